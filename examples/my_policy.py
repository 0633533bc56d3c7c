"""A policy file: `contextwise demo --policy examples/my_policy.py`.

Every stage has its own sub-policy; `None` turns a stage off.
"""

from contextwise import Policy
from contextwise.policy import (
    Budget,
    Local,
    Prune,
    Quarantine,
    Storage,
    Summarize,
    Templating,
    ToolLoadout,
)

policy = Policy(
    templating=Templating(template="agent@1", variables={"role": "a concise travel agent"},
                          max_words=60),
    quarantine=Quarantine(detectors=["injection", "tool_error", "contradiction", "oversize"]),
    summarize=Summarize(trigger_tokens=1500, keep_last=4, pin=[r"confirmation \S+"]),
    prune=Prune(dedupe_similarity=0.95, stale_tool_results_after=3),
    tools=ToolLoadout(top_k=5),
    budget=Budget(max_context_tokens=4096, max_output_tokens=128),
    backend=Local(model="smollm2-135m-instruct", device="auto", dtype="auto"),
    storage=Storage(path=None, ledger=True),
)
