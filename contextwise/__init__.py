"""contextwise: cheaper calls to a local model, through context engineering and efficient serving.

    from contextwise import Pipeline
    reply = Pipeline()([{"role": "user", "content": "Hi!"}])
"""

from contextwise.errors import (
    BackendError,
    Cancelled,
    ContextOverflow,
    ContextwiseError,
    InputError,
    ModelNotFound,
    Overloaded,
    PolicyError,
    StageError,
)
from contextwise.pipeline import Pipeline
from contextwise.policy import Policy
from contextwise.types import Call, Message, Params, Reply, Tool, ToolCall, Trace, Usage
from contextwise.wrapping import wrap

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Call",
    "Cancelled",
    "ContextOverflow",
    "ContextwiseError",
    "InputError",
    "Message",
    "ModelNotFound",
    "Overloaded",
    "Params",
    "Pipeline",
    "Policy",
    "PolicyError",
    "Reply",
    "StageError",
    "Tool",
    "ToolCall",
    "Trace",
    "Usage",
    "wrap",
]


def __getattr__(name: str) -> object:
    # LangChain is an optional extra (`contextwise[langchain]`): import it only on use.
    if name == "ChatContextwise":
        from contextwise.chat_model import ChatContextwise

        return ChatContextwise
    raise AttributeError(f"module 'contextwise' has no attribute {name!r}")
