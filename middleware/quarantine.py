"""Quarantine stage: look at tool outputs before the model does, withhold what is unsafe.

Every message whose role is in `policy.roles` (tool results by default) is run
through the policy's detectors (detectors.py) once. A flagged item is stored in
the `QuarantineStore` with its reason and, with `action="placeholder"`, replaced
by a short note carrying its id:

    [quarantined q12: possible prompt injection (tool get_page); content withheld]

`action="remove"` drops flagged messages instead, except where dropping would
break the conversation: a tool message must keep answering its assistant tool
call, so it keeps a minimal `[quarantined q12]`; a system message of the head
does the same, and an assistant message that calls tools keeps its calls.

Verdicts are memoized by item key (role, tool, arguments and content) per
session, in this process and in the store, so an item is scanned once however
long the conversation grows. Items a person released (`release`, or
`contextwise quarantine release q12`) are trusted: their placeholders expand back
to the original content when a call is built, and their facts are learned.
`clean(messages)` applies the same replacement without expanding anything; the
pipeline stores its output as session history, so quarantined content never
reaches long-term memory.

Accepted JSON tool results feed the session's facts (memory/facts.py), which is
what the "contradiction" detector checks later results against. Facts belong to
a session: calls without one get no contradiction check. Detectors that
raise are reported in the trace and count as "not flagged" (the item is then
not memoized, so it is checked again next time).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contextwise.memory.facts import DEFAULT_VOLATILE, Facts, FactView
from contextwise.memory.quarantine import QuarantineRecord, QuarantineStore, content_hash
from contextwise.memory.store import Store

from contextwise.policy import Quarantine
from contextwise.types import Call, Message, Reply

from .base import ANext, Stage
from .context import EmbedderSource, record, split_head
from .detectors import Detector, Finding, Item, build_detectors, run_detectors

__all__ = ["LABELS", "QuarantineStage", "item_key", "placeholder", "release"]

LABELS = {
    "injection": "possible prompt injection",
    "tool_error": "tool error",
    "contradiction": "contradicts an earlier result",
    "oversize": "oversized content",
}
_DETAILED = ("tool_error", "contradiction", "oversize")  # their reason helps the model
PLACEHOLDER = re.compile(r"^\[quarantined (q\d+)(?::[^\n]*)?\]$")
_CLEAN = ""  # memo value of an item scanned and found clean
MEMO_SIZE = 100_000


def item_key(m: Message, tool: str | None, arguments: dict[str, Any] | None) -> str:
    """What a verdict depends on: role, tool, its arguments and the content."""
    blob = json.dumps([m.role, tool, arguments or {}, m.content or ""], sort_keys=True,
                      default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _safe(text: str) -> str:
    """No newline or ']' inside a placeholder: it must stay one recognizable token."""
    return text.replace("\n", " ").replace("]", ")")


def placeholder(rec: QuarantineRecord, *, minimal: bool = False) -> str:
    """The short note the model sees instead of a withheld item."""
    if minimal:
        return f"[quarantined {rec.id}]"
    label = LABELS.get(rec.detector, f"flagged by {rec.detector}")
    if rec.detector in _DETAILED:
        label += f": {rec.reason[:160]}"
    where = f" (tool {rec.tool})" if rec.tool else ""
    return f"[quarantined {rec.id}: {_safe(label + where)}; content withheld]"


def release(store: Store | QuarantineStore, id: str,
            volatile: Iterable[str] = DEFAULT_VOLATILE) -> QuarantineRecord:
    """Release a record (the CLI and `QuarantineStage.release` both come here): its content
    is trusted from now on, and a released JSON tool result updates the session's facts."""
    qs = store if isinstance(store, QuarantineStore) else QuarantineStore(store)
    rec = qs.release(id)
    if rec.role == "tool" and rec.session is not None:
        Facts(qs.store, volatile).learn(rec.session, rec.tool, rec.arguments, rec.content)
    return rec


@dataclass
class _Scan:
    """What one pass over the messages found (for the trace)."""

    scanned: int = 0
    checked: int = 0
    flagged: list[dict[str, Any]] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


class QuarantineStage(Stage):
    """Scans tool results (or the roles the policy names) and withholds flagged ones."""

    name = "quarantine"

    def __init__(
        self,
        policy: Quarantine | None = None,
        *,
        embedder: EmbedderSource = None,
        store: Store | None = None,
        volatile: Sequence[str] | None = None,
    ):
        self.policy = policy or Quarantine()
        self.store = store or Store()
        self.quarantine = QuarantineStore(self.store)
        if volatile is None:
            volatile = self.policy.volatile if self.policy.volatile is not None else DEFAULT_VOLATILE
        self.volatile = list(volatile)
        self.facts = Facts(self.store, self.volatile)
        self.detectors: list[tuple[str, Detector]] = build_detectors(
            self.policy, embedder=embedder, volatile=self.volatile)
        self._learn = any(name == "contradiction" for name, _ in self.detectors)
        self._memo: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    # -- public API

    def apply(self, call: Call) -> Call:
        scan = _Scan()
        messages = self._process(call.messages, call.session, scan, expand=True)
        record(call, self.name, call.messages, messages, scanned=scan.scanned,
               checked=scan.checked, flagged=scan.flagged, withheld=scan.withheld,
               released=scan.released, errors=scan.errors)
        return call.model_copy(update={"messages": messages})

    async def acall(self, call: Call, anext: ANext) -> Reply:
        # detectors may embed text (CPU-bound): keep the event loop free
        call = await asyncio.to_thread(self.apply, call)
        return self.on_reply(call, await anext(call))

    def clean(self, messages: Sequence[Message], session: str | None = None,
              context: Sequence[Message] = ()) -> list[Message]:
        """The messages with every flagged item replaced (released ones too: history keeps
        placeholders, which expand when a call is built).

        Meant for what a call adds to the session after `apply` ran on the whole call: a
        tool result may come without the assistant message that called it, so items are
        matched by content (the newest record of that content, of `session` when given,
        else of any session); content never seen before is scanned. `context`: earlier
        messages (the history), whose tool calls name the tools of tool results here."""
        return self._process(list(messages), session, _Scan(), expand=False, context=context)

    def records(self, session: str | None = None, include_released: bool = False,
                limit: int | None = 100) -> list[QuarantineRecord]:
        return self.quarantine.list(session, include_released, limit)

    def release(self, id: str) -> QuarantineRecord:
        return release(self.quarantine, id, self.volatile)

    # -- the pass over the messages

    def _process(self, messages: list[Message], session: str | None, scan: _Scan,
                 expand: bool, context: Sequence[Message] = ()) -> list[Message]:
        roles = set(self.policy.roles)
        calls = {tc.id: tc for m in [*context, *messages] for tc in m.tool_calls or ()}
        # facts are per session: a call without one has no contradiction check
        facts = self.facts.view(session) if session is not None and self._learn else None
        # 1. classify: placeholders, items seen before (memo), new items
        plan: list[tuple[int, str, str | None, dict[str, Any], str]] = []
        for i, m in enumerate(messages):
            if m.role not in roles or not m.content:
                continue
            scan.scanned += 1
            if ph := PLACEHOLDER.match(m.content.strip()):
                plan.append((i, "placeholder", None, {}, ph.group(1)))
                continue
            tc = calls.get(m.tool_call_id or "") if m.role == "tool" else None
            tool, args = (tc.name, dict(tc.arguments)) if tc else (None, {})
            key = item_key(m, tool, args)
            plan.append((i, "key", tool, args, key))
        known = {key: self._known(session, key) for _, kind, _, _, key in plan if kind == "key"}
        if not expand:  # clean(): messages may come without their tool call or session
            for i, kind, _, _, key in plan:
                if kind == "key" and known[key] is None:
                    rec = self._by_content(messages[i].content or "", session)
                    known[key] = rec.id if rec is not None else None
        self._prefetch([messages[i].content or "" for i, kind, _, _, key in plan
                        if kind == "key" and known[key] is None])

        # 2. in message order: expand, withhold, learn, or run the detectors
        out: list[Message | None] = list(messages)
        head = split_head(messages)
        for i, kind, tool, args, key in plan:
            m = messages[i]
            if kind == "placeholder":
                rec = self._own_record(key, session)
                if rec is not None and rec.released and expand:
                    out[i] = m.model_copy(update={"content": rec.content})
                    scan.released.append(rec.id)
                continue
            verdict = known[key]
            if verdict == _CLEAN:
                continue
            if verdict is None:
                rec = self._check(i, m, tool, args, key, session, facts, scan)
                known[key] = _CLEAN if rec is None else rec.id
                if rec is None:
                    continue
            else:
                rec = self.quarantine.get(verdict)
                if rec is None:  # purged meanwhile: scan again next time
                    self._forget(session, key)
                    continue
                if rec.released and expand:  # the caller sent the original; trusted now
                    scan.released.append(rec.id)
                    continue
                scan.withheld.append(rec.id)
            out[i] = self._replacement(m, rec, i < head)
        return [m for m in out if m is not None]

    def _check(self, i: int, m: Message, tool: str | None, args: dict[str, Any], key: str,
               session: str | None, facts: FactView | None, scan: _Scan
               ) -> QuarantineRecord | None:
        """Run the detectors on a new item; store and return a record if one flags it."""
        scan.checked += 1
        if m.role == "tool" and tool is None:
            facts = None  # a result whose call is unknown has no subject to compare with
        item = Item(text=m.content or "", role=m.role, tool=tool, arguments=args,
                    session=session, facts=facts, tool_call_id=m.tool_call_id)
        finding, errors = run_detectors(item, self.detectors)
        scan.errors.extend({"index": i, **e} for e in errors)
        if finding is None:
            if facts is not None and m.role == "tool":
                facts.learn(tool, args, item.text)
            if not errors:  # a crashed detector gets another chance next time
                self._remember(session, key, _CLEAN)
                self.quarantine.mark_clean(session, key)
            return None
        rec = self._store(finding, item, key)
        self._remember(session, key, rec.id)
        scan.flagged.append({"id": rec.id, "index": i, "detector": finding.detector,
                             "reason": finding.reason, "score": finding.score, "tool": tool})
        return rec

    def _replacement(self, m: Message, rec: QuarantineRecord, in_head: bool) -> Message | None:
        if self.policy.action == "placeholder":
            return m.model_copy(update={"content": placeholder(rec)})
        if m.role == "tool" or in_head:  # never orphan a tool result or drop the head
            return m.model_copy(update={"content": placeholder(rec, minimal=True)})
        if m.role == "assistant" and m.tool_calls:  # keep the calls its results answer
            return m.model_copy(update={"content": None})
        return None

    # -- memo and records

    def _known(self, session: str | None, key: str) -> str | None:
        """_CLEAN, a record id, or None when the item was never scanned."""
        memo_key = (session or "", key)
        with self._lock:
            hit = self._memo.get(memo_key)
            if hit is not None:
                self._memo.move_to_end(memo_key)
                return hit
        rec = self.quarantine.find_by_key(key, session)
        if rec is not None:
            found = rec.id
        elif self.quarantine.is_clean(session, key):
            found = _CLEAN
        else:
            return None
        self._remember(session, key, found)
        return found

    def _remember(self, session: str | None, key: str, verdict: str) -> None:
        with self._lock:
            self._memo[(session or "", key)] = verdict
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)

    def _forget(self, session: str | None, key: str) -> None:
        with self._lock:
            self._memo.pop((session or "", key), None)

    def _by_content(self, content: str, session: str | None) -> QuarantineRecord | None:
        """The newest record of this exact content: of this session, or of any when the
        session is not known."""
        found = self.quarantine.find_by_hash(content_hash(content))
        if session is not None:
            found = [r for r in found if r.session == session]
        return found[-1] if found else None

    def _own_record(self, id: str, session: str | None) -> QuarantineRecord | None:
        """A placeholder's record, only if it belongs to this session (no cross-session reads)."""
        rec = self.quarantine.get(id)
        return rec if rec is not None and rec.session == session else None

    def _store(self, finding: Finding, item: Item, key: str) -> QuarantineRecord:
        return self.quarantine.add(
            content=item.text, detector=finding.detector, reason=finding.reason,
            score=finding.score, session=item.session, role=item.role, tool=item.tool,
            tool_call_id=item.tool_call_id, arguments=dict(item.arguments), item_key=key)

    def _prefetch(self, texts: list[str]) -> None:
        """Let detectors batch their work over all new items (the injection embeddings)."""
        if len(texts) < 2:
            return
        for _, fn in self.detectors:
            prefetch = getattr(fn, "prefetch", None)
            if prefetch is not None:
                try:
                    prefetch(texts)
                except Exception:  # noqa: BLE001, S110 - the per-item run reports errors
                    pass
