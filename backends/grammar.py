"""Grammar-constrained decoding with xgrammar: output that always parses.

One compiler per tokenizer (building its token table takes ~0.2 s), compiled
grammars memoized by schema text. A logits processor is stateful, so each
request gets a fresh one.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

from contextwise.errors import BackendError

__all__ = ["Grammars"]


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

    def processor(self, schema: dict[str, Any] | None) -> Any:
        """A fresh logits processor for JSON matching `schema` (None: any JSON object)."""
        text = None if schema is None else json.dumps(schema)
        try:
            compiled = self._compile(text)
        except Exception as e:  # xgrammar raises plain RuntimeErrors on schemas it can't take
            raise BackendError(f"cannot build a grammar for this schema: {e}") from e
        return self._xgr.contrib.hf.LogitsProcessor(compiled)
