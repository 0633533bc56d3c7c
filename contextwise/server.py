"""`contextwise serve`: an OpenAI-compatible HTTP server around a Pipeline.

    from contextwise.server import create_app
    app = create_app(Pipeline(policy), api_key="secret")   # any ASGI server runs it

Endpoints:

- ``POST /v1/chat/completions``: OpenAI's Chat Completions (JSON or SSE stream).
  Every request runs the whole pipeline (quarantine, summarize, prune, tool
  loadout, budget fit, response cache) on its async path. The ``X-Session-Id``
  header keeps the conversation in session memory (send only the new turn, or
  resend it all: it is not duplicated); ``X-User-Id`` names the user (per-user
  cache scope). A client that disconnects mid-stream stops generation.
- ``GET /v1/models`` and ``GET /v1/models/{id}``: the one model served.
- ``GET /health``: status, model, whether the model is loaded.
- ``GET /metrics``: Prometheus text format, from a registry of this app's own.

With an API key (``api_key=`` or ``$CONTEXTWISE_API_KEY``) every ``/v1/``
endpoint needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics``
stay open. Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` and never a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from contextwise.errors import (
    BackendError,
    ContextOverflow,
    ContextwiseError,
    InputError,
    ModelNotFound,
    Overloaded,
    PolicyError,
)
from contextwise.pipeline import Pipeline
from contextwise.policy import Policy
from contextwise.types import Reply

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["APIError", "create_app", "serve"]

log = logging.getLogger("contextwise.server")

API_KEY_ENV = "CONTEXTWISE_API_KEY"
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
MAX_HEADER_ID = 256  # longest session / user id taken from a header

# Request fields, OpenAI's names. Passed on to the pipeline's Params:
PARAMS = ("temperature", "top_p", "stop", "seed", "tool_choice", "response_format")
KNOWN = {
    "model", "messages", "tools", "stream", "stream_options", "n", "user",
    "max_tokens", "max_completion_tokens", *PARAMS,
}
# Accepted and ignored (they do not change what this server returns) ...
IGNORED = {"parallel_tool_calls", "store", "metadata", "service_tier"}
# ... or accepted only with their neutral value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
}


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(e: BaseException) -> APIError:
    """The response an exception deserves. Our own errors carry messages meant for
    people; anything else becomes a bare 500 (the traceback goes to the server log)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflow):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, InputError):
        return APIError(400, str(e), param=e.where or None)
    if isinstance(e, Overloaded):
        return APIError(503, str(e) or "the server is overloaded; retry later",
                        type="server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, ModelNotFound):
        return APIError(500, str(e), type="server_error", code="model_not_found")
    if isinstance(e, BackendError):
        return APIError(500, str(e), type="server_error", code="backend_error")
    if isinstance(e, PolicyError):  # the server's policy, not the request, is wrong
        return APIError(500, str(e), type="server_error", code="policy_error")
    if isinstance(e, ContextwiseError):
        return APIError(500, str(e), type="server_error", code=None)
    return APIError(500, "internal server error (details are in the server log)",
                    type="server_error", code=None)


# --------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Prometheus metrics of one app, in a registry of its own (never the global one)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("contextwise_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "contextwise_http_request_duration_seconds",
            "HTTP request latency by endpoint (streams: until the last chunk)",
            ["endpoint"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.in_progress = Gauge("contextwise_http_requests_in_progress",
                                 "HTTP requests being served", ["endpoint"], registry=r)
        self.prompt_tokens = Counter("contextwise_prompt_tokens",
                                     "prompt tokens the model processed", registry=r)
        self.completion_tokens = Counter("contextwise_completion_tokens",
                                         "tokens the model generated", registry=r)
        self.cache_hits = Counter("contextwise_cache_hits", "response cache hits by kind",
                                  ["kind"], registry=r)
        self.cache_misses = Counter("contextwise_cache_misses", "response cache misses",
                                    registry=r)
        self.errors = Counter("contextwise_errors", "error responses by type or code",
                              ["status", "kind"], registry=r)
        self.disconnects = Counter("contextwise_stream_disconnects",
                                   "streams whose client left before the end", registry=r)

    def reply(self, reply: Reply) -> None:
        self.prompt_tokens.inc(reply.usage.prompt_tokens)
        self.completion_tokens.inc(reply.usage.completion_tokens)
        records = [r for r in reply.trace.of("cache") if "hit" in r]
        kinds = [r["hit"] for r in records if r["hit"]]
        if kinds:
            self.cache_hits.labels(kind=str(kinds[-1])).inc()
        elif any("lookup_ms" in r for r in records):
            self.cache_misses.inc()

    def error(self, e: APIError) -> None:
        self.errors.labels(status=str(e.status), kind=e.code or e.type).inc()


class _Instrument:
    """ASGI middleware: requests by endpoint and status, latency, in-flight count."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else (
            "/v1/models" if path.startswith("/v1/models/") else "other")
        status = 500  # unless a response starts

        async def send_status(message: ASGIMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_progress.labels(endpoint).inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_progress.labels(endpoint).dec()
            m.requests.labels(endpoint=endpoint, status=str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


# --------------------------------------------------------------------------- requests


@dataclass
class ChatRequest:
    """A validated Chat Completions body, as pipeline arguments."""

    messages: list[Any]
    tools: list[Any] | None
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    user: str | None


def _expect(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kinds):
        raise APIError(400, f"{name}: must be {what}, got {type(value).__name__}", param=name)
    return value


def parse_chat_request(body: Any, *, model_id: str, max_messages: int) -> ChatRequest:
    """Check a request body; errors name the field (`param`). Message, tool and
    parameter contents are checked by the pipeline itself (InputError)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name in sorted(body):
        if name in KNOWN or name in IGNORED:
            continue
        if name in NEUTRAL:
            if body[name] not in NEUTRAL[name]:
                raise APIError(400, f"{name}: not supported by this server (leave it unset)",
                               param=name)
            continue
        raise APIError(400, f"unrecognized request argument supplied: {name}", param=name)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model: required (a string; GET /v1/models lists it)", param="model")
    if model != model_id:
        raise APIError(404, f"the model {model!r} does not exist here: this server serves "
                            f"{model_id!r}", param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "messages: required, a list of messages", param="messages")
    if len(messages) > max_messages:
        raise APIError(413, f"messages: {len(messages)} messages, more than this server "
                            f"accepts ({max_messages})", param="messages",
                       code="too_many_messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools: must be a list of tools", param="tools")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, f"n: only n=1 is supported, got {n!r}", param="n")
    stream = _expect(body, "stream", (bool,), "true or false") or False
    options = _expect(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage: must be true or false",
                       param="stream_options.include_usage")
    user = _expect(body, "user", (str,), "a string")

    params = {k: body[k] for k in PARAMS if body.get(k) is not None}
    limits = {k: body[k] for k in ("max_completion_tokens", "max_tokens")
              if body.get(k) is not None}
    if len(set(map(repr, limits.values()))) > 1:
        raise APIError(400, "max_tokens and max_completion_tokens disagree: give one",
                       param="max_tokens")
    if limits:
        name, value = next(iter(limits.items()))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(400, f"{name}: must be a positive integer, got {value!r}", param=name)
        params["max_tokens"] = value
    return ChatRequest(messages=messages, tools=tools, params=params, stream=bool(stream),
                       include_usage=include_usage, user=user)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing one over `limit` bytes: by Content-Length first, then by
    what actually arrives (a chunked body has no Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "the Content-Length header is not a number") from None
        if size > limit:
            raise _too_large(size, limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit, at_least=True)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"the request body is {'over ' if at_least else ''}{size} bytes; "
                         f"this server accepts at most {limit}", code="request_too_large")


def _header_id(request: Request, header: str) -> str | None:
    value = request.headers.get(header)
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > MAX_HEADER_ID:
        raise APIError(400, f"the {header} header is longer than {MAX_HEADER_ID} characters",
                       param=header)
    return value


# --------------------------------------------------------------------------- responses


def _completion(reply: Reply, model_id: str) -> dict[str, Any]:
    out = reply.to_openai(id="chatcmpl-" + uuid.uuid4().hex[:24], created=int(time.time()))
    out["model"] = model_id
    return out


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _ChatStream:
    """One streamed completion: chat.completion.chunk events (the role, text deltas,
    tool calls, the finish reason, the usage with stream_options.include_usage, then
    [DONE]) from the pipeline's `astream`, which it always closes: closing sets the
    pipeline's stop flag, so the backend stops at its next token."""

    def __init__(self, first: str | Reply, items: AsyncIterator[str | Reply],
                 req: ChatRequest, model_id: str, metrics: Metrics):
        self.first, self.items, self.req = first, items, req
        self.model_id, self.metrics = model_id, metrics
        self.id, self.created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        self.finished = False
        self.closed = False

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.req.include_usage:
            data["usage"] = None
        return _sse(data)

    async def events(self) -> AsyncIterator[bytes]:
        yield self.chunk({"role": "assistant", "content": ""})
        sent = ""
        item = self.first
        while not isinstance(item, Reply):
            if item:
                sent += item
                yield self.chunk({"content": item})
            try:
                item = await self.items.__anext__()
            except Exception as e:  # noqa: BLE001  (after the headers: an error event)
                err = _logged(e)
                self.metrics.error(err)
                self.finished = True
                yield _sse(err.body())
                return
        reply = item
        self.metrics.reply(reply)
        if reply.text.startswith(sent) and len(reply.text) > len(sent):
            yield self.chunk({"content": reply.text[len(sent):]})  # never short of the text
        if reply.tool_calls:
            yield self.chunk({"tool_calls": [{"index": i, **tc.to_openai()}
                                             for i, tc in enumerate(reply.tool_calls)]})
        yield self.chunk({}, reply.finish_reason)
        if self.req.include_usage:
            yield _sse({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model_id, "choices": [],
                        "usage": reply.usage.to_openai()})
        self.finished = True
        yield b"data: [DONE]\n\n"

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await _aclose(self.items)
        if not self.finished:
            self.metrics.disconnects.inc()


class _SSEResponse(StreamingResponse):
    """Streams a _ChatStream and closes it in every case: at the end, on an error, and
    when the client disconnects (Starlette then cancels the send loop but leaves the
    iterator suspended, or never started, so the generation behind it would run on)."""

    def __init__(self, stream: _ChatStream):
        super().__init__(stream.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.stream.close()


# --------------------------------------------------------------------------- the app


def create_app(
    pipeline: Pipeline | None = None,
    *,
    policy: Policy | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 4_000_000,
    max_messages: int = 1_000,
    session_header: str = "X-Session-Id",
    user_header: str = "X-User-Id",
) -> FastAPI:
    """The OpenAI-compatible app around `pipeline` (default: `Pipeline(policy)`; the
    model then loads on the first request unless you touch `pipeline.backend` first).

    `api_key` (default: `$CONTEXTWISE_API_KEY`) protects every /v1/ endpoint.
    """
    if pipeline is not None and policy is not None and policy != pipeline.policy:
        raise PolicyError("create_app: pass a pipeline or a policy, not both")
    if max_body_bytes < 1 or max_messages < 1:
        raise PolicyError("create_app: max_body_bytes and max_messages must be positive")
    pipe = pipeline if pipeline is not None else Pipeline(policy)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    key = key or None
    model_id = pipe.policy.backend.model
    started = int(time.time())
    metrics = Metrics()

    app = FastAPI(title="contextwise", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.pipeline = pipe
    app.state.metrics = metrics
    app.state.model_id = model_id
    app.add_middleware(_Instrument, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        metrics.error(e)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        err = APIError(e.status_code, messages.get(e.status_code, str(e.detail)),
                       code="not_found" if e.status_code == 404 else None,
                       headers=getattr(e, "headers", None))
        return await _api_error(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=e)
        err = api_error(e)
        metrics.error(err)
        return err.response()

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            return
        problem = "incorrect API key" if given else "missing API key"
        raise APIError(401, f"{problem}: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "contextwise"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        authorize(request)
        if model != model_id:
            raise APIError(404, f"the model {model!r} does not exist here: this server serves "
                                f"{model_id!r}", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id,
                "loaded": pipe.loaded}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
        req = parse_chat_request(body, model_id=model_id, max_messages=max_messages)
        kwargs: dict[str, Any] = {
            "tools": req.tools,
            "session": _header_id(request, session_header),
            "user": _header_id(request, user_header) or req.user,
            **req.params,
        }
        if not req.stream:
            try:
                reply = await pipe.achat(req.messages, **kwargs)
            except Exception as e:  # noqa: BLE001  (every error becomes an OpenAI error)
                raise _logged(e) from None
            metrics.reply(reply)
            return JSONResponse(_completion(reply, model_id))
        items = pipe.astream(req.messages, **kwargs)
        try:
            # the first item (a delta or the reply) before the headers: bad input, an
            # overflow or a failed model load still get a proper status code
            first = await items.__anext__()
        except Exception as e:  # noqa: BLE001  (every error becomes an OpenAI error)
            await _aclose(items)
            raise _logged(e) from None
        return _SSEResponse(_ChatStream(first, items, req, model_id, metrics))

    return app


async def _aclose(items: AsyncIterator[Any]) -> None:
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


def _logged(e: Exception) -> APIError:
    err = api_error(e)
    if err.status >= 500 and not isinstance(e, ContextwiseError):
        log.error("request failed", exc_info=e)
    return err


# --------------------------------------------------------------------------- the command


def serve(
    pipeline: Pipeline,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_body_bytes: int = 4_000_000,
    console: Console | None = None,
) -> None:
    """Load the model and the embedder now (not on the first request), then run uvicorn."""
    import uvicorn
    from rich.console import Console

    from contextwise.demo import load_with_progress

    console = console or Console()
    app = create_app(pipeline, api_key=api_key, max_body_bytes=max_body_bytes)  # checks first
    seconds = load_with_progress(pipeline, console)
    policy = pipeline.policy
    if any(s is not None for s in (policy.quarantine, policy.prune, policy.tools,
                                   policy.templating, policy.cache)):
        from contextwise.retrievers.embedder import get_embedder

        get_embedder(policy.embedding.model, policy.embedding.device).embed_one("warm up")
    shown = f"[{host}]" if ":" in host else host
    auth = "an API key is required" if (api_key or os.environ.get(API_KEY_ENV)) else "no API key"
    console.print(f"contextwise: {policy.backend.model} loaded in {seconds:.1f} s; serving at "
                  f"http://{shown}:{port}/v1 (OpenAI-compatible; {auth}; "
                  f"/health and /metrics open)", markup=False, highlight=False,
                  soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
