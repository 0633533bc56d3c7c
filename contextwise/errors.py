"""The error tree. Every error contextwise raises on purpose is a ContextwiseError.

Bad input (a message, a tool, a parameter, a policy) raises an error that is
also a ValueError and names what was wrong and where; failures inside the
serving path raise BackendError; a full queue raises Overloaded. Nothing is
ever disguised as model output.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "Cancelled",
    "ContextOverflow",
    "ContextwiseError",
    "InputError",
    "ModelNotFound",
    "Overloaded",
    "PolicyError",
    "StageError",
]


class ContextwiseError(Exception):
    """Base of every error contextwise raises on purpose."""


class InputError(ContextwiseError, ValueError):
    """A request is malformed. `where` names the field, e.g. ``messages[3].role``."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


class PolicyError(ContextwiseError, ValueError):
    """A policy (or a policy file) is invalid."""


class StageError(ContextwiseError):
    """A middleware stage failed."""


class BackendError(ContextwiseError):
    """The model backend failed to load or to generate."""


class ModelNotFound(BackendError):
    """The requested model is not installed and cannot be fetched."""


class ContextOverflow(BackendError, ValueError):
    """The prompt plus the reserved output tokens do not fit the model window."""

    def __init__(self, prompt_tokens: int, reserved: int, window: int, what: str = "prompt"):
        self.prompt_tokens = prompt_tokens
        self.reserved = reserved
        self.window = window
        self.over_by = prompt_tokens + reserved - window
        super().__init__(
            f"{what} is {prompt_tokens} tokens and {reserved} are reserved for output, "
            f"but the window is {window}: over by {self.over_by} tokens"
        )


class Overloaded(ContextwiseError):
    """The serving queue is full; retry later."""


class Cancelled(ContextwiseError):
    """The caller stopped listening (a stream was closed); generation was stopped."""
