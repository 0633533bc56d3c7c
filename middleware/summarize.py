"""The summarize stage: fold old turns into a running summary once a conversation grows.

Past `trigger_tokens`, every turn older than the last `keep_last` turns is
replaced by one system message right after the head ("Summary of the earlier
conversation: ..."). The summary is incremental and stored per session
(`memory.summaries`): a call reads only the messages the stored summary does
not cover yet, so a long session costs one short summarizer call per turn, not
a re-read of its whole history. Without a session the summary lives for that
call only.

Where the stored summary ends is found by *anchors*: keys of the last covered
messages (a tool message by its call id, other messages by their text and
their predecessor's). Keys, not a message count, because other stages may drop
messages in between calls; when no anchor is found the summary is rebuilt
from scratch (pinned facts are kept).

Two ways to write it:
- "model": `summarizer(text, max_tokens)`; the pipeline passes
  `model_summarizer(generate)`, which prompts the local model with
  `SUMMARY_PROMPT`. If it raises, writes nothing, or keeps fewer than half of
  the identifiers (codes, dates, numbers) it was given, the stage falls back to
  the extractive summary and says so in the trace: the embedded 135M model
  writes fluent summaries that lose the facts, so "extractive" is the default.
- "extractive" (also the fallback without a summarizer): deterministic; keeps
  the sentences with entities, numbers, dates, ids, decisions and preferences,
  drops greetings and filler, under `max_summary_tokens`.

Sentences matching a `pin` regex are carried verbatim in a "Pinned facts:"
section, stored apart from the summary text so no rewrite can lose them.
The cut never splits an assistant tool call from its results.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from contextwise.memory.facts import json_object
from contextwise.memory.store import Store
from contextwise.memory.summaries import Summaries
from contextwise.middleware.base import ANext, Stage
from contextwise.middleware.context import (
    coerce_policy,
    count_messages,
    message_tokens,
    record,
    split_head,
    units,
)
from contextwise.retrievers.chunks import identifiers

from contextwise.errors import PolicyError
from contextwise.policy import Summarize
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Reply

__all__ = [
    "SUMMARY_HEADER",
    "SUMMARY_PROMPT",
    "SummarizeStage",
    "Summarizer",
    "anchor_keys",
    "cap_tokens",
    "extractive_summary",
    "model_summarizer",
    "sentences",
    "transcript",
]

Summarizer = Callable[[str, int], str]

# For a 135M instruction model: short, concrete, one job.
SUMMARY_PROMPT = (
    "You write short summaries of conversations. Summarize the conversation below in a few "
    "short factual sentences. Copy every name, number, date, id and code exactly. Keep what "
    "the user asked for, decided or prefers, and what the tools returned. Skip greetings and "
    "small talk. Write only the summary."
)
SUMMARY_HEADER = "Summary of the earlier conversation:"
PINNED_HEADER = "Pinned facts:"
ANCHORS = 32  # keys of the last covered messages kept with a summary
ITEM_TOKENS = 200  # a message's text in the transcript is cut to this many tokens
TOOL_ITEM_TOKENS = 80  # tool results are data, not conversation: less of them
MODEL_INPUT_TOKENS = 1536  # longer transcripts are pre-compressed extractively for the model

# --------------------------------------------------------------------------- text helpers

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")
_SPEAKER = re.compile(r"^(User|Assistant|System|Tool(?: [\w.\-]+)?):\s+(.*)$")
_HEADERS = ("summary so far:", "new messages:", "conversation:", SUMMARY_HEADER.lower())


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def cap_tokens(text: str, max_tokens: int) -> str:
    """`text` within `max_tokens` cl100k tokens: whole lines/sentences first, then words."""
    text = text.strip()
    if count_text(text) <= max_tokens:
        return text
    kept: list[str] = []
    for line in text.splitlines():
        for s in sentences(line) or [line]:
            if count_text("\n".join([*kept, s])) > max_tokens:
                break
            kept.append(s)
        else:
            continue
        break
    if kept:
        return "\n".join(kept)
    words = text.split()
    lo, hi = 0, len(words)  # the longest word prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_text(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _speaker(m: Message, calls: Mapping[str, str]) -> str:
    if m.role == "tool":
        return f"Tool {calls.get(m.tool_call_id or '', 'result')}"
    return m.role.capitalize()


def transcript(messages: Sequence[Message]) -> str:
    """Messages as one line each, `Speaker: text` (tool calls and long items shortened)."""
    calls = {tc.id: tc.name for m in messages for tc in m.tool_calls or ()}
    lines = []
    for m in messages:
        if m.content and m.content.startswith("[quarantined "):
            continue  # a withheld item's placeholder tells a summary nothing
        text = _tool_facts(m.text) if m.role == "tool" else None
        text = " ".join((text if text is not None else m.text).split())
        if text:
            cap = TOOL_ITEM_TOKENS if m.role == "tool" else ITEM_TOKENS
            lines.append(f"{_speaker(m, calls)}: {cap_tokens(text, cap)}")
        for tc in m.tool_calls or ():
            lines.append(f"Assistant: called {tc.name}({json.dumps(tc.arguments, default=str)})")
    return "\n".join(lines)


def _tool_facts(text: str) -> str | None:
    """A JSON object result as `key value; key value` sentences of its scalar fields (lists
    of records become a count): what a summary can keep of data. None if not an object."""
    data = json_object(text)
    if data is None:
        return None
    parts: list[str] = []

    def walk(obj: Mapping[str, Any], prefix: str) -> None:
        for key, value in obj.items():
            name = f"{prefix}{key}".replace("_", " ")
            if isinstance(value, dict):
                walk(value, f"{prefix}{key} ")
            elif isinstance(value, list):
                if value and all(not isinstance(v, (dict, list)) for v in value):
                    parts.append(f"{name} {', '.join(str(v) for v in value[:8])}")
                else:
                    parts.append(f"{name}: {len(value)} items")
            elif value is not None and value != "":
                parts.append(f"{name} {value}")

    walk(data, "")
    return "; ".join(parts) + "." if parts else None


# --------------------------------------------------------------------------- extractive

_FILLER = re.compile(
    r"(hi|hello|hey|thanks|thank you|thank you so much|thanks a lot|many thanks|ok|okay|sure|"
    r"great|cool|nice|perfect|awesome|got it|sounds good|no problem|you're welcome|"
    r"you are welcome|bye|goodbye|good morning|good afternoon|good evening|of course|certainly|"
    r"absolutely|alright|all right|yes|no|yep|nope|happy to help|glad to help|glad i could help|"
    r"hope this helps|how can i help( you)?( today)?|how may i help( you)?( today)?|"
    r"is there anything else( i can help( you)? with)?|"
    r"let me (check|see|look)( that| this| into it)?( for you)?|one moment|just a moment|"
    r"sure thing|(i'm|i am) (happy|glad) to help)"
    r"( (so much|again|a lot|very much|there|everyone|all|then|now|please))?"
)
_DATE = re.compile(
    r"\b(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|"
    r"oct(ober)?|nov(ember)?|dec(ember)?|monday|tuesday|wednesday|thursday|friday|saturday|"
    r"sunday|today|tomorrow|tonight|yesterday|next (week|month|year)|\d{4}-\d{2}-\d{2}|"
    r"\d{1,2}/\d{1,2}(/\d{2,4})?|\d{1,2}(:\d{2})? ?(am|pm))\b",
    re.IGNORECASE,
)
_DECISION = re.compile(
    r"\b(prefer\w*|want\w*|need\w*|must|should|always|never|decid\w*|agree\w*|chose|choose|"
    r"chosen|choice|book\w*|confirm\w*|cancel\w*|order\w*|deadline|budget|allerg\w*|"
    r"favou?rite|likes?|love|hate|dislike|don't|do not|won't|avoid|schedul\w*|"
    r"remember|important|reserv\w*|paid|pay|total|price|costs?|diet|vegetarian|vegan|"
    r"address|email|phone|passport)\b",
    re.IGNORECASE,
)
_INTRODUCTION = re.compile(r"\b([Mm]y name is|I'm [A-Z]|I am [A-Z]|[Cc]all me [A-Z])")
_REQUEST = re.compile(
    r"(please |can you |could you )?(book|find|search|get|show|tell|give|list|check|send|buy|"
    r"order|look|convert|compare|help|recommend)\b", re.IGNORECASE
)
_FIRST_PERSON = re.compile(r"\b(I'm|I am|I have|I've|I need|my|our|we're|we are|we have|we)\b",
                           re.IGNORECASE)
_SMALL_NUMBER = re.compile(r"\b\d\b")
_CAPITALIZED = re.compile(r"(?<=\s)[A-Z][a-zA-Z'\-]+")
MIN_SCORE = 0.75  # below this a sentence says nothing worth keeping
SENTENCE_TOKENS = 60  # one extracted sentence at most


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _id_weight(ident: str) -> float:
    """Codes and emails (TP1351, HTL-88213, a@b.org) name one thing: worth most. A bare
    number (a temperature, a fare) is weak evidence that a sentence matters."""
    if "@" in ident or (any(c.isalpha() for c in ident) and any(c.isdigit() for c in ident)):
        return 1.5
    if _ISO_DATE.match(ident) or "-" in ident or "_" in ident:
        return 1.0
    return 0.4


def _ids_value(ids: frozenset[str] | set[str]) -> float:
    return min(sum(_id_weight(i) for i in ids), 4.5)


def _score(speaker: str, sentence: str, position: float,
           ids: frozenset[str] | set[str] | None = None) -> float:
    """How much a sentence is worth keeping; `ids`: the identifiers it adds to what was
    already chosen (None: all of its own)."""
    if _FILLER.fullmatch(_norm(sentence)):
        return 0.0
    score = {"User": 1.0, "Assistant": 0.0, "System": 0.25}.get(speaker, 0.25)
    score += _ids_value(frozenset(identifiers(sentence)) if ids is None else ids)
    score += 0.5 * min(len(_SMALL_NUMBER.findall(sentence)), 2)
    score += 1.0 if _DATE.search(sentence) else 0.0
    if _DECISION.search(sentence):  # what the user wants or decided outlives any data
        score += 2.5 if speaker == "User" else 1.5
    if speaker == "User":
        if sentence.endswith("?"):
            score -= 2.5  # a question is answered later; the answer carries the fact
        elif _REQUEST.match(sentence):
            score -= 1.0  # so is a request: what came of it is in the reply
        elif _FIRST_PERSON.search(sentence):
            score += 1.5  # the user telling about themselves: preferences, constraints
    entities = {w for w in _CAPITALIZED.findall(" " + sentence) if w not in ("I", "I'm", "I'd")}
    score += 0.75 * min(len(entities), 2)
    if sentence.startswith("called "):
        return 0.0  # the result (or the answer) says what the call found
    if _INTRODUCTION.search(sentence):
        score += 2.0  # who the user is: needed for the whole session
    elif len(sentence.split()) < 4:
        score -= 0.75
    if speaker == "Assistant" and sentence.endswith("?"):
        score -= 0.5
    return score + 0.25 * position  # later facts win ties: they are the current state


def _extract(text: str, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
    units: list[tuple[str, str]] = []  # (speaker, sentence)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.lower() in _HEADERS:
            continue
        m = _SPEAKER.match(line)
        speaker, body = (m.group(1), m.group(2)) if m else ("", line)
        units.extend((speaker, cap_tokens(s, SENTENCE_TOKENS)) for s in sentences(body))
    if not units:
        return ""
    # Each distinct sentence once, at its latest position.
    latest: dict[str, int] = {}
    for i, (_, s) in enumerate(units):
        latest[_norm(s)] = i
    # Greedy by marginal value: an identifier (code, number, date) counts only for the
    # first sentence that carries it, so the cap goes to facts not yet covered rather
    # than to the third restatement of a booking reference.
    pool: dict[int, tuple[str, str, frozenset[str], float, int]] = {}
    for i, (speaker, s) in enumerate(units):
        key = _norm(s)
        if latest[key] != i or key in exclude or not key:
            continue
        position = i / max(len(units) - 1, 1)
        if _score(speaker, s, position) >= MIN_SCORE:
            cost = count_text(f"{speaker}: {s}" if speaker else s) + 1
            pool[i] = (speaker, s, frozenset(identifiers(s)), position, cost)
    chosen: list[int] = []
    covered: set[str] = set()
    used = 0
    while pool:
        best, best_score = -1, 0.0
        for i, (speaker, s, ids, position, cost) in pool.items():
            if used + cost > max_tokens:
                continue
            score = _score(speaker, s, position, ids - covered)
            if score < MIN_SCORE:
                continue
            # Value per token (damped): one long data line must not crowd out three facts.
            score /= cost ** 0.5
            if score > best_score or (score == best_score and i > best >= 0):
                best, best_score = i, score
        if best < 0:
            break
        _, _, ids, _, cost = pool.pop(best)
        chosen.append(best)
        covered |= ids
        used += cost
    # Original order; consecutive sentences of one speaker share a line.
    lines: list[tuple[str, list[str]]] = []
    for i in sorted(chosen):
        speaker, s = units[i]
        if lines and lines[-1][0] == speaker:
            lines[-1][1].append(s)
        else:
            lines.append((speaker, [s]))
    out = "\n".join(f"{sp}: {' '.join(ss)}" if sp else " ".join(ss) for sp, ss in lines)
    return cap_tokens(out, max_tokens)


def extractive_summary(text: str, max_tokens: int) -> str:
    """A summarizer without a model: the informative sentences of a transcript
    (`Speaker: text` lines, a previous summary included), in order, under the cap."""
    return _extract(text, max_tokens)


# --------------------------------------------------------------------------- model

MIN_KEPT_IDENTIFIERS = 0.5  # share of the source's identifiers a model summary must keep


def _dropped_identifiers(source: str, summary: str) -> str | None:
    """Why a model summary is not faithful enough to use, or None when it is: it must
    keep at least half of the identifiers (codes, dates, numbers, emails) of its source."""
    wanted = [i for i in identifiers(source) if not i.isdigit() or len(i) > 2]
    if not wanted:
        return None
    low = summary.lower()
    kept = sum(1 for i in wanted if i in low)
    if kept >= MIN_KEPT_IDENTIFIERS * len(wanted):
        return None
    return f"model summary kept {kept} of {len(wanted)} identifiers; used extractive"



def model_summarizer(generate: Callable[[list[Message], int], str],
                     prompt: str = SUMMARY_PROMPT) -> Summarizer:
    """A summarizer that asks a chat model: `generate(messages, max_tokens) -> text`."""

    def summarize(text: str, max_tokens: int) -> str:
        messages = [Message(role="system", content=prompt), Message(role="user", content=text)]
        out = generate(messages, max_tokens)
        if not isinstance(out, str):
            raise TypeError(f"generate returned {type(out).__name__}, not text")
        out = re.sub(r"^\s*(\*\*)?summary(\*\*)?\s*:\s*", "", out.strip(), flags=re.IGNORECASE)
        out = cap_tokens(out, max_tokens)
        if not out:
            raise ValueError("the model wrote an empty summary")
        return out

    return summarize


# --------------------------------------------------------------------------- stage


def _own_key(m: Message) -> str:
    if m.role == "tool":
        return f"t:{m.tool_call_id}"
    if m.tool_calls:
        return "c:" + ",".join(tc.id for tc in m.tool_calls)
    return f"{m.role}:{' '.join(m.text.split())}"


def anchor_keys(messages: Sequence[Message], head: int) -> list[str]:
    """A short key per message: its own identity plus its predecessor's (the head,
    which templating may rewrite each call, is left out)."""
    keys = [""] * len(messages)
    prev = ""
    for i in range(head, len(messages)):
        own = _own_key(messages[i])
        keys[i] = hashlib.sha1(f"{prev}\x00{own}".encode()).hexdigest()[:16]
        prev = own
    return keys



class SummarizeStage(Stage):
    """Folds old turns into a running, stored, incremental summary (see the module doc)."""

    name = "summarize"

    def __init__(self, policy: Summarize | Mapping[str, Any] | None = None, *,
                 store: Store | None = None, summarizer: Summarizer | None = None):
        self.policy = coerce_policy(policy, Summarize)
        if summarizer is not None and not callable(summarizer):
            raise PolicyError(f"summarizer must be callable, got {type(summarizer).__name__}")
        self.summarizer = summarizer
        # Without a store, sessions are remembered by this stage object only.
        self.summaries = Summaries(store if store is not None else Store(":memory:"))
        self._pins = [re.compile(p) for p in self.policy.pin]

    async def acall(self, call: Call, anext: ANext) -> Reply:
        # A model summarizer blocks for seconds: run it off the event loop.
        call = await asyncio.to_thread(self.apply, call)
        return self.on_reply(call, await anext(call))

    # -- where to cut

    def cut_point(self, messages: Sequence[Message]) -> int:
        """Index where the verbatim tail starts (the last `keep_last` turns, at least
        the current one); never inside a tool-call unit. <= head: nothing to fold."""
        head = split_head(messages)
        users = [i for i in range(head, len(messages)) if messages[i].role == "user"]
        keep = max(1, self.policy.keep_last)
        if len(users) < keep:
            return head
        cut = users[-keep]
        for unit in units(messages):
            if unit[0] < cut <= unit[-1]:
                return unit[0]
        return cut

    # -- apply

    def apply(self, call: Call) -> Call:
        msgs = call.messages
        head = split_head(msgs)
        if count_messages(msgs[head:]) <= self.policy.trigger_tokens:
            record(call, self.name, msgs, msgs, folded=0, reason="under trigger")
            return call
        cut = self.cut_point(msgs)
        if cut <= head:
            record(call, self.name, msgs, msgs, folded=0, reason="no turn old enough")
            return call

        keys = anchor_keys(msgs, head)
        stored = self.summaries.get(call.session) if call.session else None
        pinned: list[str] = list(stored.pinned) if stored else []
        start, previous, incremental = head, "", False
        if stored is not None:
            anchors = set(stored.anchors)
            found = [i for i in range(head, len(msgs)) if keys[i] in anchors]
            # Other stages only ever drop messages: prefer an anchor at or before
            # where the summary ended last time (a repeated key further on is new).
            expected = head + stored.covered
            before = [i for i in found if i < expected]
            j = max(before or found, default=None)
            if j is not None:
                start, previous, incremental = min(j + 1, cut), stored.text, True

        new = msgs[start:cut]
        mode, fallback = "stored", None
        text = previous
        if new or not incremental:
            pinned = self._pin(new, pinned)
            text, mode, fallback = self._summarize(previous, new, pinned)
            if call.session:
                self.summaries.put(call.session, text, cut - head, pinned=pinned,
                                   anchors=keys[max(head, cut - ANCHORS):cut])

        summary = Message(role="system", content=self.render(text, pinned))
        out = [*msgs[:head], summary, *msgs[cut:]]
        data: dict[str, Any] = {
            "folded": cut - head,
            "turns_folded": sum(1 for m in msgs[head:cut] if m.role == "user"),
            "new_messages": len(new),
            "incremental": incremental,
            "mode": mode,
            "summary_tokens": message_tokens(summary),
            "pinned": len(pinned),
            "stored": bool(call.session),
        }
        if fallback:
            data["fallback"] = fallback
        record(call, self.name, msgs, out, **data)
        return call.model_copy(update={"messages": out})

    @staticmethod
    def render(text: str, pinned: Sequence[str]) -> str:
        """The summary message's content."""
        parts = [f"{SUMMARY_HEADER}\n{text}" if text else f"{SUMMARY_HEADER} nothing of note."]
        if pinned:
            parts.append(PINNED_HEADER + "\n" + "\n".join(f"- {p}" for p in pinned))
        return "\n\n".join(parts)

    def _pin(self, messages: Sequence[Message], pinned: list[str]) -> list[str]:
        """Sentences matching a pin pattern, verbatim, added once."""
        if not self._pins:
            return pinned
        out = list(pinned)
        seen = {_norm(p) for p in out}
        for m in messages:
            facts = _tool_facts(m.text) if m.role == "tool" else None
            for s in sentences(facts if facts is not None else m.text):
                if any(rx.search(s) for rx in self._pins) and _norm(s) not in seen:
                    seen.add(_norm(s))
                    out.append(s)
        return out

    def _summarize(self, previous: str, new: Sequence[Message], pinned: Sequence[str]
                   ) -> tuple[str, str, str | None]:
        """(summary text, mode used, why the model was not used or failed)."""
        cap = self.policy.max_summary_tokens
        parts = [f"Summary so far:\n{previous}"] if previous else []
        parts.append(("New messages:\n" if previous else "Conversation:\n") + transcript(new))
        text = "\n\n".join(parts)
        exclude = frozenset(_norm(p) for p in pinned)  # pinned facts are shown anyway
        if self.policy.mode == "extractive":
            return _extract(text, cap, exclude), "extractive", None
        if self.summarizer is None:
            return _extract(text, cap, exclude), "extractive", "no summarizer given"
        try:
            model_input = text
            if count_text(text) > MODEL_INPUT_TOKENS:
                model_input = _extract(text, MODEL_INPUT_TOKENS)
            out = self.summarizer(model_input, cap)
            if not isinstance(out, str) or not out.strip():
                raise ValueError("the summarizer returned no text")
            out = cap_tokens(out, cap)
            missing = _dropped_identifiers(model_input, out)
            if missing is not None:
                # A small model can write fluent text that keeps none of the facts;
                # an unfaithful summary is worse than an extractive one.
                return _extract(text, cap, exclude), "extractive", missing
            return out, "model", None
        except Exception as e:  # noqa: BLE001 - any summarizer failure falls back to extractive
            reason = f"summarizer failed: {type(e).__name__}: {e}"
            return _extract(text, cap, exclude), "extractive", reason
