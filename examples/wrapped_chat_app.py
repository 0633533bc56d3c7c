"""A chat app that already has a model function: `contextwise.wrap` puts the cache,
summaries, pruning and quarantine in front of it. No server.

    python examples/wrapped_chat_app.py            # scripted, then prints what was saved
    OPENAI_BASE_URL=... OPENAI_API_KEY=... OPENAI_MODEL=... python examples/wrapped_chat_app.py

With OPENAI_BASE_URL set it wraps the `openai` client (any OpenAI-compatible
endpoint, e.g. `contextwise serve`); otherwise a plain transformers call of the
embedded SmolLM2 model, written the way an app would call its own model.
"""

import os

import contextwise


def hosted_model(messages: list[dict], max_tokens: int = 128) -> str:
    from openai import OpenAI

    client = OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY
    out = client.chat.completions.create(model=os.environ.get("OPENAI_MODEL", "default"),
                                         messages=messages, max_tokens=max_tokens)
    return out.choices[0].message.content or ""


def local_model(messages: list[dict], max_tokens: int = 128) -> str:
    from contextwise.backends.loading import load_model

    loaded = load_model("smollm2-135m-instruct")  # the embedded model, as plain transformers
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


fn = hosted_model if os.environ.get("OPENAI_BASE_URL") else local_model
ask = contextwise.wrap(fn, model=os.environ.get("OPENAI_MODEL", "smollm2-135m-instruct-hf"))

script = [
    ("ana", "What is the capital of Portugal?"),
    ("bob", "what is the capital of portugal"),       # another user: exact cache hit
    ("cleo", "Tell me the capital city of Portugal"),  # reworded: semantic cache hit
    ("ana", "And what is its population?"),            # follows Ana's own conversation
]
for user, text in script:
    reply = ask.chat([{"role": "user", "content": text}], session=f"app-{user}", max_tokens=48)
    hit = next((r["hit"] for r in reply.trace.of("cache") if r.get("hit")), None)
    print(f"{user:>5}> {text}\n  bot> {reply.text.strip()[:100]}"
          f"  [{'cache ' + hit if hit else 'model'}, {reply.latency_s:.2f} s]")

ask.pipeline.cache.invalidate(session="app-ana")  # tidy up the example's own entries
