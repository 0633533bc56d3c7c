"""The context stages on their own, without a chat model.

    python examples/context_stages.py

Builds an agent request with 12 tools and a long tool result, runs the
stages' `apply(call) -> Call` directly and prints what each one cut. Only the
embedder (all-MiniLM-L6-v2, shipped in a wheel) is loaded.
"""

import json

from contextwise.memory.store import Store
from contextwise.middleware import PruneStage, QuarantineStage, ToolLoadoutStage
from contextwise.retrievers import ToolRetriever

from contextwise import Call
from contextwise.policy import Prune, ToolLoadout

TOOLS = [
    {"type": "function", "function": {"name": name, "description": description}}
    for name, description in [
        ("get_weather", "Weather forecast for a city"), ("search_flights", "Search flights"),
        ("convert_currency", "Convert money between currencies"), ("book_hotel", "Book a hotel"),
        ("send_email", "Send an email"), ("translate", "Translate text"),
        ("stock_quote", "Latest stock price"), ("track_parcel", "Track a parcel"),
        ("set_reminder", "Set a reminder"), ("play_music", "Play a song"),
        ("get_news", "Search news articles"), ("book_flight", "Book a seat on a flight"),
    ]
]
FLIGHTS = json.dumps([{"flight": f"TP{1000 + i}", "departs": f"{6 + i % 12:02d}:15",
                       "fare_eur": 90 + 7 * i} for i in range(60)])

messages = [
    {"role": "user", "content": "Which flight leaves at 09:15? I want TP1003 if possible."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "search_flights",
                                                      "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": FLIGHTS},
    {"role": "user", "content": "Book TP1003 for me if its fare is under 120 EUR."},
]

call = Call.build(messages, tools=TOOLS)
call = QuarantineStage(store=Store(":memory:")).apply(call)
call = PruneStage(Prune(long_item_tokens=200, keep_tokens=120)).apply(call)
call = ToolLoadoutStage(ToolLoadout(top_k=3)).apply(call)
for record in call.trace.records:
    data = record.data
    print(f"{record.stage:>10}: tokens {data.get('tokens_before')} -> {data.get('tokens_after')}")
print("tools kept:", [t.name for t in call.tools])
print("tool result now:", call.messages[2].content[:200], "...")

for tool, score in ToolRetriever(TOOLS).search("convert 20 euros to dollars", k=3):
    print(f"{tool.name}: {score:.3f}")
