"""A minimal chat app: streaming replies with per-session memory, no server.

Run: python examples/chat_app.py   (type /exit to quit)
"""

from contextwise import Pipeline, Reply

pipeline = Pipeline()
session = "chat-app"
while (line := input("you> ").strip()) != "/exit":
    for item in pipeline.stream([{"role": "user", "content": line}], session=session,
                                max_tokens=128):
        if isinstance(item, Reply):
            print(f"\n  [{item.usage.prompt_tokens} + {item.usage.completion_tokens} tokens]")
        else:
            print(item, end="", flush=True)
