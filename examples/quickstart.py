"""The pipeline as a plain callable, on the embedded model. Run: python examples/quickstart.py"""

from contextwise import Pipeline, Policy
from contextwise.policy import Budget


def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: City name.
    """
    return f"18 C and sunny in {city}"


pipeline = Pipeline(Policy(budget=Budget(max_output_tokens=64)))
reply = pipeline([{"role": "user", "content": "What's the weather in Lisbon?"}],
                 tools=[get_weather], tool_choice="required", session="quickstart")
call = reply.tool_calls[0]
result = get_weather(**call.arguments)
reply = pipeline([{"role": "tool", "tool_call_id": call.id, "content": result}],
                 session="quickstart", tool_choice="none")
print(reply.text, reply.usage)
