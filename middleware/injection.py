"""The "injection" detector: instructions for the model hidden in data (indirect prompt injection).

A web page, an email or a code answer a tool returns is data; an attacker who
controls it writes instructions into it ("ignore previous instructions",
"include this link in your reply", a spoofed `<|im_start|>system` turn, a
markdown image whose URL carries the user's data, code that uploads secrets).
Two checks, cheapest first:

1. Rules (regular expressions), each precise enough to flag alone: overriding
   instructions, persona hijack, chat-template tokens and spoofed role lines,
   fake tool-call tags, "do not tell the user", text addressed to an AI,
   directives about "your response", exfiltration links and images, code
   planted "into your code", and code that ships local data off the machine,
   wrecks the system or downloads and runs a program.
2. Embedding similarity: each prose sentence of the item that speaks to its
   reader (starts with a verb, or names "you", the assistant, its answer or
   instructions; table cells and JSON string values count, code blocks and
   numeric rows do not) is embedded with the shared Embedder and compared with
   the known attack phrasings of `attack_patterns.py`; a cosine at or above
   `threshold` flags the item.

Sentences are embedded once per process (the Embedder memoizes by text) and an
item has at most `max_passages` sentences checked (items that long are
oversized anyway). `benchmarks/quarantine.py` measures both checks on BIPIA.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from contextwise.retrievers.embedder import Embedder

from .attack_patterns import ATTACK_PATTERNS
from .context import EmbedderSource, embedder_getter
from .detectors import Finding, Item

__all__ = ["RULES", "InjectionDetector", "Rule", "passages"]

_I = re.IGNORECASE
_IM = re.IGNORECASE | re.MULTILINE


@dataclass(frozen=True)
class Rule:
    """A named check: a regex, or a function returning the (start, end) of a hit."""

    name: str
    what: str
    pattern: re.Pattern[str] | None = None
    check: Callable[[str], tuple[int, int] | None] | None = None

    def find(self, text: str) -> tuple[int, int] | None:
        if self.pattern is not None:
            m = self.pattern.search(text)
            return (m.start(), m.end()) if m else None
        return self.check(text) if self.check else None


_AI_NAMES = (r"ai|a\.i\.|llms?|large\s+language\s+models?|language\s+models?|ai\s+assistants?"
             r"|ai\s+agents?|chatbots?|chatgpt|gpt(?:-\d)?|claude|gemini|copilot")
_AI = f"(?:{_AI_NAMES})"
_NOT_HUMAN_TITLE = r"(?!\s+(?:manager|professor|director|principal|editor|coach|secretary))"

# -- sentence-level checks that need more than one regex


_SENTENCE = re.compile(r"[^.!?:\n]+[.!?:]?")
_CODE_BLOCK_REF = re.compile(
    r"\b(?:following|subsequent|below|next|this)\s+(?:code|script)\s*(?:block|snippet|excerpt"
    r"|section|segment|fragment|lines?)?\b", _I)
_YOUR_WORK = re.compile(
    r"\byour\s+(?:code(?:base)?|solution|implementation|algorithm|program|script|response"
    r"|answer|reply|project|application|elucidation|logic)\b", _I)
_INSERT_VERB = re.compile(
    r"\b(?:incorporat|integrat|includ|inclusion|embed|merg|blend|meld|fus|assimilat|append"
    r"|insert|introduc|enlist|employ|leverag|utili[sz]|weav|interweav|infus|inject|absorb"
    r"|adopt|deploy|engag|enrich|harmoni[sz]|ensur|enhanc|render|execut|manifest|embod"
    r"|feature|addition|presence|complement|fortify|streamlin|optimi[sz])\w*", _I)


def _code_insertion(text: str) -> tuple[int, int] | None:
    """A sentence asking to put "the following code" into "your code / solution"."""
    for m in _SENTENCE.finditer(text):
        s = m.group()
        if _CODE_BLOCK_REF.search(s) and _YOUR_WORK.search(s) and _INSERT_VERB.search(s):
            return m.start(), m.end()
    return None


_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_SOURCE = re.compile(
    # the whole environment, or the variables that fingerprint a machine (reading an API key
    # to authenticate a request is ordinary code, so single secrets do not count)
    r"dict\(os\.environ\)|os\.environ\.(?:copy|items|keys|values)\(|in\s+os\.environ\s*:"
    r"|(?:os\.environ\[|os\.getenv\(|os\.environ\.get\()\s*[\"'](?:PATH|HOME|USER|USERNAME"
    r"|USERPROFILE|TEMP|TMP|LANG|HOSTNAME|COMPUTERNAME|SHELL|LOGNAME)[\"']"
    r"|getpass|psutil\.|cookies?\.(?:txt|pkl|sqlite)|cookiejar|SimpleCookie"
    r"|load_cookie|/etc/(?:passwd|shadow)|\.ssh/|id_rsa|\.aws/credentials|\.netrc|keychain"
    r"|usb\.core|driverquery|query_devices|platform\.uname|socket\.gethostname|pynput"
    r"|keyboard\.(?:on_press|hook)|pyperclip|ImageGrab|contacts\.csv|/trash/|\.bash_history"
    r"|wallet\.dat|Login Data")
_SINK = re.compile(
    r"requests\.(?:post|put)\(|requests\.get\([^)]*\b(?:cookies|params|data)\s*=|urlopen\("
    r"|http\.client|HTTPS?Connection|httpx\.(?:post|put)|socket\.socket|\.sendall\(|\.sendto\("
    r"|smtplib|yagmail|sendmail|send_message|ftplib|FTP\(|storbinary|paho|publish\.single"
    r"|curl\s+-F|[\"']-F[\"']|--upload-file|SCPClient|paramiko")
_FETCH = re.compile(
    r"urlretrieve|urlopen\(|urllib3|requests\.get\(|httpx\.get|wget\.download|[\"']wget[\"']"
    r"|aiohttp|[\"']curl[\"']|curl\s+-s")
_RUN = re.compile(
    r"\bexec\(|\beval\(|os\.system\(|subprocess\.|nohup|xmrig|minerd|stratum\+tcp|cryptonight")
_RELAY = re.compile(
    r"storbinary|\.sendall\(|\.sendto\(|SCPClient|BluetoothSocket|bt_sock|sendmail"
    r"|send_message|yag\.send|requests\.post\([^)]*files\s*=|files\s*=\s*\{")
_DESTRUCTIVE = re.compile(
    r"\bdd\s+if=/dev/(?:zero|random|urandom)\s+of=/dev/"
    r"|\brm\s+-(?:rf|fr|r\s+-f)\s+(?:--no-preserve-root\s+)?(?:/|/\*|~|\$HOME|/usr|/etc|/lib"
    r"|/boot|/bin|/sbin|/var)(?=[\s\"']|$)"
    r"|\bmkfs(?:\.\w+)?\s+/dev/|os\.remove\(\s*[\"']/(?:lib|bin|etc|usr|boot|sbin)/"
    r"|shutil\.rmtree\(\s*[\"'](?:/|~)[\"']"
    r"|systemctl\s+(?:stop|disable|mask)\s+(?:firewalld|ufw|iptables|nftables|auditd|apparmor"
    r"|selinux|fail2ban|clamav\w*|falcon\w*|osqueryd)\b"
    r"|:\(\)\s*\{\s*:\|:\s*&\s*\}\s*;\s*:|>>?\s*/etc/(?:init\.d|rc\.local|crontab|sudoers)"
    r"|\bformat\s+c:|\bkill\s+-9\s+-1\b", re.MULTILINE)


def _code_regions(text: str) -> Iterator[tuple[int, str]]:
    blocks = [(m.start(1), m.group(1)) for m in _FENCE.finditer(text)]
    yield from blocks or [(0, text)]


def _malicious_code(text: str) -> tuple[int, int] | None:
    """Code that ships local data out, relays a download, downloads and runs, or wrecks."""
    for offset, code in _code_regions(text):
        if m := _DESTRUCTIVE.search(code):
            return offset + m.start(), offset + m.end()
        for first, second in ((_SOURCE, _SINK), (_FETCH, _RUN), (_FETCH, _RELAY)):
            a = first.search(code)
            if a and second.search(code):
                return offset + a.start(), offset + len(code)
    return None


RULES: list[Rule] = [
    Rule("ignore_instructions", "tells the model to drop its instructions", re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass|abandon)\b(?:\s+\w+){0,4}?\s+(?:previous"
        r"|prior|above|earlier|preceding|former|original|initial|system|all|any|your|other)\s+"
        r"(?:\w+\s+){0,2}?(?:instructions?|prompts?|rules|directions|guidelines|directives"
        r"|commands|orders|constraints)\b", _I)),
    Rule("new_instructions", "announces replacement instructions", re.compile(
        r"\b(?:new|real|actual|secret|hidden|updated)\s+(?:system\s+)?(?:instructions|prompt)"
        r"\s*(?::|for\s+(?:the\s+)?" + _AI + r")", _I)),
    Rule("persona", "tries to give the model a new identity", re.compile(
        r"\byou\s+are\s+(?:now|no\s+longer)\b[^.\n]{0,40}?\b(?:ai|assistant|model|bot|chatbot"
        r"|gpt|llm|mode|persona|character|dan|unrestricted|jailbroken|evil|hacker|unfiltered)\b"
        r"|\bfrom\s+now\s+on,?\s+you\s+(?:are|will\s+be|must\s+act|act)\s+(?:as\s+)?(?:an?\s+|the"
        r"\s+|my\s+)?(?:\w+\s+){0,2}?(?:ai|assistant|bot|model|persona|character)\b"
        r"|\b(?:enter|activate|enable|switch(?:ed)?\s+(?:in)?to)\s+(?:dan|jailbreak|god)\s+mode"
        r"|\byou\s+are\s+(?:now\s+)?in\s+developer\s+mode\b"
        r"|\b(?:act|behave|respond)\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?"
        r"(?:unrestricted"
        r"|unfiltered|jailbroken|evil)\b", _I)),
    Rule("chat_markup", "chat-template control tokens", re.compile(
        r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id"
        r"|end_header_id|begin_of_text)\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>")),
    Rule("role_line", "a spoofed system / assistant turn", re.compile(
        r"^\s*(?:\[|<|\(|#{1,3}\s*)?(?:system|developer|admin(?:istrator)?)(?:\s+(?:message"
        r"|prompt|override|note|instruction)s?)?(?:\]|>|\))?\s*:\s*(?:you\b|ignore|disregard"
        r"|forget|new\b|the\s+(?:assistant|ai|model)|assistant|always|never|do\s+not|don't"
        r"|from\s+now|respond|reply|answer)"
        r"|^\s*(?:assistant|ai|model)\s*:\s*(?:sure|ok|okay|i\s+will|i'll|understood|certainly)\b",
        _IM)),
    Rule("fake_tool_call", "tool-call markup inside data", re.compile(
        r"</?(?:tool_call|tool_calls|function_call|function_calls|tool_use|tool_result|invoke"
        r"|antml:\w+)\b[^>]{0,200}>|\"tool_calls\"\s*:\s*\["
        r"|\{\s*\"name\"\s*:\s*\"[\w.-]+\"\s*,\s*\"arguments\"\s*:", _I)),
    Rule("secrecy", "asks to hide something from the user", re.compile(
        r"\b(?:do\s+not|don't|dont|never|without)\s+(?:\w+\s+){0,3}?(?:tell(?:ing)?|inform(?:ing)?"
        r"|mention(?:ing)?|reveal(?:ing)?|alert(?:ing)?|notify(?:ing)?|let(?:ting)?"
        r"|disclos(?:e|ing)"
        r")\s+(?:\w+\s+){0,3}?(?:the\s+)?(?:user|human|operator)s?\b"
        r"|\b(?:keep|hide)\s+(?:this|these|the)\s+(?:\w+\s+)?(?:instructions?|message|prompt)\s+"
        r"(?:secret|hidden|from)", _I)),
    Rule("addressed_to_ai", "text addressed to an AI reading it", re.compile(
        r"\b(?:attention|note|message|instructions?|important|reminder|notice)\s*(?:to|for)\s+"
        r"(?:the\s+|any\s+|all\s+)?" + _AI + r"\b"
        r"|\b(?:dear|hey|hi|hello)\s+(?:ai|assistant|chatgpt|gpt|llm|claude|gemini|copilot|bot)\b"
        + _NOT_HUMAN_TITLE +
        r"|\bif\s+you\s+are\s+(?:an?\s+)?(?:" + _AI_NAMES + r"|assistant|bot)\b" + _NOT_HUMAN_TITLE
        + r"|\b" + _AI + r"\s+(?:reading|processing|summari[sz]ing|parsing)\s+(?:this|these)\b"
        r"|\bas\s+an?\s+(?:ai|language\s+model)\b[^.\n]{0,30}\byou\s+(?:must|should|will|are)\b",
        _I)),
    Rule("answer_directive", "tells the model what to put in its answer", re.compile(
        r"\b(?:add|include|insert|integrate|incorporate|mention|append|prepend|modify|change"
        r"|replace|use|write|render|provide|start|begin|end|finish|conclude|embed|enhance|augment"
        r"|format|translate|convert|introduce|misspell|scramble|jumble|rearrange|remove|group"
        r"|combine|substitute|encourage|suggest|emphasi[sz]e|highlight|stress|tease|express"
        r"|invite|promote|direct|advertise|recommend|output|print|say|ensure)\b"
        r"(?:[^.!?\n]|[.!?](?=\S)){0,120}?\b"
        r"(?:in|to|into|within|throughout|from|of|with)\s+(?:all\s+|each\s+|every\s+)?your\s+"
        r"(?:responses?|repl(?:y|ies)|answers?|outputs?|completions?)\b"
        r"|\b(?:modify|change|alter|adjust|rewrite|edit|enhance|augment|enrich|format|render"
        r"|translate|begin|start|end|conclude|sign|deliver|present|compose|craft|structure"
        r"|tailor|customi[sz]e)\s+(?:all\s+|each\s+|every\s+)?your\s+(?:responses?"
        r"|repl(?:y|ies)|answers?|outputs?)\b"
        r"|(?:^|(?<=[.!?]\s))\s*(?:in|within|throughout)\s+your\s+(?:responses?|repl(?:y|ies)"
        r"|answers?|outputs?)\s*,"
        r"|\byour\s+(?:response|answer|output)s?\s+(?:should|must|shall|needs?\s+to|has\s+to)\s+"
        r"(?:include|contain|start|begin|end|mention|say|state|use|feature|incorporate"
        r"|recommend|promote)\b", _IM)),
    Rule("exfiltration_link", "a link or image whose URL carries data out", re.compile(
        r"!\[[^\]\n]*\]\(\s*<?https?://[^\s)]*\?[^\s)]*(?:[{}$<\[]|%7B|\b(?:q|query|data|d|p"
        r"|payload|secret|token|key|password|pwd|conversation|chat|history|memory|context|prompt"
        r"|user|email|info|msg|message|content|text|leak|creds?|cookie|session)=)[^\s)]*\)"
        r"|\[[^\]\n]*\]\(\s*https?://[^\s)]*\?[^\s)]*(?:\{[^}\s]*\}|%7B|\$\w+|<\w+>"
        r"|=(?:INSERT|REPLACE|YOUR)_?\w*)[^\s)]*\)", _I)),
    Rule("exfiltration_request", "asks to send private data somewhere", re.compile(
        r"\b(?:send|post|forward|email|upload|transmit|leak|exfiltrate|submit)\b[^.\n]{0,60}?\b"
        r"(?:conversation|chat\s+history|message\s+history|previous\s+messages|system\s+prompt"
        r"|the\s+user'?s?\s+(?:\w+\s+)?(?:data|details|information|emails?|passwords?|credentials"
        r"|address|messages|files|history|contacts)|passwords?|credentials|api\s+keys?"
        r"|secret\s+keys?|private\s+keys?|personal\s+(?:data|information))\b[^.\n]{0,60}?"
        r"(?:https?://|www\.|\b[\w.+-]+@[\w-]+\.\w+)", _I)),
    Rule("code_insertion", "asks to plant a given code block in the model's code",
         check=_code_insertion),
    Rule("malicious_code", "code that exfiltrates, downloads and runs, or destroys",
         check=_malicious_code),
]

# -- passages for the embedding check

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[A-Za-z]{2,}")
_CODE_CHARS = frozenset("=(){}[];<>$\\`")


# Attack phrasings speak to the reader: they start with a verb or name "you", the
# assistant, its answer or its instructions. Sentences without such a cue (most table
# cells, headers, narrative) are not embedded at all.
_VERB_LIST = """add adopt answer append apply ask avoid begin call change click combine compose
    convert copy create delete describe develop direct disregard do don download draft email
    embed emphasize encourage end enhance ensure enter execute explain express forget format
    forward give group help hide highlight ignore include incorporate insert install integrate
    introduce invite keep leak list make mention misspell modify never obey open output override
    post prepend pretend print promote provide put rearrange recommend remember remove render
    repeat replace reply respond return reveal rewrite run say scramble send share show sign
    start state stop stress substitute suggest summarize summarise tell translate transfer type
    update upload urge use visit write"""
_VERBS = frozenset(_VERB_LIST.split())
_CUES = re.compile(
    r"\b(?:you|your|yours|yourself|please|must|should|ignore|assistant|ai|llm|model|chatbot|bot"
    r"|instructions?|prompt|system|repl(?:y|ies)|respond|response|answers?|users?|reader)\b", _I)


def _prose(s: str) -> bool:
    words = _WORD.findall(s)
    if len(words) < 3 or sum(c in _CODE_CHARS for c in s) > max(3, len(s) // 12):
        return False
    return words[0].lower() in _VERBS or _CUES.search(s) is not None


def _json_strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _json_strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_strings(v, out)


def passages(text: str, limit: int = 256) -> list[str]:
    """The prose sentences of an item that address a reader, at most `limit`, in order,
    without duplicates: what the embedding check compares with attack phrasings."""
    stripped = text.strip()
    lines: list[str] = []
    if stripped[:1] in "{[":
        try:
            values: list[str] = []
            _json_strings(json.loads(stripped), values)
            lines = [ln for v in values for ln in v.splitlines()]
        except (json.JSONDecodeError, RecursionError):
            lines = []
    if not lines:
        in_fence = False
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
            elif not in_fence:
                lines.append(line)
    out: dict[str, None] = {}
    for line in lines:
        parts = line.split("|") if line.count("|") >= 2 else _SPLIT.split(line)
        for part in parts:
            s = part.strip()
            if _prose(s):
                out.setdefault(s[:400])
                if len(out) >= limit:
                    return list(out)
    return list(out)


class InjectionDetector:
    """Rules first, then cosine to known attack phrasings; `threshold` is the cosine that flags.

    `embedder`: an Embedder, a zero-argument getter, or None for the shared default
    (loaded on first use). `use_embeddings=False` keeps the rules only.
    """

    name = "injection"

    def __init__(
        self,
        threshold: float = 0.62,
        *,
        embedder: EmbedderSource = None,
        patterns: Sequence[str] = ATTACK_PATTERNS,
        rules: Sequence[Rule] = RULES,
        use_embeddings: bool = True,
        max_passages: int = 256,
    ):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if use_embeddings and not patterns:
            raise ValueError("the embedding check needs at least one attack pattern")
        self.threshold = threshold
        self.patterns = list(patterns)
        self.rules = list(rules)
        self.use_embeddings = use_embeddings
        self.max_passages = max_passages
        self._embedder = embedder_getter(embedder)
        self._pattern_vectors: np.ndarray | None = None

    @property
    def embedder(self) -> Embedder:
        return self._embedder()

    def check_rules(self, text: str) -> Finding | None:
        for rule in self.rules:
            hit = rule.find(text)
            if hit is not None:
                return Finding("injection", f"rule {rule.name}: {rule.what}", 1.0, hit)
        return None

    def prefetch(self, texts: Sequence[str]) -> None:
        """Embed the passages of several items in one batch (the stage calls this with the
        items it is about to scan: one forward pass instead of one per item)."""
        if not self.use_embeddings:
            return
        todo = [p for t in texts if self.check_rules(t) is None
                for p in passages(t, self.max_passages)]
        if todo:
            self.embedder.embed(todo)

    def similarity(self, text: str) -> tuple[float, str, str]:
        """(best cosine, its passage, the attack pattern it is close to); (0, '', '') if none."""
        found = passages(text, self.max_passages)
        if not found:
            return 0.0, "", ""
        embedder = self.embedder
        if self._pattern_vectors is None:
            self._pattern_vectors = embedder.embed(self.patterns)
        sims = embedder.embed(found) @ self._pattern_vectors.T
        i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
        return float(sims[i, j]), found[i], self.patterns[j]

    def __call__(self, item: Item) -> Finding | None:
        text = item.text
        if not text.strip():
            return None
        if found := self.check_rules(text):
            return found
        if not self.use_embeddings:
            return None
        score, passage, pattern = self.similarity(text)
        if score < self.threshold:
            return None
        start = text.find(passage)
        span = (start, start + len(passage)) if start >= 0 else None
        return Finding("injection", f"close ({score:.2f}) to a known attack: {pattern!r}",
                       round(score, 4), span)
