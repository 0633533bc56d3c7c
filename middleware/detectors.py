"""Detectors: small functions that look at one item (a tool result, a message) and may flag it.

A detector is any callable `detector(item: Item) -> Finding | None`. Built-ins
(named in `contextwise.policy.DETECTORS`):

- "injection": instructions planted in data for the model (middleware/injection.py);
- "tool_error": tracebacks, HTTP errors, `{"error": ...}`, empty results, timeouts;
- "contradiction": a JSON result that contradicts a remembered fact (memory/facts.py);
- "oversize": more than `max_item_tokens` cl100k tokens, or a binary / base64 blob.

Your own detector is run exactly like these; its name in traces and records is
`getattr(fn, "name", fn.__name__)`. A detector that raises (or returns
something other than a Finding or None) never takes a request down: the error
is reported in the trace and the item counts as not flagged by it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from contextwise.memory.facts import (
    DEFAULT_VOLATILE,
    FactView,
    compile_patterns,
    conflicts,
    json_object,
)

from contextwise.policy import Quarantine
from contextwise.tokens import count_text

from .context import EmbedderSource

__all__ = [
    "ContradictionDetector",
    "Detector",
    "Finding",
    "Item",
    "OversizeDetector",
    "build_detectors",
    "detector_name",
    "run_detectors",
    "tool_error",
]


@dataclass(frozen=True)
class Item:
    """One piece of content to judge, with where it came from."""

    text: str
    role: str = "tool"
    tool: str | None = None  # the tool whose result this is (tool messages)
    arguments: Mapping[str, Any] = field(default_factory=dict)  # that call's arguments
    session: str | None = None
    facts: FactView | None = None  # remembered facts of the session (contradiction)
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Finding:
    """Why an item was flagged. `score` in [0, 1]; `span` is (start, end) in the text."""

    detector: str
    reason: str
    score: float = 1.0
    span: tuple[int, int] | None = None


Detector = Callable[[Item], Finding | None]


def detector_name(fn: Any) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def run_detectors(
    item: Item, detectors: Sequence[tuple[str, Detector]]
) -> tuple[Finding | None, list[dict[str, str]]]:
    """The first finding in detector order (later detectors are not run), and the errors
    of detectors that raised or returned garbage (those count as "not flagged")."""
    errors: list[dict[str, str]] = []
    for name, fn in detectors:
        try:
            found = fn(item)
        except Exception as e:  # noqa: BLE001 - a broken detector must not take the request down
            errors.append({"detector": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        if found is None:
            continue
        if not isinstance(found, Finding):
            errors.append({"detector": name,
                           "error": f"returned {type(found).__name__}, expected Finding or None"})
            continue
        return found, errors
    return None, errors


# --------------------------------------------------------------------------- tool_error

_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\):|^Exception in thread \""
    r"|^\s+at [\w$.]+\([\w$]+\.java:\d+\)"
    r"|^panic: |^goroutine \d+ \[running\]:", re.MULTILINE)
_HTTP_STATUS = re.compile(
    r"\bHTTP(?:/\d(?:\.\d)?)?\s*(?:error\s*)?:?\s*([45]\d\d)\b"
    r"|\b([45]\d\d)\s*(?:-\s*)?(Bad Request|Unauthorized|Payment Required|Forbidden|Not Found"
    r"|Method Not Allowed|Request Timeout|Conflict|Gone|Too Many Requests|Unprocessable Entity"
    r"|Internal Server Error|Not Implemented|Bad Gateway|Service Unavailable|Gateway Timeout)\b",
    re.IGNORECASE)
_LEADING_ERROR = re.compile(  # "Error: ...", "[FATAL] ...", "ValueError: ..." at the start
    r"^\s*(?i:\[?(?:error|fatal|exception|failed|failure)\]?)\s*[:!\-\]]"
    r"|^\s*\w*(?:Error|Exception):\s")
_TIMEOUT = re.compile(
    r"\b(?:timed?\s*out|timeout|deadline exceeded|ETIMEDOUT|ECONNREFUSED|ECONNRESET"
    r"|connection (?:refused|reset)|read timeout)\b", re.IGNORECASE)
_EMPTY = re.compile(
    r"^(?:|\[\s*\]|\{\s*\}|null|none|nil|undefined|n/?a|\"\"|''|no (?:results?|matches|data"
    r"|records|items|entries)(?: (?:were )?found)?|nothing (?:was )?found|not found|empty"
    r"|0 results?)\.?$", re.IGNORECASE)
_STATUS_KEYS = ("status", "status_code", "statusCode", "code", "http_status")


def _json_error(text: str) -> str | None:
    data = json_object(text)
    if data is None:
        return None
    for key in ("error", "errors", "exception", "fault"):
        value = data.get(key)
        if value:  # {"error": null} and {"errors": []} are success responses
            return f"{key}: {json.dumps(value, default=str)[:120]}"
    for key in _STATUS_KEYS:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value < 600:
            return f"{key} {value}"
    for key in ("success", "ok"):
        if data.get(key) is False:
            return f"{key}: false"
    return None


def tool_error(item: Item) -> Finding | None:
    """A failed tool call: the model needs to know it failed, not read the stack trace."""
    text = item.text.strip()
    if _EMPTY.match(text):
        return Finding("tool_error", f"empty result {text[:20]!r}" if text else "empty result")
    if (m := _TRACEBACK.search(text[:4000])) and (m.start() < 300 or len(text) < 4000):
        return Finding("tool_error", "stack trace", span=(m.start(), m.end()))
    if reason := _json_error(text):
        return Finding("tool_error", reason[:160])
    if m := _HTTP_STATUS.search(text[:120]):  # error responses lead with their status
        return Finding("tool_error", f"HTTP {m.group(1) or m.group(2)}",
                       span=(m.start(), m.end()))
    if len(text) < 500:
        if _LEADING_ERROR.match(text):
            return Finding("tool_error", "error message: " + text.splitlines()[0][:100])
        if m := _TIMEOUT.search(text):
            return Finding("tool_error", "timeout / connection failure", span=(m.start(), m.end()))
    return None


tool_error.name = "tool_error"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- oversize

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{512,}={0,2}")
_HEX_RUN = re.compile(r"\b[0-9a-fA-F]{1024,}\b")
_DATA_URI = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/]{200,}")


class OversizeDetector:
    """Items over `max_tokens` cl100k tokens, binary text and base64 / hex blobs."""

    name = "oversize"

    def __init__(self, max_tokens: int = 4000):
        self.max_tokens = max_tokens

    def __call__(self, item: Item) -> Finding | None:
        text = item.text
        # a token is at least one character: short texts need no count
        if len(text) > self.max_tokens and (n := count_text(text)) > self.max_tokens:
            return Finding("oversize", f"{n} tokens > {self.max_tokens}")
        sample = text[:20_000]
        if sample:
            control = sum(1 for c in sample if (ord(c) < 32 and c not in "\n\r\t") or c == "\ufffd")
            if control / len(sample) > 0.05:
                return Finding("oversize", "binary content")
        for pattern, what in ((_DATA_URI, "data URI"), (_BASE64_RUN, "base64 blob"),
                              (_HEX_RUN, "hex blob")):
            m = pattern.search(text)
            if m and (what != "base64 blob" or _mixed(m.group())):
                return Finding("oversize", f"{what} of {m.end() - m.start()} chars",
                               span=(m.start(), m.end()))
        return None


def _mixed(run: str) -> bool:
    """Real base64 mixes upper case, lower case and digits; a long word does not."""
    return any(c.isdigit() for c in run) and any(c.isupper() for c in run) and any(
        c.islower() for c in run)


# --------------------------------------------------------------------------- contradiction


class ContradictionDetector:
    """A JSON tool result giving another value for a remembered (subject, attribute).

    Reads `item.facts` (the stage passes the session's facts); volatile attributes
    are not checked unless pinned (see memory/facts.py for the rule).
    """

    name = "contradiction"

    def __init__(self, volatile: Iterable[str] = DEFAULT_VOLATILE):
        self.volatile = compile_patterns(volatile)

    def __call__(self, item: Item) -> Finding | None:
        if item.facts is None or item.role != "tool":
            return None
        found = conflicts(item.facts, item.tool, item.arguments, item.text, self.volatile)
        if not found:
            return None
        parts = [f"{a} was {_short(old)}, now {_short(new)}" for a, old, new in found[:3]]
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        return Finding("contradiction", "; ".join(parts) + more)


def _short(value: Any) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------- registry


def build_detectors(
    policy: Quarantine,
    *,
    embedder: EmbedderSource = None,
    volatile: Iterable[str] = DEFAULT_VOLATILE,
) -> list[tuple[str, Detector]]:
    """(name, detector) for each entry of `policy.detectors`, in order."""
    from .injection import InjectionDetector  # the embedder-backed one loads lazily

    out: list[tuple[str, Detector]] = []
    for d in policy.detectors:
        if d == "injection":
            fn: Detector = InjectionDetector(threshold=policy.injection_similarity,
                                             embedder=embedder)
        elif d == "tool_error":
            fn = tool_error
        elif d == "contradiction":
            fn = ContradictionDetector(volatile)
        elif d == "oversize":
            fn = OversizeDetector(policy.max_item_tokens)
        elif callable(d):
            fn = d
        else:  # the policy validator already refuses unknown names
            raise ValueError(f"unknown detector {d!r}")
        out.append((detector_name(fn), fn))
    return out
