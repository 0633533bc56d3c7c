"""Shared test helpers: a deterministic fake backend and storage fixtures.

Nothing here loads a model. `FakeBackend` answers by echoing the last user
message (or a fixed text, or a tool call), counts tokens as words and streams
one word per `on_delta` call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from contextwise.backends.base import Backend
from contextwise.memory.store import Store

from contextwise.types import Call, Message, Reply, Tool, ToolCall, Usage


def _words(text: str | None) -> int:
    return len((text or "").split())


class FakeBackend(Backend):
    """A backend that needs no model.

    - replies with `reply_text` if given, else echoes the last user message;
    - with `tool_call=(name, arguments)` (or a ToolCall) it answers calls that
      carry tools with that tool call instead of text;
    - counts tokens as whitespace-separated words (each tool adds one token for
      its name plus the words of its description);
    - streams by calling `call.on_delta` once per word (the deltas join back
      to the reply text exactly);
    - `pause_after_first_delta`: an Event it waits on (up to 5 s) after the
      first delta, so tests can act in the middle of a stream;
    - records every call it got (`calls`), every batch (`batches`), how often
      the async path was used (`agenerate_batches`) and the exceptions its
      `on_delta` raised (`delta_errors`; `cancelled` is set when one happens).
    """

    model_name = "fake-model"
    context_window = 4096

    def __init__(
        self,
        *,
        reply_text: str | None = None,
        tool_call: ToolCall | tuple[str, dict[str, Any]] | None = None,
        pause_after_first_delta: threading.Event | None = None,
    ):
        self.reply_text = reply_text
        if isinstance(tool_call, tuple):
            tool_call = ToolCall(name=tool_call[0], arguments=tool_call[1])
        self.tool_call = tool_call
        self.pause_after_first_delta = pause_after_first_delta
        self.calls: list[Call] = []
        self.batches: list[list[Call]] = []
        self.agenerate_batches = 0
        self.delta_errors: list[BaseException] = []
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    # -- Backend contract

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        n = sum(_words(m.content) for m in messages)
        n += sum(1 + _words(t.description) for t in tools)
        return n

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        with self._lock:
            self.batches.append(list(calls))
            self.calls.extend(calls)
        return [self._answer(c) for c in calls]

    async def agenerate(self, calls: Sequence[Call]) -> list[Reply]:
        with self._lock:
            self.agenerate_batches += 1
        return await super().agenerate(calls)

    # -- helpers

    @property
    def last_call(self) -> Call:
        assert self.calls, "the backend was never called"
        return self.calls[-1]

    @staticmethod
    def deltas(text: str) -> list[str]:
        """How `text` is streamed: one piece per word, joining back to `text`."""
        pieces = re.findall(r"\s*\S+", text)
        rest = text[len("".join(pieces)):]
        if rest:
            pieces = [*pieces[:-1], pieces[-1] + rest] if pieces else [rest]
        return pieces

    def _answer(self, call: Call) -> Reply:
        prompt_tokens = self.count_tokens(call.messages, call.tools)
        if self.tool_call is not None and call.tools and call.params.tool_choice != "none":
            message = Message(role="assistant", content=None, tool_calls=[self.tool_call])
            return Reply(
                message=message,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=1),
                model=self.model_name,
                finish_reason="tool_calls",
                trace=call.trace,
            )
        if self.reply_text is not None:
            text = self.reply_text
        else:
            users = [m for m in call.messages if m.role == "user"]
            text = users[-1].text if users else ""
        if call.on_delta is not None:
            for i, piece in enumerate(self.deltas(text)):
                try:
                    call.on_delta(piece)
                except BaseException as e:
                    self.delta_errors.append(e)
                    self.cancelled.set()
                    raise
                if i == 0 and self.pause_after_first_delta is not None:
                    self.pause_after_first_delta.wait(5)
        return Reply(
            message=Message(role="assistant", content=text),
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=_words(text)),
            model=self.model_name,
            finish_reason="stop",
            trace=call.trace,
        )


@pytest.fixture(autouse=True)
def _contextwise_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                      ) -> Path:
    """Every test gets its own CONTEXTWISE_HOME: nothing touches the real home."""
    home = tmp_path_factory.mktemp("contextwise_home")
    monkeypatch.setenv("CONTEXTWISE_HOME", str(home))
    return home


@pytest.fixture
def make_backend() -> type[FakeBackend]:
    """The FakeBackend class, for tests that need one configured differently."""
    return FakeBackend


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "contextwise.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    s = Store(store_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real default embedder (all-MiniLM-L6-v2, CPU), loaded once per test run."""
    from contextwise.retrievers.embedder import get_embedder

    return get_embedder()
