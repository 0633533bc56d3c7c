"""The prune stage: drop what the model does not need before it reads it.

Agent conversations grow by repetition: the same question asked twice, the same
tool called again with the same arguments, a 4,000-token tool result of which
the question needs two records. This stage removes, in order:

1. superseded tool results: a later call of the same tool with the same
   arguments returned a fresher result (`drop_superseded`);
2. exact duplicates (same role, same text) and near duplicates (embedding
   cosine >= `dedupe_similarity`, same role, same identifiers: "order 123" and
   "order 124" are never merged). We keep the LATEST occurrence: it sits
   closest to the question, for tool results it is the fresher data, a repeated
   question stays next to its answer, and it agrees with superseding. The
   system head is never touched and the last user message (the query) is
   never dropped;
3. stale tool results: more than `stale_tool_results_after` turns old
   (a result is k turns old when k user messages came after it);
4. query-aware chunk pruning: tool results, non-head system documents and
   older user messages above `long_item_tokens` are cut to `keep_tokens` with
   `select_chunks` against the last user message (plus, for a tool result, the
   call that produced it). The results the model is about to read (after the
   last user message) are still cut, since they are usually the biggest items,
   but get twice the budget (`FRESH_KEEP_FACTOR`): they are what the answer
   comes from. The last user message itself is the query and is never cut.

Tool-call integrity: work happens on `units()` (an assistant tool call with its
results). A removed tool result becomes a short placeholder that keeps its
`tool_call_id`; when every result of a unit goes (and none of its calls is
still waiting for a result), the whole unit goes, assistant message included.
No assistant call is ever left without its results, no result without its call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from contextwise.middleware.base import ANext, Stage
from contextwise.middleware.context import (
    EmbedderSource,
    coerce_policy,
    embedder_getter,
    latest_query,
    message_tokens,
    record,
    split_head,
    turn_index,
    units,
)
from contextwise.retrievers.chunks import identifiers, select_chunks

from contextwise.policy import Prune
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Reply, ToolCall

__all__ = ["FRESH_KEEP_FACTOR", "NEAR_DUP_MAX_TOKENS", "PruneStage", "placeholder"]

FRESH_KEEP_FACTOR = 2  # results after the last user message keep this many times keep_tokens
# The embedder reads 256 word pieces: longer texts would be compared by their
# beginning only, so near-duplicate detection stops here (exact duplicates do not).
NEAR_DUP_MAX_TOKENS = 180

_REASONS = {
    "superseded": "superseded by a later call",
    "duplicate": "same as a later result",
    "near_duplicate": "nearly the same as a later result",
    "stale": "stale, {age} turns old",
}


def placeholder(tool: str, reason: str, age: int = 0) -> str:
    """The short text that replaces a removed tool result."""
    return f"[result of {tool} omitted: {_REASONS[reason].format(age=age)}]"



class PruneStage(Stage):
    """Drops duplicates, superseded and stale tool results; cuts long items to what
    the query needs. `apply(call)` needs no model (only the sentence embedder)."""

    name = "prune"

    def __init__(self, policy: Prune | Mapping[str, Any] | None = None, *,
                 embedder: EmbedderSource = None):
        self.policy = coerce_policy(policy, Prune)
        self._embedder = embedder_getter(embedder)

    # -- stage contract

    async def acall(self, call: Call, anext: ANext) -> Reply:
        # Embedding a long tool result takes a while on a CPU: keep the loop free.
        call = await asyncio.to_thread(self.apply, call)
        return self.on_reply(call, await anext(call))

    def apply(self, call: Call) -> Call:
        msgs = call.messages
        head = split_head(msgs)
        last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
        calls = {tc.id: tc for m in msgs for tc in m.tool_calls or ()}
        turns = turn_index(msgs)
        current = turns[-1] if turns else 0

        verdict: dict[int, str] = {}
        if self.policy.drop_superseded:
            self._superseded(msgs, head, calls, verdict)
        self._exact_duplicates(msgs, head, last_user, verdict)
        if self.policy.dedupe_similarity is not None:
            self._near_duplicates(msgs, head, last_user, verdict)
        if self.policy.stale_tool_results_after is not None:
            limit = self.policy.stale_tool_results_after
            for i in range(head, len(msgs)):
                if msgs[i].role == "tool" and i not in verdict and current - turns[i] > limit:
                    verdict[i] = "stale"

        out, counts, items = self._apply_verdicts(msgs, calls, verdict, turns, current)
        if self.policy.query_aware:
            out = self._cut_long(call, out, counts, items, last_user, calls)
        new = call.model_copy(update={"messages": [m for _, m in out]})
        record(call, self.name, msgs, new.messages, **counts, items=items)
        return new

    # -- what goes

    @staticmethod
    def _superseded(msgs: list[Message], head: int, calls: dict[str, ToolCall],
                    verdict: dict[int, str]) -> None:
        seen: set[tuple[str, str]] = set()
        for i in range(len(msgs) - 1, head - 1, -1):
            m = msgs[i]
            tc = calls.get(m.tool_call_id or "") if m.role == "tool" else None
            if tc is None:
                continue
            key = (tc.name, json.dumps(tc.arguments, sort_keys=True, default=str))
            if key in seen:
                verdict[i] = "superseded"
            seen.add(key)

    @staticmethod
    def _candidate(m: Message) -> bool:
        """Messages dedupe may remove: user, tool, and plain assistant text."""
        if not m.content or not m.content.strip():
            return False
        return m.role in ("user", "tool") or (m.role == "assistant" and not m.tool_calls)

    def _exact_duplicates(self, msgs: list[Message], head: int, last_user: int,
                          verdict: dict[int, str]) -> None:
        seen: set[tuple[str, str]] = set()
        for i in range(len(msgs) - 1, head - 1, -1):
            m = msgs[i]
            if not self._candidate(m) or i in verdict:
                continue
            key = (m.role, " ".join(m.text.split()))
            if key in seen and i != last_user:
                verdict[i] = "duplicate"
            seen.add(key)

    def _near_duplicates(self, msgs: list[Message], head: int, last_user: int,
                         verdict: dict[int, str]) -> None:
        idx = [i for i in range(head, len(msgs))
               if i not in verdict and self._candidate(msgs[i])
               and message_tokens(msgs[i]) <= NEAR_DUP_MAX_TOKENS]
        if len(idx) < 2:
            return
        vectors = self._embedder().embed([msgs[i].text for i in idx])
        sims = vectors @ vectors.T
        ids = [frozenset(identifiers(msgs[i].text)) for i in idx]
        threshold = float(self.policy.dedupe_similarity or 1.0)
        kept: list[int] = []  # positions in idx, later messages first
        for p in range(len(idx) - 1, -1, -1):
            i = idx[p]
            twin = i != last_user and any(
                msgs[idx[q]].role == msgs[i].role and ids[q] == ids[p]
                and float(sims[p, q]) >= threshold
                for q in kept
            )
            if twin:
                verdict[i] = "near_duplicate"
            else:
                kept.append(p)

    # -- applying it without orphans

    @staticmethod
    def _apply_verdicts(
        msgs: list[Message], calls: dict[str, ToolCall], verdict: dict[int, str],
        turns: list[int], current: int,
    ) -> tuple[list[tuple[int, Message]], dict[str, int], list[dict[str, Any]]]:
        counts = {k: 0 for k in ("superseded", "duplicate", "near_duplicate", "stale")}
        counts |= {"units_dropped": 0, "messages_dropped": 0, "placeholders": 0}
        items: list[dict[str, Any]] = []
        out: list[tuple[int, Message]] = []

        def note(i: int, action: str) -> None:
            counts[verdict[i]] += 1
            items.append({"index": i, "role": msgs[i].role, "reason": verdict[i],
                          "action": action})

        for unit in units(msgs):
            first = msgs[unit[0]]
            results = unit[1:]
            if first.role == "assistant" and first.tool_calls and results:
                answered = {msgs[i].tool_call_id for i in results}
                pending = {tc.id for tc in first.tool_calls} - answered
                if not pending and all(i in verdict for i in results):
                    for i in results:  # the whole unit goes, call and results together
                        note(i, "unit_dropped")
                    counts["units_dropped"] += 1
                    counts["messages_dropped"] += len(unit)
                    continue
                out.append((unit[0], first))
                for i in results:
                    out.append((i, PruneStage._placeholder(msgs, i, calls, verdict, turns,
                                                           current, counts, note)))
                continue
            i = unit[0]
            if i not in verdict:
                out.append((i, first))
            elif first.role == "tool":  # a tool message outside a unit: never removed
                out.append((i, PruneStage._placeholder(msgs, i, calls, verdict, turns, current,
                                                       counts, note)))
            else:
                note(i, "dropped")
                counts["messages_dropped"] += 1
        return out, counts, items

    @staticmethod
    def _placeholder(msgs: list[Message], i: int, calls: dict[str, ToolCall],
                     verdict: dict[int, str], turns: list[int], current: int,
                     counts: dict[str, int], note: Any) -> Message:
        m = msgs[i]
        if i not in verdict:
            return m
        tc = calls.get(m.tool_call_id or "")
        text = placeholder(tc.name if tc else "tool", verdict[i], current - turns[i])
        if count_text(text) >= count_text(m.text):
            return m  # the result is already shorter than any note about it
        note(i, "placeholder")
        counts["placeholders"] += 1
        return m.model_copy(update={"content": text})

    # -- cutting long items

    def _cut_long(self, call: Call, out: list[tuple[int, Message]], counts: dict[str, int],
                  items: list[dict[str, Any]], last_user: int, calls: dict[str, ToolCall]
                  ) -> list[tuple[int, Message]]:
        policy = self.policy
        query = latest_query(call)
        head = split_head(call.messages)
        counts["chunk_pruned"] = 0
        counts["chunk_tokens_cut"] = 0
        result: list[tuple[int, Message]] = []
        for i, m in out:
            eligible = (
                i >= head and i != last_user and m is call.messages[i] and bool(m.content)
                and (m.role in ("tool", "user", "system"))
            )
            before = count_text(m.content or "") if eligible else 0
            if not eligible or before <= policy.long_item_tokens:
                result.append((i, m))
                continue
            fresh = i > last_user
            budget = policy.keep_tokens * (FRESH_KEEP_FACTOR if fresh else 1)
            q = query
            tc = calls.get(m.tool_call_id or "") if m.role == "tool" else None
            if tc is not None:  # the call says what the result was fetched for
                q = f"{query}\n{tc.name} {json.dumps(tc.arguments, default=str)}"
            text = select_chunks(q, m.content or "", budget, embedder=self._embedder,
                                 dense_query=query)
            after = count_text(text)
            if after < before:
                counts["chunk_pruned"] += 1
                counts["chunk_tokens_cut"] += before - after
                items.append({"index": i, "role": m.role, "reason": "long", "action": "cut",
                              "tokens_before": before, "tokens_after": after, "fresh": fresh})
                m = m.model_copy(update={"content": text})
            result.append((i, m))
        return result
