"""Remembered facts per session, so a tool result that contradicts an earlier one stands out.

A fact is (subject, attribute) -> value. Facts come from two places:

- accepted JSON tool results. The subject is the call that produced them,
  `tool(arg=value, ...)` with the arguments sorted (`subject_of`); the
  attributes are the result's keys, nested objects flattened with dots
  (`wind.speed`). Lists of plain values are one value; lists holding objects
  (search hits, pages) are skipped, since their order and content change
  legitimately. A top-level list is not a fact source for the same reason.
- facts a user pins (`pin`): any subject string, usually `subject_of(...)`.

The rule for a *contradiction* (deterministic, no model): a new result of the
same call gives a different value for an attribute already remembered. Values
compare as canonical JSON (1 and 1.0 are equal, strings are stripped).
Volatile attributes, whose change is expected (times, prices, counts, status,
cursors, ... see `DEFAULT_VOLATILE`), are not checked: a later result just
updates them. Pinned facts are always checked, volatile or not, and a tool
result never overwrites them. Facts of a result that was flagged are not
learned; releasing it (a person trusts it) learns them.

Facts are per session; a call without a session has none (the stage skips the
contradiction check there).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from contextwise.memory.store import Store
from pydantic import BaseModel

__all__ = [
    "DEFAULT_VOLATILE",
    "Fact",
    "FactView",
    "Facts",
    "SessionFacts",
    "compile_patterns",
    "conflicts",
    "is_volatile",
    "json_object",
    "observe",
    "subject_of",
]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS facts (
        session TEXT NOT NULL,     -- '' for facts not tied to a session
        subject TEXT NOT NULL,
        attribute TEXT NOT NULL,
        value TEXT NOT NULL,       -- canonical JSON
        source TEXT NOT NULL,      -- 'tool' or 'pinned'
        updated REAL NOT NULL,
        PRIMARY KEY (session, subject, attribute)
    )""",
]

# Attribute names (the last dotted part, lowercased) whose value may change between
# two results of the same call without anything being wrong.
DEFAULT_VOLATILE: tuple[str, ...] = (
    (r"(^|_)(time|times|timestamp|ts|date|datetime|now|today|updated|modified|created|expires?"
     r"|expiry|age|elapsed|duration|latency|took|uptime)($|_)"),
    r"_(at|on|ms|s|sec|seconds)$",
    (r"(^|_)(price|prices|cost|rate|rates|fee|amount|balance|total|quote|bid|ask|change"
     r"|percent|pct)($|_)"),
    r"(^|_)(count|counts|remaining|available|stock|quantity|qty|views|likes|score|rank)($|_)",
    (r"(^|_)(status|state|progress|version|etag|nonce|cursor|next|page|token|request_id"
     r"|trace_id|id_token|session_id)($|_)"),
    r"(^|_)(temp|temperature|humidity|wind|pressure|condition|conditions|forecast)($|_)",
    (r"(^|_)(rain|precip|precipitation|chance|probability|high|low|uv|cloud|clouds|cloudiness"
     r"|visibility|snow|feels|aqi|c|f)($|_)"),
)
MAX_ATTRIBUTES = 200
MAX_DEPTH = 6


class Fact(BaseModel):
    session: str | None
    subject: str
    attribute: str
    value: Any
    source: str = "tool"
    updated: float = 0.0


def subject_of(tool: str | None, arguments: Mapping[str, Any] | None = None) -> str:
    """`get_user(id=42)`: the tool and its arguments, sorted, values as JSON."""
    args = ", ".join(f"{k}={json.dumps(v, sort_keys=True, default=str)}"
                     for k, v in sorted((arguments or {}).items()))
    return f"{tool or '?'}({args})"


def _canonical(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _flatten(obj: Mapping[str, Any], prefix: str, depth: int, out: dict[str, str]) -> None:
    for key, value in obj.items():
        if len(out) >= MAX_ATTRIBUTES:
            return
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if depth < MAX_DEPTH:
                _flatten(value, name + ".", depth + 1, out)
        elif isinstance(value, list):
            if all(not isinstance(v, (Mapping, list)) for v in value):
                out[name] = _canonical(value)
        else:
            out[name] = _canonical(value)


def json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed as a JSON object, or None (not JSON, or JSON but not an object)."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def observe(content: str) -> dict[str, str] | None:
    """Attribute -> canonical JSON value of a JSON-object result; None if it is not one."""
    data = json_object(content)
    if data is None:
        return None
    out: dict[str, str] = {}
    _flatten(data, "", 0, out)
    return out


def is_volatile(attribute: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    """Whether the attribute's last dotted part matches a volatile pattern."""
    leaf = attribute.rsplit(".", 1)[-1].lower()
    return any(p.search(leaf) for p in patterns)


def compile_patterns(volatile: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for p in volatile:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"volatile pattern {p!r} is not a regex: {e}") from None
    return out


class FactView(Protocol):
    """What the contradiction detector reads: the remembered facts of one subject."""

    def subject(self, subject: str) -> dict[str, Fact]: ...

    def learn(self, tool: str | None, arguments: Mapping[str, Any] | None, content: str) -> int: ...


def conflicts(
    view: FactView,
    tool: str | None,
    arguments: Mapping[str, Any] | None,
    content: str,
    volatile: Iterable[re.Pattern[str]],
) -> list[tuple[str, Any, Any]]:
    """(attribute, remembered value, new value) for each contradiction of this result."""
    seen = observe(content)
    if not seen:
        return []
    known = view.subject(subject_of(tool, arguments))
    out = []
    for attribute, value in seen.items():
        fact = known.get(attribute)
        if fact is None or _canonical(fact.value) == value:
            continue
        if fact.source != "pinned" and is_volatile(attribute, volatile):
            continue
        out.append((attribute, fact.value, json.loads(value)))
    return out


class Facts:
    """Per-session facts in the store: `pin`, `learn`, `subject`, `all`, `forget`."""

    def __init__(self, store: Store, volatile: Iterable[str] = DEFAULT_VOLATILE):
        self.store = store
        self.volatile = compile_patterns(volatile)
        store.ensure_schema("facts", 1, SCHEMA)

    def subject(self, session: str | None, subject: str) -> dict[str, Fact]:
        rows = self.store.query(
            "SELECT attribute, value, source, updated FROM facts WHERE session=? AND subject=?",
            (session or "", subject))
        return {r["attribute"]: Fact(session=session, subject=subject, attribute=r["attribute"],
                                     value=json.loads(r["value"]), source=r["source"],
                                     updated=r["updated"]) for r in rows}

    def all(self, session: str | None) -> list[Fact]:
        rows = self.store.query(
            "SELECT subject, attribute, value, source, updated FROM facts WHERE session=? "
            "ORDER BY subject, attribute", (session or "",))
        return [Fact(session=session, subject=r["subject"], attribute=r["attribute"],
                     value=json.loads(r["value"]), source=r["source"], updated=r["updated"])
                for r in rows]

    def pin(self, session: str | None, subject: str, attribute: str, value: Any) -> Fact:
        """Remember a fact a user vouches for; results are checked against it, never replace it."""
        now = time.time()
        self.store.execute(
            "INSERT OR REPLACE INTO facts (session, subject, attribute, value, source, updated) "
            "VALUES (?,?,?,?, 'pinned', ?)", (session or "", subject, attribute, _canonical(value),
                                              now))
        return Fact(session=session, subject=subject, attribute=attribute, value=value,
                    source="pinned", updated=now)

    def learn(self, session: str | None, tool: str | None, arguments: Mapping[str, Any] | None,
              content: str) -> int:
        """Remember the attributes of an accepted JSON result (pinned facts stay); returns
        how many were written."""
        seen = observe(content)
        if not seen:
            return 0
        subject, now = subject_of(tool, arguments), time.time()
        with self.store.transaction() as db:
            pinned = {r[0] for r in db.execute(
                "SELECT attribute FROM facts WHERE session=? AND subject=? AND source='pinned'",
                (session or "", subject))}
            rows = [(session or "", subject, a, v, now) for a, v in seen.items() if a not in pinned]
            db.executemany(
                "INSERT OR REPLACE INTO facts (session, subject, attribute, value, source, "
                "updated) VALUES (?,?,?,?, 'tool', ?)", rows)
        return len(rows)

    def forget(self, session: str | None, subject: str | None = None) -> int:
        if subject is None:
            return self.store.execute("DELETE FROM facts WHERE session=?", (session or "",))
        return self.store.execute("DELETE FROM facts WHERE session=? AND subject=?",
                                  (session or "", subject))

    def view(self, session: str | None) -> SessionFacts:
        return SessionFacts(self, session)


class SessionFacts:
    """A `Facts` bound to one session (what a detector gets as `item.facts`)."""

    def __init__(self, facts: Facts, session: str | None):
        self.facts, self.session = facts, session

    def subject(self, subject: str) -> dict[str, Fact]:
        return self.facts.subject(self.session, subject)

    def learn(self, tool: str | None, arguments: Mapping[str, Any] | None, content: str) -> int:
        return self.facts.learn(self.session, tool, arguments, content)
