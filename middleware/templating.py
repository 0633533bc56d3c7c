"""Templating stage: assemble the system prompt, control output length, add few-shot examples.

The system prompt is built from, in order: the policy's template rendered with
the policy's default variables overlaid by the call's `variables`, the policy's
extra instructions, a length instruction (`max_words`), few-shot examples
picked by similarity to the query under a token budget, and finally the
caller's own system messages. It is one system message at the head: small
models follow one system message best, and later stages never prune the head,
so examples cannot be summarized away or deduplicated against the user's turn.

Output length is controlled twice: the instruction asks for at most N words
and, for plain-text answers, `max_tokens` is lowered to what N words need, so
an answer that ignores the instruction is still cut. Calls with tools keep
their `max_tokens`: a truncated tool call would be worse than a long one.
"""

from __future__ import annotations

import math
from typing import Any

from contextwise.policy import Example, Templating
from contextwise.types import Call, Message

from .base import Stage
from .context import EmbedderSource, embedder_getter, latest_query, record, split_head
from .templates import TemplateRegistry, default_registry

__all__ = ["TOKENS_PER_WORD", "TemplatingStage"]

# English prose runs ~1.3 tokens per word; leave room for punctuation and a last word.
TOKENS_PER_WORD = 1.6


class TemplatingStage(Stage):
    name = "templating"

    def __init__(
        self,
        policy: Templating | None = None,
        *,
        embedder: EmbedderSource = None,
        registry: TemplateRegistry | None = None,
    ):
        self.policy = policy or Templating()
        self.registry = registry or default_registry
        if self.policy.template is not None:
            self.registry.get(self.policy.template)  # unknown template: fail at build time
        self._embedder = embedder_getter(embedder)
        self._examples: Any = None  # ExampleRetriever, built on first use

    def _pick_examples(self, query: str) -> list[Example]:
        p = self.policy
        if not p.examples or p.max_examples == 0 or not query:
            return []
        if self._examples is None:
            from contextwise.retrievers.examples import ExampleRetriever

            self._examples = ExampleRetriever(list(p.examples), embedder=self._embedder())
        return self._examples.select(
            query, max_examples=p.max_examples, budget_tokens=p.examples_budget_tokens
        )

    def system_prompt(self, call: Call) -> tuple[str, dict[str, object]]:
        """The assembled system text (without the caller's own system messages) and
        what went into it, for the trace."""
        p = self.policy
        parts: list[str] = []
        info: dict[str, object] = {}
        if p.template is not None:
            template = self.registry.get(p.template)
            parts.append(template.render({**p.variables, **call.variables}))
            info["template"] = template.ref
        if p.instructions:
            parts.append(p.instructions.strip())
        if p.max_words is not None:
            parts.append(f"Answer in at most {p.max_words} words.")
        examples = self._pick_examples(latest_query(call))
        if examples:
            shots = "\n\n".join(f"User: {e.input}\nAssistant: {e.output}" for e in examples)
            parts.append("Examples of good answers:\n\n" + shots)
            info["examples"] = len(examples)
        return "\n\n".join(parts), info

    def apply(self, call: Call) -> Call:
        text, info = self.system_prompt(call)
        update: dict[str, object] = {}
        if text:
            head = split_head(call.messages)
            own = [m.content for m in call.messages[:head] if m.content]
            system = Message(role="system", content="\n\n".join([text, *own]))
            update["messages"] = [system, *call.messages[head:]]
        cap = self._max_tokens(call)
        if cap is not None:
            update["params"] = call.params.model_copy(update={"max_tokens": cap})
            info["max_tokens"] = cap
        out = call.model_copy(update=update) if update else call
        record(call, self.name, call.messages, out.messages, **info)
        return out

    def _max_tokens(self, call: Call) -> int | None:
        words = self.policy.max_words
        if words is None or (call.tools and call.params.tool_choice != "none"):
            return None
        if call.params.response_format is not None:
            return None  # JSON output is not prose; its length is the schema's business
        cap = math.ceil(words * TOKENS_PER_WORD) + 8
        current = call.params.max_tokens
        return cap if current is None or cap < current else None
