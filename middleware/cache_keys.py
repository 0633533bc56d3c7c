"""Cache keys: what makes two requests the same question in the same context.

Three pieces, all pure functions of the call (no model, no storage):

- `normalize(text)`: the exact-match form of a query (Unicode NFKC, case-folded,
  whitespace collapsed, trailing punctuation dropped).
- `fingerprint(call, ...)`: a digest of everything besides the latest user
  turn that changes the answer: model and quantization, the scope (global, a
  user, a session), system prompt and template version, the tool set (the
  catalogue the caller offered, when tool loadout narrowed it per query), the
  output-changing generation parameters and the engineered history. Two calls
  may share an answer only if their fingerprints are equal, so "how old is he?"
  asked in two conversations about different people never does.
- `guard(a, b)`: high cosine similarity is not enough: "capital of Austria" and
  "capital of Australia", "5 km" and "50 km", "safe" and "not safe" embed
  close together. A semantic hit must also agree on numbers, negation, entity
  names, wh-words, word order, and every content word one query has must
  have a counterpart in the other (the same word, a typo of it, or a synonym by
  word embedding). It returns the reason for refusing, or None.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from contextwise.retrievers.lexical import _stem

from contextwise.types import Call, Message

__all__ = [
    "KeyTerms",
    "exact_key",
    "fingerprint",
    "guard",
    "key_terms",
    "latest_user_index",
    "normalize",
]

# Parameters that change what the model writes (Params fields minus none).
OUTPUT_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed", "tool_choice",
                 "response_format")

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The exact-cache form of a query: NFKC, case-folded, single spaces, no trailing ?!."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", text).strip().rstrip("?!.。？！ ").strip()


def latest_user_index(messages: Sequence[Message]) -> int | None:
    """Index of the last user message with text: the query a cache looks up."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user" and m.content and m.content.strip():
            return i
    return None


def _digest(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _message_key(m: Message, call_ids: dict[str, int]) -> list[object]:
    calls = [[c.name, c.arguments] for c in m.tool_calls or []]
    # tool-call ids are random per model call: key a result by its call's position
    result_of = call_ids.get(m.tool_call_id or "", m.tool_call_id or "")
    return [m.role, _SPACE.sub(" ", m.content or "").strip(), calls, m.name or "", result_of]


def fingerprint(call: Call, *, model: str, namespace: str = "global") -> str:
    """Digest of the call's context without its latest user turn (see module doc)."""
    q = latest_user_index(call.messages)
    call_ids: dict[str, int] = {}
    for m in call.messages:
        for c in m.tool_calls or []:
            call_ids.setdefault(c.id, len(call_ids))
    history = [_message_key(m, call_ids) for i, m in enumerate(call.messages) if i != q]
    after = 0 if q is None else len(call.messages) - 1 - q  # tool results after the query
    params = call.params.model_dump(include=set(OUTPUT_PARAMS))
    # Tool loadout picks tools per query, so two wordings of one question may see
    # different subsets: the key is the catalogue the agent offered, when loadout ran.
    catalogues = [r["catalogue"] for r in call.trace.of("tools") if r.get("catalogue")]
    tools: object = (["catalogue", catalogues[-1]] if catalogues
                     else sorted([t.name, t.description, t.parameters] for t in call.tools))
    templates = [r.get("template") for r in call.trace.of("templating") if r.get("template")]
    return _digest({
        "model": model, "scope": namespace, "params": params, "tools": tools,
        "history": history, "after": after, "templates": templates,
    })


def exact_key(fp: str, query: str) -> str:
    """The exact-cache key: fingerprint plus the normalized query."""
    return hashlib.sha256(f"{fp}\x00{normalize(query)}".encode()).hexdigest()


# ----------------------------------------------------------------------------- the guard

_TOKEN = re.compile(r"\d+(?:[.,:/]\d+)*[^\W\d_]*|[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)
_NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000",
    "dozen": "12", "half": "0.5", "quarter": "0.25", "second": "2nd",
    "third": "3rd", "fourth": "4th", "fifth": "5th", "twice": "2x",
    "double": "2x", "triple": "3x",
}
_NEGATIONS = frozenset(
    """not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt
    didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt
    except excluding besides non lacking""".split()  # noqa: SIM905  (a word list, read as text)
)
# wh-words that ask for a different kind of answer; what/which/how are interchangeable
_WH = {"when": "when", "where": "where", "who": "who", "whom": "who", "whose": "whose",
       "why": "why"}
_FILLER = frozenset(
    """please pls plz kindly tell explain know want wanna need help show let give me i you
    we my your our can could would will should do does did is are was were be been am the
    a an of in on at for to with about and or but so just really actually exactly quickly
    quick briefly basically simply hi hello hey thanks thank question wondering wonder
    curious like any some someone anyone something anything way ways possible able there
    here it its it's this that these those what which how whats hows im ive id youre
    describe mean means meaning definition define give get find out say
    said""".split()  # noqa: SIM905  (a word list, read as text)
)
# Verbs and relational words that rarely decide an answer ("make"/"create" a branch,
# "X vs Y"/"difference between X and Y"): a substitution among them is not a new
# question. They still count for opposites and swapped roles.
_GENERIC = frozenset(
    """make makes create get gets set put use used using change update modify see view check
    list show shows find display go going work works support supports allow allowed vs versus
    between difference differences different compare comparison way ways thing things people
    each typical usual usually normally best top ideal write syntax
    command""".split()  # noqa: SIM905  (a word list, read as text)
)
_OPPOSITES = [
    ("increase", "decrease"), ("increase", "reduce"), ("raise", "lower"), ("up", "down"),
    ("upload", "download"), ("import", "export"), ("encrypt", "decrypt"), ("encode", "decode"),
    ("enable", "disable"), ("add", "remove"), ("add", "delete"), ("create", "delete"),
    ("open", "close"), ("start", "stop"), ("start", "end"), ("begin", "end"), ("buy", "sell"),
    ("cheap", "expensive"), ("cheapest", "expensive"), ("cheapest", "priciest"),
    ("min", "max"), ("minimum", "maximum"), ("smallest", "largest"), ("smallest", "biggest"),
    ("small", "large"), ("small", "big"), ("fast", "slow"), ("fastest", "slowest"),
    ("faster", "slower"), ("best", "worst"), ("better", "worse"), ("high", "low"),
    ("highest", "lowest"), ("higher", "lower"), ("long", "short"), ("longest", "shortest"),
    ("longer", "shorter"), ("hot", "cold"), ("warm", "cold"), ("before", "after"),
    ("first", "last"), ("earliest", "latest"), ("oldest", "newest"), ("old", "new"),
    ("older", "newer"), ("young", "old"), ("youngest", "oldest"), ("gain", "lose"),
    ("gain", "loss"), ("win", "lose"), ("push", "pull"), ("input", "output"), ("in", "out"),
    ("inside", "outside"), ("above", "below"), ("over", "under"), ("top", "bottom"),
    ("left", "right"), ("north", "south"), ("east", "west"), ("asc", "desc"),
    ("ascending", "descending"), ("lock", "unlock"), ("follow", "unfollow"), ("pros", "cons"),
    ("advantage", "disadvantage"), ("benefit", "risk"), ("allow", "block"), ("allow", "deny"),
    ("accept", "reject"), ("approve", "reject"), ("include", "exclude"), ("true", "false"),
    ("yes", "no"), ("always", "never"), ("more", "less"), ("more", "fewer"), ("most", "least"),
    ("many", "few"), ("heavy", "light"), ("safe", "dangerous"), ("safe", "unsafe"),
    ("legal", "illegal"), ("public", "private"), ("internal", "external"), ("local", "remote"),
    ("client", "server"), ("sync", "async"), ("synchronous", "asynchronous"),
    ("static", "dynamic"), ("mutable", "immutable"), ("join", "leave"), ("attach", "detach"),
    ("connect", "disconnect"), ("subscribe", "unsubscribe"), ("install", "uninstall"),
    ("login", "logout"), ("sign", "unsign"), ("deposit", "withdraw"), ("credit", "debit"),
    ("borrow", "lend"), ("inhale", "exhale"), ("arrival", "departure"),
    ("arrive", "depart"), ("departure", "return"), ("outbound", "inbound"),
    ("morning", "evening"), ("day", "night"), ("summer", "winter"), ("spring", "autumn"),
    ("male", "female"), ("men", "women"), ("man", "woman"), ("boy", "girl"), ("adult", "child"),
    ("adults", "kids"), ("positive", "negative"), ("plus", "minus"), ("sum", "difference"),
    ("multiply", "divide"), ("celsius", "fahrenheit"), ("km", "miles"), ("kg", "lbs"),
    ("kg", "pounds"), ("meters", "feet"), ("liters", "gallons"), ("cm", "inches"),
    ("usd", "eur"), ("dollars", "euros"), ("sunrise", "sunset"), ("wake", "sleep"),
    ("on", "off"), ("online", "offline"), ("empty", "full"), ("wet", "dry"), ("soft", "hard"),
    ("dark", "light"), ("black", "white"), ("odd", "even"), ("prime", "composite"),
    ("horizontal", "vertical"), ("row", "column"), ("rows", "columns"), ("head", "tail"),
    ("prefix", "suffix"), ("front", "back"), ("frontend", "backend"), ("read", "write"),
    ("get", "set"), ("get", "post"), ("send", "receive"), ("sender", "recipient"),
    ("parent", "child"), ("ancestor", "descendant"), ("upper", "lower"),
    ("uppercase", "lowercase"), ("coldest", "warmest"), ("coldest", "hottest"),
    ("colder", "warmer"), ("hotter", "colder"), ("wettest", "driest"), ("in", "out"),
    ("cheaper", "pricier"), ("cheaper", "expensive"), ("plural", "singular"),
    ("vegetarian", "vegan"), ("today", "tomorrow"), ("today", "yesterday"),
    ("tomorrow", "yesterday"), ("weekday", "weekend"), ("next", "previous"),
    ("next", "last"), ("forward", "backward"), ("undo", "redo"), ("zip", "unzip"),
    ("compress", "decompress"), ("mount", "unmount"), ("freeze", "unfreeze"),
    ("merge", "split"), ("overestimate", "underestimate"),
]
_OPPOSITE: dict[str, set[str]] = {}
for _a, _b in _OPPOSITES:
    for _x, _y in ((_a, _b), (_b, _a)):
        _OPPOSITE.setdefault(_stem(_x), set()).add(_stem(_y))
_NEG_PREFIXES = ("un", "dis", "de", "in", "im", "il", "ir", "non", "anti", "mis")


def _lemma(word: str) -> str:
    """A gentler stem than BM25's for comparing two queries' words: plurals and
    common verb endings go ("holes" -> "hole", "charging" -> "charg")."""
    w = word
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if len(w) > 5 and w.endswith("ing"):
        return w[:-3]
    if len(w) > 4 and w.endswith("ed"):
        return w[:-2]
    return w


def _same_word(x: str, y: str) -> bool:
    """A typo or another form of the same word ("charg"/"charge", "wireless"/"wirelessly")."""
    if _typo(x, y):
        return True
    short, long_ = (x, y) if len(x) <= len(y) else (y, x)
    return len(short) >= 5 and long_.startswith(short) and len(short) >= 0.75 * len(long_)


@dataclass(frozen=True)
class KeyTerms:
    """What a query's answer hinges on, beyond its overall meaning."""

    numbers: frozenset[str]
    negated: bool
    entities: frozenset[str]  # case-folded names written with capitals or digits
    wh: frozenset[str]
    content: tuple[str, ...]  # stemmed content words, in order, without filler
    words: frozenset[str]  # every word, case-folded
    sequence: tuple[str, ...]  # every word, case-folded, in order


@lru_cache(maxsize=100_000)
def key_terms(text: str) -> KeyTerms:
    text = unicodedata.normalize("NFKC", text).replace("’", "'")
    raw = _TOKEN.findall(text)
    numbers: set[str] = set()
    entities: set[str] = set()
    wh: set[str] = set()
    negated = False
    content: list[str] = []
    sentence_start = True
    pos = 0
    for tok in raw:
        start = text.find(tok, pos)
        pos = start + len(tok)
        before = text[max(0, start - 2):start]
        if any(p in before for p in ".?!\n"):
            sentence_start = True
        low = tok.casefold()
        word = low.replace("'", "")
        if tok[0].isdigit():
            numbers.add(tok.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", tok) else tok)
            if not tok.isdigit() and any(c.isalpha() for c in tok):
                entities.add(low)
            sentence_start = False
            continue
        if word in _NUMBER_WORDS:
            numbers.add(_NUMBER_WORDS[word])
            sentence_start = False
            continue
        if word in _NEGATIONS or low.endswith("n't"):
            negated = True
        if word in _WH:
            wh.add(_WH[word])
        capitalized = tok[0].isupper() and not sentence_start
        if (capitalized and word not in _FILLER) or (len(tok) >= 2 and tok.isupper()):
            entities.add(word)
        sentence_start = False
        if (word not in _FILLER and word not in _NEGATIONS and word not in _WH
                and word not in _GENERIC):
            content.append(_lemma(word))
    folded = [t.casefold().replace("'", "") for t in raw]
    return KeyTerms(frozenset(numbers), negated, frozenset(entities), frozenset(wh),
                    tuple(content), frozenset(folded), tuple(folded))


def _typo(a: str, b: str) -> bool:
    """One edit (insert, delete, substitute or swap of neighbours) apart, inside words of
    5+ chars with the same first and last letter: "recieve"/"receive", not
    "methanol"/"ethanol" or "LVII"/"LVIII"."""
    if min(len(a), len(b)) < 5 or abs(len(a) - len(b)) > 1 or a[0] != b[0] or a[-1] != b[-1]:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
        )
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1:]


def _opposed(a: str, b: str) -> bool:
    if b in _OPPOSITE.get(a, ()):
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return len(short) >= 3 and any(long_ == p + short for p in _NEG_PREFIXES)


def _same_entity(a: str, pool: frozenset[str]) -> bool:
    return a in pool or any(_typo(a, b) for b in pool)


def _block_swap(a: Sequence[str], b: Sequence[str]) -> bool:
    """b is a with two non-adjacent spans swapped (P X M Y S -> P Y M X S): the same
    words in other roles, "from Paris to Rome" / "from Rome to Paris"."""
    if len(a) != len(b) or a == b or sorted(a) != sorted(b):
        return False
    p = next(i for i in range(len(a)) if a[i] != b[i])
    s = next(i for i in range(len(a)) if a[-1 - i] != b[-1 - i])
    a, b = a[p:len(a) - s], b[p:len(b) - s]
    n = len(a)
    for x in range(1, n):
        for y in range(1, n - x):
            m = n - x - y
            if m >= 1 and list(b) == [*a[n - y:], *a[x:x + m], *a[:x]]:
                return True
    return False


WordSimilarity = Callable[[str, str], float]


def guard(
    a: str,
    b: str,
    *,
    word_similarity: WordSimilarity | None = None,
    synonym_similarity: float = 0.75,
) -> str | None:
    """Why queries `a` and `b` may need different answers, or None if nothing says so.

    One-sided additions ("the capital *city* of France") pass; a substitution
    does not: when both queries have content words the other lacks, each must
    have a counterpart (a typo of, or a synonym by word embedding of, a word in
    the other query).
    """
    ta, tb = key_terms(a), key_terms(b)
    if ta.numbers != tb.numbers:
        return f"numbers differ: {sorted(ta.numbers ^ tb.numbers)}"
    if ta.negated != tb.negated:
        return "one is negated"
    if ta.wh and tb.wh and ta.wh != tb.wh:
        return f"asks {sorted(ta.wh ^ tb.wh)}"
    lost_a = [e for e in ta.entities if not _same_entity(e, tb.words)]
    lost_b = [e for e in tb.entities if not _same_entity(e, ta.words)]
    if lost_a and lost_b:
        return f"entities differ: {lost_a[0]!r} / {lost_b[0]!r}"
    raw_a, raw_b = set(map(_stem, ta.sequence)), set(map(_stem, tb.sequence))
    for x in raw_a - raw_b:
        for y in raw_b - raw_a:
            if _opposed(x, y):
                return f"opposites {x!r} / {y!r}"
    if _block_swap(ta.sequence, tb.sequence):
        return "same words in other roles"
    words_a, words_b = set(ta.content), set(tb.content)
    only_a, only_b = words_a - words_b, words_b - words_a
    if not (only_a and only_b):
        return None
    for mine, other in ((only_a, words_b), (only_b, words_a)):
        for x in mine:
            if any(_same_word(x, y) for y in other):
                continue
            if word_similarity is not None and other and max(
                word_similarity(x, y) for y in other
            ) >= synonym_similarity:
                continue
            return f"{x!r} has no counterpart"
    return None
