"""The local backend: a transformers chat model in this process.

Steps for one call: render the chat (tools into the system prompt, see
chat_format), check the window, pick decoding (greedy or sampled; grammar-
constrained for a required tool call or a JSON-schema reply), generate with
an optional streamer, trim at stop strings, then parse tool calls. It knows
nothing about stages or storage. Calls run one at a time here; batching is a
separate engine.

Prefix KV cache: the rendered system part of a prompt (system message(s) plus
the tools block chat_format puts there) is prefilled once and its keys/values
kept in a `PrefixCache`; later calls that open with the same tokens hand
`generate` a copy and prefill only the rest. Greedy output is unchanged.

Prompt lookup (`speculative="prompt_lookup"`): transformers' assisted
generation with `prompt_lookup_num_tokens`. Draft tokens are copied from where
the last n-gram (2, then 1 tokens) occurs earlier in the prompt or the reply so
far; one forward pass checks the whole draft and keeps the longest prefix the
model itself would have picked greedily, plus one token of its own. Lossless
for greedy decoding. Here on the single-request path (transformers supports
batch size 1): the padded batching engine sends a group of one here, so under
low load calls get prompt lookup and under load they batch; under static
decoding the engine's slots run their own prompt lookup (backends/continuous.py).
Skipped (plain decoding, the reason in the trace) for sampled calls, grammar-constrained calls
(the grammar processor keeps per-step state that drafting would advance),
stop strings (transformers' StopStringCriteria only looks at the end of the
sequence, and a step can add several tokens) and stateful models. Streaming
works: a step's accepted tokens reach the streamer together. A call served by
prompt lookup does not use the prefix KV cache (transformers' assisted decoding
runs its first pass over the whole prompt and can't start from a prefilled
cache); the trace says `prefix_cache_skipped="speculative"`. "Lossless" holds
in exact arithmetic: checking a draft in one pass rounds floats differently
from one token at a time, so a near-tie could in principle flip, as with
batching (not seen in the tests or the benchmark).

Draft model (`speculative="draft"`): transformers' assisted generation with a
draft model proposing up to `speculative_tokens` tokens per step (fewer when
its own top probability drops below transformers' default confidence cut, 0.4;
the count adapts within a call: +2 after a fully accepted draft, -1 otherwise),
checked by the main model in one pass, lossless as above. `draft_model` loads
a separate model like `model` does (same tokenizer: token ids are compared
directly; a different one goes through transformers' re-tokenizing path).
Without one the draft is the main model itself, exiting after its first
`draft_layers` decoder layers (transformers' `assistant_early_exit`: the same
module with `config.num_hidden_layers` lowered while drafting, so the same
embedding, final norm and head; no weights are copied). Early exit only drafts
well for models trained for it (LayerSkip): on SmolLM2-135M a 27-of-30-layer
draft has 33-39% of its tokens accepted, and on a CPU the drafting steps cost
more than they save, 0.4x the plain tokens/s (benchmarks/speculative.py;
shallower drafts are accepted even less: 1-14% at 4-20 layers). Same skip rules
and prefix-cache bypass as prompt lookup. The trace gives
`draft_target_passes` (main-model forward passes) and `draft_accepted_tokens`
(= completion tokens - those passes: the tokens that came from accepted drafts).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

from contextwise.backends.base import Backend
from contextwise.backends.chat_format import (
    TOOL_CALL_OPEN,
    parse_tool_calls,
    template_messages,
    tool_call_schema,
)
from contextwise.backends.grammar import Grammars
from contextwise.backends.loading import LoadedModel, load_model
from contextwise.backends.prefix_cache import PrefixCache, copy_cache
from contextwise.backends.prompt import forced_tools, render_prompt

from contextwise.errors import BackendError, Cancelled, ContextOverflow, InputError, ModelNotFound
from contextwise.types import Call, InvalidToolCall, Message, Reply, Tool, ToolCall, Usage

__all__ = ["LocalBackend", "left_padded", "plain_greedy"]

DEFAULT_MAX_TOKENS = 256
SPECULATIVE_MODES = ("none", "prompt_lookup", "draft")
DRAFT_LAYERS_FRACTION = 0.9  # self-draft default: 27 of SmolLM2-135M's 30 layers

_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> threading.Lock:
    """One lock per loaded model, shared by every backend on it (a self-draft
    changes the model's config while it drafts)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


class _PassCounter:
    """A stopping criterion that never stops: counts the main model's decoding
    steps (once per forward pass, in assisted decoding too)."""

    def __init__(self) -> None:
        self.passes = 0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.passes += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _QuietDraftConfig(logging.Filter):
    """Drops the deprecation notice transformers' own candidate generator triggers on
    every assisted-generation call (it passes generation_config and kwargs together)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing `generation_config` together with")


_QUIET_DRAFT = _QuietDraftConfig()


def _early_exit_supported(model: Any) -> bool:
    """Whether the base model's forward runs `layers[: config.num_hidden_layers]`
    (what transformers' assistant_early_exit relies on)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        return False
    try:
        return "num_hidden_layers" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False


class _DeltaStreamer:
    """A transformers streamer that sends text deltas to `sink`.

    It holds back any tail that could still become a stop string (or, with
    tools, the start of a `<tool_call>`), and a trailing partial UTF-8 char,
    so the deltas always add up to exactly the reply's final text.
    """

    def __init__(self, tokenizer: Any, sink: Callable[[str], None], markers: Sequence[str]):
        self.tokenizer = tokenizer
        self.sink = sink
        self.markers = [m for m in markers if m]
        self.ids: list[int] = []
        self.sent = ""  # text already handed to the sink
        self.done = False  # a marker was seen: nothing more is content
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(m) for m in self.markers) if i >= 0), default=-1)
        if cut >= 0:
            text, self.done = text[:cut], True
        else:
            hold = max((k for m in self.markers for k in range(1, len(m))
                        if text.endswith(m[:k])), default=0)
            text = text[: len(text) - hold]
        text = text.rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass

    def finish(self, final: str) -> None:
        """Send what the final text has beyond what was already sent."""
        if len(final) > len(self.sent) and final.startswith(self.sent):
            self.sink(final[len(self.sent):])
            self.sent = final


class LocalBackend(Backend):
    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | None = None,
        max_context_tokens: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        loaded: LoadedModel | None = None,
        prefix_cache_mb: float | None = None,
        prefix_cache_min_tokens: int = 32,
        quantization: str = "none",
        speculative: str = "none",
        speculative_tokens: int = 10,
        draft_model: str | None = None,
        draft_layers: int | None = None,
    ):
        """`prefix_cache_mb`: memory for cached prompt prefixes (KV), 0 turns
        the prefix cache off, None picks by device: 256 MB on CPU, off on a GPU
        (on an H100 the 135M model prefilled 1,544 tokens faster than the cache
        could be copied); `prefix_cache_min_tokens`: shorter system parts
        are not cached; `quantization`: a `backends.quantize` mode ('none',
        'int8', 'int8-dynamic', 'int4', 'fp8') applied to the loaded weights;
        `speculative`: 'prompt_lookup' turns on prompt-lookup decoding for greedy
        calls (see the module doc), drafting up to `speculative_tokens` per step;
        'draft' drafts with `draft_model` (loaded like `model`, same device and
        dtype) or, when None, with the main model's first `draft_layers` layers
        (None: 90% of them)."""
        if speculative not in SPECULATIVE_MODES:
            raise InputError("speculative",
                             f"must be one of {SPECULATIVE_MODES}, got {speculative!r}")
        if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
            raise InputError("speculative_tokens",
                             f"must be an int >= 1, got {speculative_tokens!r}")
        if draft_model is not None and (not isinstance(draft_model, str) or not draft_model):
            raise InputError("draft_model", f"must be a model name or path, got {draft_model!r}")
        if draft_layers is not None and (not isinstance(draft_layers, int)
                                         or isinstance(draft_layers, bool) or draft_layers < 1):
            raise InputError("draft_layers", f"must be an int >= 1 or None, got {draft_layers!r}")
        if speculative != "draft" and (draft_model is not None or draft_layers is not None):
            raise InputError("draft_model" if draft_model is not None else "draft_layers",
                             f"needs speculative='draft', got speculative={speculative!r}")
        if draft_model is not None and draft_layers is not None:
            raise InputError("draft_layers", "applies to the self-draft only (draft_model=None)")
        self.speculative = speculative
        self.speculative_tokens = speculative_tokens
        self.loaded = loaded or load_model(model, device=device, dtype=dtype, cache_dir=cache_dir,
                                           quantization=quantization)
        self.quantization = self.loaded.quantization
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.model_name = model
        window = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.context_window = min(window, max_context_tokens or window)
        self.default_max_tokens = default_max_tokens
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
        self._lock = _model_lock(self.model)  # one generate at a time on this model
        self.draft: LoadedModel | None = None  # speculative="draft" with a draft_model
        self.draft_layers: int | None = None  # speculative="draft", self-draft
        self._draft_same_tokenizer = True
        if speculative == "draft":
            self._init_draft(draft_model, draft_layers, device, dtype, cache_dir)
        if prefix_cache_mb is None:
            prefix_cache_mb = 256 if str(self.model.device).startswith("cpu") else 0
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(int(prefix_cache_mb * 2**20), prefix_cache_min_tokens)
            if prefix_cache_mb > 0 else None
        )
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._prefix_token_ids = lru_cache(maxsize=64)(self._prefix_token_ids_uncached)

    def _init_draft(self, draft_model: str | None, draft_layers: int | None, device: str,
                    dtype: str, cache_dir: str | None) -> None:
        logging.getLogger("transformers.generation.utils").addFilter(_QUIET_DRAFT)  # once: a set
        if draft_model is None:
            n = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
            if n < 2 or not _early_exit_supported(self.model):
                raise InputError("draft_layers", f"model {self.model_name!r} does not support a "
                                 "self-draft (early exit); set draft_model")
            layers = draft_layers or max(1, min(n - 1, round(DRAFT_LAYERS_FRACTION * n)))
            if layers >= n:
                raise InputError("draft_layers", f"must be below the model's {n} layers "
                                 f"(a draft as deep as the model saves nothing), got {layers}")
            self.draft_layers = layers
            return
        try:
            self.draft = load_model(draft_model, device=device, dtype=dtype, cache_dir=cache_dir)
        except ModelNotFound as e:
            raise ModelNotFound(f"draft_model: {e}") from None
        if str(self.draft.model.device) != str(self.model.device):
            raise InputError("draft_model", f"loads on {self.draft.model.device}, the main "
                             f"model on {self.model.device}; give the same device")
        self._draft_same_tokenizer = self.draft.tokenizer.get_vocab() == self.tokenizer.get_vocab()

    def _draft_kwargs(self) -> dict[str, Any]:
        """generate() kwargs for speculative='draft' (under the model lock)."""
        assistant = self.model if self.draft is None else self.draft.model
        config = assistant.generation_config  # what transformers' candidate generator reads
        config.num_assistant_tokens = self.speculative_tokens
        config.num_assistant_tokens_schedule = "heuristic_transient"  # adapt within a call only
        if self.draft is None:
            return {"assistant_early_exit": self.draft_layers}
        kwargs: dict[str, Any] = {"assistant_model": assistant}
        if not self._draft_same_tokenizer:
            kwargs.update(tokenizer=self.tokenizer, assistant_tokenizer=self.draft.tokenizer)
        return kwargs

    # -- prompt

    def render(self, call: Call) -> str:
        return render_prompt(self.tokenizer, call)

    def decode_texts(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        """`tokenizer.decode(ids, skip_special_tokens=True)` of each sequence; a fast
        tokenizer decodes them all in one call, in parallel and outside the GIL (256
        replies finishing together cost the batching engine's worker ~15 ms one by one)."""
        tok = self.tokenizer
        fast = getattr(tok, "backend_tokenizer", None)
        if fast is None or getattr(tok, "clean_up_tokenization_spaces", False):
            return [tok.decode(list(s), skip_special_tokens=True) for s in seqs]
        return fast.decode_batch([list(s) for s in seqs], skip_special_tokens=True)

    def _prefix_token_ids_uncached(self, system: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
        text = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in system], tokenize=False,
            add_generation_prompt=False,
        )
        return tuple(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def system_prefix(self, call: Call, ids: Sequence[int]) -> tuple[int, ...] | None:
        """Token ids of the prompt's system part, if worth caching, else None.

        The leading system message(s) of the templated chat (tools included)
        rendered alone; used only when those ids are an exact prefix of the
        full prompt `ids`, leave at least one token after them and reach the
        prefix cache's `min_tokens`.
        """
        if self.prefix_cache is None:
            return None
        system: list[tuple[str, str]] = []
        for m in template_messages(call):
            if m["role"] != "system":
                break
            system.append((m["role"], m["content"]))
        if not system:
            return None
        prefix = self._prefix_token_ids(tuple(system))
        n = len(prefix)
        if n < self.prefix_cache.min_tokens or n >= len(ids) or tuple(ids[:n]) != prefix:
            return None
        return prefix

    def _prefill(self, ids: Sequence[int], start: int, cache: Any) -> Any:
        """Run the model over ids[start:] on top of `cache` (None: empty); the grown cache."""
        import torch
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        x = torch.tensor([list(ids[start:])], dtype=torch.long, device=self.model.device)
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        self.model(input_ids=x, use_cache=True, **{self._cache_kw: cache}, **extra)
        return cache

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        return self.prompt_tokens(Call(messages=list(messages), tools=list(tools)))

    def prompt_tokens(self, call: Call) -> int:
        return len(self.tokenizer(self.render(call), add_special_tokens=False)["input_ids"])

    # -- generation

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        return [self._generate_one(c) for c in calls]

    def streamer(self, call: Call, prompt_seen: bool = False) -> _DeltaStreamer | None:
        """The call's stream (None without `on_delta`), holding back text that may turn
        out to be a stop string or a tool call; `prompt_seen`: it is fed the new tokens
        only (the batching engine's rows)."""
        if call.on_delta is None:
            return None
        markers = list(call.params.stop or [])
        if call.tools and call.params.tool_choice != "none":
            markers.append(TOOL_CALL_OPEN)
        streamer = _DeltaStreamer(self.tokenizer, call.on_delta, markers)
        streamer.prompt_seen = prompt_seen
        return streamer

    def generate_scored(self, call: Call) -> tuple[Reply, list[float]]:
        """One call, plus the probability the model gave each token it chose (its own
        softmax over the raw logits, before temperature / top_p / grammar)."""
        probs: list[float] = []
        return self._generate_one(call, probs=probs), probs

    def batchable(self, call: Call) -> bool:
        """Whether `call` can share one padded batch in `generate_scored_batch`:
        `plain_greedy` and not streamed."""
        return plain_greedy(call) and call.on_delta is None

    def generate_scored_batch(
        self, calls: Sequence[Call],
    ) -> list[tuple[Reply, list[float]] | BaseException]:
        """`generate_scored` for many `batchable` calls at once: one left-padded
        greedy `generate`, each row cut at its own EOS and max_tokens. Per call,
        (reply, probabilities) or the error that call met (ContextOverflow), so one
        bad call does not fail the others. The confidence cascade's small model
        answers a concurrent group this way. Padding changes float rounding, so a
        near-tie can pick another token than the single path would (fp32 on CPU:
        the same text for all 16 rows of benchmarks/backend.py)."""
        import torch

        t0 = time.perf_counter()
        results: list[Any] = [None] * len(calls)  # each call's result, set below
        rows: list[tuple[int, list[int], int]] = []  # (index, prompt ids, max_new)
        for i, call in enumerate(calls):
            if not self.batchable(call):
                raise InputError("calls", "generate_scored_batch takes greedy, unconstrained, "
                                          "unstreamed calls without stop strings only "
                                          "(see batchable)")
            ids = self.tokenizer(self.render(call), add_special_tokens=False)["input_ids"]
            max_new = call.params.max_tokens or self.default_max_tokens
            if len(ids) + max_new > self.context_window:
                results[i] = ContextOverflow(len(ids), max_new, self.context_window)
            else:
                rows.append((i, ids, max_new))
        if not rows:
            return results
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids, mask = left_padded([ids for _, ids, _ in rows], pad)
        width = input_ids.shape[1]
        scorer = _ChosenProbs()
        with self._lock, torch.inference_mode():
            try:
                out = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    max_new_tokens=max(m for _, _, m in rows), pad_token_id=pad,
                    eos_token_id=tok.eos_token_id, do_sample=False, temperature=None,
                    top_p=None, top_k=None, logits_processor=[scorer],
                )
            except Cancelled:
                raise
            except Exception as e:
                raise BackendError(f"generation failed: {type(e).__name__}: {e}") from e
            new = out[:, width:]
            probs = scorer.finish(new[:, -1])  # [rows, steps]
        for r, (i, ids, max_new) in enumerate(rows):
            chosen = new[r, :max_new].tolist()
            if tok.eos_token_id in chosen:
                chosen = chosen[: chosen.index(tok.eos_token_id) + 1]
            reply = self._reply(calls[i], chosen, len(ids), t0, None, None,
                                prefix_cached_tokens=0, prefix_stored_tokens=0,
                                batch_size=len(rows))
            results[i] = (reply, probs[r, : len(chosen)].tolist())
        return results

    def speculative_skip(self, call: Call) -> str | None:
        """Why speculative decoding (prompt lookup or a draft) can't serve `call`
        (plain decoding then), or None when it can."""
        p = call.params
        if p.temperature > 0:
            return "sampled"
        if p.response_format or forced_tools(call):
            return "constrained"
        if p.stop:
            return "stop_strings"
        if getattr(self.model, "_is_stateful", False):
            return "stateful_model"
        return None

    def _generate_one(self, call: Call, probs: list[float] | None = None) -> Reply:
        import torch
        from transformers import StoppingCriteriaList

        t0 = time.perf_counter()
        p = call.params
        forced = forced_tools(call)
        max_new = p.max_tokens or self.default_max_tokens
        enc = self.tokenizer(self.render(call), return_tensors="pt", add_special_tokens=False)
        n_prompt = int(enc["input_ids"].shape[1])
        if n_prompt + max_new > self.context_window:
            raise ContextOverflow(n_prompt, max_new, self.context_window)
        ids: list[int] = enc["input_ids"][0].tolist() if self.prefix_cache is not None else []
        prefix = self.system_prefix(call, ids)

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if forced:
            kwargs["logits_processor"] = [
                self.grammars.processor(tool_call_schema(forced), max_new=max_new)]
        elif p.response_format:
            kwargs["logits_processor"] = [self.grammars.processor(p.json_schema, max_new=max_new)]
        if p.stop and not forced and not p.response_format:
            kwargs.update(stop_strings=p.stop, tokenizer=self.tokenizer)
        streamer = None if forced else self.streamer(call)
        if streamer is not None:
            kwargs["streamer"] = streamer
        spec_trace: dict[str, Any] = {}
        passes: _PassCounter | None = None
        if self.speculative != "none":
            skip = self.speculative_skip(call)
            if skip is None:
                if self.speculative == "prompt_lookup":
                    kwargs["prompt_lookup_num_tokens"] = self.speculative_tokens
                else:
                    passes = _PassCounter()
                    kwargs["stopping_criteria"] = StoppingCriteriaList([passes])
                spec_trace["speculative"] = self.speculative
                if prefix is not None:
                    # transformers' assisted decoding runs its first forward pass over the
                    # whole prompt, so a prefilled cache would see the prefix twice.
                    prefix = None
                    spec_trace["prefix_cache_skipped"] = "speculative"
            else:
                spec_trace.update(speculative="none", speculative_skipped=skip)

        reused = stored = 0
        with self._lock, torch.inference_mode():
            enc = enc.to(self.model.device)
            try:
                if prefix is not None and self.prefix_cache is not None:
                    hit = self.prefix_cache.lookup(ids)
                    reused, past = hit if hit is not None else (0, None)
                    if reused < len(prefix):
                        # Prefill the system part (on top of a shorter hit), keep it, use a copy.
                        past = self._prefill(prefix, reused, past)
                        if self.prefix_cache.store(prefix, past):
                            stored = len(prefix)
                            past = copy_cache(past)
                    if past is not None:
                        kwargs[self._cache_kw] = past  # generate prefills only the rest
                if passes is not None:
                    kwargs.update(self._draft_kwargs())
                if probs is not None:
                    kwargs.update(output_logits=True, return_dict_in_generate=True)
                if p.seed is not None:
                    torch.manual_seed(p.seed)
                out = self.model.generate(**enc, **kwargs)
                if probs is not None:
                    chosen = out.sequences[0, n_prompt:]
                    logits = torch.cat(out.logits, dim=0)[: chosen.shape[0]].float()
                    probs.extend(torch.softmax(logits, dim=-1)
                                 .gather(1, chosen[:, None]).squeeze(1).tolist())
                    out = out.sequences
            except Cancelled:
                raise
            except Exception as e:
                raise BackendError(f"generation failed: {type(e).__name__}: {e}") from e
        new_ids = out[0, n_prompt:].tolist()
        if passes is not None:
            spec_trace.update(draft_target_passes=passes.passes,
                              draft_accepted_tokens=max(0, len(new_ids) - passes.passes))
        return self._reply(call, new_ids, n_prompt, t0, forced, streamer,
                           prefix_cached_tokens=reused, prefix_stored_tokens=stored, **spec_trace)

    def _reply(self, call: Call, new_ids: list[int], n_prompt: int, t0: float,
               forced: list[Tool] | None, streamer: _DeltaStreamer | None,
               text: str | None = None, **trace: Any) -> Reply:
        """The Reply for `new_ids` (the generated tokens): stop strings trimmed, tool
        calls parsed, the stream finished, a "backend" trace record (plus `trace`).
        Shared by the single path above and the batching engine (which may pass `text`,
        new_ids decoded already: `decode_texts`)."""
        p = call.params
        ended = bool(new_ids) and new_ids[-1] == self.tokenizer.eos_token_id
        if text is None:
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "stop" if ended else "length"
        if p.stop and not forced:
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"

        calls: list[ToolCall] = []
        invalid: list[InvalidToolCall] = []
        content: str | None = text
        if forced:
            content = None
            calls, invalid = _forced_call(text, forced)
        elif call.tools and p.tool_choice != "none":
            content, calls, invalid = parse_tool_calls(text, call.tools)
        if calls:
            finish = "tool_calls"
        if content is None and not calls:
            content = ""  # an invalid forced call: the raw text is in invalid_tool_calls
        if streamer is not None:
            streamer.finish(content or "")
        call.trace.add(
            "backend", model=self.model_name, prompt_tokens=n_prompt,
            completion_tokens=len(new_ids), constrained=bool(forced or p.response_format),
            **trace,
        )
        return Reply(
            message=Message(role="assistant", content=content, tool_calls=calls or None),
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=len(new_ids)),
            model=self.model_name,
            finish_reason=finish,
            trace=call.trace,
            invalid_tool_calls=invalid,
            latency_s=time.perf_counter() - t0,
        )


def plain_greedy(call: Call) -> bool:
    """Whether `call` decodes as a row of a plain greedy batch: greedy, no grammar
    (response_format, forced tool), no stop strings (a batch row's tokens and
    probabilities would run past them)."""
    p = call.params
    return (p.temperature == 0 and not p.response_format and not forced_tools(call)
            and not p.stop)


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of prompts left-padded to the longest, as
    `generate` takes a batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        dtype=torch.long)
    return ids, mask


class _ChosenProbs:
    """A logits processor that leaves the scores alone and keeps, per row, the
    probability of each token the step picked: softmax of the step's scores
    (the raw logits when no other processor runs: greedy, no grammar), read
    at the next step, when the pick has joined `input_ids`. One step's
    distribution is held at a time, not every step's logits."""

    def __init__(self) -> None:
        self._last: Any = None
        self._probs: list[Any] = []

    def _take(self, picked: Any) -> None:
        self._probs.append(self._last.gather(1, picked[:, None].to(self._last.device))[:, 0])

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._last is not None:
            self._take(input_ids[:, -1])
        self._last = torch.softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_picked: Any) -> Any:
        """[rows, steps] probabilities, given the last step's picks."""
        import torch

        if self._last is not None:
            self._take(last_picked)
            self._last = None
        return torch.stack(self._probs, dim=1).cpu()


def _forced_call(text: str, tools: list[Tool]) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """Parse the JSON that grammar-constrained decoding produced inside <tool_call>."""
    raw = text.split("</tool_call>")[0].strip()
    _, calls, invalid = parse_tool_calls(TOOL_CALL_OPEN + raw, tools)
    if not calls and not invalid:
        invalid = [InvalidToolCall(raw=raw, error="no tool call in output")]
    return calls, invalid

