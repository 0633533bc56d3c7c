"""Fused Triton kernels for one decode step of a Llama-family layer on the static KV cache.

    layers = TritonLayers(heads=9, kv_heads=3, head_dim=64, eps=1e-5, scale=64 ** -0.5)
    layers.layer(x, fused_weights, k_cache, v_cache, pos, cos, sin, window, slots)  # x [n, hidden]

Why: in PyTorch a decode layer is ~28 kernels (norms, casts, rotary, cache
writes, SDPA, matmuls, SiLU, adds) and at batch 1 each takes ~2 us however
little it does, so a 30-layer model spends ~1.9 ms per token launching them
(profiled on an H100: benchmarks/results/gpu_profile/). Here a layer is five
kernels:

1. RMSNorm + q/k/v matmul (+ bias) + rotary + the new key/value written into the
   cache at each row's position (queries go to a scratch buffer);
2. attention of each row's queries over its own cached positions 0..pos (the
   loop stops at the row's length, not at the graph's window), online softmax,
   the query heads sharing a kv head computed together; split along the
   sequence (flash-decoding) when rows x kv heads are too few to fill the GPU,
   then (2b) one small kernel combines the splits;
3. o projection (+ bias) + residual, in place;
4. RMSNorm + gate/up matmul (+ bias) + SiLU(gate) * up;
5. down projection (+ bias) + residual, in place.

With the tile `attend_o` set (off by default, not yet measured on a GPU), one row
attending over a short window runs 2 and 3 as one kernel whose every program
repeats the attention: four launches a layer instead of five.
With the tile `persistent` set (off by default, not yet measured on a GPU), a
one-row batch's greedy step is one persistent kernel instead
(backends/triton_persistent.py).

The arithmetic follows transformers' Llama layer: RMSNorm in float32, the
weight times the normalized row rounded to the activation dtype, each linear's
output rounded to the activation dtype before the next operation, float32
accumulation everywhere. Weights are the fused q/k/v and gate/up tensors of
`static_decode._fuse_layers` (views of the model's own weights).

Each row names its cache slot, so rows sharing a slot at positions 0..t-1 are a
causal prefill of t tokens: `StaticDecoder` prefills short prompts with the same
kernels (no padding, five launches a layer).

On Hopper and later every kernel launches with programmatic dependent launch
(PDL): it starts while the kernel before it still runs, asks L2 for its weights
(`prefetch.global.L2`), and only then waits for that kernel's outputs, so a
step's ~150 dependent launches overlap instead of paying each one's start-up
and first DRAM round trip (H100, batch 1: 1,460 against 1,200 tok/s; 256 rows:
190,750 against 164,770). Each kernel issues every load that does not need its
matmul's result up front (the RMS pass over the row unrolled into one round trip;
bias, residual, positions, rotary tables): at batch 1 a kernel's time is its chain
of memory round trips (H100, the decoder alone: 1,628.7 against 1,474.2 tok/s at
batch 1, 189,339.5 against 173,976.2 at 256 rows). Row counts and attention split
counts are run-time arguments triton does not specialize on: the variants left
(one per row block, split or not) are few enough for `StaticDecoder.warm_up` to
compile them all, instead of a new row count compiling one mid-serving.
`greedy_head` picks greedy tokens without logits: the final RMSNorm + lm_head +
each vocabulary block's largest logit in one kernel, the row's first largest
(torch.argmax's choice) in a second.

On a machine without CUDA the same kernels run in Triton's interpreter (numpy):
slow, for tests only. `compile_for_gpu` compiles them for a GPU architecture
(e.g. sm_90) with no GPU present, which is how CI checks they lower.
"""

import functools
import os
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:  # CUDA builds of torch (and xgrammar) bring triton
    triton = None
    tl = None
try:  # programmatic dependent launch (Hopper and later; triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

__all__ = ["DEFAULT_TILES", "TritonLayers", "available", "compile_for_gpu",
           "compiled_variants"]

_BL = 64  # cached positions per attention block
_TARGET_PROGRAMS = 128  # attention programs to aim for (an H100 has 132 SMs)
_MAX_SPLITS = 64  # attention splits of a row at most


def available() -> str | None:
    """Why the Triton kernels can't run here, or None when they can."""
    if triton is None:
        return "triton is not installed"
    return None


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc + a @ b, accumulated in float32: float32 inputs in the interpreter (it
        multiplies bfloat16 wrongly), exact float32 products for a float32 model."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _mac(a, w_ptr, cols, ks, cmask, kmask, K, acc, UPCAST: tl.constexpr,
             IEEE: tl.constexpr):
        """acc + a @ w[cols, ks].T (w [out, K] row-major), in float32 on tensor cores. (A
        GEMV for one row, products summed in registers, was slower on an H100: 813 against
        1,239 tok/s at batch 1.)"""
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None],
                    mask=cmask[None, :] & kmask[:, None], other=0.0)
        return _dot(a, w, acc, UPCAST, IEEE)

    @triton.jit
    def _to_l2(ptrs):
        """Ask L2 for the lines at `ptrs` (no registers, no wait)."""
        tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch(w_ptr, rows, K, LINE: tl.constexpr, PF: tl.constexpr):
        """Ask L2 for rows `rows` of w [*, K], one prefetch per 128-byte line (LINE
        elements), PF lines a row at most: issued before the kernel waits for the one
        before it, so its weights stream in while that one still runs."""
        at = tl.minimum(tl.arange(0, PF) * LINE, K - 1)
        _to_l2(w_ptr + rows.to(tl.int64)[:, None] * K + at[None, :])

    @triton.jit
    def _begin(PDL: tl.constexpr):
        """With programmatic dependent launch (PDL), this kernel may start while the one
        before it runs: wait for it here (its outputs are this one's inputs), then let
        the next kernel start (it prefetches its weights while this one computes).
        (Letting the next one start before this wait was slower on an H100: 1,195.3
        against 1,607.6 tok/s at batch 1, results/gpu_diag/run8_gpu_decode.json.)"""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _squares(x_ptr, rows, rmask, k0, HIDDEN: tl.constexpr, BK: tl.constexpr):
        """Squares of columns k0..k0+BK of the rows of x [n, HIDDEN], float32 [BM, BK]."""
        ks = k0 + tl.arange(0, BK)
        xv = tl.load(x_ptr + rows[:, None] * HIDDEN + ks[None, :],
                     mask=rmask[:, None] & (ks[None, :] < HIDDEN), other=0.0)
        xv = xv.to(tl.float32)
        return xv * xv

    @triton.jit
    def _inv_rms(x_ptr, rows, rmask, eps, HIDDEN: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr, EARLY: tl.constexpr = 1):
        """1 / RMS of each of the rows of x [n, HIDDEN], in float32. EARLY: the blocks'
        squares are summed elementwise and reduced across the row once, in an unrolled
        loop, so all the row's loads go out together (one memory round trip, not one a
        block behind a reduction's barrier: at batch 1 a kernel's time is mostly such
        round trips)."""
        if EARLY:
            sq = tl.zeros((BM, BK), dtype=tl.float32)
            for k0 in tl.static_range(0, HIDDEN, BK):
                sq += _squares(x_ptr, rows, rmask, k0, HIDDEN, BK)
            ss = tl.sum(sq, axis=1)
        else:
            ss = tl.zeros((BM,), dtype=tl.float32)
            for k0 in range(0, HIDDEN, BK):
                ss += tl.sum(_squares(x_ptr, rows, rmask, k0, HIDDEN, BK), axis=1)
        return tl.rsqrt(ss / HIDDEN + eps)

    @triton.jit
    def _normed(x_ptr, nw_ptr, rows, rmask, inv, ks, kmask, HIDDEN: tl.constexpr):
        """Columns `ks` of the normed rows, as transformers' RMSNorm rounds them:
        weight * (x * inv).to(dtype), in the activation dtype."""
        dt = x_ptr.dtype.element_ty
        xv = tl.load(x_ptr + rows[:, None] * HIDDEN + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        nw = tl.load(nw_ptr + ks, mask=kmask, other=0.0)
        normed = (xv.to(tl.float32) * inv[:, None]).to(dt).to(tl.float32)
        return (nw.to(tl.float32)[None, :] * normed).to(dt)

    @triton.jit
    def _norm_matmul2(x_ptr, nw_ptr, w_ptr, rows, rmask, cols1, cols2, cmask, eps,
                      HIDDEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                      TWO: tl.constexpr = True, EARLY: tl.constexpr = 1):
        """The normed rows times two sets of weight rows (w [out, HIDDEN]): (h @ w[cols1].T,
        h @ w[cols2].T), float32 [BM, BN] each; without TWO the first only (and zeros).
        EARLY 2: no pass over the rows before the matmul: (weight * x) @ w.T, scaled by
        1 / RMS after it (the same sum, rounded differently from transformers' RMSNorm
        in a 16-bit dtype)."""
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        if EARLY == 2:  # squares summed elementwise: no cross-warp reduction in the loop
            sq = tl.zeros((BM, BK), dtype=tl.float32)
            for k0 in range(0, HIDDEN, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < HIDDEN
                xv = tl.load(x_ptr + rows[:, None] * HIDDEN + ks[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                sq += xv * xv
                nw = tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                h = (xv * nw[None, :]).to(x_ptr.dtype.element_ty)
                acc1 = _mac(h, w_ptr, cols1, ks, cmask, kmask, HIDDEN, acc1, UPCAST, IEEE)
                if TWO:
                    acc2 = _mac(h, w_ptr, cols2, ks, cmask, kmask, HIDDEN, acc2, UPCAST, IEEE)
            inv = tl.rsqrt(tl.sum(sq, axis=1) / HIDDEN + eps)[:, None]
            return acc1 * inv, acc2 * inv
        inv = _inv_rms(x_ptr, rows, rmask, eps, HIDDEN, BM, BK, EARLY)
        for k0 in range(0, HIDDEN, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < HIDDEN
            h = _normed(x_ptr, nw_ptr, rows, rmask, inv, ks, kmask, HIDDEN)
            acc1 = _mac(h, w_ptr, cols1, ks, cmask, kmask, HIDDEN, acc1, UPCAST, IEEE)
            if TWO:
                acc2 = _mac(h, w_ptr, cols2, ks, cmask, kmask, HIDDEN, acc2, UPCAST, IEEE)
        return acc1, acc2

    @triton.jit
    def _rotary(cos_ptr, sin_ptr, pos, half, rmask, D: tl.constexpr):
        """cos and sin at each row's position for columns `half` of the first rotary half
        and the same ones of the second: (cos1, cos2, sin1, sin2), float32 [rows, cols]."""
        at = pos[:, None] * D + half[None, :]
        c1 = tl.load(cos_ptr + at, mask=rmask[:, None], other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + at + D // 2, mask=rmask[:, None], other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + at, mask=rmask[:, None], other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + at + D // 2, mask=rmask[:, None], other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    def _norm_qkv_rope(x_ptr, nw_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
                       q_ptr, kc_ptr, vc_ptr, n, eps, s_slot, s_head, s_pos,
                       HIDDEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       D: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr, QS: tl.constexpr, UPCAST: tl.constexpr,
                       IEEE: tl.constexpr, PDL: tl.constexpr = False,
                       LINE: tl.constexpr = 64, PF: tl.constexpr = 0,
                       EARLY: tl.constexpr = 1):
        """Grid (row blocks, (heads + 2 * kv_heads) * QS): 1/QS of one head's D outputs
        (the same columns of both rotary halves) for BM rows. EARLY: the loads that
        don't need the matmul (bias, positions, rotary tables, slots) go out before it,
        the bias before the wait for the kernel before."""
        HALF: tl.constexpr = D // 2
        BH: tl.constexpr = HALF // QS
        head = tl.program_id(1) // QS
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < n
        dt = x_ptr.dtype.element_ty
        half = (tl.program_id(1) % QS) * BH + tl.arange(0, BH)  # columns of the first half
        out1 = head * D + half  # this head's weight rows, first half (rotary pairs i, i + D/2)
        if PF > 0:
            _prefetch(w_ptr, out1, HIDDEN, LINE, PF)
            _prefetch(w_ptr, out1 + HALF, HIDDEN, LINE, PF)
        if EARLY and HAS_BIAS:
            b1 = tl.load(b_ptr + out1).to(tl.float32)[None, :]
            b2 = tl.load(b_ptr + out1 + HALF).to(tl.float32)[None, :]
        _begin(PDL)
        if EARLY:
            pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
            c1, c2, s1, s2 = _rotary(cos_ptr, sin_ptr, pos, half, rmask, D)
            slot = tl.load(slot_ptr + rows, mask=rmask, other=0)  # the row's cache slot
        acc1, acc2 = _norm_matmul2(x_ptr, nw_ptr, w_ptr, rows, rmask, out1, out1 + HALF,
                                   half < HALF, eps, HIDDEN, BM, BH, BK, UPCAST, IEEE,
                                   EARLY=EARLY)
        if HAS_BIAS:
            if not EARLY:
                b1 = tl.load(b_ptr + out1).to(tl.float32)[None, :]
                b2 = tl.load(b_ptr + out1 + HALF).to(tl.float32)[None, :]
            acc1 += b1
            acc2 += b2
        y1 = acc1.to(dt).to(tl.float32)  # the linear's output, rounded as transformers' is
        y2 = acc2.to(dt).to(tl.float32)
        if not EARLY:
            pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
            c1, c2, s1, s2 = _rotary(cos_ptr, sin_ptr, pos, half, rmask, D)
            slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        if head < HEADS + KV_HEADS:  # queries and keys: rotary (rotate_half convention)
            r1 = y1 * c1 - y2 * s1
            r2 = y2 * c2 + y1 * s2
        else:
            r1 = y1
            r2 = y2
        slot = slot.to(tl.int64)[:, None] * s_slot  # a big cache passes 2**31 elements
        if head < HEADS:
            dst = q_ptr + rows[:, None] * (HEADS * D) + head * D + half[None, :]
        elif head < HEADS + KV_HEADS:
            dst = (kc_ptr + slot + (head - HEADS) * s_head + pos[:, None] * s_pos
                   + half[None, :])
        else:
            dst = (vc_ptr + slot + (head - HEADS - KV_HEADS) * s_head + pos[:, None] * s_pos
                   + half[None, :])
        tl.store(dst, r1.to(dt), mask=rmask[:, None])
        tl.store(dst + HALF, r2.to(dt), mask=rmask[:, None])

    @triton.jit
    def _attention(q, kbase, vbase, lo, hi, s_pos, scale, D: tl.constexpr, BG: tl.constexpr,
                   BL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   CM: tl.constexpr):
        """Online softmax of the queries q [BG, D] over the cached positions [lo, hi) of
        one kv head (keys at kbase, values at vbase, s_pos apart): (row maxima, sums of
        exponentials, unnormalized outputs [BG, D] in float32). CM: the cache loads'
        cache modifier ("": the default; ".cg": from L2, for a kernel that reads what
        other SMs wrote. Passed, never defaulted: triton 3.6 takes no str default.)"""
        d = tl.arange(0, D)
        dt = q.dtype
        m = tl.full((BG,), float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros((BG,), dtype=tl.float32)
        acc = tl.zeros((BG, D), dtype=tl.float32)
        for start in range(lo, hi, BL):
            keys = start + tl.arange(0, BL)
            kmask = keys < hi
            at_key = keys.to(tl.int64) * s_pos  # position-major: past 2**31 elements
            k = tl.load(kbase + at_key[None, :] + d[:, None], mask=kmask[None, :], other=0.0,
                        cache_modifier=CM)
            v = tl.load(vbase + at_key[:, None] + d[None, :], mask=kmask[:, None], other=0.0,
                        cache_modifier=CM)
            s = _dot(q, k, tl.zeros((BG, BL), dtype=tl.float32), UPCAST, IEEE) * scale
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # each block has a valid key: finite
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = _dot(p.to(dt), v, acc * alpha[:, None], UPCAST, IEEE)
            m = m_new
        return m, l_sum, acc

    def _attend(q_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, o_ptr, part_ptr, ml_ptr, scale, chunk,
                s_slot, s_head, s_pos,
                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                GROUP: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr,
                SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                PDL: tl.constexpr = False):
        """Grid (rows, kv_heads, splits): the GROUP query heads of one kv head of one row
        over cached positions [split * chunk, min(pos + 1, (split + 1) * chunk)); SPLIT:
        more than one split (partials out, for `_combine`). The split count is the
        grid's, not a constexpr: one compiled kernel serves every count."""
        _begin(PDL)
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        gmask = g < GROUP
        qh = kvh * GROUP + g
        dt = q_ptr.dtype.element_ty
        q = tl.load(q_ptr + row * (HEADS * D) + qh[:, None] * D + d[None, :],
                    mask=gmask[:, None], other=0.0)
        end = tl.load(pos_ptr + row) + 1
        lo = split * chunk
        hi = tl.minimum(end, lo + chunk)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        at = slot * s_slot + kvh * s_head  # a big cache passes 2**31 elements
        m, l_sum, acc = _attention(q, kc_ptr + at, vc_ptr + at, lo, hi, s_pos, scale, D, BG,
                                   BL, UPCAST, IEEE, "")
        if not SPLIT:
            tl.store(o_ptr + row * (HEADS * D) + qh[:, None] * D + d[None, :],
                     (acc / l_sum[:, None]).to(dt), mask=gmask[:, None])
        else:  # unnormalized partials; an empty split leaves m = -inf, l = 0
            at = (row * HEADS + qh) * tl.num_programs(2) + split
            tl.store(part_ptr + at[:, None] * D + d[None, :], acc, mask=gmask[:, None])
            tl.store(ml_ptr + at * 2, m, mask=gmask)
            tl.store(ml_ptr + at * 2 + 1, l_sum, mask=gmask)

    def _combine(part_ptr, ml_ptr, o_ptr, splits, HEADS: tl.constexpr, D: tl.constexpr,
                 BS: tl.constexpr, PDL: tl.constexpr = False):
        """Grid (rows, heads): the `splits` (<= BS) of one head of one row, weighted by
        their maxima."""
        _begin(PDL)
        row = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, BS)
        smask = sp < splits
        d = tl.arange(0, D)
        at = (row * HEADS + h) * splits + sp
        m = tl.load(ml_ptr + at * 2, mask=smask, other=float("-inf"))
        l_sum = tl.load(ml_ptr + at * 2 + 1, mask=smask, other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))  # split 0 always holds position 0: the max is finite
        acc = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
        tl.store(o_ptr + (row * HEADS + h) * D + d, o.to(o_ptr.dtype.element_ty))

    def _attend_o(q_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, w_ptr, b_ptr, x_ptr, scale,
                  s_slot, s_head, s_pos, N: tl.constexpr, HEADS: tl.constexpr,
                  KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                  BG: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr,
                  HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  PDL: tl.constexpr = False, LINE: tl.constexpr = 64, PF: tl.constexpr = 0):
        """`_attend` and the o projection's `_matmul_add` in one kernel, for ONE row and an
        unsplit attention: grid (N / BN,), each program computes every head's attention
        output (as `_attend` does, rounded to the activation dtype) and its BN output
        columns of o @ w.T (+ bias), added to the row of x in place. Every program
        repeats the attention (cheap for one row and a short window) to save a launch
        and its round trips."""
        K: tl.constexpr = HEADS * D
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cols < N
        if PF > 0:
            _prefetch(w_ptr, tl.minimum(cols, N - 1), K, LINE, PF)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        _begin(PDL)
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        end = tl.load(pos_ptr) + 1
        slot = tl.load(slot_ptr).to(tl.int64)
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        gmask = g < GROUP
        dt = q_ptr.dtype.element_ty
        acc = tl.zeros((BN,), dtype=tl.float32)
        for kvh in tl.static_range(KV_HEADS):
            qh = kvh * GROUP + g
            q = tl.load(q_ptr + qh[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
            at = slot * s_slot + kvh * s_head
            _, l_sum, o = _attention(q, kc_ptr + at, vc_ptr + at, 0, end, s_pos, scale, D,
                                     BG, BL, UPCAST, IEEE, "")
            o = (o / l_sum[:, None]).to(dt)  # [BG, D]: this kv head's query heads
            for j in tl.static_range(GROUP):  # head kvh * GROUP + j: columns of w
                w = tl.load(w_ptr + cols[None, :] * K + (kvh * GROUP + j) * D + d[:, None],
                            mask=cmask[None, :], other=0.0)
                part = _dot(o, w, tl.zeros((BG, BN), dtype=tl.float32), UPCAST, IEEE)
                acc += tl.sum(tl.where(g[:, None] == j, part, 0.0), axis=0)
        if HAS_BIAS:
            acc += bias
        y = acc.to(dt).to(tl.float32)
        tl.store(x_ptr + cols, (x + y).to(dt), mask=cmask)

    def _matmul_add(a_ptr, w_ptr, b_ptr, x_ptr, n, N: tl.constexpr, K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    PDL: tl.constexpr = False, LINE: tl.constexpr = 64, PF: tl.constexpr = 0,
                    EARLY: tl.constexpr = 1):
        """x[:, cols] += a @ w[cols].T (+ bias), in place. Grid (row blocks, N / BN).
        EARLY: the bias is read before the wait for the kernel before, the residual
        before the matmul."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask = rows < n
        cmask = cols < N
        both = rmask[:, None] & cmask[None, :]
        at = x_ptr + rows[:, None] * N + cols[None, :]
        if PF > 0:
            _prefetch(w_ptr, tl.minimum(cols, N - 1), K, LINE, PF)
        if EARLY and HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        _begin(PDL)
        if EARLY:
            x = tl.load(at, mask=both, other=0.0).to(tl.float32)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc = _mac(a, w_ptr, cols, ks, cmask, kmask, K, acc, UPCAST, IEEE)
        if HAS_BIAS:
            if not EARLY:
                bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            acc += bias
        y = acc.to(dt).to(tl.float32)
        if not EARLY:
            x = tl.load(at, mask=both, other=0.0).to(tl.float32)
        tl.store(at, (x + y).to(dt), mask=both)

    def _norm_gate_up(x_ptr, nw_ptr, w_ptr, b_ptr, h_ptr, n, eps, HIDDEN: tl.constexpr,
                      INTER: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
                      LINE: tl.constexpr = 64, PF: tl.constexpr = 0,
                      EARLY: tl.constexpr = 1):
        """h[:, cols] = silu(gate) * up of the normed rows. Grid (row blocks, INTER / BN).
        EARLY: the bias is read before the wait for the kernel before."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        if PF > 0:
            at = tl.minimum(cols, INTER - 1)
            _prefetch(w_ptr, at, HIDDEN, LINE, PF)
            _prefetch(w_ptr, INTER + at, HIDDEN, LINE, PF)
        rmask = rows < n
        cmask = cols < INTER
        if EARLY and HAS_BIAS:
            b_g = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            b_u = tl.load(b_ptr + INTER + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        _begin(PDL)
        dt = x_ptr.dtype.element_ty
        acc_g, acc_u = _norm_matmul2(x_ptr, nw_ptr, w_ptr, rows, rmask, cols, INTER + cols,
                                     cmask, eps, HIDDEN, BM, BN, BK, UPCAST, IEEE,
                                     EARLY=EARLY)
        if HAS_BIAS:
            if not EARLY:
                b_g = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                b_u = tl.load(b_ptr + INTER + cols, mask=cmask, other=0.0).to(tl.float32)[
                    None, :]
            acc_g += b_g
            acc_u += b_u
        gate = acc_g.to(dt).to(tl.float32)
        up = acc_u.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)  # F.silu's rounding
        tl.store(h_ptr + rows[:, None] * INTER + cols[None, :], (act * up).to(dt),
                 mask=rmask[:, None] & cmask[None, :])

    def _head_argmax(x_ptr, nw_ptr, w_ptr, ban_ptr, val_ptr, idx_ptr, n, eps, eos,
                     HIDDEN: tl.constexpr, VOCAB: tl.constexpr, BM: tl.constexpr,
                     BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr, PDL: tl.constexpr = False,
                     LINE: tl.constexpr = 64, PF: tl.constexpr = 0,
                     EARLY: tl.constexpr = 1):
        """Grid (row blocks, VOCAB / BV): the final RMSNorm of BM rows times BV rows of the
        output embedding w [VOCAB, HIDDEN], rounded to the activation dtype as the
        lm_head's logits are; per row the block's largest logit (EOS at -inf while the
        row's ban is > 0) and its first index, into val / idx [n, blocks]."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BV + tl.arange(0, BV)
        rmask = rows < n
        cmask = cols < VOCAB
        if PF > 0:
            _prefetch(w_ptr, tl.minimum(cols, VOCAB - 1), HIDDEN, LINE, PF)
        _begin(PDL)
        if EARLY:
            ban = tl.load(ban_ptr + rows, mask=rmask, other=0)
        dt = x_ptr.dtype.element_ty
        acc, _ = _norm_matmul2(x_ptr, nw_ptr, w_ptr, rows, rmask, cols, cols, cmask, eps,
                               HIDDEN, BM, BV, BK, UPCAST, IEEE, TWO=False, EARLY=EARLY)
        logits = acc.to(dt).to(tl.float32)
        if not EARLY:
            ban = tl.load(ban_ptr + rows, mask=rmask, other=0)
        banned = (cols[None, :] == eos) & (ban[:, None] > 0)
        logits = tl.where(cmask[None, :] & ~banned, logits, float("-inf"))
        best = tl.max(logits, axis=1)
        first = tl.min(tl.where(logits == best[:, None], cols[None, :], VOCAB), axis=1)
        blocks = tl.num_programs(1)
        at = rows * blocks + tl.program_id(1)
        tl.store(val_ptr + at, best, mask=rmask)
        tl.store(idx_ptr + at, first, mask=rmask)

    def _pick(val_ptr, idx_ptr, out_ptr, tok_ptr, pos_ptr, ban_ptr, s_out,
              BLOCKS: tl.constexpr, BB: tl.constexpr, VOCAB: tl.constexpr,
              PDL: tl.constexpr = False):
        """Grid (rows,): the row's greedy token, the first index of its largest logit (as
        torch.argmax picks among equal ones), into out[row * s_out] and the next step's
        input token, whose position moves on by one; the row's EOS ban counts down."""
        _begin(PDL)
        row = tl.program_id(0)
        b = tl.arange(0, BB)
        bmask = b < BLOCKS
        v = tl.load(val_ptr + row * BLOCKS + b, mask=bmask, other=float("-inf"))
        i = tl.load(idx_ptr + row * BLOCKS + b, mask=bmask, other=VOCAB)
        token = tl.min(tl.where(v == tl.max(v, axis=0), i, VOCAB), axis=0)
        tl.store(out_ptr + row * s_out, token)
        tl.store(tok_ptr + row, token)
        tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)
        tl.store(ban_ptr + row, tl.load(ban_ptr + row) - 1)

    _KERNELS = {"norm_qkv_rope": _norm_qkv_rope, "attend": _attend, "combine": _combine,
                "attend_o": _attend_o,
                "matmul_add": _matmul_add, "norm_gate_up": _norm_gate_up,
                "head_argmax": _head_argmax, "pick": _pick}


# Integer arguments triton must not specialize on (it compiles a kernel anew for each
# value class: 1, multiples of 16, others): row counts and split counts vary with the
# traffic, and a compile mid-serving stalls every request for seconds.
_UNSPECIALIZED = {"norm_qkv_rope": ["n"], "matmul_add": ["n"], "norm_gate_up": ["n"],
                  "head_argmax": ["n"], "combine": ["splits"], "pick": ["s_out"]}


# Jitted decode kernels of other modules (triton_persistent's step) that
# compiled_variants counts too; they add themselves on import.
OTHER_KERNELS: list[Any] = []


def compiled_variants() -> int:
    """How many kernel variants triton has compiled in this process, all decode kernels
    together (one appearing while serving is a compile stall); -1 when triton does not
    say (not installed, or its cache internals moved)."""
    try:
        return sum(len(cache[0]) for fn in [*_jitted().values(), *OTHER_KERNELS]
                   for cache in fn.device_caches.values())
    except Exception:  # noqa: BLE001  (a private attribute of triton's: no count)
        return -1


@functools.cache
def _jitted() -> dict[str, Any]:
    return {name: triton.jit(fn, do_not_specialize=_UNSPECIALIZED.get(name))
            for name, fn in _KERNELS.items()}


def _kernels(device: Any) -> dict[str, Any]:
    """The kernels for tensors on `device`: compiled for CUDA, or, elsewhere, run by
    Triton's interpreter, which has to be on (TRITON_INTERPRET=1) before triton is
    first imported, for triton's own library functions to be interpretable too."""
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError("the Triton decode kernels need CUDA; on a CPU they run only in "
                         "Triton's interpreter (TRITON_INTERPRET=1 set before triton is "
                         "imported: for tests, slow)")
    return _jitted()


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# Output columns per matmul program at <= 16 rows and above; the reduction block,
# warps and pipeline stages of the matmul kernels above 16 rows and (*_small) at
# <= 16, where a step is bound by the latency of each kernel's dependent loads,
# not by bandwidth: fewer, larger loads; programs per q/k/v head at <= 16 rows
# (more programs read each head's weights in parallel); positions per attention
# split at least. The defaults are the best of benchmarks/gpu_decode.py's sweeps
# on an H100 (bk_small 256: 1,230 tok/s at batch 1 against 998 at 128).
# pdl: launch each kernel with programmatic dependent launch where the GPU has it
# (compute capability 9+), so it starts while the one before it runs; prefetch:
# such a kernel first asks L2 for its weights. bm: rows per matmul program at most;
# bv: vocabulary rows per program of the greedy head. early: the matmul kernels
# issue the loads that don't depend on their matmul (norm row, bias, residual,
# positions, rotary tables) before it, so they overlap instead of adding round
# trips (0: after it, as before; 2: also no RMS pass before the matmul, its scale
# applied after; kept to measure). stages_head: the greedy head's pipeline
# stages (0: the layers'; its 768 programs at batch 1 want a small footprint).
# attend_o: for one row attending over at most this many positions, attention
# and the o projection in one kernel (`_attend_o`; 0: never). persistent: a
# one-row batch's whole step as one persistent kernel (backends/
# triton_persistent.py, whose p_* tiles these are; StaticDecoder greedy launches;
# p_trace: it records when each program reaches and leaves each grid barrier;
# p_fuse_mlp: its gate/up and down projections as one stage, a barrier fewer a layer;
# p_staged: its stages as a kernel each, chained with PDL, no barriers).
# A TritonLayers copies these at construction; benchmarks may change them first.
DEFAULT_TILES = {"bn_small": 16, "bn_large": 64, "bk": 128, "warps": 4, "stages": 3,
                 "bk_small": 256, "warps_small": 4, "stages_small": 3, "qkv_split": 1,
                 "min_split": 256, "bm": 64, "pdl": 1, "prefetch": 1, "bv": 64, "early": 1,
                 "stages_head": 0, "attend_o": 0, "persistent": 0, "p_bh": 8, "p_bn": 8,
                 "p_bn_mlp": 8, "p_bv": 16, "p_splits": 8, "p_warps": 8, "p_ahead": 0,
                 "p_programs": 0, "p_staged": 0, "p_trace": 0, "p_fuse_mlp": 0}


class TritonLayers:
    """The five-kernel decode layer for one model's shapes. Stateless apart from the
    shapes: scratch buffers come from the caller's allocator (a CUDA graph's pool)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float,
                 tiles: dict[str, int] | None = None):
        reason = available()
        if reason is not None:
            raise ValueError(f"Triton decode kernels unavailable: {reason}")
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if head_dim < 32 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.eps, self.scale = float(eps), float(scale)
        self.tiles = {**DEFAULT_TILES, **(tiles or {})}

    def uses_pdl(self, device: Any) -> bool:
        """Whether kernels on `device` launch with programmatic dependent launch."""
        return bool(self.tiles["pdl"]) and _pdl_ok(device)

    def _chaining(self, x: Any) -> tuple[dict[str, Any], Any]:
        """Launch options for kernels over x: with PDL its constexpr and launch flag, and a
        function giving the weight prefetch (LINE, PF) of a kernel reducing over k."""
        pdl = self.uses_pdl(x.device)

        def prefetch(k: int) -> dict[str, int]:
            if not (pdl and self.tiles["prefetch"]):
                return {}
            return _prefetch_lines(k, x.element_size())

        return ({"PDL": True, "launch_pdl": True} if pdl else {}), prefetch

    def splits(self, n: int, window: int) -> int:
        """Sequence splits for attention: enough programs to fill the GPU, each split at
        least tiles["min_split"] positions of the window, a power of two."""
        s, least = 1, self.tiles["min_split"]
        while (n * self.kv_heads * s < _TARGET_PROGRAMS and window // (s * 2) >= least
               and s < _MAX_SPLITS):
            s *= 2
        return s

    def layer(self, x: Any, w: tuple, kc: Any, vc: Any, pos: Any, cos: Any, sin: Any,
              window: int, slots: Any) -> Any:
        """One decoder layer for one token in each of rows 0..n-1: x [n, hidden] (updated
        in place and returned), `w` the fused weights of `static_decode._fuse_layers`,
        kc/vc the layer's cache [slots, kv_heads, max_len, D], pos [n] each row's
        position, slots [n] its cache slot, cos/sin [max_len, D] the rotary tables,
        `window` the most positions any row attends over (it sets the attention splits).
        Each row writes its key and value at (slot, pos), then attends over its slot's
        positions 0..pos: rows sharing a slot at positions 0..t-1 are a causal prefill."""
        import torch

        norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, down_w, down_b = w
        n, hidden = x.shape
        heads, kvh, d = self.heads, self.kv_heads, self.head_dim
        inter = down_w.shape[1]
        k = _kernels(x.device)
        flags = {"UPCAST": x.device.type != "cuda", "IEEE": x.dtype == torch.float32}
        t = self.tiles
        small = "_small" if n <= 16 else ""
        bm = min(t["bm"], max(16, _pow2(n)))
        bn = t["bn_small"] if small else t["bn_large"]
        bk = _block_k(t["bk" + small], x.dtype == torch.float32)
        qs = t["qkv_split"] if small and d // 2 // t["qkv_split"] >= 16 else 1
        rows = triton.cdiv(n, bm)
        chained, lines = self._chaining(x)
        flags.update(num_warps=t["warps" + small], num_stages=t["stages" + small],
                     EARLY=int(t["early"]), **chained)
        s_slot, s_head, s_pos, _ = kc.stride()
        q = torch.empty((n, heads * d), dtype=x.dtype, device=x.device)
        k["norm_qkv_rope"][(rows, (heads + 2 * kvh) * qs)](
            x, norm1, qkv_w, qkv_b if qkv_b is not None else qkv_w, cos, sin, pos, slots, q,
            kc, vc,
            n, self.eps, s_slot, s_head, s_pos, HIDDEN=hidden, HEADS=heads, KV_HEADS=kvh,
            D=d, HAS_BIAS=qkv_b is not None, BM=bm, BK=_bk(hidden, bk), QS=qs, **flags,
            **lines(hidden))
        splits = self.splits(n, window)
        bg = max(16, _pow2(self.group))
        if n == 1 and splits == 1 and window <= t["attend_o"]:
            k["attend_o"][(triton.cdiv(hidden, bn),)](
                q, kc, vc, pos, slots, o_w, o_b if o_b is not None else o_w, x, self.scale,
                s_slot, s_head, s_pos, N=hidden, HEADS=heads, KV_HEADS=kvh, D=d,
                GROUP=self.group, BG=bg, BL=_BL, BN=bn, HAS_BIAS=o_b is not None,
                UPCAST=flags["UPCAST"], IEEE=flags["IEEE"], num_warps=flags["num_warps"],
                num_stages=flags["num_stages"], **chained, **lines(heads * d))
        else:
            o = torch.empty_like(q)
            chunk = triton.cdiv(triton.cdiv(window, splits), _BL) * _BL
            part = ml = o
            if splits > 1:
                part = torch.empty((n, heads, splits, d), dtype=torch.float32,
                                   device=x.device)
                ml = torch.empty((n, heads, splits, 2), dtype=torch.float32, device=x.device)
            k["attend"][(n, kvh, splits)](
                q, kc, vc, pos, slots, o, part, ml, self.scale, chunk, s_slot, s_head,
                s_pos, HEADS=heads, KV_HEADS=kvh, D=d, GROUP=self.group, BG=bg, BL=_BL,
                SPLIT=splits > 1, UPCAST=flags["UPCAST"], IEEE=flags["IEEE"], **chained)
            if splits > 1:
                k["combine"][(n, heads)](part, ml, o, splits, HEADS=heads, D=d,
                                         BS=_MAX_SPLITS, **chained)
            k["matmul_add"][(rows, triton.cdiv(hidden, bn))](
                o, o_w, o_b if o_b is not None else o_w, x, n, N=hidden, K=heads * d,
                HAS_BIAS=o_b is not None, BM=bm, BN=bn, BK=_bk(heads * d, bk), **flags,
                **lines(heads * d))
        h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
        k["norm_gate_up"][(rows, triton.cdiv(inter, bn))](
            x, norm2, gu_w, gu_b if gu_b is not None else gu_w, h, n, self.eps,
            HIDDEN=hidden, INTER=inter, HAS_BIAS=gu_b is not None, BM=bm, BN=bn,
            BK=_bk(hidden, bk), **flags, **lines(hidden))
        k["matmul_add"][(rows, triton.cdiv(hidden, bn))](
            h, down_w, down_b if down_b is not None else down_w, x, n, N=hidden, K=inter,
            HAS_BIAS=down_b is not None, BM=bm, BN=bn, BK=_bk(inter, bk), **flags,
            **lines(inter))
        return x

    def greedy_head(self, x: Any, norm_w: Any, head_w: Any, eos: int | None, out: Any,
                    tokens: Any, pos: Any, ban: Any) -> None:
        """The greedy next token of each of rows 0..n-1 of x [n, hidden] (the last
        layer's output): the final RMSNorm (weight `norm_w`), the logits against head_w
        [vocab, hidden] rounded as the lm_head's, EOS (None: no EOS) excluded where
        ban > 0, the first index of the largest logit; written to `out` (a column view
        of a chunk's tokens) and `tokens`, `pos` moved on by one, `ban` counted down, in
        place. Two kernels: no [n, vocab] logits tensor, no separate argmax."""
        import torch

        n, hidden = x.shape
        vocab = head_w.shape[0]
        k = _kernels(x.device)
        t = self.tiles
        small = "_small" if n <= 16 else ""
        chained, lines = self._chaining(x)
        bm = min(t["bm"], max(16, _pow2(n)))
        bv = t["bv"]
        blocks = triton.cdiv(vocab, bv)
        val = torch.empty((n, blocks), dtype=torch.float32, device=x.device)
        idx = torch.empty((n, blocks), dtype=torch.int32, device=x.device)
        k["head_argmax"][(triton.cdiv(n, bm), blocks)](
            x, norm_w, head_w, ban, val, idx, n, self.eps, -1 if eos is None else int(eos),
            HIDDEN=hidden, VOCAB=vocab, BM=bm, BV=bv,
            BK=_bk(hidden, _block_k(t["bk" + small], x.dtype == torch.float32)),
            UPCAST=x.device.type != "cuda", IEEE=x.dtype == torch.float32,
            num_warps=t["warps" + small], num_stages=t["stages_head"] or t["stages" + small],
            EARLY=int(t["early"]), **chained, **lines(hidden))
        k["pick"][(n,)](val, idx, out, tokens, pos, ban, out.stride(0), BLOCKS=blocks,
                        BB=_pow2(blocks), VOCAB=vocab, **chained)


def _prefetch_lines(k: int, element_size: int) -> dict[str, int]:
    """A kernel's weight prefetch over rows of k elements: LINE elements per 128-byte
    line, PF (a power of two) lines a row."""
    line = 128 // element_size
    return {"LINE": line, "PF": _pow2(-(-k // line))}


@functools.cache
def _pdl_ok(device: Any) -> bool:
    """Whether kernels on `device` can use programmatic dependent launch: a CUDA GPU of
    compute capability 9 or later (Hopper) and a triton that has it."""
    import torch

    return (device.type == "cuda" and gdc_wait is not None
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _block_k(block: int, fp32: bool) -> int:
    """float32 tiles take twice the shared memory: at most 64 there (a 64 x 64 tile pair
    at 128 would need ~230 KB, more than any GPU but an H100 has)."""
    return min(block, 64) if fp32 else block


def _bk(k: int, block: int = 128) -> int:
    """The reduction block: `block`, or less for a small reduction (at least 16, tl.dot's
    floor)."""
    return max(16, min(block, _pow2(k)))


def compile_for_gpu(arch: int = 90, dtype: str = "bf16", hidden: int = 576, heads: int = 9,
                    kv_heads: int = 3, head_dim: int = 64, inter: int = 1536, vocab: int = 49152,
                    bm: int = 16, bn: int = 16, bk: int = 128, splits: int = 4,
                    qkv_split: int = 1, warps: int = 4, stages: int = 3, pdl: bool = False,
                    early: int = 1) -> dict[str, dict[str, Any]]:
    """Compile every kernel for CUDA compute capability `arch` without a GPU (Triton's
    bundled ptxas), with the tiles `TritonLayers.layer` would pick (`pdl`: launched
    with programmatic dependent launch, the matmuls prefetching their weights; `early`:
    the tile of that name); per kernel its cubin size, shared memory in bytes and PTX.
    Raises if a kernel does not lower."""
    if triton is None:
        raise ValueError("triton is not installed")
    p, f, i = f"*{dtype}", "*fp32", "*i64"
    group = heads // kv_heads
    flags = {"UPCAST": False, "IEEE": dtype == "fp32"}
    bk = _block_k(bk, dtype == "fp32")
    chained = {"PDL": pdl}
    loads = {"EARLY": early}

    def lines(k: int) -> dict[str, int]:
        spec = _prefetch_lines(k, 4 if dtype == "fp32" else 2)
        return spec if pdl else {**spec, "PF": 0}  # PF 0: no prefetch

    jobs = {
        "norm_qkv_rope": (
            {"x_ptr": p, "nw_ptr": p, "w_ptr": p, "b_ptr": p, "cos_ptr": p, "sin_ptr": p,
             "pos_ptr": i, "slot_ptr": i, "q_ptr": p, "kc_ptr": p, "vc_ptr": p, "n": "i32",
             "eps": "fp32", "s_slot": "i32", "s_head": "i32", "s_pos": "i32"},
            {"HIDDEN": hidden, "HEADS": heads, "KV_HEADS": kv_heads, "D": head_dim,
             "HAS_BIAS": True, "BM": bm, "BK": _bk(hidden, bk), "QS": qkv_split, **flags,
             **chained, **lines(hidden), **loads}),
        "attend": (
            {"q_ptr": p, "kc_ptr": p, "vc_ptr": p, "pos_ptr": i, "slot_ptr": i, "o_ptr": p,
             "part_ptr": f,
             "ml_ptr": f, "scale": "fp32", "chunk": "i32", "s_slot": "i32", "s_head": "i32",
             "s_pos": "i32"},
            {"HEADS": heads, "KV_HEADS": kv_heads, "D": head_dim, "GROUP": group,
             "BG": max(16, _pow2(group)), "BL": _BL, "SPLIT": splits > 1, **flags,
             **chained}),
        "combine": ({"part_ptr": f, "ml_ptr": f, "o_ptr": p, "splits": "i32"},
                    {"HEADS": heads, "D": head_dim, "BS": _MAX_SPLITS, **chained}),
        "attend_o": (
            {"q_ptr": p, "kc_ptr": p, "vc_ptr": p, "pos_ptr": i, "slot_ptr": i, "w_ptr": p,
             "b_ptr": p, "x_ptr": p, "scale": "fp32", "s_slot": "i32", "s_head": "i32",
             "s_pos": "i32"},
            {"N": hidden, "HEADS": heads, "KV_HEADS": kv_heads, "D": head_dim, "GROUP": group,
             "BG": max(16, _pow2(group)), "BL": _BL, "BN": bn, "HAS_BIAS": True, **flags,
             **chained, **lines(heads * head_dim)}),
        "matmul_add": (
            {"a_ptr": p, "w_ptr": p, "b_ptr": p, "x_ptr": p, "n": "i32"},
            {"N": hidden, "K": inter, "HAS_BIAS": True, "BM": bm, "BN": bn,
             "BK": _bk(inter, bk), **flags, **chained, **lines(inter), **loads}),
        "norm_gate_up": (
            {"x_ptr": p, "nw_ptr": p, "w_ptr": p, "b_ptr": p, "h_ptr": p, "n": "i32",
             "eps": "fp32"},
            {"HIDDEN": hidden, "INTER": inter, "HAS_BIAS": True, "BM": bm, "BN": bn,
             "BK": _bk(hidden, bk), **flags, **chained, **lines(hidden), **loads}),
        "head_argmax": (
            {"x_ptr": p, "nw_ptr": p, "w_ptr": p, "ban_ptr": i, "val_ptr": f,
             "idx_ptr": "*i32", "n": "i32", "eps": "fp32", "eos": "i32"},
            {"HIDDEN": hidden, "VOCAB": vocab, "BM": bm, "BV": 64, "BK": _bk(hidden, bk),
             **flags, **chained, **lines(hidden), **loads}),
        "pick": (
            {"val_ptr": f, "idx_ptr": "*i32", "out_ptr": i, "tok_ptr": i, "pos_ptr": i,
             "ban_ptr": i, "s_out": "i32"},
            {"BLOCKS": -(-vocab // 64), "BB": _pow2(-(-vocab // 64)), "VOCAB": vocab,
             **chained}),
    }
    kernels = _jitted()
    out = {}
    for name, (signature, constexprs) in jobs.items():
        options = ({"num_warps": warps, "num_stages": stages}
                   if name in ("norm_qkv_rope", "matmul_add", "norm_gate_up", "head_argmax",
                               "attend_o")
                   else {})
        if pdl:
            options["launch_pdl"] = True
        compiled = compile_offline(kernels[name], signature, constexprs, arch, options,
                                   aligned=("s_slot", "s_head", "s_pos", "chunk"))
        out[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                     "shared_bytes": compiled.metadata.shared, "ptx": compiled.asm["ptx"]}
    return out


def compile_offline(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int,
                    options: dict[str, Any], aligned: tuple[str, ...] = ()) -> Any:
    """`fn` compiled for CUDA compute capability `arch` with no GPU present (Triton's
    bundled ptxas): `signature` the run-time arguments' types, `constexprs` the rest.
    Pointers and the integers named in `aligned` are taken as multiples of 16, as
    triton specializes a launch on such arguments (without it no load is vectorized
    and no loop pipelined: not the code a GPU runs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 notice only
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, kind in signature.items() if kind.startswith("*") or a in aligned}
    src = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constexprs}},
                    constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or None)
