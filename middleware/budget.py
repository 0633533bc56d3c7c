"""Budget fit: the last stage before the model; the prompt always fits the window.

The budget is the model window (or the policy's smaller `max_context_tokens`)
minus the tokens reserved for the reply (`max_tokens`). When the prompt is over,
whole units (an assistant tool call with its results, or one message) are
dropped oldest first. Pinned content is never dropped: the system head (which
holds the template and any running summary), everything from the last user
message on (the current turn, with the tool calls and results the model is
about to read) and the tool schemas. If pinned content alone does not fit,
`ContextOverflow` says by how many tokens.

Counting: pass `counter` (the pipeline passes the serving model's exact
tokenizer count); the default counts cl100k tokens, which is right for hosted
models and an estimate for local ones. An exact count renders and tokenizes
the whole prompt, so it is skipped when the memoized cl100k estimate, scaled
by the largest exact/estimate ratio seen so far plus a margin, is clearly
under the limit; the first call, and any call near the limit, count exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from contextwise.errors import ContextOverflow
from contextwise.policy import Budget
from contextwise.types import Call

from .base import Stage
from .context import count_messages, message_tokens, record, split_head, tool_tokens, units

__all__ = ["BudgetStage", "approx_prompt_tokens"]

SAFETY = 1.25  # head-room on the calibrated estimate before we trust it without counting


def approx_prompt_tokens(call: Call) -> int:
    """cl100k tokens of the messages and tool schemas (+3 to prime the reply)."""
    return count_messages(call.messages) + sum(tool_tokens(t) for t in call.tools) + 3


class BudgetStage(Stage):
    name = "budget"

    def __init__(
        self,
        budget: Budget | None = None,
        *,
        window: int | Callable[[], int] | None = None,
        counter: Callable[[Call], int] | None = None,
    ):
        self.budget = budget or Budget()
        self._window = window
        self.counter = counter or approx_prompt_tokens
        self._exact = counter is not None
        self._ratio = 0.0  # largest exact/estimate seen; 0: not calibrated yet

    def limit(self, call: Call) -> tuple[int, int]:
        """(tokens the prompt may use, tokens reserved for the reply)."""
        window = self._window() if callable(self._window) else self._window
        caps = [w for w in (window, self.budget.max_context_tokens) if w]
        if not caps:
            raise ValueError("budget fit needs a window: pass window= or set max_context_tokens")
        reserve = call.params.max_tokens or self.budget.max_output_tokens
        return min(caps), reserve

    def apply(self, call: Call) -> Call:
        window, reserve = self.limit(call)
        allowed = window - reserve
        estimate = approx_prompt_tokens(call)
        if self._exact and self._ratio and estimate * self._ratio * SAFETY <= allowed:
            record(call, self.name, call.messages, call.messages,
                   prompt_tokens=round(estimate * self._ratio), limit=allowed, counted="estimate")
            return call
        n = self.counter(call)
        if self._exact:
            self._ratio = max(self._ratio, n / max(estimate, 1))
        if n <= allowed:
            record(call, self.name, call.messages, call.messages, prompt_tokens=n, limit=allowed)
            return call

        messages = call.messages
        head = split_head(messages)
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=head)
        droppable = [u for u in units(messages[head:last_user])]
        # The counter may be a model tokenizer; estimate each unit's share with
        # cl100k scaled to it, drop, then count exactly again.
        scale = n / max(approx_prompt_tokens(call), 1)
        dropped: set[int] = set()
        kept = call
        while n > allowed and droppable:
            need = n - allowed
            freed = 0.0
            while droppable and freed < need:
                unit = droppable.pop(0)
                dropped.update(head + i for i in unit)
                freed += scale * sum(message_tokens(messages[head + i]) for i in unit)
            kept = call.model_copy(
                update={"messages": [m for i, m in enumerate(messages) if i not in dropped]}
            )
            n = self.counter(kept)
        if n > allowed:
            raise ContextOverflow(
                n, reserve, window,
                what="pinned content (system prompt, current turn and tool schemas)",
            )
        record(
            call, self.name, call.messages, kept.messages,
            prompt_tokens=n, limit=allowed, dropped_messages=len(dropped),
        )
        return kept
