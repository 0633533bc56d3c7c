"""A LangChain agent on the embedded local model, with contextwise as agent middleware.

    python examples/langchain_agent.py

`create_agent` gets 32 tools (5 it needs, 27 it never calls), `ChatContextwise`
(the embedded SmolLM2-135M, offline) and `ContextwiseMiddleware`, which applies
the policy to every model call: quarantine, summaries, pruning, tool loadout
(32 tools -> the few the question needs), budget fit and the response cache.
At the end it prints the ledger's savings table.

The 135M model rarely decides to call a tool on its own, so a small middleware
below asks for a tool call on the first model call of each user turn and for a
plain answer once the tool has replied (`tool_choice`, which ChatContextwise
turns into grammar-constrained decoding).
"""

import time
import uuid

from contextwise.middleware.langchain import ContextwiseMiddleware
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import HumanMessage
from langchain_core.tools import StructuredTool, tool

from contextwise import ChatContextwise, Policy
from contextwise.demo import (
    OTHER_TOOLS,
    book_hotel,
    convert_currency,
    find_restaurants,
    get_weather,
    search_flights,
)
from contextwise.policy import Cache, Storage, ToolLoadout
from contextwise.report import print_report, summarize


def _unused(name: str, description: str) -> StructuredTool:
    def run(query: str) -> str:
        return f"{name} is not part of this example"

    return StructuredTool.from_function(run, name=name, description=description)


TOOLS = [tool(f) for f in (get_weather, search_flights, convert_currency, find_restaurants,
                           book_hotel)]
TOOLS += [_unused(name, desc) for name, desc in OTHER_TOOLS]
TOOLS += [_unused("get_exchange_history", "Historical exchange rates of a currency pair."),
          _unused("find_parking", "Find parking garages near an address.")]


class ToolFirst(AgentMiddleware):
    """A tool call first on each user turn, then a plain answer from its result."""

    def wrap_model_call(self, request, handler):
        fresh_turn = isinstance(request.messages[-1], HumanMessage)
        return handler(request.override(tool_choice="any" if fresh_turn else "none"))

    async def awrap_model_call(self, request, handler):
        fresh_turn = isinstance(request.messages[-1], HumanMessage)
        return await handler(request.override(tool_choice="any" if fresh_turn else "none"))


policy = Policy(tools=ToolLoadout(top_k=3), cache=Cache(side_effect_tools=["book_hotel"]))
contextwise = ContextwiseMiddleware(policy)
# The chat model runs its own pipeline too: give it no stages and no ledger of its own,
# the middleware does the work and the bookkeeping.
model = ChatContextwise(policy=Policy(quarantine=None, summarize=None, prune=None, tools=None,
                                      cache=None, storage=Storage(ledger=False)),
                        max_tokens=64)
agent = create_agent(model, TOOLS, middleware=[contextwise, ToolFirst()],
                     system_prompt="You are a concise travel assistant. Use the tools, then "
                                   "answer in one sentence.")

started = time.time()
thread = {"configurable": {"thread_id": "agent-" + uuid.uuid4().hex[:8]}}
for question in ("What's the weather in Lisbon today?",
                 "How much is 250 EUR in USD?",
                 "Recommend a seafood restaurant in Lisbon."):
    t0 = time.perf_counter()
    state = agent.invoke({"messages": [{"role": "user", "content": question}]}, thread)
    calls = [tc["name"] for m in state["messages"] for tc in getattr(m, "tool_calls", [])]
    print(f"user> {question}\n  tools called: {calls}\n"
          f"  bot> {state['messages'][-1].text.strip()[:120]}  ({time.perf_counter() - t0:.1f} s)")

if contextwise.ledger is not None:
    print_report(summarize(contextwise.ledger, policy.pricing, since=started))
