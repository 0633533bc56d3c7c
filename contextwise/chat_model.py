"""`ChatContextwise`: a LangChain chat model over a contextwise Pipeline.

    from contextwise.chat_model import ChatContextwise

    model = ChatContextwise(max_tokens=128)                 # default policy, embedded model
    model.invoke("Hello")                                    # -> AIMessage
    model.bind_tools([get_weather], tool_choice="any").invoke("Weather in Lisbon?")
    model.with_structured_output(Answer).invoke("...")      # grammar-constrained JSON

Every call runs the policy's stages (quarantine, summarize, prune, tool loadout,
budget fit, response cache) in front of the local backend, exactly as a
`Pipeline` call does. One `Pipeline` per ChatContextwise, built on first use
from `policy` (or passed in as `pipeline=`), so constructing a model is cheap
and loads nothing.

LangChain messages, tools and replies convert in
`contextwise.middleware.langchain_convert`, the converter the agent middleware
uses too: messages are text only (a content block the model cannot read raises
`InputError` naming the message and block), a provider's built-in tool is
refused; a `Reply` becomes an `AIMessage` with `tool_calls` (ids kept), the
calls that did not parse or validate in `invalid_tool_calls` (when streaming:
in the last chunk's `response_metadata["invalid_tool_calls"]`), `usage_metadata`
and `response_metadata` (`model_name`, `finish_reason`, `model_provider`, `cache`).

Needs the optional extra: `pip install "contextwise[langchain]"`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.exceptions import OutputParserException
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.language_models.model_profile import ModelProfile
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import (
        JsonOutputKeyToolsParser,
        PydanticToolsParser,
    )
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.utils.function_calling import convert_to_json_schema
    from langchain_core.utils.pydantic import is_basemodel_subclass

    from contextwise.middleware.langchain_convert import (
        from_langchain_messages,
        from_langchain_tools,
        reply_to_ai_chunk,
        reply_to_ai_message,
        tool_choice_from_langchain,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ChatContextwise needs LangChain: pip install 'contextwise[langchain]'"
    ) from e
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from contextwise.errors import InputError
from contextwise.pipeline import Pipeline
from contextwise.policy import Local, Policy
from contextwise.types import Message, Params, Reply, Tool

if TYPE_CHECKING:
    # JsonOutputParser's field `pydantic_object: type[TBaseModel] | None` uses a type
    # variable the class does not bind; the pydantic mypy plugin, typing _JsonParser's
    # __init__, looks TBaseModel up in this module (without it: name-defined, no line).
    from langchain_core.output_parsers.json import TBaseModel  # noqa: F401  (see above)

__all__ = ["ChatContextwise", "messages_to_openai", "reply_to_ai_message"]

# Call parameters a per-call kwarg (or a `bind`) may set, besides the tools.
_CALL_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "tool_choice", "response_format")
_CALL_EXTRAS = ("session", "user", "variables", "response_cache")


# --------------------------------------------------------------------------- conversion


def messages_to_openai(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI chat dicts, as `ChatContextwise` reads them (text
    only; errors name the message and block, e.g. ``messages[1].content[0]``)."""
    return [m.to_openai() for m in from_langchain_messages(messages)]


def _result(reply: Reply) -> ChatResult:
    message = reply_to_ai_message(reply)
    return ChatResult(
        generations=[ChatGeneration(message=message,
                                    generation_info={"finish_reason": reply.finish_reason})],
        llm_output={"model_name": reply.model, "token_usage": reply.usage.to_openai()},
    )


def _tools(tools: Sequence[Any]) -> list[Tool]:
    """LangChain tools as contextwise Tools (a provider's built-in tool is refused)."""
    return [t for t in from_langchain_tools(tools, builtin="error") if t is not None]


# --------------------------------------------------------------------------- structured output


def _schema_json(schema: Any) -> tuple[str, dict[str, Any]]:
    """(name, JSON schema) of a pydantic class, TypedDict, OpenAI tool or JSON-schema dict."""
    if isinstance(schema, Mapping) and "title" not in schema and (
        "properties" in schema or schema.get("type") == "object"
    ):
        return "response", dict(schema)  # a bare JSON schema without a title
    try:
        js = convert_to_json_schema(schema)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError("schema", f"cannot make a JSON schema from {type(schema).__name__}: {e}"
                         ) from None
    return str(js.get("title") or "response"), js


def _cut_off(result: Sequence[Generation]) -> str | None:
    """Why a reply ended early, when it did (`max_tokens` reached), else None."""
    message = getattr(result[0], "message", None) if result else None
    meta = getattr(message, "response_metadata", None) or {}
    if meta.get("finish_reason") == "length":
        return ("the model reached max_tokens before the structured output was complete; "
                "raise max_tokens")
    return None


class _SaysCutOff:
    """Parser mixin: when a reply does not parse because it was cut off at max_tokens,
    the error says so."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        try:
            return super().parse_result(result, partial=partial)  # type: ignore[misc]
        except OutputParserException as e:
            why = None if partial else _cut_off(result)
            if why:
                raise OutputParserException(f"{why} ({e})", llm_output=result[0].text) from e
            raise


class _JsonParser(_SaysCutOff, JsonOutputParser):
    """JsonOutputParser that says when a reply was cut off at max_tokens."""


class _PydanticParser(_SaysCutOff, PydanticOutputParser):  # type: ignore[type-arg]
    """PydanticOutputParser that says when a reply was cut off at max_tokens."""


def _check_tool_reply(result: Sequence[Generation], partial: bool) -> None:
    """A forced call that did not parse is an error, not a silent None."""
    if partial:
        return
    message = getattr(result[0], "message", None) if result else None
    if isinstance(message, AIMessage) and not message.tool_calls:
        bad = message.invalid_tool_calls
        why = _cut_off(result) or (bad[0].get("error") if bad else None) or "no tool call"
        raise OutputParserException(f"no valid structured output: {why}",
                                    llm_output=bad[0].get("args") if bad else message.text)


class _KeyToolsParser(JsonOutputKeyToolsParser):
    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_tool_reply(result, partial)
        return super().parse_result(result, partial=partial)


class _PydanticToolsParser(PydanticToolsParser):
    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_tool_reply(result, partial)
        return super().parse_result(result, partial=partial)


# --------------------------------------------------------------------------- profile


@lru_cache(maxsize=64)
def _context_window(model: str, cache_dir: str | None) -> int | None:
    """The model's window from its config, without loading anything heavy (None: unknown).

    Reads config.json of a model folder or of a GGUF's converted copy; a GGUF
    never converted (and a hub id) is unknown until the model loads.
    """
    from contextwise.backends.loading import ALIASES, converted_dir, packaged_path

    try:
        if model in ALIASES:
            gguf = packaged_path(ALIASES[model])
            folder = converted_dir(str(gguf), cache_dir) if gguf else None
        elif model.endswith(".gguf") and Path(model).expanduser().is_file():
            folder = converted_dir(str(Path(model).expanduser().resolve()), cache_dir)
        else:
            folder = Path(model).expanduser()
        config = folder / "config.json" if folder is not None else None
        if config is None or not config.is_file():
            return None
        value = json.loads(config.read_text()).get("max_position_embeddings")
        return int(value) if value else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the model


class ChatContextwise(BaseChatModel):
    """A LangChain chat model whose calls run through a contextwise `Pipeline`.

    `policy` (default `Policy()`) shapes every call: context stages, response
    cache and the local backend; or pass a ready `pipeline`. `model_name`
    (alias `model`) defaults to the policy's backend model; naming a model
    without a policy serves that model under the default policy.
    Generation defaults (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`)
    can be overridden per call (`invoke(..., max_tokens=16)`), like `session`
    (contextwise session memory), `user` (per-user cache scope), `variables`
    (template values) and `response_cache` ("use", "skip" or "refresh").
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid", arbitrary_types_allowed=True,
                              protected_namespaces=())

    policy: Policy | None = Field(default=None, description="None: Policy() (or the pipeline's)")
    pipeline: Pipeline | None = Field(
        default=None, exclude=True, repr=False,
        description="None: built from `policy` on first use (one per ChatContextwise)",
    )
    model_name: str | None = Field(default=None, alias="model",
                                   description="None: the policy's backend model")
    max_tokens: int | None = Field(default=None, ge=1, description="None: the policy's budget")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = None
    session: str | None = Field(default=None, description="keep the conversation in session memory")
    user: str | None = Field(default=None, description="names the caller (per-user cache scope)")
    response_cache: Literal["use", "skip", "refresh"] = "use"
    streaming: bool = Field(default=False, description="invoke() streams internally")
    # Accepted so code written for hosted chat models constructs this one unchanged;
    # a local model has no key, and a call is neither retried nor timed out here.
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    timeout: float | None = None
    max_retries: int | None = None

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _resolve(self) -> ChatContextwise:
        if self.pipeline is not None:
            if self.policy is not None and self.policy != self.pipeline.policy:
                raise ValueError("pass a policy or a pipeline, not both: the pipeline "
                                 "already has a policy")
            self.policy = self.pipeline.policy
        if self.policy is None:
            self.policy = _default_policy(self.model_name)
        served = self.policy.backend.model
        if self.model_name is None:
            self.model_name = served
        elif self.model_name != served:
            raise ValueError(f"model_name {self.model_name!r} differs from the policy's backend "
                             f"model {served!r}: set Policy(backend=Local(model=...)) instead")
        if self.stop == []:
            self.stop = None
        return self

    # -- LangChain metadata

    @property
    def _llm_type(self) -> str:
        return "contextwise"

    @property
    def _policy(self) -> Policy:
        return self.policy if self.policy is not None else Policy()

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """What changes the output: LangChain's own cache keys on this."""
        from contextwise.pipeline import model_identity

        backend = self._policy.backend
        return {
            "model_name": self.model_name,
            "quantization": getattr(backend, "quantization", "none"),
            "dtype": backend.dtype,
            "model_identity": model_identity(self._policy),
            "policy": _policy_digest(self._policy),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "session": self.session,
            "user": self.user,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "contextwise"
        if not isinstance(kwargs.get("model"), str):
            params["ls_model_name"] = self.model_name or ""
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        policy = (self.pipeline.policy if self.pipeline is not None
                  else self.policy or _default_policy(self.model_name))
        profile: dict[str, Any] = {
            "text_inputs": True, "image_inputs": False, "image_url_inputs": False,
            "pdf_inputs": False, "audio_inputs": False, "video_inputs": False,
            "image_tool_message": False, "pdf_tool_message": False,
            "text_outputs": True, "image_outputs": False, "audio_outputs": False,
            "video_outputs": False, "reasoning_output": False,
            "tool_calling": True, "tool_choice": True, "tool_call_streaming": True,
            "temperature": True,
            # `structured_output` stays unset on purpose: LangChain agents then use a
            # forced tool call for `response_format` (ToolStrategy), which can still
            # call the other tools; a JSON-schema grammar would rule tool calls out.
        }
        window = self._window(policy)
        if window:
            profile["max_input_tokens"] = window
        return profile  # type: ignore[return-value]

    def _window(self, policy: Policy) -> int | None:
        pipeline = self.pipeline
        if pipeline is not None and pipeline._backend is not None:
            return int(pipeline._backend.context_window) or None
        window = _context_window(policy.backend.model, policy.backend.cache_dir)
        cap = policy.budget.max_context_tokens
        if window is None:
            return cap
        return min(window, cap) if cap else window

    # -- the pipeline

    def _get_pipeline(self) -> Pipeline:
        if self.pipeline is None:
            with self._lock:
                if self.pipeline is None:
                    self.pipeline = Pipeline(self._policy)
        return self.pipeline

    def _after_call(self, pipeline: Pipeline) -> None:
        """Once the model is loaded its window is known: fill in the profile."""
        if (isinstance(self.profile, dict) and "max_input_tokens" not in self.profile
                and pipeline._backend is not None and "profile" not in self.model_fields_set):
            self.profile["max_input_tokens"] = int(pipeline._backend.context_window)

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Pipeline, list[Message], list[Tool] | None, dict[str, Any]]:
        """(pipeline, messages, tools, keyword arguments) of one pipeline call."""
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)  # LangChain's own switch, already acted on
        model = kwargs.pop("model", None)
        if model is not None and model != self.model_name:
            raise InputError("model", f"this ChatContextwise serves {self.model_name!r}; build "
                                      f"ChatContextwise(model={model!r}) to use another model")
        raw_tools = kwargs.pop("tools", None)
        tools = _tools(raw_tools) if raw_tools else None
        unknown = sorted(set(kwargs) - set(_CALL_PARAMS) - set(_CALL_EXTRAS))
        if unknown:
            known = ", ".join((*_CALL_PARAMS, "stop", "tools", *_CALL_EXTRAS))
            raise InputError(unknown[0], f"unknown parameter (known: {known})")
        params: dict[str, Any] = {"temperature": self.temperature}
        for name in ("max_tokens", "top_p", "seed"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        stops = stop if stop is not None else self.stop
        if stops:
            params["stop"] = list(stops)
        for name in _CALL_PARAMS:
            if name in kwargs and kwargs[name] is not None:
                params[name] = kwargs[name]
        if "tool_choice" in params:
            names = [t.name for t in tools or []]
            choice = tool_choice_from_langchain(params.pop("tool_choice"), names)
            if choice is not None:
                params["tool_choice"] = choice
        session = kwargs.get("session", self.session)
        params["user"] = kwargs.get("user", self.user)
        params["cache"] = kwargs.get("response_cache", self.response_cache)
        if kwargs.get("variables") is not None:
            params["variables"] = kwargs["variables"]
        params["session"] = session
        return self._get_pipeline(), from_langchain_messages(messages), tools, params

    # -- generation

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pipeline, msgs, tools, params = self._prepare(messages, stop, kwargs)
        reply = pipeline(msgs, tools, **params)
        self._after_call(pipeline)
        return _result(reply)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pipeline, msgs, tools, params = self._prepare(messages, stop, kwargs)
        reply = await pipeline.achat(msgs, tools, **params)
        self._after_call(pipeline)
        return _result(reply)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text deltas as they are generated, then one last chunk with the tool calls,
        usage and finish reason. Closing the stream early stops generation."""
        pipeline, msgs, tools, params = self._prepare(messages, stop, kwargs)
        sent = ""
        items = pipeline.stream(msgs, tools, **params)
        try:
            for item in items:
                if isinstance(item, Reply):
                    self._after_call(pipeline)
                    yield ChatGenerationChunk(message=reply_to_ai_chunk(item, sent))
                    return
                sent += item
                yield ChatGenerationChunk(message=AIMessageChunk(content=item))
        finally:
            items.close()  # type: ignore[attr-defined]  # a generator: stops generation

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        pipeline, msgs, tools, params = self._prepare(messages, stop, kwargs)
        sent = ""
        items = pipeline.astream(msgs, tools, **params)
        try:
            async for item in items:
                if isinstance(item, Reply):
                    self._after_call(pipeline)
                    yield ChatGenerationChunk(message=reply_to_ai_chunk(item, sent))
                    return
                sent += item
                yield ChatGenerationChunk(message=AIMessageChunk(content=item))
        finally:
            await items.aclose()  # type: ignore[attr-defined]  # an async generator

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for out in llm_outputs:
            for k, v in ((out or {}).get("token_usage") or {}).items():
                total[k] = total.get(k, 0) + int(v)
        return {"model_name": self.model_name, "token_usage": total}

    # -- tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (BaseTool, typed functions, pydantic classes, TypedDicts, OpenAI
        dicts). `tool_choice`: "auto" (default), "none", "any"/"required"/True (some
        tool must be called), a tool name, or OpenAI's dict form. A required or named
        call is decoded under a grammar of the tools' schemas, so it always parses.
        `strict` and `parallel_tool_calls` are accepted for compatibility: calls are
        always checked against the schema, and a forced reply is one call."""
        converted = _tools(tools)
        choice = tool_choice_from_langchain(tool_choice, [t.name for t in converted])
        specs = [t.to_openai() for t in converted]
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=specs, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies as `schema` (pydantic class -> instance; TypedDict, JSON schema or
        OpenAI tool -> dict), decoded under a grammar so the JSON always matches.

        `method`: "json_schema" (default: the reply is the JSON), "function_calling"
        (a forced call of a tool shaped like the schema) or "json_mode" (any JSON
        object; `schema` optional). `include_raw=True` returns {"raw", "parsed",
        "parsing_error"}. Other keyword arguments are call parameters bound along
        (e.g. `max_tokens`); a reply cut off at max_tokens raises
        OutputParserException saying so.
        """
        unknown = sorted(set(kwargs) - set(_CALL_PARAMS) - set(_CALL_EXTRAS) - {"stop"})
        if unknown:
            raise InputError(unknown[0], "unknown argument for with_structured_output")
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        format_kwargs: dict[str, Any] = {"method": method, "strict": strict}
        if method == "function_calling":
            if schema is None:
                raise InputError("schema", "method='function_calling' needs a schema")
            try:
                name = _tools([schema])[0].name
            except InputError as e:
                raise InputError("schema", e.problem) from None
            llm = self.bind_tools(
                [schema], tool_choice=name,
                ls_structured_output_format={"kwargs": format_kwargs, "schema": schema},
                **kwargs,
            )
            parser: Runnable[Any, Any] = (
                _PydanticToolsParser(tools=[cast("type[Any]", schema)], first_tool_only=True)
                if is_model
                else _KeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                if schema is None:
                    raise InputError("schema", "method='json_schema' needs a schema")
                name, js = _schema_json(schema)
                response_format = {"type": "json_schema",
                                   "json_schema": {"name": name, "schema": js}}
                try:
                    Params.model_validate({"response_format": response_format})
                except ValueError as e:
                    raise InputError("schema", str(e).splitlines()[-1]) from None
            else:
                response_format = {"type": "json_object"}
            bind: dict[str, Any] = {"response_format": response_format, **kwargs}
            if schema is not None:
                bind["ls_structured_output_format"] = {"kwargs": format_kwargs, "schema": schema}
            llm = self.bind(**bind)
            parser = (_PydanticParser(pydantic_object=cast("type[Any]", schema)) if is_model
                      else _JsonParser())
        else:
            raise InputError("method", f"unknown method {method!r} "
                                       "(json_schema, function_calling or json_mode)")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                           parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback],
                                                           exception_key="parsing_error")


def _default_policy(model: str | None) -> Policy:
    """The default policy, serving `model` when one is named."""
    return Policy(backend=Local.model_validate({"model": model})) if model else Policy()


def _policy_digest(policy: Policy) -> str:
    """A short digest of everything in the policy (stages change what the model sees)."""
    import hashlib

    return hashlib.sha256(policy.describe().encode()).hexdigest()[:16]
