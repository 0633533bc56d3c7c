"""Tool loadout: show the model only the tools this request needs.

Every tool schema in a request is paid for in prompt tokens, on every call of
an agent loop; a 200-tool catalogue can cost more than the conversation. This
stage keeps the `top_k` tools a `ToolRetriever` ranks best for the request,
plus the ones that must stay whatever the ranking says:

- `policy.always` (names missing from the catalogue are ignored and reported),
- tools the conversation already called, when `keep_called` (their calls and
  results stay readable, and the agent often calls them again),
- the tool `tool_choice` names, if any.

With `tool_choice="none"` nothing is retrieved: only the tools already called
(and `always`) stay, since the model may not call any.

Kept tools stay in the catalogue's original order. Nothing happens when the
catalogue already has at most `top_k` tools (no model is loaded then).

What the request is about: the last user message. In an agent loop the last
message is often a tool result and the user spoke several steps earlier; the
next tool depends on both the goal and what just came back. So when messages
follow the last user message, the request is ranked twice, by the user message
and by the user message plus the latest tool result / assistant text, and each
tool keeps its better score (both are z-scores over the same catalogue, so they
compare).

An agent sends the same catalogue on every call: one `ToolRetriever` is kept
per catalogue hash (LRU), so the index is built once, not per call; with
`cache_dir` it is also kept on disk across processes. With `learn_from_calls`,
the tool calls the model makes are learned as usage examples of the query that
led to them (off by default: a model that picks the wrong tool would teach it).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from contextwise.middleware.base import ANext, Stage
from contextwise.middleware.context import (
    EmbedderSource,
    embedder_getter,
    latest_query,
    tool_tokens,
)
from contextwise.retrievers.tools import ToolRetriever, catalogue_hash

from contextwise.policy import ToolLoadout
from contextwise.types import Call, Message, Reply, Tool

__all__ = ["ToolLoadoutStage", "schema_tokens"]

RETRIEVERS = 16  # catalogues kept per stage
CONTEXT_CHARS = 1000  # how much of the latest tool result / assistant text joins the query
SHORT_KEY = 16


# Kept under its old name: the trace's schema token counts.
schema_tokens = tool_tokens


class ToolLoadoutStage(Stage):
    """Keep the `top_k` tools the request needs (plus always / called / forced ones)."""

    name = "tools"

    def __init__(
        self,
        policy: ToolLoadout | None = None,
        *,
        embedder: EmbedderSource = None,
        cache_dir: str | Path | None = None,
        examples: Mapping[str, Sequence[str]] | None = None,
        learn_from_calls: bool = False,
    ):
        self.policy = policy or ToolLoadout()
        self.cache_dir = cache_dir
        self.examples = {k: list(v) for k, v in (examples or {}).items()}
        self.learn_from_calls = learn_from_calls
        self._embedder = embedder_getter(embedder)
        self._retrievers: OrderedDict[str, tuple[ToolRetriever, dict[str, int]]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ retrievers

    def retriever(self, tools: Sequence[Tool]) -> ToolRetriever:
        """The retriever for this catalogue (built once per catalogue hash)."""
        return self._entry(tools, catalogue_hash(tools))[0]

    def _entry(self, tools: Sequence[Tool], key: str) -> tuple[ToolRetriever, dict[str, int]]:
        with self._lock:
            hit = self._retrievers.get(key)
            if hit is not None:
                self._retrievers.move_to_end(key)
                return hit
        names = {t.name for t in tools}
        retriever = ToolRetriever(
            tools,
            embedder=self._embedder,
            lexical_weight=self.policy.lexical_weight,
            cache_dir=self.cache_dir,
            examples={k: v for k, v in self.examples.items() if k in names},
        )
        entry = (retriever, {t.name: schema_tokens(t) for t in tools})
        with self._lock:
            self._retrievers[key] = entry
            while len(self._retrievers) > RETRIEVERS:
                self._retrievers.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ request side

    def apply(self, call: Call) -> Call:
        tools = call.tools
        p = self.policy
        if len(tools) <= p.top_k:
            n = sum(schema_tokens(t) for t in tools)
            call.trace.add(self.name, tools_before=len(tools), tools_after=len(tools),
                           tokens_before=n, tokens_after=n, passthrough=True,
                           reason=f"at most top_k={p.top_k} tools")
            return call
        if call.params.tool_choice == "none":
            return self._no_calls(call)
        views = request_views(call.messages, latest_query(call))
        if not views:
            n = sum(schema_tokens(t) for t in tools)
            call.trace.add(self.name, tools_before=len(tools), tools_after=len(tools),
                           tokens_before=n, tokens_after=n, passthrough=True,
                           reason="no query to rank tools by")
            return call
        key = catalogue_hash(tools)
        retriever, tokens = self._entry(tools, key)
        total = sum(tokens.values())

        # each tool keeps its best score over the views
        best: dict[str, float] = {}
        for ranked in retriever.search_many(views, p.top_k):
            for tool, score in ranked:
                best[tool.name] = max(score, best.get(tool.name, float("-inf")))
        retrieved = sorted(best.items(), key=lambda kv: -kv[1])[: p.top_k]

        names = {t.name for t in tools}
        always = [n for n in p.always if n in names]
        unknown_always = [n for n in p.always if n not in names]
        called = [n for n in called_tools(call.messages) if n in names] if p.keep_called else []
        choice = call.params.tool_choice
        forced = [choice] if choice in names else []
        keep = {n for n, _ in retrieved} | set(always) | set(called) | set(forced)
        kept = [t for t in tools if t.name in keep]  # catalogue order

        data: dict[str, object] = {
            "tools_before": len(tools),
            "tools_after": len(kept),
            "tokens_before": total,
            "tokens_after": sum(tokens[t.name] for t in kept),
            "kept": [t.name for t in kept],
            "dropped": len(tools) - len(kept),
            "retrieved": [[n, round(s, 3)] for n, s in retrieved],
            "views": len(views),
            "catalogue": key[:SHORT_KEY],
        }
        if always:
            data["always"] = always
        if unknown_always:
            data["unknown_always"] = unknown_always
        if called:
            data["called"] = called
        if forced:
            data["forced"] = forced[0]
        call.trace.add(self.name, **data)
        return call.model_copy(update={"tools": kept})

    def _no_calls(self, call: Call) -> Call:
        """tool_choice "none": the model may not call anything, so schemas are dead weight;
        keep only the tools the conversation already called (and `always`), so the
        calls in the history still read against their schema."""
        names = {t.name for t in call.tools}
        keep = set(called_tools(call.messages)) | {n for n in self.policy.always if n in names}
        kept = [t for t in call.tools if t.name in keep]
        call.trace.add(
            self.name, tools_before=len(call.tools), tools_after=len(kept),
            tokens_before=sum(schema_tokens(t) for t in call.tools),
            tokens_after=sum(schema_tokens(t) for t in kept), kept=[t.name for t in kept],
            reason="tool_choice none: only tools already called",
            catalogue=catalogue_hash(call.tools)[:SHORT_KEY],
        )
        return call.model_copy(update={"tools": kept})

    # ------------------------------------------------------------------ reply side

    def on_reply(self, call: Call, reply: Reply) -> Reply:
        if self.learn_from_calls and reply.tool_calls:
            self._learn(call, reply)
        return reply

    def _learn(self, call: Call, reply: Reply) -> None:
        records = call.trace.of(self.name)
        short = records[-1].get("catalogue") if records else None
        query = latest_query(call)
        if not short or not query.strip():
            return
        with self._lock:
            entry = next((e for k, e in self._retrievers.items() if k.startswith(short)), None)
        if entry is None:
            return
        retriever = entry[0]
        known = {t.name for t in retriever.tools}
        pairs = [(query, tc.name) for tc in reply.tool_calls if tc.name in known]
        if pairs:
            retriever.learn_many(pairs)
            with self._lock:  # remembered for other catalogues (a tool added later) too
                for q, name in pairs:
                    queries = self.examples.setdefault(name, [])
                    if q not in queries:
                        queries.append(q)

    async def acall(self, call: Call, anext: ANext) -> Reply:
        # ranking embeds the query (and the first call builds the index): off the loop
        call = await asyncio.to_thread(self.apply, call)
        reply = await anext(call)
        if self.learn_from_calls and reply.tool_calls:
            await asyncio.to_thread(self._learn, call, reply)
        return reply


def called_tools(messages: Sequence[Message]) -> list[str]:
    """Names of the tools the conversation called, first call first, no repeats."""
    seen: dict[str, None] = {}
    for m in messages:
        for tc in m.tool_calls or ():
            seen.setdefault(tc.name, None)
    return list(seen)


def request_views(messages: Sequence[Message], query: str) -> list[str]:
    """What to rank tools by: the last user message and, when an agent step follows
    it, that message plus the latest tool result and assistant text."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user" and m.content),
                    default=-1)
    tail = messages[last_user + 1:]
    context: list[str] = []
    tool_result = next((m.text for m in reversed(tail) if m.role == "tool" and m.text), "")
    said = next((m.text for m in reversed(tail) if m.role == "assistant" and m.text), "")
    for text in (said, tool_result):
        if text.strip():
            context.append(text.strip()[:CONTEXT_CHARS])
    views = [query] if query.strip() else []
    if context:
        views.append("\n".join([query, *context]).strip())
    return views
