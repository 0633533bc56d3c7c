"""A policy file: `contextwise demo --policy examples/my_policy.py`."""

from contextwise import Policy
from contextwise.policy import Budget, Local, Storage

policy = Policy(
    budget=Budget(max_context_tokens=4096, max_output_tokens=128),
    backend=Local(model="smollm2-135m-instruct", device="auto", dtype="auto"),
    storage=Storage(path=None, ledger=True),
)
