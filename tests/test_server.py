"""`contextwise serve`: a real uvicorn server on a loopback port, talked to with the
official `openai` client (sync and async) and httpx for the other endpoints.

Most tests share one module-scoped server whose pipeline runs every default stage
around a FakeBackend (it echoes the last user message, or answers a tool call when
the request carries tools); the `model` tests use the embedded model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from conftest import FakeBackend

from contextwise import Pipeline, Policy
from contextwise.cli import build_parser, main
from contextwise.errors import BackendError, Cancelled, Overloaded, StageError
from contextwise.policy import Storage
from contextwise.server import create_app
from contextwise.types import Call, Reply

MODEL = "smollm2-135m-instruct"  # the policy's model id, whatever backend serves it
KEY = "sk-test-0123456789"
MAX_BODY = 100_000
MAX_MESSAGES = 20
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


# --------------------------------------------------------------------------- servers


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def make_pipeline(directory: Path, backend: Any, **policy: Any) -> Pipeline:
    """Every default stage (quarantine, summarize, prune, tool loadout, budget, cache)."""
    storage = Storage(path=str(directory / "state.db"))
    return Pipeline(Policy(storage=storage, **policy), backend=backend)


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built without api_key= read $CONTEXTWISE_API_KEY: keep a developer's out."""
    monkeypatch.delenv("CONTEXTWISE_API_KEY", raising=False)


@pytest.fixture(scope="module")
def backend() -> FakeBackend:
    return FakeBackend(tool_call=("get_weather", {"city": "Lisbon"}))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, backend: FakeBackend) -> Pipeline:
    return make_pipeline(tmp_path_factory.mktemp("server"), backend)


@pytest.fixture(scope="module")
def base_url(pipeline: Pipeline) -> Iterator[str]:
    app = create_app(pipeline, api_key=KEY, max_body_bytes=MAX_BODY,
                     max_messages=MAX_MESSAGES)
    with running(app) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[Any]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def http(base_url: str) -> Iterator[Any]:
    """httpx with the API key; `http.get(..., headers={"Authorization": ""})` drops it."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def scrape(http: Any) -> Callable[..., float]:
    """The /metrics page now, as `value(sample_name, **labels)` (0 when absent)."""
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in prometheus_parser.text_string_to_metric_families(response.text)
        for s in family.samples
    }
    return lambda name, **labels: samples.get((name, frozenset(labels.items())), 0.0)


def assert_error_shape(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


# --------------------------------------------------------------------------- completions


def test_non_streaming_completion(client: Any, backend: FakeBackend) -> None:
    text = "Hello from the non-streaming test, please echo me."
    r = client.chat.completions.create(model=MODEL, messages=[user(text)], max_tokens=32)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert r.usage.completion_tokens == len(text.split())
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert backend.last_call.params.max_tokens == 32


def test_parameters_reach_the_backend(client: Any, backend: FakeBackend) -> None:
    client.chat.completions.create(
        model=MODEL, messages=[user("parameters check, one two three")],
        max_completion_tokens=20, temperature=0.5, top_p=0.9, stop=["END"], seed=7, n=1,
        user="body-user",
    )
    p = backend.last_call.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (20, 0.5, 0.9, ["END"], 7)
    assert backend.last_call.user == "body-user"


def test_streaming_completion(client: Any) -> None:
    text = "Streaming test: these words arrive one by one."
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[user(text)], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    deltas = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    assert "".join(deltas) == text and len(deltas) > 1
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(text.split())
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_sends_none(client: Any) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[user("no usage chunk, please")], stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_stream_is_server_sent_events_ending_in_done(http: Any) -> None:
    body = {"model": MODEL, "messages": [user("raw event stream check")], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_tool_calls_non_streaming(client: Any, backend: FakeBackend) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[user("What is the weather in Lisbon right now?")],
        tools=[WEATHER], tool_choice="auto")
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Lisbon"}
    assert [t.name for t in backend.last_call.tools] == ["get_weather"]


def test_tool_calls_streaming(client: Any) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[user("Weather in Lisbon, streamed please?")],
        tools=[WEATHER], tool_choice="required", stream=True))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    (tc,) = calls
    assert tc.index == 0 and tc.id.startswith("call_") and tc.type == "function"
    assert tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Lisbon"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_response_format_json_schema(client: Any, backend: FakeBackend) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "celsius": {"type": "integer"}},
              "required": ["city", "celsius"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    answer = '{"city": "Porto", "celsius": 21}'  # the fake backend echoes it
    r = client.chat.completions.create(model=MODEL, messages=[user(answer)],
                                       response_format=fmt)
    assert json.loads(r.choices[0].message.content) == {"city": "Porto", "celsius": 21}
    assert backend.last_call.params.json_schema == schema


async def test_async_client(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY,
                                  max_retries=0) as client:
        text = "Async client says hello to the server."
        r = await client.chat.completions.create(model=MODEL, messages=[user(text)])
        assert r.choices[0].message.content == text
        stream = await client.chat.completions.create(
            model=MODEL, messages=[user("Async streaming works too, word by word.")],
            stream=True)
        deltas = [c.choices[0].delta.content async for c in stream
                  if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == "Async streaming works too, word by word."


# --------------------------------------------------------------------------- sessions


def test_session_header_carries_memory(client: Any, pipeline: Pipeline,
                                       backend: FakeBackend) -> None:
    headers = {"X-Session-Id": "server-session-1", "X-User-Id": "alice"}
    first = user("My favourite composer is Hildegard von Bingen.")
    r1 = client.chat.completions.create(model=MODEL, messages=[first], extra_headers=headers)
    # the second turn sends only the new message: the server remembers the first
    second = user("Which composer did I mention?")
    client.chat.completions.create(model=MODEL, messages=[second], extra_headers=headers)
    seen = [m.content for m in backend.last_call.messages]
    assert first["content"] in seen and seen[-1] == second["content"]
    assert backend.last_call.session == "server-session-1" and backend.last_call.user == "alice"
    # OpenAI-style clients resend the whole conversation: it is not stored twice
    a1 = {"role": "assistant", "content": r1.choices[0].message.content}
    history = pipeline.conversations.history("server-session-1")
    assert len(history) == 4
    resent = [first, a1, second, history[3].to_openai(), user("And which century?")]
    client.chat.completions.create(model=MODEL, messages=resent, extra_headers=headers)
    assert len(pipeline.conversations.history("server-session-1")) == 6


def test_no_session_header_no_memory(client: Any, backend: FakeBackend) -> None:
    client.chat.completions.create(model=MODEL, messages=[user("Remember the number 4711.")])
    client.chat.completions.create(model=MODEL, messages=[user("Which number was it?")])
    assert [m.content for m in backend.last_call.messages] == ["Which number was it?"]
    assert backend.last_call.session is None


# --------------------------------------------------------------------------- cache, metrics


def test_cache_hit_shows_in_metrics(client: Any, http: Any, backend: FakeBackend) -> None:
    question = [user("What is the boiling point of water at sea level?")]
    client.chat.completions.create(model=MODEL, messages=question)
    before, calls = scrape(http), len(backend.calls)
    again = client.chat.completions.create(model=MODEL, messages=question)
    streamed = list(client.chat.completions.create(model=MODEL, messages=question, stream=True))
    after = scrape(http)
    assert len(backend.calls) == calls  # both answered from the cache
    assert again.choices[0].message.content == question[0]["content"]
    assert again.usage.completion_tokens == 0
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == question[0]["content"]
    hits = "contextwise_cache_hits_total"
    assert after(hits, kind="exact") - before(hits, kind="exact") == 2
    assert after("contextwise_cache_misses_total") == before("contextwise_cache_misses_total")


def test_metrics_move(client: Any, http: Any) -> None:
    before = scrape(http)
    client.chat.completions.create(model=MODEL, messages=[user("metrics, count this call")])
    after = scrape(http)
    ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert after("contextwise_http_requests_total", **ok) == (
        before("contextwise_http_requests_total", **ok) + 1)
    latency = "contextwise_http_request_duration_seconds_count"
    assert after(latency, endpoint="/v1/chat/completions") == (
        before(latency, endpoint="/v1/chat/completions") + 1)
    for name in ("contextwise_prompt_tokens_total", "contextwise_completion_tokens_total",
                 "contextwise_cache_misses_total"):
        assert after(name) > before(name), name
    # errors are counted by kind
    http.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "n": 3})
    final = scrape(http)
    assert final("contextwise_errors_total", status="400", kind="invalid_request_error") == (
        after("contextwise_errors_total", status="400", kind="invalid_request_error") + 1)
    assert final("contextwise_http_requests_total", endpoint="/v1/chat/completions",
                 status="400") >= 1


def test_each_app_has_its_own_registry(pipeline: Pipeline) -> None:
    a, b = create_app(pipeline), create_app(pipeline)
    assert a.state.metrics.registry is not b.state.metrics.registry
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("contextwise_prompt_tokens_total") is None


# --------------------------------------------------------------------------- other endpoints


def test_models(client: Any, http: Any) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_health_is_open(base_url: str) -> None:
    r = httpx.get(base_url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": MODEL, "loaded": True}


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": KEY}, {"Authorization": "Basic " + KEY}])
def test_api_key_required_on_v1(base_url: str, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", f"/v1/models/{MODEL}")):
        body = {"model": MODEL, "messages": [user("hi")]} if method == "POST" else None
        r = httpx.request(method, base_url + path, headers=headers, json=body)
        error = assert_error_shape(r, 401)
        assert error["code"] == "invalid_api_key" and KEY not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(base_url + "/health").status_code == 200
    assert httpx.get(base_url + "/metrics").status_code == 200


def test_openai_client_with_wrong_key(base_url: str) -> None:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="nope", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=MODEL, messages=[user("let me in")])
    with openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0) as c:
        assert c.chat.completions.create(model=MODEL, messages=[user("let me in")]).choices


@pytest.mark.parametrize("env_key", [None, "from-the-environment"])
def test_api_key_from_environment(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch,
                                  env_key: str | None) -> None:
    if env_key is None:
        monkeypatch.delenv("CONTEXTWISE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("CONTEXTWISE_API_KEY", env_key)
    with running(create_app(pipeline)) as url:
        assert httpx.get(url + "/v1/models").status_code == (200 if env_key is None else 401)
        if env_key is not None:
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {env_key}"})
            assert r.status_code == 200


# --------------------------------------------------------------------------- limits, bad input


def test_oversize_body_is_413(http: Any, client: Any) -> None:
    big = {"model": MODEL, "messages": [user("x" * (MAX_BODY + 10))]}
    error = assert_error_shape(http.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = http.post("/v1/chat/completions", content=chunked(),
                  headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_error_shape(r, 413)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=big["messages"])
    assert e.value.status_code == 413


def test_too_many_messages(client: Any) -> None:
    messages = [user(f"message number {i}") for i in range(MAX_MESSAGES + 1)]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert e.value.status_code == 413 and e.value.param == "messages"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_role_is_400_naming_the_field(client: Any, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, stream=stream,
            messages=[user("hi"), {"role": "bot", "content": "beep"}])  # type: ignore[misc]
    assert e.value.param == "messages[1].role"
    assert "unknown role 'bot'" in e.value.message


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    (b"{not json", 400, None, "not valid JSON"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"[" * 50_000, 400, None, "nested too deeply"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "model"),
    ({"model": MODEL}, 400, "messages", "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", "list"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "does not exist"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n",
     "n=1"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400,
     "frobnicate", "unrecognized"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
     400, "temperature", "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens", "positive"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
      "max_completion_tokens": 6}, 400, "max_tokens", "disagree"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400,
     "tools[0].name", "tool name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tool_choice": "required"}, 400, "tool_choice", "no tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     "stream", "true or false"),
    ({"model": MODEL, "messages": []}, 400, "messages", "at least one"),
])
def test_bad_requests(http: Any, body: Any, status: int, param: str | None,
                      words: str) -> None:
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    error = assert_error_shape(r, status)
    assert error["param"] == param and words in error["message"]


def test_context_overflow_is_400(client: Any) -> None:
    # the fake counts words; well over the window, whatever the budget stage's estimate
    words = " ".join(["word"] * (3 * FakeBackend.context_window))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[user(words)])
    assert e.value.code == "context_length_exceeded"
    assert "over by" in e.value.message


def test_unknown_endpoint_and_method(http: Any) -> None:
    assert assert_error_shape(http.get("/v1/nothing-here"), 404)["code"] == "not_found"
    assert_error_shape(http.get("/v1/chat/completions"), 405)


# --------------------------------------------------------------------------- failures, disconnects


class FailingBackend(FakeBackend):
    """Streams its first word, then fails."""

    def _answer(self, call: Call) -> Reply:
        if call.on_delta is not None:
            call.on_delta("partial")
        raise BackendError("the model fell over")


class RaisingBackend(FakeBackend):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def _answer(self, call: Call) -> Reply:
        raise self.error


@pytest.mark.parametrize(("error", "status", "kind", "code"), [
    (RuntimeError("secret internal detail"), 500, "server_error", None),
    (Overloaded("the queue is full"), 503, "server_error", "overloaded"),
    (StageError("a stage failed"), 500, "server_error", None),
])
def test_errors_map_to_status_codes(tmp_path: Path, error: Exception, status: int, kind: str,
                                    code: str | None) -> None:
    with running(create_app(make_pipeline(tmp_path, RaisingBackend(error)))) as url:
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions",
                           json={"model": MODEL, "messages": [user("fail")], "stream": stream})
            body = assert_error_shape(r, status)
            assert (body["type"], body["code"]) == (kind, code)
            assert "secret" not in r.text and "Traceback" not in r.text
        if status == 503:
            assert r.headers["retry-after"] == "1"


def test_backend_failures_are_openai_errors(tmp_path: Path) -> None:
    with running(create_app(make_pipeline(tmp_path / "a", FailingBackend()))) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model=MODEL, messages=[user("go")],
                                                stream=True)
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert "the model fell over" in e.value.message
        with pytest.raises(openai.InternalServerError) as e2:
            client.chat.completions.create(model=MODEL, messages=[user("go again")])
        assert "the model fell over" in e2.value.message


def test_client_disconnect_stops_generation(tmp_path: Path) -> None:
    release = threading.Event()
    slow = FakeBackend(reply_text="one two three four five six seven eight",
                       pause_after_first_delta=release)
    app = create_app(make_pipeline(tmp_path, slow))
    body = {"model": MODEL, "messages": [user("count slowly")], "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content":"one"' in line:
                    break  # the backend is now paused after its first word
        # the response is closed: wait until the server has noticed
        for _ in range(600):  # up to ~30 s: a wait for an event, not a speed check
            if scrape(http)("contextwise_stream_disconnects_total") >= 1:
                break
            time.sleep(0.05)
        assert scrape(http)("contextwise_stream_disconnects_total") >= 1, (
            "the server never saw the disconnect")
        release.set()  # the backend goes on, and is stopped at its next token
        assert slow.cancelled.wait(30)
    assert isinstance(slow.delta_errors[0], Cancelled)
    assert len(slow.calls) == 1


# --------------------------------------------------------------------------- the command


def test_serve_command_loads_the_model_first(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_body_bytes) == (
        "127.0.0.1", 8000, None, 4_000_000)
    fake = FakeBackend()
    monkeypatch.setattr("contextwise.pipeline.build_backend", lambda *a, **k: fake)
    seen: dict[str, Any] = {}

    def run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs, app=app, loaded=app.state.pipeline._backend is fake)

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--port", "8123", "--api-key", "k", "--max-body-bytes", "999"]) == 0
    assert seen["loaded"] and (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().out
    with running(seen["app"]) as url:
        assert httpx.get(url + "/health").json()["loaded"] is True
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/chat/completions", content=b"x" * 1000,
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 413


# --------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_real_model_stream_matches_non_stream(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path, None, cache=None)  # no cache: both calls generate
    with running(create_app(pipe)) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        assert httpx.get(url + "/health").json()["loaded"] is False  # loads on first use
        messages = [user("Name a color.")]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           temperature=0)
        text = r.choices[0].message.content
        assert text and 0 < r.usage.completion_tokens <= 12
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert httpx.get(url + "/health").json()["loaded"] is True
