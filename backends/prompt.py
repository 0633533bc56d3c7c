"""Counting a call's prompt in model tokens without loading the model.

The pipeline counts prompts for budget fit and for the ledger's passthrough
figures. A cache hit never reaches the model, so loading weights just to count
would cost more than the hit saves: `PromptCounter` loads the tokenizer and
the config alone and renders exactly as the local backend does.
"""

from __future__ import annotations

from typing import Any

from contextwise.backends.chat_format import TOOL_CALL_OPEN, template_messages

from contextwise.types import Call, Tool

__all__ = ["PromptCounter", "forced_tools", "render_prompt"]


def forced_tools(call: Call) -> list[Tool] | None:
    """Tools to constrain to when the call must be a tool call, else None."""
    choice = call.params.tool_choice
    if choice == "required":
        return list(call.tools)
    if choice not in ("auto", "none"):
        tool = call.tool(choice)
        return [tool] if tool else None
    return None


def render_prompt(tokenizer: Any, call: Call) -> str:
    """The prompt text the model sees for `call` (chat template, tools, forced-call tag)."""
    text = tokenizer.apply_chat_template(
        template_messages(call), tokenize=False, add_generation_prompt=True
    )
    if forced_tools(call):
        text += TOOL_CALL_OPEN  # the model continues inside the tag
    return str(text)


class PromptCounter:
    """`prompt_tokens(call)` and `context_window` of a model, from its tokenizer and config."""

    def __init__(self, model: str, cache_dir: str | None = None,
                 max_context_tokens: int | None = None):
        from contextwise.backends.loading import load_tokenizer

        self.tokenizer, window = load_tokenizer(model, cache_dir)
        self.context_window = min(window, max_context_tokens or window)

    def prompt_tokens(self, call: Call) -> int:
        return len(self.tokenizer(render_prompt(self.tokenizer, call),
                                  add_special_tokens=False)["input_ids"])
