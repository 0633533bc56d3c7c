"""Grammar-constrained decoding with xgrammar: output that always parses.

One compiler per tokenizer (building its token table takes ~0.2 s), compiled
grammars memoized by schema text. A logits processor is stateful, so each
request gets a fresh one.

Closing within the budget: a small model can stay inside a JSON string (a
joke that repeats itself) until max_tokens, and a cut-off JSON never parses.
Given the call's `max_new`, the processor keeps the last `reserve` tokens for
closing (4, plus the tokens of every required key as `"key": ""`, at most half
the budget): there, among the tokens the grammar allows, it keeps only those that
end the open string (`"`, `"}`...), else those that close an object or array,
else the shortest values (`""`, `0`, `[]`...), picking the model's favourite
of them; where the grammar leads (a required key, a colon) it takes the
longest token the grammar allows, so the forced text costs the fewest tokens.
The reply is then valid JSON whenever the reserve covers what the schema still
requires.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from contextwise.errors import BackendError

__all__ = ["Closers", "ClosingProcessor", "Grammars", "in_string"]


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int):
        try:
            import xgrammar as xgr
        except ImportError as e:  # pragma: no cover - a hard dependency
            raise BackendError("constrained decoding needs xgrammar: pip install xgrammar") from e
        self._xgr = xgr
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)
        self._closers: Closers | None = None

    def _compiler_once(self) -> Any:
        with self._lock:
            if self._compiler is None:
                info = self._xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size
                )
                self._compiler = self._xgr.GrammarCompiler(info)
            return self._compiler

    def _compile_uncached(self, schema_text: str | None) -> Any:
        compiler = self._compiler_once()
        if schema_text is None:
            # json_object means an object (as OpenAI guarantees), not any JSON value:
            # the built-in JSON grammar lets a small model answer `[1]`
            schema_text = json.dumps({"type": "object"})
        return compiler.compile_json_schema(schema_text, any_whitespace=False)

    def processor(self, schema: dict[str, Any] | None, max_new: int | None = None) -> Any:
        """A fresh logits processor for JSON matching `schema` (None: any JSON object);
        with `max_new` (the call's max_tokens), one that closes the JSON in time."""
        text = None if schema is None else json.dumps(schema)
        try:
            compiled = self._compile(text)
        except Exception as e:  # xgrammar raises plain RuntimeErrors on schemas it can't take
            raise BackendError(f"cannot build a grammar for this schema: {e}") from e
        inner = self._xgr.contrib.hf.LogitsProcessor(compiled)
        if max_new is None:
            return inner
        reserve = min(max_new // 2, closing_reserve(schema, self._tokenizer))
        return ClosingProcessor(inner, self._tokenizer, self.closers(), max_new, reserve)

    def closers(self) -> Closers:
        with self._lock:
            if self._closers is None:
                self._closers = Closers.of(self._tokenizer, self._vocab_size)
            return self._closers


@dataclass(frozen=True)
class Closers:
    """Token ids (as index tensors) by what they do to an unfinished JSON text."""

    end_string: Any  # '"' then only closing brackets
    close: Any  # only '}' / ']'
    short_value: Any  # a whole short value: '""', '0', '[]', '{}', 'null', 'true', 'false'
    lengths: Any  # characters per token id

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> Closers:
        import torch

        end_string, close, short = [], [], []
        lengths = torch.zeros(vocab_size, dtype=torch.long)
        for token_id in range(min(vocab_size, len(tokenizer))):
            text = tokenizer.decode([token_id])
            lengths[token_id] = len(text)
            if not text or text != text.strip():  # the grammar allows no whitespace
                continue
            if text[0] == '"' and set(text[1:]) <= set("}]"):
                end_string.append(token_id)
            if set(text) <= set("}]"):
                close.append(token_id)
            if text in SHORT_VALUES:
                short.append(token_id)
        return cls(torch.tensor(end_string, dtype=torch.long),
                   torch.tensor(close, dtype=torch.long),
                   torch.tensor(short, dtype=torch.long), lengths)


def closing_reserve(schema: dict[str, Any] | None, tokenizer: Any) -> int:
    """Tokens to keep for closing a reply to `schema`: 4 for brackets and quotes, plus,
    for every required key (nested required objects included), its tokens as
    `"key": ""`: the most a reply can still owe when it starts closing."""
    need = 4
    stack: list[Any] = [schema or {}]  # any JSON value: non-objects are skipped
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        props = node.get("properties") or {}
        for key in node.get("required") or []:
            need += len(tokenizer(f'"{key}": ""', add_special_tokens=False)["input_ids"])
            stack.append(props.get(key))
    return need


SHORT_VALUES = {'""', "0", "[]", "{}", "null", "true", "false", '"}', '""}'}


def in_string(text: str) -> bool:
    """Whether JSON `text` (a prefix of a document) ends inside a string."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


class ClosingProcessor:
    """The grammar's logits processor, plus: in the last `reserve` of `max_new` tokens,
    only the allowed tokens that move toward a closed document (module doc)."""

    def __init__(self, inner: Any, tokenizer: Any, closers: Closers, max_new: int,
                 reserve: int):
        self.inner = inner
        self.tokenizer = tokenizer
        self.closers = closers
        self.max_new = max_new
        self.reserve = reserve
        self.start: int | None = None  # the prompt's length, seen at the first call

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = self.inner(input_ids, scores)
        if self.start is None:
            self.start = int(input_ids.shape[1])
        made = int(input_ids.shape[1]) - self.start
        if self.max_new - made > self.reserve:
            return scores
        text = self.tokenizer.decode(input_ids[0, self.start:].tolist(),
                                     skip_special_tokens=True)
        order = ((self.closers.end_string,) if in_string(text)
                 else (self.closers.close, self.closers.short_value))
        for ids in order:
            ids = ids.to(scores.device)
            allowed = ids[scores[0, ids] > float("-inf")]
            if allowed.numel():
                break
        else:  # the grammar leads (a key, a colon): its longest step, fewest tokens
            lengths = self.closers.lengths.to(scores.device)[: scores.shape[1]]
            lengths = torch.where(scores[0, : lengths.shape[0]] > float("-inf"), lengths, -1)
            allowed = (lengths == lengths.max()).nonzero()[:, 0]
        keep = scores[0, allowed]
        scores = torch.full_like(scores, float("-inf"))
        scores[0, allowed] = keep
        return scores
