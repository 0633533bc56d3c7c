"""`contextwise.wrap(fn)`: the pipeline in front of any messages -> text function."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import contextwise
from contextwise import Policy
from contextwise.errors import BackendError, InputError
from contextwise.policy import Budget, Storage


def u(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return Policy(storage=Storage(path=str(tmp_path / "w.db")))


def test_wrap_calls_the_function_and_caches(policy) -> None:
    seen: list[list[dict]] = []

    def hosted(messages: list[dict]) -> str:
        seen.append(messages)
        return "Paris."

    ask = contextwise.wrap(hosted, policy, model="hosted-x")
    assert ask(u("What is the capital of France?")) == "Paris."
    assert ask(u("what is the capital of france")) == "Paris."
    assert ask(u("Tell me the capital city of France")) == "Paris."
    assert len(seen) == 1 and seen[0] == u("What is the capital of France?")
    reply = ask.chat(u("What is the capital of France?"))
    assert reply.trace.of("cache")[0]["hit"] == "exact" and reply.model == "hosted-x"


def test_wrap_forwards_the_parameters_it_names(policy) -> None:
    got: dict = {}

    def hosted(messages, max_tokens=None, temperature=None, stop=None):
        got.update(max_tokens=max_tokens, temperature=temperature, stop=stop)
        return "ok"

    contextwise.wrap(hosted, policy)(u("hi"), max_tokens=7, stop=["\n"], cache="skip")
    assert got == {"max_tokens": 7, "temperature": 0.0, "stop": ["\n"]}


def test_wrap_session_memory_and_summaries(policy) -> None:
    seen: list[list[dict]] = []

    def hosted(messages):
        seen.append(messages)
        return f"noted {len(messages)}"

    ask = contextwise.wrap(hosted, policy)
    ask(u("My name is Ana."), session="s")
    ask(u("What is my name?"), session="s")
    assert [m["content"] for m in seen[1]][:1] == ["My name is Ana."]


def test_wrap_async_function(policy) -> None:
    async def hosted(messages):
        await asyncio.sleep(0)
        return "async ok"

    ask = contextwise.wrap(hosted, policy)
    assert asyncio.run(ask.acall(u("hello there"))) == "async ok"
    assert ask(u("hello there")) == "async ok"  # the cache answers the sync call


def test_wrap_budget_fits_the_declared_window(tmp_path: Path) -> None:
    seen: list[list[dict]] = []

    def hosted(messages):
        seen.append(messages)
        return "ok"

    policy = Policy(storage=Storage(path=str(tmp_path / "b.db")), summarize=None,
                    budget=Budget(max_context_tokens=300, max_output_tokens=50))
    ask = contextwise.wrap(hosted, policy)
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"message {i} " + "word " * 20},
                    {"role": "assistant", "content": "ok"}]
    ask(history + u("and now?"))
    from contextwise.tokens import count_messages
    from contextwise.types import parse_messages

    assert count_messages(parse_messages(seen[0])) <= 250
    assert seen[0][-1]["content"] == "and now?"


def test_wrap_bad_input_and_bad_function(policy) -> None:
    with pytest.raises(InputError, match="fn"):
        contextwise.wrap(42, policy)  # type: ignore[arg-type]
    ask = contextwise.wrap(lambda messages: 3, policy)
    with pytest.raises(BackendError, match="returned int"):
        ask(u("hi"))
    with pytest.raises(InputError, match="role"):
        ask([{"role": "bot", "content": "x"}])


@pytest.mark.model
def test_wrapped_chat_app_example_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["CONTEXTWISE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, str(root / "examples" / "wrapped_chat_app.py")],
                         capture_output=True, text=True, timeout=600, check=True, env=env).stdout
    assert "[cache exact" in out and "[cache semantic" in out and out.count("[model") == 2
