"""Static-KV decoding for Llama-family models: fixed slots, CUDA graphs for decode.

    dec = StaticDecoder.build(model, slots=256, max_len=2048)   # None: unsupported model
    logits = dec.prefill([0, 1], [ids_a, ids_b])     # [2, vocab]: each prompt's last token
    dec.copy_prefix([(0, 2, 40)])                     # slot 2 takes slot 0's first 40 positions
    dec.prefill([2], [ids_c], starts=[40])            # ids_c[:40] == ids_a[:40]: the rest only
    tokens, _ = dec.decode(2, [a, b], [len(ids_a), len(ids_b)], steps=8)  # [2, 8] greedy
    run = dec.launch(2, [a, b], [len(ids_a), len(ids_b)], steps=8)  # queued, not waited for
    nxt = dec.launch(2, None, [len(ids_a) + 8, len(ids_b) + 8], steps=8)  # goes on from it
    first8, next8 = run.tokens(), nxt.tokens()

Why: transformers' `generate` spends its time launching ~1,000 small kernels per
token from Python (one H100 gave 13-17 tok/s on a 135M model whose weights it
could read 12,000 times a second). Here the key/value cache is preallocated
(`slots` sequences x `max_len` positions) and every decode step has fixed
shapes, so on CUDA a whole step (and, for greedy rows, several steps, the
chosen token fed back on the device) is captured once as a CUDA graph and
replayed with one launch.

The model's own weights and rotary tables do the work. With plain float
linears, q/k/v and gate/up are fused into one matmul each (the modules' weights
become views of the fused tensors) and a decode layer is one pure function of
tensors (`compile=True` runs it through torch.compile: one compile for every
layer and shape; `kernels="triton"`, or "auto" on CUDA, runs it as five fused
Triton kernels, backends/triton_decode.py, which also prefill prompts of up to
TRITON_PREFILL_MAX tokens, one prompt of up to PREFILL_GRAPH_MAX tokens as a
graph replay, and lays the cache out position-major, each position's slots
together, so a step's reads and writes share few memory pages; greedy launches
there pick the next token with two more kernels, final norm + lm_head + argmax,
without a logits tensor; with the tile `persistent`, a one-row greedy step is one
persistent kernel, backends/triton_persistent.py); quantized linears keep the
module path, so they behave as in transformers. Only the attention over the
static cache and the cache writes are written here. Each slot has its own
position, so sequences of different lengths decode together and a finished slot
takes a new sequence while the others go on (continuous batching;
`backends/continuous.py` schedules it).

A decode step over `n` slots attends over the first `L` cache positions with
a per-slot mask (`position <= pos`): graphs are captured lazily per (n, L)
bucket (powers of two), so short contexts do not read the whole cache.
Positions past a slot's prompt hold garbage until that slot's decode
overwrites them; the mask never lets a step see them first.

Supported: `LlamaForCausalLM`, `MistralForCausalLM` (no sliding window below
`max_len`), `Qwen2ForCausalLM`; anything else returns None from `build` and the
caller keeps transformers' generate.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["KERNELS", "KV_LAYOUTS", "Pending", "ResumeFailed", "StaticDecoder", "cache_dtype",
           "kv_bytes_per_slot", "supported"]

KERNELS = ("auto", "torch", "triton")  # what computes a decode layer (auto: triton on CUDA)
KV_LAYOUTS = ("slot", "position")  # how the cache is laid out in memory (_cache_tensor)
_ARCHITECTURES = {"llama", "mistral", "qwen2"}
_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}  # position-only tables
_MIN_L = 128  # the smallest attention window a graph is captured for
MAX_VERIFY = 16  # tokens per slot in one verify pass at most (the last one + a draft)
# Most tokens of a prompt the Triton kernels prefill (past a reused prefix: its rest):
# each token's attention is one program's loop over its earlier positions (quadratic;
# SDPA's flash kernels take longer prompts).
TRITON_PREFILL_MAX = 1024
# One prompt of up to this many tokens prefills (on the Triton kernels) as a CUDA graph
# replay, padded to a power of two: launching ~150 kernels from Python took ~7-10 ms on an
# H100 host, a tenth of a 128-token reply at batch 1.
PREFILL_GRAPH_MAX = 256


def supported(model: Any) -> str | None:
    """Why `model` can't use static decoding, or None when it can."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _ARCHITECTURES:
        return f"architecture {getattr(cfg, 'model_type', None)!r} is not llama/mistral/qwen2"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type: str | None = "default"  # a config may hold None
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    return None


def cache_dtype(model: Any) -> Any:
    """The dtype keys and values are kept in: the activations', which is the final
    norm's weight dtype (quantization leaves norms alone; embeddings may be int8)."""
    return model.model.norm.weight.dtype


def kv_bytes_per_slot(model: Any, max_len: int, dtype: Any) -> int:
    import torch

    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * max_len * head_dim * elt


class ResumeFailed(RuntimeError):
    """A resumed launch did not run (the Triton kernels failed and are off now): launch
    again with the tokens and positions from the host."""


class Pending:
    """The greedy tokens [n, steps] of a launched decode, on their way to the host;
    `fault`: (a host flag copied with them, what to call when it is set: the one-row
    step's barrier gave up, so the tokens are garbage and `tokens` raises)."""

    def __init__(self, host: Any, done: Any, fault: tuple[Any, Any] | None = None):
        self.host, self.done, self.fault = host, done, fault

    def tokens(self) -> list[list[int]]:
        if self.done is not None:
            self.done.synchronize()
        if self.fault is not None and int(self.fault[0][0]):
            self.fault[1]()
            raise RuntimeError("the one-row decode step's grid barrier timed out (not every "
                               "program was resident on the GPU): its tokens are void; the "
                               "decoder is back on the layer kernels")
        return self.host.tolist()


class Alternating:
    """Two buffers per shape, handed out in turn (made by `make(shape)` on first need):
    a launched chunk's tokens land in one while the host still reads the chunk before
    it from the other. (Reusing one buffer for two chunks in flight hands the first
    chunk's reader the second chunk's tokens.)"""

    def __init__(self, make: Any):
        self.make = make
        self.rings: dict[tuple[int, ...], list[Any]] = {}

    def take(self, shape: tuple[int, ...]) -> Any:
        ring = self.rings.setdefault(shape, [])
        if len(ring) < 2:
            ring.append(self.make(shape))
        else:
            ring.append(ring.pop(0))
        return ring[-1]


class StaticDecoder:
    """Preallocated KV cache for `slots` sequences of up to `max_len` tokens, and the
    prefill / decode passes over it. Not thread-safe: one caller (the engine's
    worker) drives it."""

    def __init__(self, model: Any, slots: int, max_len: int, cuda_graphs: bool = True,
                 lock: Any = None, compile: bool = False, eos: int | None = None,
                 kernels: str = "torch", kv_layout: str | None = None):
        import torch

        reason = supported(model)
        if reason is not None:
            raise ValueError(f"static decoding unsupported: {reason}")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.scale = self.head_dim ** -0.5
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            raise ValueError(f"static decoding unsupported: sliding window {window} < {max_len}")
        self.slots = int(slots)
        self.max_len = int(max_len)
        self.device = next(model.parameters()).device
        self.dtype = cache_dtype(model)
        if kv_layout is not None and kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        with torch.inference_mode():
            positions = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.inner.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype).contiguous()  # [max_len, D]
        self.sin = sin[0].to(self.dtype).contiguous()
        self.arange = torch.arange(self.max_len, device=self.device)
        self.rows = torch.arange(self.slots, device=self.device)
        # Graph inputs/outputs live in fixed buffers; the host copies into them.
        self.tokens = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        # Steps each slot still may not end (EOS masked, as transformers' min_new_tokens).
        self.eos = eos
        self.ban = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self._verify_buffers: tuple[Any, ...] | None = None  # made on first verify
        self._one_row: Any = None  # the persistent one-row step, made on first use
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # (n, window, steps, logits) -> (the CUDA graph, its outputs: tokens, logits or
        # None); ("prefill", width, window) -> (the graph, a one-prompt prefill's logits)
        self._graphs: dict[tuple, tuple[Any, Any]] = {}
        self._pool: Any = None
        self._host = Alternating(  # pinned host buffers for `launch`'s tokens
            lambda shape: torch.empty(shape, dtype=torch.long, pin_memory=True))
        self._host_flags = Alternating(  # and for the one-row step's barrier flag
            lambda shape: torch.empty(shape, dtype=torch.int32, pin_memory=True))
        self._prefill_inputs: dict[int, Any] = {}  # width -> a graphed prefill's inputs
        self._lock = lock if lock is not None else threading.Lock()  # the model's, if shared
        # Plain float weights: q/k/v and gate/up become one matmul each (the modules'
        # weights turn into views of the fused tensors: no extra memory), and a decode
        # layer is one pure function of tensors, which torch.compile can take.
        self.fused = _fuse_layers(self.layers, self.heads, self.kv_heads, self.head_dim)
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self._decode_layer = _decode_layer_for(self.heads, self.kv_heads, self.head_dim,
                                               self.eps, self.scale)
        # "triton": the five fused kernels of backends/triton_decode.py per layer; "auto":
        # those on CUDA when they can run, else the torch kernels
        self.kernels, self.triton = "torch", None
        self.stats: dict[str, Any] = {}
        auto = kernels == "auto" and self.device.type == "cuda" and not compile
        if kernels == "triton" or auto:
            why = self._triton_unusable()
            if why is None:
                from contextwise.backends.triton_decode import TritonLayers

                self.triton = TritonLayers(self.heads, self.kv_heads, self.head_dim,
                                           self.eps, self.scale)
                self.kernels = "triton"
            else:
                self.stats["kernels_note"] = f"triton kernels off: {why}"
        # The final norm and output embedding, for the Triton greedy head (the next tokens
        # without logits): a plain lm_head without bias only.
        head = getattr(self.model, "lm_head", None)
        norm_w = getattr(getattr(self.inner, "norm", None), "weight", None)
        self.output_weights = ((norm_w, head.weight) if head is not None and _plain(head)
                               and head.bias is None and norm_w is not None else None)
        # Position-major suits the Triton kernels (an H100 engine at 256 requests: 91,920
        # against 66,861 tok/s slot-major); the torch kernels' SDPA reads slot-major.
        self.kv_layout = kv_layout or ("position" if self.triton is not None else "slot")
        self.k = [self._cache_tensor() for _ in self.layers]
        self.v = [self._cache_tensor() for _ in self.layers]
        self.compiled = bool(compile) and self.fused is not None and self.triton is None
        if self.compiled:
            # One compile serves every layer and every (n, window): those two sizes are
            # symbolic, everything else (weights, the model's constants) static, so a
            # coincidence such as n == head_dim can't specialize (and recompile) it.
            self._decode_layer = _symbolic(torch.compile(self._decode_layer))
        self.stats.update({"graphs_captured": 0, "replays": 0, "eager_steps": 0,
                           "prefills": 0})

    def _cache_tensor(self) -> Any:
        """One layer's keys or values, seen as [slots, kv_heads, max_len, D] whatever the
        layout in memory. "slot": each slot's positions together. "position": each
        position's slots together, so a step's reads and writes (every slot's first
        positions) share a few memory pages, however many slots and positions there are."""
        import torch

        if self.kv_layout == "slot":
            shape = (self.slots, self.kv_heads, self.max_len, self.head_dim)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        shape = (self.max_len, self.slots, self.kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device).permute(1, 2, 0, 3)

    def _triton_unusable(self) -> str | None:
        from contextwise.backends.triton_decode import available

        if available() is not None:
            return available()
        if self.fused is None:
            return "they need plain float linears (this model's are quantized or unusual)"
        if self.device.type != "cuda":
            import triton

            if not triton.knobs.runtime.interpret:
                return "they need CUDA (or Triton's interpreter, TRITON_INTERPRET=1: tests)"
        if self.head_dim < 32 or self.head_dim & (self.head_dim - 1):
            return f"head_dim {self.head_dim} is not a power of two >= 32"
        return None

    def warm_up(self) -> None:
        """Compile the decode layer now (n = 1, 2, 32 and 64: each tile kind; on the
        Triton kernels also the greedy head, the attention split along the sequence, and
        the prefill's row blocks of 32 and 64, with graphs each one-prompt prefill graph
        up to PREFILL_GRAPH_MAX tokens, from position 0 and after a reused prefix in
        windows up to 1,024), not on the first requests (seconds each); a no-op unless
        compiled or on the Triton kernels (on CUDA: they compile on first use). Writes
        only garbage: at position 0 of the first 64 slots, and at the first positions
        of slot 0."""
        import torch

        if not (self.compiled or (self.triton is not None and self.device.type == "cuda")):
            return
        with self._lock, torch.inference_mode():
            while True:
                try:
                    # each row block (16, 32, 64 rows: 1 and 2 rows take the batch-1 tiles)
                    for n in sorted({1, min(2, self.slots), min(32, self.slots),
                                     min(64, self.slots)}):
                        for logits in (True, False):  # and the greedy head (2 steps: the
                            # second's column of the chunk is 8 bytes off triton's alignment)
                            self.tokens[:n].zero_()
                            self.pos[:n].zero_()
                            self._run(n, self.window_for(0), 1 if logits else 2, logits)
                    # attention split along the sequence (one kernel for every split count)
                    wide = self.window_for(self.max_len - 1)
                    if self.triton is not None and self.triton.splits(1, wide) > 1:
                        self.tokens[:1].zero_()
                        self.pos[:1].zero_()
                        self._run(1, wide, 1, True)
                    if self._one_row is not None and not self._one_row.healthy():
                        # a barrier gave up: not every program was resident at once
                        self._persistent_off("a grid barrier of the one-row step timed out")
                        continue
                    break
                except Exception as e:
                    if self.triton is None:
                        raise
                    self._triton_failed(e)  # then again without PDL, or on the torch kernels
        if self.triton is not None and self.max_len >= 33:
            try:
                # Two prompts (never a graph) of 17 and 33 rows in all: each row block, at
                # a row count that is not a multiple of 16 (triton specializes ints that are)
                for width in (17, 33):
                    self._prefill_triton([0, 0], [[0] * (width - 8), [0] * 8], [width - 8, 8])
                if self.cuda_graphs:  # the one-prompt prefill graphs
                    for width in (16, 32, 64, 128, 256):
                        if width <= min(self.max_len, PREFILL_GRAPH_MAX):
                            self._prefill_triton([0], [[0] * width], [width])
                    # and after a reused prefix, for windows up to 1,024 (a prompt's rest
                    # ending at the window's last position: its graph's key)
                    for window in (128, 256, 512, 1024):
                        for width in (16, 32, 64, 128, 256):
                            if width < window <= self.max_len and width <= PREFILL_GRAPH_MAX:
                                self._prefill_triton([0], [[0] * window], [window],
                                                     [window - width])
            except Exception as e:  # noqa: BLE001  (as in prefill: the torch kernels go on)
                self._triton_failed(e)

    @classmethod
    def build(cls, model: Any, slots: int, max_len: int, cuda_graphs: bool = True,
              lock: Any = None, compile: bool = False, eos: int | None = None,
              kernels: str = "torch", kv_layout: str | None = None) -> StaticDecoder | None:
        """A decoder for `model`, or None when its architecture is not supported."""
        if supported(model) is not None:
            return None
        try:
            return cls(model, slots, max_len, cuda_graphs=cuda_graphs, lock=lock,
                       compile=compile, eos=eos, kernels=kernels, kv_layout=kv_layout)
        except ValueError:
            return None

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- the passes

    def _layer(self, i: int, layer: Any, x: Any, cos: Any, sin: Any, write: Any,
               attend: Any) -> Any:
        """One decoder layer through the model's modules; `write(i, k, v)` stores the new
        keys/values, `attend(i, q, k, v)` returns the attention output [b, heads, t, D]."""
        b, t, _ = x.shape
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        write(i, k, v)
        o = attend(i, q, k, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        x = x + attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, x: Any) -> Any:
        return self.model.lm_head(self.inner.norm(x)).float()

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                starts: Sequence[int] | None = None) -> Any:
        """Fill `slots` with `prompts` (positions 0..len-1, replacing what a slot held
        there); the logits [len(slots), vocab] (float32) of each prompt's last token.
        `starts[i]`: positions 0..starts[i]-1 of slot i already hold prompt i's keys and
        values (left by an earlier prompt with that prefix, or `copy_prefix`), so only
        its tokens from there on are computed; each start must be below its prompt's
        length (the last token's logits are computed). None: all 0."""
        import torch
        import torch.nn.functional as F

        if len(slots) != len(prompts) or not prompts:
            raise ValueError("prefill needs one prompt per slot")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.max_len:
            raise ValueError(f"prompt lengths must be 1..{self.max_len}, got {lengths}")
        if any(not 0 <= s < self.slots for s in slots) or len(set(slots)) < len(slots):
            raise ValueError(f"slots must be distinct, 0..{self.slots - 1}; got {list(slots)}")
        starts = [0] * len(prompts) if starts is None else [int(s) for s in starts]
        if len(starts) != len(prompts) or any(
                not 0 <= s < n for s, n in zip(starts, lengths, strict=True)):
            raise ValueError(f"starts must be one per prompt, each 0..its length - 1; got "
                             f"{starts} for lengths {lengths}")
        width = max(lengths)
        computed = max(n - s for n, s in zip(lengths, starts, strict=True))
        if self.triton is not None and computed <= TRITON_PREFILL_MAX:
            try:
                logits = self._prefill_triton(slots, prompts, lengths, starts)
            except Exception as e:  # noqa: BLE001  (an experimental kernel must not fail it)
                self._triton_failed(e)
            else:
                self.stats["prefills"] += 1
                return logits
        if any(starts):
            logits = self._prefill_after(slots, prompts, lengths, starts)
            self.stats["prefills"] += 1
            return logits
        ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts],
                           dtype=torch.long, device=self.device)
        where = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        cos, sin = self.cos[:width][None, None], self.sin[:width][None, None]

        def write(i: int, k: Any, v: Any) -> None:
            # Right padding: a short prompt writes garbage past its end, which the
            # decode mask hides until that slot's own decode overwrites it.
            self.k[i][where, :, :width] = k
            self.v[i][where, :, :width] = v

        group = self.heads // self.kv_heads

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            if group > 1:  # plain repeats: every SDPA backend takes them
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

        with self._lock, torch.inference_mode():
            x = self.inner.embed_tokens(ids)
            for i, layer in enumerate(self.layers):
                x = self._layer(i, layer, x, cos, sin, write, attend)
            last = torch.tensor([n - 1 for n in lengths], device=self.device)
            logits = self._logits(x[torch.arange(len(prompts), device=self.device), last])
        self.stats["prefills"] += 1
        return logits

    def _prefill_after(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                       lengths: list[int], starts: list[int]) -> Any:
        """`prefill` through the model's modules of each prompt's tokens from its start
        on (right-padded to the longest such part), attending over the slot's cache: the
        positions before the start hold the prompt's prefix already."""
        import torch

        width = max(n - s for n, s in zip(lengths, starts, strict=True))
        ids = torch.tensor([list(p[s:]) + [0] * (width - len(p) + s)
                            for p, s in zip(prompts, starts, strict=True)], dtype=torch.long)
        offsets = torch.arange(width)
        pos = torch.tensor(starts)[:, None] + offsets  # [b, width]
        valid = offsets[None, :] < torch.tensor(lengths)[:, None] - torch.tensor(starts)[:, None]
        b = len(prompts)
        with self._lock, torch.inference_mode():
            ids, pos, valid = (t.to(self.device) for t in (ids, pos, valid))
            where = torch.tensor(list(slots), dtype=torch.long, device=self.device)
            pos = pos.clamp(max=self.max_len - 1)  # padding past the slot: never written
            # only each prompt's own tokens are written: padding must not touch the cache
            put = (where[:, None].expand(b, width)[valid], pos[valid])
            x = self._over_cache(ids, pos, self.window_for(max(lengths) - 1), where, put,
                                 keep=valid)
            last = torch.tensor([n - s - 1 for n, s in zip(lengths, starts, strict=True)],
                                device=self.device)
            return self._logits(x[torch.arange(b, device=self.device), last])

    def _over_cache(self, ids: Any, pos: Any, window: int, read: Any, put: tuple[Any, Any],
                    keep: Any = None) -> Any:
        """The model's modules over tokens `ids` [b, t] at positions `pos` [b, t] (each
        below max_len) of the b slots `read` (a slice or an index of slots): their keys
        and values are written at `put` (slot and position indices; `keep` [b, t]: only
        those tokens'), and each token attends to its slot's first `window` positions up
        to its own. The last layer's output [b, t, hidden]. No host sync without `keep`."""
        import torch.nn.functional as F

        b, t = ids.shape
        group = self.heads // self.kv_heads
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [b, 1, t, D]
        # query (head g of kv head h, token j) sees cache positions <= token j's position
        mask = (self.arange[:window][None, None, :] <= pos[:, :, None])[:, None]
        mask = mask.repeat(1, 1, group, 1)  # [b, 1, group * t, window], rows (g, j)

        def write(i: int, k: Any, v: Any) -> None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if keep is not None:
                k, v = k[keep], v[keep]
            self.k[i][put[0], :, put[1]] = k
            self.v[i][put[0], :, put[1]] = v

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            q = q.reshape(b, self.kv_heads, group * t, self.head_dim)
            o = F.scaled_dot_product_attention(
                q, self.k[i][read, :, :window], self.v[i][read, :, :window], attn_mask=mask,
                scale=self.scale)
            return o.reshape(b, self.heads, t, self.head_dim)

        x = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, write, attend)
        return x

    def copy_prefix(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """For each (source, target, n): the keys and values at positions 0..n-1 of slot
        `source` copied into slot `target` (every layer), so a prompt starting with the
        tokens `source` holds there prefills from position n on (`prefill`'s starts).
        Each target once, and none of them a source."""
        import torch

        targets = {t for _, t, _ in copies}
        if any(s in targets for s, _, _ in copies):
            raise ValueError("copy_prefix: a slot is both a source and a target")
        if len(targets) < len(copies):
            raise ValueError("copy_prefix: a slot is the target of two copies")
        for s, t, n in copies:
            if not (0 <= s < self.slots and 0 <= t < self.slots and 0 < n <= self.max_len):
                raise ValueError(f"copy_prefix: bad copy {(s, t, n)} for {self.slots} slots "
                                 f"of {self.max_len} positions")
        by_length: dict[int, list[tuple[int, int]]] = {}
        for s, t, n in copies:
            by_length.setdefault(n, []).append((s, t))
        with self._lock, torch.inference_mode():
            for n, pairs in by_length.items():
                src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
                dst = torch.tensor([t for _, t in pairs], dtype=torch.long, device=self.device)
                for cache in (*self.k, *self.v):
                    cache[dst, :, :n] = cache[src, :, :n]

    def bucket(self, n: int) -> int:
        """The slots a decode or verify pass over slots 0..n-1 runs (a power of two): the
        ones not decoding (dormant) take a token at position 0 of their own slot, so their
        caches' content is lost."""
        return _bucket(n, self.slots)

    def _prefill_triton(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                        lengths: list[int], starts: list[int] | None = None) -> Any:
        """The prefill on the Triton decode kernels: every prompt token from its start
        on is a row, at its position, in its prompt's slot (a row attends over its slot's
        positions up to its own, written by the same layer's first kernel, or before the
        start by an earlier prompt: causal). No padding, and five launches a layer
        instead of a few dozen eager ops."""
        import torch

        assert self.triton is not None and self.fused is not None
        starts = starts or [0] * len(prompts)
        if self.cuda_graphs and len(prompts) == 1 and lengths[0] - starts[0] <= PREFILL_GRAPH_MAX:
            width = max(16, _bucket(lengths[0] - starts[0], PREFILL_GRAPH_MAX))
            if starts[0] + width <= self.max_len:
                return self._prefill_graphed(slots[0], prompts[0], starts[0], width)
        rows = sum(n - s for n, s in zip(lengths, starts, strict=True))
        pad = [0] * (-rows % 8)  # each row of `host` 64-byte aligned, as triton assumes
        host = torch.tensor([[t for p, s in zip(prompts, starts, strict=True) for t in p[s:]]
                             + pad,
                             [j for n, s in zip(lengths, starts, strict=True)
                              for j in range(s, n)] + pad,
                             [slot for slot, n, s in zip(slots, lengths, starts, strict=True)
                              for _ in range(n - s)] + pad],
                            dtype=torch.long)
        with self._lock, torch.inference_mode():
            # (a misaligned row would compile the kernels anew: seconds, mid-serving)
            ids, pos, where = host.to(self.device, non_blocking=True)[:, :rows]
            x = self.inner.embed_tokens(ids)
            for i, weights in enumerate(self.fused):
                x = self.triton.layer(x, weights, self.k[i], self.v[i], pos, self.cos,
                                      self.sin, max(lengths), where)
            last = torch.tensor([n - s for n, s in zip(lengths, starts, strict=True)])
            return self._logits(x[last.cumsum(0).sub_(1).to(self.device)])

    def _prefill_graphed(self, slot: int, prompt: Sequence[int], start: int,
                         width: int) -> Any:
        """`_prefill_triton` of one prompt from position `start` on as the replay of a
        graph captured per (`width`, attention window), `width` a power of two >= the
        tokens computed: the rows past the prompt are token 0 at the positions after it,
        in its slot, where they write keys and values no row reads (the prompt's rows
        attend up to their own positions; decoding writes each later position before
        attending to it)."""
        import torch

        n = len(prompt) - start
        # the attention's splits must cover the last position: the width for a prompt
        # from position 0 (its graphs as before), else a power of two >= 128 past it
        window = width if start == 0 else self.window_for(start + width - 1)
        host = torch.tensor([list(prompt[start:]) + [0] * (width - n),
                             list(range(start, start + width)), [slot] * width,
                             [n - 1] * width], dtype=torch.long)
        with self._lock, torch.inference_mode():
            buffers = self._prefill_inputs.get(width)
            if buffers is None:
                buffers = self._prefill_inputs[width] = torch.zeros_like(host,
                                                                         device=self.device)
            buffers.copy_(host)

            def run() -> Any:
                assert self.triton is not None and self.fused is not None
                ids, pos, where, last = buffers
                x = self.inner.embed_tokens(ids)
                for i, weights in enumerate(self.fused):
                    x = self.triton.layer(x, weights, self.k[i], self.v[i], pos, self.cos,
                                          self.sin, window, where)
                return self._logits(x.index_select(0, last[:1]))

            return self._replay(("prefill", width, window), run, (buffers,)).clone()

    def _step(self, n: int, window: int) -> Any:
        """One decode step for slots 0..n-1 from self.tokens/self.pos (device buffers):
        the logits [n, vocab]. Fixed shapes, no host sync: capturable."""
        import torch.nn.functional as F

        if self.triton is not None:
            return self._logits(self._hidden_triton(n, window))
        pos = self.pos[:n].clamp(max=self.max_len - 1)
        rows = self.rows[:n]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # [n, 1, D]
        mask = (self.arange[:window][None, :] <= pos[:, None])[:, None, None, :]
        if self.fused is not None:
            x = self.inner.embed_tokens(self.tokens[:n])
            for i, weights in enumerate(self.fused):
                x = self._decode_layer(x, weights, self.k[i], self.v[i], rows, pos, cos, sin,
                                       mask)
            return self._logits(x)

        def write(i: int, k: Any, v: Any) -> None:
            self.k[i][rows, :, pos] = k[:, :, 0]
            self.v[i][rows, :, pos] = v[:, :, 0]

        group = self.heads // self.kv_heads

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            # One query per head: the `group` query heads sharing a kv head become that
            # kv head's query rows, so no backend needs GQA support or a repeated cache.
            q = q.reshape(n, self.kv_heads, group, self.head_dim)
            o = F.scaled_dot_product_attention(
                q, self.k[i][:n, :, :window], self.v[i][:n, :, :window], attn_mask=mask,
                scale=self.scale)
            return o.reshape(n, self.heads, 1, self.head_dim)

        x = self.inner.embed_tokens(self.tokens[:n])[:, None, :]
        for i, layer in enumerate(self.layers):  # cos/sin broadcast over heads: [n, 1, 1, D]
            x = self._layer(i, layer, x, cos[:, None], sin[:, None], write, attend)
        return self._logits(x[:, 0])

    def _hidden_triton(self, n: int, window: int) -> Any:
        """The last layer's output [n, hidden] for slots 0..n-1 on the Triton kernels
        (each row attends over its own length: no mask)."""
        assert self.triton is not None and self.fused is not None
        pos = self.pos[:n].clamp(max=self.max_len - 1)
        x = self.inner.embed_tokens(self.tokens[:n])
        for i, weights in enumerate(self.fused):
            x = self.triton.layer(x, weights, self.k[i], self.v[i], pos, self.cos, self.sin,
                                  window, self.rows[:n])
        return x

    def _run(self, n: int, window: int, steps: int, logits: bool = True) -> tuple[Any, Any]:
        """`steps` decode steps (greedy feedback between them); (tokens [n, steps],
        logits of the last step [n, vocab], or None when not `logits`: then on the Triton
        kernels the greedy head picks the tokens without making logits)."""
        import torch

        if not logits and self.triton is not None and self.output_weights is not None:
            chosen = torch.empty((n, steps), dtype=torch.long, device=self.device)
            one = self._one_row_step() if n == 1 else None
            for s in range(steps):
                if one is not None:  # the whole step as one persistent kernel
                    one.run(self.tokens[:1], self.pos[:1], self.ban[:1], self.rows[:1],
                            chosen[:, s], window)
                    continue
                self.triton.greedy_head(self._hidden_triton(n, window), *self.output_weights,
                                        self.eos, chosen[:, s], self.tokens[:n],
                                        self.pos[:n], self.ban[:n])
            return chosen, None
        out = []
        last = None  # the last step's logits (`logits` is the flag)
        for s in range(steps):
            last = self._step(n, window)
            if self.eos is not None:
                last[:, self.eos].masked_fill_(self.ban[:n] > 0, float("-inf"))
                self.ban[:n].sub_(1)
            chosen = last.argmax(-1)
            out.append(chosen)
            # the next step's inputs; after the last step, the next launch's (`resume`)
            self.tokens[:n].copy_(chosen)
            self.pos[:n].add_(1)
        return torch.stack(out, 1), last

    def window_for(self, top: int) -> int:
        """The attention window (a power of two >= 128, at most max_len) covering position `top`."""
        w = _MIN_L
        while w <= top:
            w *= 2
        return min(w, self.max_len)

    def decode(self, n: int, tokens: Any, pos: Any, steps: int = 1,
               ban_eos: Any = None) -> tuple[Any, Any]:
        """Decode `steps` tokens for slots 0..n-1, whose last tokens are `tokens` at
        positions `pos` (host lists or tensors of length n); `ban_eos`: per slot, how
        many of the next tokens may not be EOS (needs `eos`; None: 0). Returns (greedy
        tokens [n, steps] on the host, last step's logits [n, vocab] on the device).
        Only the first step's logits matter to a sampled row (then use steps=1)."""
        import torch

        out, logits = self._decode(n, tokens, pos, steps, ban_eos, logits=True)
        with torch.inference_mode():
            return out[:n].cpu(), logits[:n]

    def launch(self, n: int, tokens: Any, pos: Any, steps: int = 1,
               ban_eos: Any = None) -> Pending:
        """`decode`'s greedy tokens without waiting for them: the steps are queued on the
        GPU and `.tokens()` of the result waits. `tokens=None` resumes where the previous
        launch over the same n slots left off (its last tokens at `pos`, which must be
        its positions + its steps; EOS bans counted down on the device), so the host
        never stalls the GPU between chunks."""
        import torch

        out, _ = self._decode(n, tokens, pos, steps, ban_eos, logits=False)
        with torch.inference_mode():
            fault = None
            if n == 1 and self._one_row is not None:  # the step ran as one persistent kernel
                flag = (self._host_flags.take((1,)) if self.device.type == "cuda"
                        else torch.empty(1, dtype=torch.int32))
                flag.copy_(self._one_row.sync[1:], non_blocking=True)
                fault = (flag, lambda: self._persistent_off("a grid barrier timed out"))
            if self.device.type != "cuda":  # no graphs: `out` is this call's own tensor
                return Pending(out[:n], None, fault)
            host = self._host.take(tuple(out.shape))
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return Pending(host[:n], done, fault)

    def _decode(self, n: int, tokens: Any, pos: Any, steps: int, ban_eos: Any,
                logits: bool) -> tuple[Any, Any]:
        """The steps queued: the graph's (or eager steps') outputs for the whole bucket
        (tokens, and the last step's logits if `logits`)."""
        import torch

        if not 1 <= n <= self.slots:
            raise ValueError(f"n must be 1..{self.slots}, got {n}")
        pos_t = torch.as_tensor(pos, dtype=torch.long)
        top = int(pos_t.max()) + steps - 1
        window = self.window_for(top)
        bucket = _bucket(n, self.slots)
        inputs = None
        if tokens is not None:
            tok_t = torch.as_tensor(tokens, dtype=torch.long)
            if bucket > n:  # dormant rows: position 0, cheap, write only their own slot
                pos_t = torch.cat([pos_t, torch.zeros(bucket - n, dtype=torch.long)])
                tok_t = torch.cat([tok_t, torch.zeros(bucket - n, dtype=torch.long)])
            ban_t = torch.zeros(bucket, dtype=torch.long)
            if ban_eos is not None:
                ban_t[:n] = torch.as_tensor(ban_eos, dtype=torch.long)
            inputs = (tok_t, pos_t, ban_t)
        with self._lock, torch.inference_mode():
            while True:
                try:
                    return self._steps(bucket, window, steps, inputs, logits)
                except Exception as e:
                    if self.triton is None:
                        raise
                    self._triton_failed(e)  # a kernel failing must not fail the call
                    if inputs is None:  # the device inputs may be spent: launch from the host
                        raise ResumeFailed(str(e)) from e

    def verify(self, n: int, tokens: Sequence[Sequence[int]], pos: Sequence[int],
               ban_eos: Sequence[int] | None = None) -> list[list[int]]:
        """One pass over t tokens for each of slots 0..n-1 (speculative decoding): slot
        i's `tokens[i]` (its last token, then a draft) go at positions pos[i] ..
        pos[i] + t - 1, their keys and values are written, and each attends to the slot's
        cache up to itself. Returns, per slot, the greedy token after each of the t
        positions (host lists). `ban_eos[i]`: how many of slot i's next tokens may not be
        EOS. Draft tokens the caller rejects leave keys/values past its new position,
        which the position mask hides until they are overwritten."""
        import torch

        t = len(tokens[0]) if len(tokens) else 0
        if not 1 <= n <= self.slots or len(tokens) != n or len(pos) != n:
            raise ValueError(f"verify needs 1..{self.slots} slots, one token list and "
                             f"position each; got n={n}")
        if not 1 <= t <= MAX_VERIFY or any(len(row) != t for row in tokens):
            raise ValueError(f"verify needs 1..{MAX_VERIFY} tokens per slot, the same for all")
        if max(pos) + t > self.max_len:
            raise ValueError(f"positions {max(pos)}..{max(pos) + t - 1} pass the slot "
                             f"length {self.max_len}")
        width = _bucket(t, MAX_VERIFY)  # fewer graphs; padded positions must fit too
        if not self.cuda_graphs or max(pos) + width > self.max_len:
            width = t
        bucket = _bucket(n, self.slots)
        window = self.window_for(max(pos) + width - 1)
        rows = [list(r) + [0] * (width - t) for r in tokens] + [[0] * width] * (bucket - n)
        starts = list(pos) + [0] * (bucket - n)  # dormant rows write only their own slot
        bans = list(ban_eos or [0] * n) + [0] * (bucket - n)
        host = (torch.tensor(rows, dtype=torch.long),
                torch.tensor([[p + j for j in range(width)] for p in starts], dtype=torch.long),
                torch.tensor([[int(j < b) for j in range(width)] for b in bans],
                             dtype=torch.long))
        with self._lock, torch.inference_mode():
            if self._verify_buffers is None:
                self._verify_buffers = tuple(
                    torch.zeros((self.slots, MAX_VERIFY), dtype=torch.long,
                                device=self.device) for _ in range(3))
            buffers = self._verify_buffers
            for buffer, values in zip(buffers, host, strict=True):
                buffer[:bucket, :width].copy_(values, non_blocking=True)

            def run() -> Any:
                return self._verify_run(bucket, width, window)

            out = None
            if self.cuda_graphs:
                try:
                    out = self._replay(("verify", bucket, window, width), run, buffers)
                except Exception as e:  # noqa: BLE001  (a failed capture: go on without graphs)
                    self._graphs_failed(e)
                    for buffer, values in zip(buffers, host, strict=True):
                        buffer[:bucket, :width].copy_(values)
            if out is None:
                out = run()
            return [row[:t] for row in out[:n].tolist()]

    def _verify_run(self, n: int, t: int, window: int) -> Any:
        """The verify pass for slots 0..n-1, t tokens each, from the verify buffers:
        greedy tokens [n, t]. Fixed shapes, no host sync: capturable. Runs the model's
        modules (as prefill does), whatever the decode kernels."""
        assert self._verify_buffers is not None
        tokens, positions, banned = (b[:n, :t] for b in self._verify_buffers)
        pos = positions.clamp(max=self.max_len - 1)
        x = self._over_cache(tokens, pos, window, slice(0, n), (self.rows[:n, None], pos))
        logits = self._logits(x)  # [n, t, vocab]
        if self.eos is not None:
            logits[..., self.eos].masked_fill_(banned > 0, float("-inf"))
        return logits.argmax(-1)

    def _steps(self, bucket: int, window: int, steps: int, inputs: tuple | None,
               logits: bool = True) -> tuple[Any, Any]:
        """Copy (tokens, positions, EOS bans) into the device buffers (None: they hold the
        last run's next inputs already) and run the steps: a graph replay (captured on
        first use), or eager steps without graphs."""
        def load(blocking: bool) -> None:
            if inputs is None:
                return
            for buffer, values in zip((self.tokens, self.pos, self.ban), inputs, strict=True):
                buffer[:bucket].copy_(values, non_blocking=not blocking)

        load(blocking=False)
        if self.cuda_graphs:
            try:
                return self._replay((bucket, window, steps, logits),
                                    lambda: self._run(bucket, window, steps, logits),
                                    (self.tokens, self.pos, self.ban))
            except Exception as e:
                if self.triton is not None:
                    raise  # the kernels' fault, maybe: decode() retries on the torch kernels
                self._graphs_failed(e)  # a failed capture: go on without graphs
                load(blocking=True)
        self.stats["eager_steps"] += steps
        return self._run(bucket, window, steps, logits)

    def _one_row_step(self) -> Any:
        """The persistent one-row step (backends/triton_persistent.py) when the tile
        `persistent` asks for it and it can run here, else None (the layer kernels)."""
        assert self.triton is not None and self.fused is not None
        if not self.triton.tiles["persistent"]:
            return None
        if self._one_row is None:
            from contextwise.backends.triton_persistent import OneRowStep

            assert self.output_weights is not None
            try:
                self._one_row = OneRowStep(
                    self.triton, self.fused, self.k, self.v, self.inner.embed_tokens.weight,
                    *self.output_weights, self.cos, self.sin, self.max_len, self.eos)
            except ValueError as e:
                self.triton.tiles["persistent"] = 0
                self.stats["persistent_note"] = f"one-row step off: {e}"
                return None
        return self._one_row

    def one_row_trace(self) -> dict[str, Any] | None:
        """Where the persistent one-row step's last step spent its time, when it ran
        traced (tile p_trace; `triton_persistent.trace_summary`); else None."""
        return self._one_row.trace() if self._one_row is not None else None

    def _persistent_off(self, why: str) -> None:
        """Back to the layer kernels for one row; graphs that launch the step dropped
        (after the GPU is done with any still queued)."""
        import torch

        assert self.triton is not None
        self.triton.tiles["persistent"] = 0
        self._one_row = None
        self.stats["persistent_note"] = f"one-row step off since: {why}"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._graphs.clear()

    def _triton_failed(self, error: BaseException) -> None:
        """A Triton kernel failed: the one-row step off if it was on, else launch them
        without programmatic dependent launch from now on where they used it, else the
        torch kernels; graphs captured with the failed kernels are dropped."""
        import torch

        assert self.triton is not None
        why = f"{type(error).__name__}: {str(error)[:200]}"
        if self.triton.tiles["persistent"]:
            self._persistent_off(why)  # (drops the graphs itself)
            return
        if self.triton.uses_pdl(self.device):
            self.triton.tiles["pdl"] = 0
            self.stats["kernels_note"] = f"triton kernels without PDL since: {why}"
        else:
            self.triton, self.kernels = None, "torch"
            self.stats["kernels_note"] = f"triton kernels failed, torch kernels since: {why}"
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA graphs

    def _graphs_failed(self, error: BaseException) -> None:
        """Turn graphs off for good after a failed capture; the reason goes in stats."""
        import torch

        self.cuda_graphs = False
        self._graphs.clear()
        self.stats["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _replay(self, key: tuple, run: Any, inputs: tuple) -> Any:
        """`run()`'s outputs, from its CUDA graph for `key` (captured on first use; `inputs`
        are the device buffers it reads, which capturing must leave as they were)."""
        if key not in self._graphs:
            self._graphs[key] = self._capture(run, inputs)
        graph, outputs = self._graphs[key]
        graph.replay()
        self.stats["replays"] += 1
        return outputs

    def _capture(self, run: Any, inputs: tuple) -> tuple[Any, Any]:
        import torch

        saved = [t.clone() for t in inputs]

        def restore() -> None:
            for t, old in zip(inputs, saved, strict=True):
                t.copy_(old)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: lazy inits must not happen in capture
            run()
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work other threads do meanwhile (an embedder, a request on
        # another model) must not invalidate this capture, nor be refused by it.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = run()
        # Capturing recorded the pass without running it: restore the inputs the warm-up
        # may have advanced, so the caller's replay starts from them.
        restore()
        self.stats["graphs_captured"] += 1
        return graph, outputs


def _rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary embedding, as transformers' apply_rotary_pos_emb (rotate_half)."""
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _plain(linear: Any) -> bool:
    import torch

    w = getattr(linear, "weight", None)
    return (w is not None and type(getattr(w, "data", None)) is torch.Tensor
            and w.dtype.is_floating_point
            and type(linear) is torch.nn.Linear)


def _fuse(linears: list[Any]) -> tuple[Any, Any]:
    """One weight (and bias) for `linears` stacked by output rows; each module's weight
    (and bias) becomes a view into it, so nothing is held twice."""
    import torch

    weight = torch.cat([m.weight.data for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("mixed biases")
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _fuse_layers(layers: list[Any], heads: int, kv_heads: int, head_dim: int) -> list[tuple] | None:
    """Per layer: (norm1, qkv weight, qkv bias, o weight, o bias, norm2, gate_up weight,
    gate_up bias, down weight, down bias); None when a layer's linears are not plain
    float `nn.Linear`s (quantized) or its shapes are unusual: those keep the modules."""
    out = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj]
        if not all(_plain(m) for m in linears) or getattr(mlp, "act_fn", None) is None:
            return None
        if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            return None
        if (attn.q_proj.weight.shape[0] != heads * head_dim
                or attn.k_proj.weight.shape[0] != kv_heads * head_dim):
            return None
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        try:
            qkv, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, gate_up_b = _fuse([mlp.gate_proj, mlp.up_proj])
        except ValueError:
            return None
        out.append((layer.input_layernorm.weight, qkv, qkv_b, attn.o_proj.weight,
                    attn.o_proj.bias, layer.post_attention_layernorm.weight, gate_up,
                    gate_up_b, mlp.down_proj.weight, mlp.down_proj.bias))
    return out


def _decode_layer_for(heads: int, kv_heads: int, head_dim: int, eps: float,
                      scale: float) -> Any:
    """The decode layer function for a model's shapes (its constants bound here)."""
    import torch.nn.functional as F

    qk_width = (heads + kv_heads) * head_dim
    group = heads // kv_heads

    def decode_layer(x: Any, w: tuple, kc: Any, vc: Any, rows: Any, pos: Any, cos: Any,
                     sin: Any, mask: Any) -> Any:
        """One decoder layer for one new token in each of slots 0..n-1, x [n, hidden]; kc/vc
        the layer's whole cache (written in place), mask [n, 1, 1, window] which cache
        positions each slot sees. The arithmetic of transformers' Llama layer (RMSNorm in
        float32, rotary, SDPA, SiLU MLP) with fused matmuls."""
        norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, down_w, down_b = w
        n, hidden = x.shape
        window = mask.shape[-1]
        h = norm1 * F.rms_norm(x.float(), (hidden,), eps=eps).to(x.dtype)
        qkv = F.linear(h, qkv_w, qkv_b)
        qk = qkv[:, :qk_width].view(n, heads + kv_heads, head_dim)
        qk = _rope(qk, cos, sin)
        kc[rows, :, pos] = qk[:, heads:]
        vc[rows, :, pos] = qkv[:, qk_width:].view(n, kv_heads, head_dim)
        # The query heads sharing a kv head are that kv head's query rows: no GQA
        # support needed from the SDPA backend and no repeated cache.
        q = qk[:, :heads].reshape(n, kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(q, kc[:n, :, :window], vc[:n, :, :window],
                                           attn_mask=mask, scale=scale)
        x = x + F.linear(o.reshape(n, heads * head_dim), o_w, o_b)
        h = norm2 * F.rms_norm(x.float(), (hidden,), eps=eps).to(x.dtype)
        gate, up = F.linear(h, gu_w, gu_b).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, down_w, down_b)

    return decode_layer


def _symbolic(compiled: Any) -> Any:
    """`compiled` called with n (slots) and the window as its only symbolic sizes; the
    cache and weights keep static shapes (the cache is mutated in place, whole, as
    transformers' static cache is under torch.compile). Without duck sizing: n == window
    (128, 256) would otherwise specialize. n = 1 still compiles once more (size-1 dims
    always specialize)."""
    import torch
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    def call(x: Any, w: tuple, kc: Any, vc: Any, rows: Any, pos: Any, cos: Any, sin: Any,
             mask: Any) -> Any:
        for t, dims in ((x, 0), (rows, 0), (pos, 0), (cos, 0), (sin, 0), (mask, (0, 3))):
            torch._dynamo.maybe_mark_dynamic(t, dims)
        # patch() is added at import by torch's install_config_module: mypy can't see it
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            return compiled(x, w, kc, vc, rows, pos, cos, sin, mask)

    return call


def _bucket(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)
