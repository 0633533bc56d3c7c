"""One decode step of a one-row batch as ONE persistent Triton kernel (tile `persistent`).

    step = OneRowStep(layers, fused, k, v, embed, norm_w, head_w, cos, sin, max_len, eos)
    step.run(tokens, pos, ban, slots, out, window)  # row 0's next greedy token, in place

Why: at batch 1 the five-kernel layer of `triton_decode` is bound by its ~150
dependent kernel boundaries a token (each a grid drain, a launch and the next
kernel's first memory round trips: ~4 us a kernel on an H100, 1,624 tok/s), not by
the ~270 MB of weights it reads. Here a step is one launch of one program per SM,
each walking every stage itself, with a grid-wide barrier (a counter in L2) where a
kernel boundary was. Per layer: (1) RMSNorm + q/k/v + rotary + the new key and value
into the cache; (2) attention split along the positions; (3) the splits combined +
o projection + residual; (4) RMSNorm + gate/up + SiLU(gate) * up; (5) down
projection + residual; then (6) the final RMSNorm + lm_head, each program keeping
its largest logit, and (7) the first of the largest (torch.argmax's pick): the next
token, its position moved on, the EOS ban counted down. Layer 0 reads its input
straight from the embedding. Each program asks L2 for its share of the next layer's
weights a layer ahead, so a stage's weight loads hit L2; it loads its first unit's
weights of a stage before the activations they multiply (one round trip, not two),
or with the tile p_ahead earlier: between its arrival at the stage's barrier and its
wait there (2), or a stage early (1), so they arrive while it waits.

One row needs no tensor cores: a program's output columns are the row times those
weight rows over the whole reduction at once (every load of a stage in one memory
round trip), summed in float32. The arithmetic rounds as `triton_decode`'s kernels
do (and transformers'): RMSNorm in float32, each linear's output rounded to the
activation dtype, float32 attention and accumulation.

All programs must be resident at once: one per SM, which a launch always gets while
no other kernel holds SMs for ever. A barrier that waits too long gives up and
raises a flag (`OneRowStep.healthy`; StaticDecoder checks it after warm-up and with
every launched chunk's tokens, which then raise), so a misfit surfaces as an error
and the layer kernels, not as a hung GPU or garbage tokens. Loads of what other
programs wrote in this launch go to L2 (".cg"): an SM's L1 is not coherent within a
kernel.

With the tile p_fuse_mlp the gate/up and down stages are one (a barrier fewer a
layer, four a layer): each unit of intermediate columns multiplies its silu(gate) *
up by its slice of the down projection's columns and adds the products into
float32 sums in L2 (split-K, atomic adds of 4 floats); the next stage adds them,
rounded as the linear's output, and the bias to the residual. The sums' order is
whatever order the adds land in, so unlike the five stages a step's logits may
differ in the last bits from run to run (as with any split-K reduction).

With the tile p_trace each program also records, at the start, at each barrier
(arriving, going on) and at the end, the global timer and its SM's clock, and its
SM: `OneRowStep.trace` / `trace_summary` say how much of a step the barriers take
against each kind of stage (GPU only: the clocks are inline PTX).

With the tile p_staged the same stages run as a kernel each (`_one_stage`, layers * 5
+ 2 launches, 122 with p_fuse_mlp), each over its stage's units, chained with
programmatic dependent launch: no barrier, and (p_ahead) a launch loads its weights
while it waits for the one before it, which the layer kernels of `triton_decode` only
prefetch to L2. On a CPU the interpreter runs programs one after another, so a barrier
can't be met by more than one: tests run the step as one program, and staged with
several programs a launch.
"""

from typing import Any

from contextwise.backends.triton_decode import (
    _BL,
    DEFAULT_TILES,
    OTHER_KERNELS,
    _attention,
    _begin,
    _kernels,
    _pow2,
    _to_l2,
    available,
    compile_offline,
    tl,
    triton,
)

try:  # the trace's clocks (tile p_trace; compiled kernels only: inline PTX)
    from triton.language.extra.cuda import globaltimer, smid
except ImportError:
    globaltimer = smid = None

__all__ = ["OneRowStep", "compile_for_gpu", "trace_summary"]

_STAGES = 5  # stages a layer

# Entries of a layer's row in the pointer table: a fused layer's ten tensors
# (static_decode._fuse_layers' order), then its key and value caches.
_TABLE = ("norm1", "qkv_w", "qkv_b", "o_w", "o_b", "norm2", "gu_w", "gu_b", "down_w",
          "down_b", "k", "v")

if triton is not None:
    _ENTRIES = tl.constexpr(len(_TABLE))
    (_NORM1, _QKV_W, _QKV_B, _O_W, _O_B, _NORM2, _GU_W, _GU_B, _DOWN_W, _DOWN_B, _K,
     _V) = (tl.constexpr(i) for i in range(len(_TABLE)))
    _SPIN_LIMIT = tl.constexpr(1 << 20)  # polls (L2 round trips) before a barrier gives up

    @triton.jit
    def _stamp(at, TRACE: tl.constexpr):
        """Trace (TRACE): the global timer (ns, comparable across SMs) into at[0] and the
        SM's own clock (cycles, finer) into at[2]."""
        if TRACE:
            tl.store(at, globaltimer())
            clock = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [],
                                              dtype=tl.int64, is_pure=False, pack=1)
            tl.store(at + 2, clock)

    @triton.jit
    def _arrive(sync_ptr, trace_at, TRACE: tl.constexpr):
        """This program's arrival at a grid barrier: the CTA's stores, then one release
        increment of the counter at sync_ptr (cooperative groups' grid sync, split in
        two so loads that don't depend on the barrier can go out before the wait).
        Traced: the time the CTA's work was done, at trace_at."""
        tl.debug_barrier()
        _stamp(trace_at, TRACE)
        tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")

    @triton.jit
    def _wait(sync_ptr, target, limit, trace_at, TRACE: tl.constexpr):
        """Poll the counter (one thread, acquire; its view shared through the CTA
        barrier) until it reaches `target` arrivals. Past `limit` polls it sets the flag
        at sync_ptr + 1 and goes on; returns the limit for the next barrier (0 after a
        timeout: the step is void, so later barriers don't each wait it out). Traced:
        the time the CTA goes on, at trace_at + 1."""
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        while (seen < target) & (spins < limit):
            seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if seen < target:
            tl.atomic_xchg(sync_ptr + 1, 1)
            limit = limit * 0
        tl.debug_barrier()
        _stamp(trace_at + 1, TRACE)
        return limit

    @triton.jit
    def _at(table_ptr, layer, j: tl.constexpr, like):
        """Entry j of the layer's row of the pointer table, a pointer to like's dtype,
        16-byte aligned (torch's allocations are; `OneRowStep` checks): without the hint
        no load through it is vectorized."""
        address = tl.load(table_ptr + layer * _ENTRIES + j)
        return tl.multiple_of(address.to(tl.pointer_type(like.dtype.element_ty)), 16)

    @triton.jit
    def _prefetch_units(ptr, count, p, P, UNIT: tl.constexpr, LINE: tl.constexpr,
                        PER: tl.constexpr):
        """Ask L2 for this program's units of UNIT contiguous elements at ptr (units p,
        p + P, ...; `count` elements in all; a unit of one line: its share of a matrix):
        PER lines at most, in the order it reads them (the clamp repeats the last)."""
        LINES: tl.constexpr = (UNIT + LINE - 1) // LINE
        i = tl.arange(0, PER)
        at = (p + P * (i // LINES)) * UNIT + (i % LINES) * LINE
        _to_l2(ptr + tl.minimum(at, count - 1))

    @triton.jit
    def _normed(x, nw_ptr, eps, dt, HIDDEN: tl.constexpr, HP: tl.constexpr):
        """The row x (float32 [HP], zeros past HIDDEN) as transformers' RMSNorm gives it,
        weight * (x * inv).to(dtype) in the activation dtype dt: float32 [HP]."""
        k = tl.arange(0, HP)
        nw = tl.load(nw_ptr + k, mask=k < HIDDEN, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
        return (nw * (x * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)

    @triton.jit
    def _row(x_ptr, HIDDEN: tl.constexpr, HP: tl.constexpr):
        """The row x [HIDDEN] (written in this launch: from L2), float32 [HP], zeros past
        HIDDEN."""
        k = tl.arange(0, HP)
        return tl.load(x_ptr + k, mask=k < HIDDEN, other=0.0, cache_modifier=".cg").to(
            tl.float32)

    @triton.jit
    def _normed_row(x_ptr, nw_ptr, eps, HIDDEN: tl.constexpr, HP: tl.constexpr):
        """The row x [HIDDEN] normed (`_normed`): float32 [HP], zeros past HIDDEN."""
        return _normed(_row(x_ptr, HIDDEN, HP), nw_ptr, eps, x_ptr.dtype.element_ty, HIDDEN,
                       HP)

    @triton.jit
    def _plus_mlp(x, acc_ptr, b_ptr, dt, HIDDEN: tl.constexpr, HP: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
        """With the fused MLP: the residual row x (`_row`) plus the down projection summed
        at acc_ptr (float32) + bias, rounded as transformers' linear output and residual
        add are: float32 [HP], zeros past HIDDEN."""
        k = tl.arange(0, HP)
        km = k < HIDDEN
        y = tl.load(acc_ptr + k, mask=km, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y += tl.load(b_ptr + k, mask=km, other=0.0).to(tl.float32)
        return (x + y.to(dt).to(tl.float32)).to(dt).to(tl.float32)

    @triton.jit
    def _rows(w_ptr, outs, omask, K: tl.constexpr, KP: tl.constexpr):
        """Weight rows `outs` of w [*, K], [len(outs), KP] (zeros past K and where not
        omask): a unit's whole reduction in one load."""
        k = tl.arange(0, KP)
        return tl.load(w_ptr + outs[:, None] * K + k[None, :],
                       mask=omask[:, None] & (k[None, :] < K), other=0.0)

    @triton.jit
    def _times(w, a):
        """Weight rows w [m, KP] times the row a (float32 [KP]): float32 [m]."""
        return tl.sum(w.to(tl.float32) * a[None, :], axis=1)

    # Each matrix stage loads its first unit's weights before the row they multiply, so
    # both are one memory round trip, not two (a unit loop's loads would wait for the
    # row); at SmolLM2's shapes most programs have one unit a stage.

    @triton.jit
    def _qkv_inputs(u, b_ptr, cos_ptr, sin_ptr, pos, D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BH: tl.constexpr):
        """Unit u's bias and rotary table entries (bias1, bias2, cos1, cos2, sin1, sin2,
        float32 [BH]; bias 0 without one): loads that don't wait for the products."""
        HALF: tl.constexpr = D // 2
        QS: tl.constexpr = HALF // BH
        half = (u % QS) * BH + tl.arange(0, BH)
        out1 = (u // QS) * D + half
        at = pos * D + half
        b1 = 0.0
        b2 = 0.0
        if HAS_BIAS:
            b1 = tl.load(b_ptr + out1).to(tl.float32)
            b2 = tl.load(b_ptr + out1 + HALF).to(tl.float32)
        return (b1, b2, tl.load(cos_ptr + at).to(tl.float32),
                tl.load(cos_ptr + at + HALF).to(tl.float32), tl.load(sin_ptr + at).to(tl.float32),
                tl.load(sin_ptr + at + HALF).to(tl.float32))

    @triton.jit
    def _qkv_unit(w1, w2, h, ins, u, q_ptr, kc_ptr, vc_ptr, pos, slot, s_slot, s_head, s_pos,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                  BH: tl.constexpr):
        """Unit u of q/k/v (w1, w2: its weight rows of both rotary halves; ins:
        `_qkv_inputs`): + bias, rotary; queries to q, the key and value into the cache."""
        HALF: tl.constexpr = D // 2
        QS: tl.constexpr = HALF // BH
        dt = q_ptr.dtype.element_ty
        b1, b2, c1, c2, s1, s2 = ins
        head = u // QS
        half = (u % QS) * BH + tl.arange(0, BH)
        y1 = (_times(w1, h) + b1).to(dt).to(tl.float32)  # rounded as transformers' output
        y2 = (_times(w2, h) + b2).to(dt).to(tl.float32)
        if head < HEADS + KV_HEADS:  # queries and keys: rotary (rotate_half)
            r1 = y1 * c1 - y2 * s1
            r2 = y2 * c2 + y1 * s2
        else:
            r1 = y1
            r2 = y2
        if head < HEADS:
            dst = q_ptr + head * D + half
        elif head < HEADS + KV_HEADS:
            dst = kc_ptr + slot * s_slot + (head - HEADS) * s_head + pos * s_pos + half
        else:
            dst = (vc_ptr + slot * s_slot + (head - HEADS - KV_HEADS) * s_head
                   + pos * s_pos + half)
        tl.store(dst, r1.to(dt))
        tl.store(dst + HALF, r2.to(dt))

    @triton.jit
    def _qkv_first(w_ptr, p, limit, HIDDEN: tl.constexpr, HP: tl.constexpr,
                   D: tl.constexpr, BH: tl.constexpr):
        """Program p's first q/k/v unit's weight rows (both rotary halves); none (zeros,
        no load) unless p < limit."""
        HALF: tl.constexpr = D // 2
        QS: tl.constexpr = HALF // BH
        out1 = (p // QS) * D + (p % QS) * BH + tl.arange(0, BH)
        mine = p + tl.zeros((BH,), tl.int32) < limit  # (a vector: the interpreter)
        return _rows(w_ptr, out1, mine, HIDDEN, HP), _rows(w_ptr, out1 + HALF, mine, HIDDEN, HP)

    @triton.jit
    def _stage_qkv(w1, w2, xin, nw_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr,
                   pos, slot, eps, s_slot, s_head, s_pos, p, P, acc_ptr, db_ptr, r_ptr, mlp_in,
                   HIDDEN: tl.constexpr, HP: tl.constexpr, HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BH: tl.constexpr, DOWN_BIAS: tl.constexpr, FUSE: tl.constexpr):
        """Units of BH columns of one head's first rotary half and the same ones of its
        second: RMSNorm + q/k/v + bias + rotary + the cache write (w1, w2: the first
        unit's weights, `_qkv_first`). The input row is xin's, or (FUSE, mlp_in: after a
        fused MLP) that plus acc and the down bias (`_plus_mlp`), which program 0 also
        writes to r_ptr, the o stage's residual."""
        HALF: tl.constexpr = D // 2
        QS: tl.constexpr = HALF // BH
        units = (HEADS + 2 * KV_HEADS) * QS
        ins = _qkv_inputs(tl.minimum(p, units - 1), b_ptr, cos_ptr, sin_ptr, pos, D, HAS_BIAS,
                          BH)
        dt = q_ptr.dtype.element_ty
        x = _row(xin, HIDDEN, HP)
        if FUSE:
            if mlp_in:
                x = _plus_mlp(x, acc_ptr, db_ptr, dt, HIDDEN, HP, DOWN_BIAS)
                if p == 0:
                    k = tl.arange(0, HP)
                    tl.store(r_ptr + k, x.to(dt), mask=k < HIDDEN)
        h = _normed(x, nw_ptr, eps, dt, HIDDEN, HP)
        if p < units:
            _qkv_unit(w1, w2, h, ins, p, q_ptr, kc_ptr, vc_ptr, pos, slot, s_slot, s_head,
                      s_pos, HEADS, KV_HEADS, D, BH)
        for u in range(p + P, units, P):
            out1 = (u // QS) * D + (u % QS) * BH + tl.arange(0, BH)
            every = out1 >= 0
            _qkv_unit(_rows(w_ptr, out1, every, HIDDEN, HP),
                      _rows(w_ptr, out1 + HALF, every, HIDDEN, HP), h,
                      _qkv_inputs(u, b_ptr, cos_ptr, sin_ptr, pos, D, HAS_BIAS, BH), u, q_ptr,
                      kc_ptr, vc_ptr, pos, slot, s_slot, s_head, s_pos, HEADS, KV_HEADS, D, BH)

    @triton.jit
    def _stage_attend(q_ptr, kc_ptr, vc_ptr, part_ptr, ml_ptr, end, slot, chunk, splits, scale,
                      s_slot, s_head, s_pos, p, P, KV_HEADS: tl.constexpr, D: tl.constexpr,
                      GROUP: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr,
                      BS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """Units (kv head, split): the kv head's GROUP query heads over positions
        [split * chunk, min(end, (split + 1) * chunk)), online softmax; unnormalized
        partials and (max, sum) out (an empty split: -inf, 0)."""
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        gmask = g < GROUP
        for u in range(p, KV_HEADS * splits, P):
            kvh = u // splits
            split = u % splits
            qh = kvh * GROUP + g
            q = tl.load(q_ptr + qh[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0,
                        cache_modifier=".cg")
            lo = split * chunk
            at = slot * s_slot + kvh * s_head
            m, l_sum, acc = _attention(q, kc_ptr + at, vc_ptr + at, lo,
                                       tl.minimum(end, lo + chunk), s_pos, scale, D, BG, BL,
                                       UPCAST, IEEE, ".cg")
            at = qh * BS + split
            tl.store(part_ptr + at[:, None] * D + d[None, :], acc, mask=gmask[:, None])
            tl.store(ml_ptr + at * 2, m, mask=gmask)
            tl.store(ml_ptr + at * 2 + 1, l_sum, mask=gmask)

    @triton.jit
    def _add_inputs(cols, cm, b_ptr, xin, HAS_BIAS: tl.constexpr):
        """The residual xin[cols] and the bias (0 without one), float32: loads that don't
        wait for the products."""
        b = 0.0
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        return b, tl.load(xin + cols, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float32)

    @triton.jit
    def _add_unit(y, ins, cols, cm, x_ptr):
        """x[cols] = the residual + (y + bias) rounded as the linear's output is (ins:
        `_add_inputs`)."""
        dt = x_ptr.dtype.element_ty
        b, x = ins
        tl.store(x_ptr + cols, (x + (y + b).to(dt).to(tl.float32)).to(dt), mask=cm)

    @triton.jit
    def _cols_first(w_ptr, off, p, limit, N: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, BN: tl.constexpr):
        """Program p's first unit's weight rows off + (BN columns of N) of w [*, K]; none
        (zeros, no load) unless p < limit."""
        cols = p * BN + tl.arange(0, BN)
        return _rows(w_ptr, off + cols, (cols < N) & (p + 0 * cols < limit), K, KP)

    @triton.jit
    def _stage_o(w, part_ptr, ml_ptr, w_ptr, b_ptr, xin, x_ptr, splits, p, P,
                 HIDDEN: tl.constexpr, HEADS: tl.constexpr, HH: tl.constexpr,
                 D: tl.constexpr, BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BN: tl.constexpr):
        """Every head's splits combined (each program all of them: a few KB from L2,
        instead of a stage and a barrier), rounded as attention's output; then units of
        BN columns: o @ w.T (+ bias), plus the residual xin, into x (w: the first unit's
        weights, `_cols_first`)."""
        dt = x_ptr.dtype.element_ty
        units = tl.cdiv(HIDDEN, BN)
        cols = p * BN + tl.arange(0, BN)
        cm = (cols < HIDDEN) & (p + 0 * cols < units)
        ins = _add_inputs(cols, cm, b_ptr, xin, HAS_BIAS)
        hh = tl.arange(0, HH)
        sp = tl.arange(0, BS)
        d = tl.arange(0, D)
        real = hh < HEADS
        ok = real[:, None] & (sp[None, :] < splits)
        at = hh[:, None] * BS + sp[None, :]
        m = tl.load(ml_ptr + at * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_sum = tl.load(ml_ptr + at * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_ptr + at[:, :, None] * D + d[None, None, :], mask=ok[:, :, None],
                       other=0.0, cache_modifier=".cg")
        top = tl.where(real, tl.max(m, axis=1), 0.0)  # split 0 holds position 0: finite
        wgt = tl.where(ok, tl.exp(m - top[:, None]), 0.0)
        den = tl.where(real, tl.sum(l_sum * wgt, axis=1), 1.0)
        o = tl.sum(part * wgt[:, :, None], axis=1) / den[:, None]  # [HH, D]
        a = tl.reshape(o.to(dt).to(tl.float32), (HH * D,))  # column h * D + d of o @ w.T
        if p < units:
            _add_unit(_times(w, a), ins, cols, cm, x_ptr)
        for u in range(p + P, units, P):
            cols = u * BN + tl.arange(0, BN)
            cm = cols < HIDDEN
            _add_unit(_times(_rows(w_ptr, cols, cm, HEADS * D, HH * D), a),
                      _add_inputs(cols, cm, b_ptr, xin, HAS_BIAS), cols, cm, x_ptr)

    @triton.jit
    def _silu_gate_up(wg, wu, h, cols, cm, b_ptr, dt, INTER: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
        """silu(gate) * up of the unit's columns (its gate and up weight rows times the
        normed row h, + bias), in dt, rounded as transformers' are."""
        gate = _times(wg, h)
        up = _times(wu, h)
        if HAS_BIAS:
            gate += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + INTER + cols, mask=cm, other=0.0).to(tl.float32)
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)  # F.silu's rounding
        return (act * up).to(dt)

    @triton.jit
    def _gate_up_unit(wg, wu, h, cols, cm, b_ptr, h_ptr, INTER: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
        """h[cols] = silu(gate) * up, from the unit's gate and up weight rows."""
        tl.store(h_ptr + cols, _silu_gate_up(wg, wu, h, cols, cm, b_ptr,
                                             h_ptr.dtype.element_ty, INTER, HAS_BIAS), mask=cm)

    @triton.jit
    def _down_first(w_ptr, p, limit, HIDDEN: tl.constexpr, INTER: tl.constexpr,
                    HP: tl.constexpr, BN: tl.constexpr):
        """Fused MLP: program p's first unit's slice of the down projection w [HIDDEN,
        INTER], its BN columns p * BN.. of every row: [HP, BN] (zeros past HIDDEN, none
        unless p < limit)."""
        n = tl.arange(0, HP)
        cols = p * BN + tl.arange(0, BN)
        mine = (cols < INTER) & (p + 0 * cols < limit)
        return tl.load(w_ptr + n[:, None] * INTER + cols[None, :],
                       mask=(n[:, None] < HIDDEN) & mine[None, :], other=0.0)

    @triton.jit
    def _mlp_unit(wg, wu, wd, h, cols, cm, b_ptr, acc_ptr, dt, HIDDEN: tl.constexpr,
                  HP: tl.constexpr, INTER: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Fused MLP: the unit's silu(gate) * up columns (`_silu_gate_up`) times its slice
        wd of the down projection, added into the float32 sums at acc_ptr (split-K: every
        unit adds its share of every output)."""
        a = tl.where(cm, _silu_gate_up(wg, wu, h, cols, cm, b_ptr, dt, INTER,
                                       HAS_BIAS).to(tl.float32), 0.0)
        n = tl.arange(0, HP)
        tl.atomic_add(acc_ptr + n, _times(wd, a), mask=n < HIDDEN, sem="relaxed", scope="gpu")

    @triton.jit
    def _stage_mlp(wg, wu, wd, x_ptr, nw_ptr, w_ptr, b_ptr, down_ptr, acc_ptr, eps, p, P,
                   HIDDEN: tl.constexpr, HP: tl.constexpr, INTER: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BN: tl.constexpr):
        """Fused MLP (tile p_fuse_mlp): units of BN intermediate columns, RMSNorm +
        silu(gate) * up + their share of the down projection, summed into acc_ptr
        (zeroed before; the next stage adds it and the bias to the residual x): the
        gate/up and down stages in one, a grid barrier fewer a layer (wg, wu, wd: the
        first unit's weights, `_cols_first`, `_down_first`)."""
        dt = x_ptr.dtype.element_ty
        units = tl.cdiv(INTER, BN)
        cols = p * BN + tl.arange(0, BN)
        cm = cols < INTER
        h = _normed_row(x_ptr, nw_ptr, eps, HIDDEN, HP)
        if p < units:
            _mlp_unit(wg, wu, wd, h, cols, cm, b_ptr, acc_ptr, dt, HIDDEN, HP, INTER, HAS_BIAS)
        for u in range(p + P, units, P):
            cols = u * BN + tl.arange(0, BN)
            cm = cols < INTER
            _mlp_unit(_rows(w_ptr, cols, cm, HIDDEN, HP),
                      _rows(w_ptr, INTER + cols, cm, HIDDEN, HP),
                      _down_first(down_ptr, u, units, HIDDEN, INTER, HP, BN), h, cols, cm,
                      b_ptr, acc_ptr, dt, HIDDEN, HP, INTER, HAS_BIAS)

    @triton.jit
    def _stage_gate_up(wg, wu, x_ptr, nw_ptr, w_ptr, b_ptr, h_ptr, eps, p, P,
                       HIDDEN: tl.constexpr, HP: tl.constexpr, INTER: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BN: tl.constexpr):
        """Units of BN columns of the MLP: RMSNorm + silu(gate) * up, into h (wg, wu: the
        first unit's gate and up weights, `_cols_first`)."""
        units = tl.cdiv(INTER, BN)
        cols = p * BN + tl.arange(0, BN)
        cm = cols < INTER
        h = _normed_row(x_ptr, nw_ptr, eps, HIDDEN, HP)
        if p < units:
            _gate_up_unit(wg, wu, h, cols, cm, b_ptr, h_ptr, INTER, HAS_BIAS)
        for u in range(p + P, units, P):
            cols = u * BN + tl.arange(0, BN)
            cm = cols < INTER
            _gate_up_unit(_rows(w_ptr, cols, cm, HIDDEN, HP),
                          _rows(w_ptr, INTER + cols, cm, HIDDEN, HP), h, cols, cm, b_ptr, h_ptr,
                          INTER, HAS_BIAS)

    @triton.jit
    def _stage_down(w, h_ptr, w_ptr, b_ptr, x_ptr, p, P, HIDDEN: tl.constexpr,
                    INTER: tl.constexpr, IP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BN: tl.constexpr):
        """Units of BN columns: h @ w.T (+ bias), added to x in place (w: the first unit's
        weights, `_cols_first`)."""
        units = tl.cdiv(HIDDEN, BN)
        cols = p * BN + tl.arange(0, BN)
        cm = (cols < HIDDEN) & (p + 0 * cols < units)
        ins = _add_inputs(cols, cm, b_ptr, x_ptr, HAS_BIAS)
        k = tl.arange(0, IP)
        a = tl.load(h_ptr + k, mask=k < INTER, other=0.0, cache_modifier=".cg").to(tl.float32)
        if p < units:
            _add_unit(_times(w, a), ins, cols, cm, x_ptr)
        for u in range(p + P, units, P):
            cols = u * BN + tl.arange(0, BN)
            cm = cols < HIDDEN
            _add_unit(_times(_rows(w_ptr, cols, cm, INTER, IP), a),
                      _add_inputs(cols, cm, b_ptr, x_ptr, HAS_BIAS), cols, cm, x_ptr)

    @triton.jit
    def _head_unit(w, h, cols, ban, eos, best, first, dt, VOCAB: tl.constexpr):
        """One unit of the head: its vocabulary rows w (`_rows`) times the normed row h,
        rounded as the lm_head's logits (EOS at -inf while the ban lasts); (best, first)
        moved on to the largest logit so far and the first index of it (units come in
        increasing order)."""
        cm = cols < VOCAB
        logits = _times(w, h).to(dt).to(tl.float32)
        banned = (cols == eos) & (ban > 0)
        logits = tl.where(cm & ~banned, logits, float("-inf"))
        top = tl.max(logits, axis=0)
        at = tl.min(tl.where(logits == top, cols, VOCAB), axis=0)
        return tl.maximum(top, best), tl.where(top > best, at, first)

    @triton.jit
    def _stage_head(wh, x_ptr, nw_ptr, w_ptr, best_ptr, bidx_ptr, ban, eos, eps, p, P,
                    acc_ptr, db_ptr, HIDDEN: tl.constexpr, HP: tl.constexpr,
                    VOCAB: tl.constexpr, BV: tl.constexpr, DOWN_BIAS: tl.constexpr,
                    FUSE: tl.constexpr):
        """Units of BV vocabulary rows: the logits of the normed row (FUSE: x plus the
        last fused MLP, `_plus_mlp`) (`_head_unit`); the program's largest and the first
        index of it into best / bidx [p] (wh: the first unit's rows, `_cols_first`)."""
        dt = x_ptr.dtype.element_ty
        x = _row(x_ptr, HIDDEN, HP)
        if FUSE:
            x = _plus_mlp(x, acc_ptr, db_ptr, dt, HIDDEN, HP, DOWN_BIAS)
        h = _normed(x, nw_ptr, eps, dt, HIDDEN, HP)
        best = tl.full((), float("-inf"), tl.float32)
        first = tl.full((), VOCAB, tl.int32)
        units = tl.cdiv(VOCAB, BV)
        if p < units:
            best, first = _head_unit(wh, h, p * BV + tl.arange(0, BV), ban, eos, best, first,
                                     dt, VOCAB)
        for u in range(p + P, units, P):
            cols = u * BV + tl.arange(0, BV)
            best, first = _head_unit(_rows(w_ptr, cols, cols < VOCAB, HIDDEN, HP), h, cols,
                                     ban, eos, best, first, dt, VOCAB)
        tl.store(best_ptr + p, best)
        tl.store(bidx_ptr + p, first)

    @triton.jit
    def _stage_pick(best_ptr, bidx_ptr, out_ptr, tok_ptr, pos_ptr, ban_ptr, P,
                    VOCAB: tl.constexpr, BP: tl.constexpr):
        """The first index of the largest logit over the programs' picks: the greedy
        token, into out and the next step's input, its position moved on by one, the
        EOS ban counted down."""
        b = tl.arange(0, BP)
        bm = b < P
        v = tl.load(best_ptr + b, mask=bm, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(bidx_ptr + b, mask=bm, other=VOCAB, cache_modifier=".cg")
        token = tl.min(tl.where(v == tl.max(v, axis=0), i, VOCAB), axis=0)
        tl.store(out_ptr, token)
        tl.store(tok_ptr, token)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        tl.store(ban_ptr, tl.load(ban_ptr) - 1)

    @triton.jit
    def _prefetch_layer(table_ptr, layer, like, p, P, HIDDEN: tl.constexpr,
                        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                        INTER: tl.constexpr, LINE: tl.constexpr, PF_QKV: tl.constexpr,
                        PF_O: tl.constexpr, PF_GU: tl.constexpr, PF_DOWN: tl.constexpr):
        """Ask L2 for program p's share of the layer's four matrices (a unit of one line:
        a share of each matrix; PF_*: its lines of each)."""
        _prefetch_units(_at(table_ptr, layer, _QKV_W, like),
                        (HEADS + 2 * KV_HEADS) * D * HIDDEN, p, P, LINE, LINE, PF_QKV)
        _prefetch_units(_at(table_ptr, layer, _O_W, like), HIDDEN * HEADS * D, p, P, LINE,
                        LINE, PF_O)
        _prefetch_units(_at(table_ptr, layer, _GU_W, like), 2 * INTER * HIDDEN, p, P, LINE,
                        LINE, PF_GU)
        _prefetch_units(_at(table_ptr, layer, _DOWN_W, like), HIDDEN * INTER, p, P, LINE,
                        LINE, PF_DOWN)

    @triton.jit
    def _zero(acc_ptr, HIDDEN: tl.constexpr, HP: tl.constexpr):
        """acc [HIDDEN] float32 = 0: the fused MLP's sums before its stage adds into them."""
        k = tl.arange(0, HP)
        tl.store(acc_ptr + k, tl.zeros((HP,), tl.float32), mask=k < HIDDEN)

    @triton.jit
    def _arrive_before(s, sync_ptr, arrivals, P, trace_p, TRACE: tl.constexpr):
        """The arrival at the grid barrier before stage s (none before stage 0): the
        arrivals that barrier waits for. (Traced: at the trace's row s, see
        `trace_summary`.)"""
        if s > 0:
            arrivals += P
            _arrive(sync_ptr, trace_p + s * P * 4, TRACE)
        return arrivals

    @triton.jit
    def _wait_before(s, sync_ptr, arrivals, limit, trace_p, P, TRACE: tl.constexpr):
        """The wait at the grid barrier before stage s (see `_arrive_before`): the next
        barrier's poll limit."""
        if s > 0:
            limit = _wait(sync_ptr, arrivals, limit, trace_p + s * P * 4, TRACE)
        return limit

    def _one_row_step(tok_ptr, pos_ptr, ban_ptr, out_ptr, slot_ptr, embed_ptr, table_ptr,
                      cos_ptr, sin_ptr, normf_ptr, head_ptr, x_ptr, q_ptr, part_ptr, ml_ptr,
                      h_ptr, acc_ptr, r_ptr, best_ptr, bidx_ptr, sync_ptr, trace_ptr, eps, eos,
                      scale, s_slot, s_head, s_pos, chunk, splits, max_pos,
                      LAYERS: tl.constexpr, HIDDEN: tl.constexpr, HEADS: tl.constexpr,
                      KV_HEADS: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
                      VOCAB: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr,
                      BL: tl.constexpr, BS: tl.constexpr, HH: tl.constexpr,
                      HP: tl.constexpr, IP: tl.constexpr, BP: tl.constexpr,
                      QKV_BIAS: tl.constexpr, O_BIAS: tl.constexpr, GU_BIAS: tl.constexpr,
                      DOWN_BIAS: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
                      BNG: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
                      IEEE: tl.constexpr, AHEAD: tl.constexpr = 0,
                      LINE: tl.constexpr = 64, PF_QKV: tl.constexpr = 0,
                      PF_O: tl.constexpr = 0, PF_GU: tl.constexpr = 0,
                      PF_DOWN: tl.constexpr = 0, PF_HEAD: tl.constexpr = 0,
                      TRACE: tl.constexpr = 0, FUSE: tl.constexpr = 0):
        """Grid (programs,): every stage of the step (layer l's stage s is l * 5 + s; the
        head LAYERS * 5, the pick LAYERS * 5 + 1), a grid barrier between each two (the
        staged form, without barriers, is `_one_stage`). A program's
        first unit's weights of a stage are loaded right after the barrier before it
        (AHEAD 0); one stage earlier (1: the next layer's q/k/v during the gate/up
        stage, held in registers across it); or between its arrival at that barrier and
        its wait (2), so they arrive while it waits and the arrival's release does not
        wait for them. PF_*: lines of each weight a program prefetches to L2 for the
        next layer, and of the output embedding for the head (0: none), between its
        arrival and its wait. TRACE: each program's times into trace
        [LAYERS * 5 + 4, P, 4] int64 (see `trace_summary`). FUSE: the
        gate/up and down stages as one (`_stage_mlp`, split-K into acc [2, HIDDEN]
        float32, a buffer a layer in turn; the next stage adds it to the residual;
        stage l * 5 + 4 is empty, and the o stage's residual is r [HIDDEN], which the
        q/k/v stage writes)."""
        p = tl.program_id(0)
        P = tl.num_programs(0)
        trace_p = trace_ptr + p * 4  # this program's column of the trace
        LAST: tl.constexpr = LAYERS * 5 + 2  # stages
        if TRACE:  # the start (row 0, as an arrival and a go) and the SM
            _stamp(trace_p, TRACE)
            _stamp(trace_p + 1, TRACE)
            tl.store(trace_p + (LAST + 1) * P * 4, smid().to(tl.int64))
        tok = tl.load(tok_ptr)
        pos = tl.minimum(tl.load(pos_ptr), max_pos)
        slot = tl.load(slot_ptr).to(tl.int64)
        ban = tl.load(ban_ptr)
        QS: tl.constexpr = D // 2 // BH
        Q_UNITS: tl.constexpr = (HEADS + 2 * KV_HEADS) * QS
        O_UNITS: tl.constexpr = (HIDDEN + BN - 1) // BN
        G_UNITS: tl.constexpr = (INTER + BNG - 1) // BNG
        KO: tl.constexpr = HEADS * D
        arrivals = p * 0
        limit = tl.full((), _SPIN_LIMIT, tl.int32)
        wq1, wq2 = _qkv_first(_at(table_ptr, 0, _QKV_W, x_ptr), p, Q_UNITS * (AHEAD == 1),
                              HIDDEN, HP, D, BH)
        for layer in range(LAYERS):
            s = layer * 5
            if layer == 0:  # the embedding row is the first layer's input
                xin = embed_ptr + tok * HIDDEN
                res = embed_ptr + tok * HIDDEN
            else:
                xin = x_ptr
                if FUSE:  # x + the last layer's MLP, as the q/k/v stage wrote it
                    res = r_ptr
                else:
                    res = x_ptr
            acc_in = acc_ptr + ((layer + 1) % 2) * HIDDEN  # FUSE: the last layer's MLP sums
            acc_out = acc_ptr + (layer % 2) * HIDDEN  # and this one's
            kc = _at(table_ptr, layer, _K, x_ptr)
            vc = _at(table_ptr, layer, _V, x_ptr)
            qkv_w = _at(table_ptr, layer, _QKV_W, x_ptr)
            o_w = _at(table_ptr, layer, _O_W, x_ptr)
            gu_w = _at(table_ptr, layer, _GU_W, x_ptr)
            down_w = _at(table_ptr, layer, _DOWN_W, x_ptr)
            # 1. RMSNorm + q/k/v + rotary + cache write
            arrivals = _arrive_before(s, sync_ptr, arrivals, P, trace_p, TRACE)
            if PF_QKV > 0:  # the next layer's weights to L2, a share each program
                if layer + 1 < LAYERS:
                    _prefetch_layer(table_ptr, layer + 1, x_ptr, p, P, HIDDEN, HEADS, KV_HEADS,
                                    D, INTER, LINE, PF_QKV, PF_O, PF_GU, PF_DOWN)
            if AHEAD == 0:
                limit = _wait_before(s, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            if AHEAD != 1:
                wq1, wq2 = _qkv_first(qkv_w, p, Q_UNITS, HIDDEN, HP, D, BH)
            if AHEAD != 0:
                limit = _wait_before(s, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            _stage_qkv(wq1, wq2, xin, _at(table_ptr, layer, _NORM1, x_ptr), qkv_w,
                       _at(table_ptr, layer, _QKV_B, x_ptr), cos_ptr, sin_ptr, q_ptr, kc,
                       vc, pos, slot, eps, s_slot, s_head, s_pos, p, P, acc_in,
                       _at(table_ptr, tl.maximum(layer - 1, 0), _DOWN_B, x_ptr), r_ptr,
                       layer > 0, HIDDEN, HP, HEADS, KV_HEADS, D, QKV_BIAS, BH, DOWN_BIAS,
                       FUSE)
            if FUSE:  # this layer's sums start at 0 (last read by the last q/k/v stage)
                if p == 0:
                    _zero(acc_out, HIDDEN, HP)
            if AHEAD == 1:
                wo = _cols_first(o_w, 0, p, O_UNITS, HIDDEN, KO, HH * D, BN)
            # 2. attention, split along the positions (no weights)
            arrivals = _arrive_before(s + 1, sync_ptr, arrivals, P, trace_p, TRACE)
            limit = _wait_before(s + 1, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            _stage_attend(q_ptr, kc, vc, part_ptr, ml_ptr, pos + 1, slot, chunk, splits,
                          scale, s_slot, s_head, s_pos, p, P, KV_HEADS, D, GROUP, BG, BL,
                          BS, UPCAST, IEEE)
            if AHEAD == 1:
                wg = _cols_first(gu_w, 0, p, G_UNITS, INTER, HIDDEN, HP, BNG)
                wu = _cols_first(gu_w, INTER, p, G_UNITS, INTER, HIDDEN, HP, BNG)
                if FUSE:
                    wdm = _down_first(down_w, p, G_UNITS, HIDDEN, INTER, HP, BNG)
            # 3. the splits combined + o projection + residual
            arrivals = _arrive_before(s + 2, sync_ptr, arrivals, P, trace_p, TRACE)
            if AHEAD == 0:
                limit = _wait_before(s + 2, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            if AHEAD != 1:
                wo = _cols_first(o_w, 0, p, O_UNITS, HIDDEN, KO, HH * D, BN)
            if AHEAD != 0:
                limit = _wait_before(s + 2, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            _stage_o(wo, part_ptr, ml_ptr, o_w, _at(table_ptr, layer, _O_B, x_ptr), res,
                     x_ptr, splits, p, P, HIDDEN, HEADS, HH, D, BS, O_BIAS, BN)
            if (AHEAD == 1) & (FUSE == 0):
                wd = _cols_first(down_w, 0, p, O_UNITS, HIDDEN, INTER, IP, BN)
            # 4. RMSNorm + gate/up + SiLU(gate) * up (FUSE: + its share of the down
            # projection, summed into acc_out)
            arrivals = _arrive_before(s + 3, sync_ptr, arrivals, P, trace_p, TRACE)
            if AHEAD == 0:
                limit = _wait_before(s + 3, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            if AHEAD != 1:
                wg = _cols_first(gu_w, 0, p, G_UNITS, INTER, HIDDEN, HP, BNG)
                wu = _cols_first(gu_w, INTER, p, G_UNITS, INTER, HIDDEN, HP, BNG)
                if FUSE:
                    wdm = _down_first(down_w, p, G_UNITS, HIDDEN, INTER, HP, BNG)
            if AHEAD != 0:
                limit = _wait_before(s + 3, sync_ptr, arrivals, limit, trace_p, P, TRACE)
            if FUSE:
                _stage_mlp(wg, wu, wdm, x_ptr, _at(table_ptr, layer, _NORM2, x_ptr), gu_w,
                           _at(table_ptr, layer, _GU_B, x_ptr), down_w, acc_out, eps, p, P,
                           HIDDEN, HP, INTER, GU_BIAS, BNG)
            else:
                _stage_gate_up(wg, wu, x_ptr, _at(table_ptr, layer, _NORM2, x_ptr), gu_w,
                               _at(table_ptr, layer, _GU_B, x_ptr), h_ptr, eps, p, P,
                               HIDDEN, HP, INTER, GU_BIAS, BNG)
            if AHEAD == 1:  # the next layer's first q/k/v unit
                nxt = tl.minimum(layer + 1, LAYERS - 1)
                wq1, wq2 = _qkv_first(_at(table_ptr, nxt, _QKV_W, x_ptr), p,
                                      Q_UNITS * (layer + 1 < LAYERS), HIDDEN, HP, D, BH)
            # 5. down projection + residual (FUSE: done in 4)
            if FUSE == 0:
                arrivals = _arrive_before(s + 4, sync_ptr, arrivals, P, trace_p, TRACE)
                if AHEAD == 0:
                    limit = _wait_before(s + 4, sync_ptr, arrivals, limit, trace_p, P, TRACE)
                if AHEAD != 1:
                    wd = _cols_first(down_w, 0, p, O_UNITS, HIDDEN, INTER, IP, BN)
                if AHEAD != 0:
                    limit = _wait_before(s + 4, sync_ptr, arrivals, limit, trace_p, P, TRACE)
                _stage_down(wd, h_ptr, down_w, _at(table_ptr, layer, _DOWN_B, x_ptr),
                            x_ptr, p, P, HIDDEN, INTER, IP, DOWN_BIAS, BN)
        # 6. the final RMSNorm + lm_head, each program's largest logit (its rows asked of
        # L2 all at once at the barrier: it walks them one unit after another)
        s = LAYERS * 5
        arrivals = _arrive_before(s, sync_ptr, arrivals, P, trace_p, TRACE)
        if PF_HEAD > 0:
            _prefetch_units(head_ptr, VOCAB * HIDDEN, p, P, BV * HIDDEN, LINE, PF_HEAD)
        limit = _wait_before(s, sync_ptr, arrivals, limit, trace_p, P, TRACE)
        wh = _cols_first(head_ptr, 0, p, (VOCAB + BV - 1) // BV, VOCAB, HIDDEN, HP, BV)
        _stage_head(wh, x_ptr, normf_ptr, head_ptr, best_ptr, bidx_ptr, ban, eos, eps, p, P,
                    acc_ptr + ((LAYERS - 1) % 2) * HIDDEN,
                    _at(table_ptr, LAYERS - 1, _DOWN_B, x_ptr), HIDDEN, HP, VOCAB, BV,
                    DOWN_BIAS, FUSE)
        # 7. the pick
        arrivals = _arrive_before(s + 1, sync_ptr, arrivals, P, trace_p, TRACE)
        limit = _wait_before(s + 1, sync_ptr, arrivals, limit, trace_p, P, TRACE)
        if p == 0:
            _stage_pick(best_ptr, bidx_ptr, out_ptr, tok_ptr, pos_ptr, ban_ptr, P, VOCAB, BP)
        if TRACE:  # the end (row LAST)
            tl.debug_barrier()
            _stamp(trace_p + LAST * P * 4, TRACE)

    _jitted_step = triton.jit(_one_row_step, do_not_specialize=["chunk", "splits"])
    OTHER_KERNELS.append(_jitted_step)  # counted by triton_decode.compiled_variants

    def _one_stage(tok_ptr, pos_ptr, ban_ptr, out_ptr, slot_ptr, embed_ptr, table_ptr,
                   cos_ptr, sin_ptr, normf_ptr, head_ptr, x_ptr, q_ptr, part_ptr, ml_ptr,
                   h_ptr, acc_ptr, r_ptr, best_ptr, bidx_ptr, eps, eos, scale, s_slot, s_head,
                   s_pos, chunk, splits, max_pos, layer, picks, KIND: tl.constexpr,
                   LAYERS: tl.constexpr, HIDDEN: tl.constexpr, HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
                   VOCAB: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr,
                   BL: tl.constexpr, BS: tl.constexpr, HH: tl.constexpr, HP: tl.constexpr,
                   IP: tl.constexpr, BP: tl.constexpr, QKV_BIAS: tl.constexpr,
                   O_BIAS: tl.constexpr, GU_BIAS: tl.constexpr, DOWN_BIAS: tl.constexpr,
                   BH: tl.constexpr, BN: tl.constexpr, BNG: tl.constexpr, BV: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, AHEAD: tl.constexpr = 0,
                   LINE: tl.constexpr = 64, PF_QKV: tl.constexpr = 0, PF_O: tl.constexpr = 0,
                   PF_GU: tl.constexpr = 0, PF_DOWN: tl.constexpr = 0,
                   PF_HEAD: tl.constexpr = 0, PDL: tl.constexpr = False,
                   TRACE: tl.constexpr = 0, FUSE: tl.constexpr = 0):
        """One stage of the step as its own launch (tile p_staged), the stages of
        `_one_row_step` without its barriers: KIND 0-4 layer `layer`'s q/k/v, attention,
        o, gate/up (FUSE: the fused MLP) and down; 5 the head, over `picks` programs; 6
        the pick. Grid: the stage's units (fewer: each program walks several). With PDL
        a launch may start while the one before it runs: it waits for it (`_begin`)
        before loading anything a launch writes; its first unit's weights are loaded
        before that wait (AHEAD 1 or 2), so they arrive while it waits, or after it (0).
        The q/k/v stage asks L2 for the next layer's weights (PF_*) before its wait.
        (PF_HEAD and TRACE: `_constants`' for the one-launch step, unused here.)"""
        p = tl.program_id(0)
        P = tl.num_programs(0)
        # PDL's wait before the launch's first weights are loaded (AHEAD 0), or after
        WAIT_FIRST: tl.constexpr = PDL and AHEAD == 0
        WAIT_AFTER: tl.constexpr = PDL and AHEAD != 0
        QS: tl.constexpr = D // 2 // BH
        KO: tl.constexpr = HEADS * D
        acc_in = acc_ptr + ((layer + 1) % 2) * HIDDEN  # FUSE: the last layer's MLP sums
        acc_out = acc_ptr + (layer % 2) * HIDDEN  # and this one's
        if KIND == 0:  # RMSNorm + q/k/v + rotary + the cache write
            Q_UNITS: tl.constexpr = (HEADS + 2 * KV_HEADS) * QS
            qkv_w = _at(table_ptr, layer, _QKV_W, x_ptr)
            if PF_QKV > 0:  # the next layer's weights to L2, a share each program
                if layer + 1 < LAYERS:
                    _prefetch_layer(table_ptr, layer + 1, x_ptr, p, P, HIDDEN, HEADS, KV_HEADS,
                                    D, INTER, LINE, PF_QKV, PF_O, PF_GU, PF_DOWN)
            _begin(WAIT_FIRST)
            wq1, wq2 = _qkv_first(qkv_w, p, Q_UNITS, HIDDEN, HP, D, BH)
            _begin(WAIT_AFTER)
            tok = tl.load(tok_ptr)
            pos = tl.minimum(tl.load(pos_ptr), max_pos)
            slot = tl.load(slot_ptr).to(tl.int64)
            if layer == 0:  # the embedding row is the first layer's input
                xin = embed_ptr + tok * HIDDEN
            else:
                xin = x_ptr
            _stage_qkv(wq1, wq2, xin, _at(table_ptr, layer, _NORM1, x_ptr), qkv_w,
                       _at(table_ptr, layer, _QKV_B, x_ptr), cos_ptr, sin_ptr, q_ptr,
                       _at(table_ptr, layer, _K, x_ptr), _at(table_ptr, layer, _V, x_ptr), pos,
                       slot, eps, s_slot, s_head, s_pos, p, P, acc_in,
                       _at(table_ptr, tl.maximum(layer - 1, 0), _DOWN_B, x_ptr), r_ptr,
                       layer > 0, HIDDEN, HP, HEADS, KV_HEADS, D, QKV_BIAS, BH, DOWN_BIAS, FUSE)
            if FUSE:  # this layer's sums start at 0 (last read by the last q/k/v stage)
                if p == 0:
                    _zero(acc_out, HIDDEN, HP)
        elif KIND == 1:  # attention, split along the positions
            kc = _at(table_ptr, layer, _K, x_ptr)
            vc = _at(table_ptr, layer, _V, x_ptr)
            _begin(PDL)
            pos = tl.minimum(tl.load(pos_ptr), max_pos)
            slot = tl.load(slot_ptr).to(tl.int64)
            _stage_attend(q_ptr, kc, vc, part_ptr, ml_ptr, pos + 1, slot, chunk, splits, scale,
                          s_slot, s_head, s_pos, p, P, KV_HEADS, D, GROUP, BG, BL, BS, UPCAST,
                          IEEE)
        elif KIND == 2:  # the splits combined + o projection + residual
            O_UNITS: tl.constexpr = (HIDDEN + BN - 1) // BN
            o_w = _at(table_ptr, layer, _O_W, x_ptr)
            _begin(WAIT_FIRST)
            wo = _cols_first(o_w, 0, p, O_UNITS, HIDDEN, KO, HH * D, BN)
            _begin(WAIT_AFTER)
            if layer == 0:
                res = embed_ptr + tl.load(tok_ptr) * HIDDEN
            elif FUSE:  # x + the last layer's MLP, as the q/k/v stage wrote it
                res = r_ptr
            else:
                res = x_ptr
            _stage_o(wo, part_ptr, ml_ptr, o_w, _at(table_ptr, layer, _O_B, x_ptr), res, x_ptr,
                     splits, p, P, HIDDEN, HEADS, HH, D, BS, O_BIAS, BN)
        elif KIND == 3:  # RMSNorm + gate/up + SiLU(gate) * up (FUSE: + down, split-K)
            G_UNITS: tl.constexpr = (INTER + BNG - 1) // BNG
            gu_w = _at(table_ptr, layer, _GU_W, x_ptr)
            down_w = _at(table_ptr, layer, _DOWN_W, x_ptr)
            _begin(WAIT_FIRST)
            wg = _cols_first(gu_w, 0, p, G_UNITS, INTER, HIDDEN, HP, BNG)
            wu = _cols_first(gu_w, INTER, p, G_UNITS, INTER, HIDDEN, HP, BNG)
            if FUSE:
                wdm = _down_first(down_w, p, G_UNITS, HIDDEN, INTER, HP, BNG)
            _begin(WAIT_AFTER)
            if FUSE:
                _stage_mlp(wg, wu, wdm, x_ptr, _at(table_ptr, layer, _NORM2, x_ptr), gu_w,
                           _at(table_ptr, layer, _GU_B, x_ptr), down_w, acc_out, eps, p, P,
                           HIDDEN, HP, INTER, GU_BIAS, BNG)
            else:
                _stage_gate_up(wg, wu, x_ptr, _at(table_ptr, layer, _NORM2, x_ptr), gu_w,
                               _at(table_ptr, layer, _GU_B, x_ptr), h_ptr, eps, p, P, HIDDEN,
                               HP, INTER, GU_BIAS, BNG)
        elif KIND == 4:  # down projection + residual
            D_UNITS: tl.constexpr = (HIDDEN + BN - 1) // BN
            down_w = _at(table_ptr, layer, _DOWN_W, x_ptr)
            _begin(WAIT_FIRST)
            wd = _cols_first(down_w, 0, p, D_UNITS, HIDDEN, INTER, IP, BN)
            _begin(WAIT_AFTER)
            _stage_down(wd, h_ptr, down_w, _at(table_ptr, layer, _DOWN_B, x_ptr), x_ptr, p, P,
                        HIDDEN, INTER, IP, DOWN_BIAS, BN)
        elif KIND == 5:  # the final RMSNorm + lm_head, each program's largest logit
            V_UNITS: tl.constexpr = (VOCAB + BV - 1) // BV
            _begin(WAIT_FIRST)
            wh = _cols_first(head_ptr, 0, p, V_UNITS, VOCAB, HIDDEN, HP, BV)
            _begin(WAIT_AFTER)
            _stage_head(wh, x_ptr, normf_ptr, head_ptr, best_ptr, bidx_ptr, tl.load(ban_ptr),
                        eos, eps, p, P, acc_ptr + ((LAYERS - 1) % 2) * HIDDEN,
                        _at(table_ptr, LAYERS - 1, _DOWN_B, x_ptr), HIDDEN, HP, VOCAB, BV,
                        DOWN_BIAS, FUSE)
        else:  # the pick
            _begin(PDL)
            _stage_pick(best_ptr, bidx_ptr, out_ptr, tok_ptr, pos_ptr, ban_ptr, picks, VOCAB,
                        BP)

    _jitted_stage = triton.jit(_one_stage, do_not_specialize=["chunk", "splits", "layer",
                                                              "picks"])
    OTHER_KERNELS.append(_jitted_stage)


def _constants(layers: int, hidden: int, heads: int, kv_heads: int, d: int, inter: int,
               vocab: int, programs: int, tiles: dict[str, int], itemsize: int,
               biases: tuple[bool, ...], gpu: bool) -> dict[str, Any]:
    """The step kernel's constexprs (and num_warps) for a model's shapes, the tiles
    (`OneRowStep`'s) and `programs`; biases: whether q/k/v, o, gate/up and down have
    one; gpu: compiled (the L2 prefetches), not interpreted. Raises ValueError on tiles
    it can't take."""
    bh = min(int(tiles["p_bh"]), d // 2)
    widths = {"p_splits": int(tiles["p_splits"]), "p_bh": bh, "p_bn": int(tiles["p_bn"]),
              "p_bn_mlp": int(tiles["p_bn_mlp"]), "p_bv": int(tiles["p_bv"])}
    for name, value in widths.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"tile {name} must be a power of two, got {value}")
    if int(tiles["p_ahead"]) not in (0, 1, 2):
        raise ValueError(f"tile p_ahead must be 0, 1 or 2, got {tiles['p_ahead']}")
    trace, fuse = int(tiles["p_trace"]), int(tiles["p_fuse_mlp"])
    for name, value in (("p_trace", trace), ("p_fuse_mlp", fuse)):
        if value not in (0, 1):
            raise ValueError(f"tile {name} must be 0 or 1, got {tiles[name]}")
    if trace and not gpu:
        raise ValueError("tile p_trace needs a CUDA GPU (its clocks are inline PTX, which "
                         "the interpreter cannot run)")
    if trace and globaltimer is None:
        raise ValueError("tile p_trace needs triton.language.extra.cuda.globaltimer "
                         f"(triton {triton.__version__} has none)")
    out = dict(LAYERS=layers, HIDDEN=hidden, HEADS=heads, KV_HEADS=kv_heads, D=d,
               INTER=inter, VOCAB=vocab, GROUP=heads // kv_heads,
               BG=max(16, _pow2(heads // kv_heads)), BL=_BL, BS=widths["p_splits"],
               HH=_pow2(heads), HP=_pow2(hidden), IP=_pow2(inter), BP=_pow2(programs), BH=bh,
               BN=widths["p_bn"], BNG=widths["p_bn_mlp"], BV=widths["p_bv"],
               AHEAD=int(tiles["p_ahead"]), TRACE=trace, FUSE=fuse, UPCAST=not gpu,
               IEEE=itemsize == 4,
               num_warps=int(tiles["p_warps"]),
               **dict(zip(("QKV_BIAS", "O_BIAS", "GU_BIAS", "DOWN_BIAS"), biases, strict=True)))
    if gpu and tiles["prefetch"]:
        line = 128 // itemsize

        def share(count: int, unit: int = line) -> int:  # lines of a program's units
            return _pow2(triton.cdiv(triton.cdiv(count, unit), programs)
                         * triton.cdiv(unit, line))

        out.update(LINE=line, PF_QKV=share((heads + 2 * kv_heads) * d * hidden),
                   PF_O=share(hidden * heads * d), PF_GU=share(2 * inter * hidden),
                   PF_DOWN=share(hidden * inter),
                   PF_HEAD=share(vocab * hidden, widths["p_bv"] * hidden))
    return out


class OneRowStep:
    """The persistent one-row decode step over a `StaticDecoder`'s fused weights and
    cache. Tiles (from `TritonLayers.tiles`): p_bh (q/k/v columns a unit, per rotary
    half), p_bn (o and down projection columns a unit), p_bn_mlp (gate/up columns a
    unit), p_bv (vocabulary rows a unit), p_splits (attention splits at most), p_ahead
    (each stage's first weights loaded 0: after its barrier, 1: a stage early, 2:
    between the arrival at its barrier and the wait; staged, 1 and 2: before the wait
    for the launch before), p_warps, p_programs (0: one per SM on CUDA, 1 elsewhere;
    staged, the most programs a launch: 0 its units on CUDA), p_staged (one launch a
    stage, `_one_stage`, no barriers: what the interpreter can run with several
    programs; on a GPU the same one-row stages as layers * 5 + 2 kernels, 152 for
    SmolLM2 (122 with p_fuse_mlp), each of its units' programs, chained with PDL, the
    weights loaded while a launch waits for the one before it), p_trace (each step
    records its programs' clocks at every barrier: `trace`; CUDA only), p_fuse_mlp
    (gate/up and down as one split-K stage: a barrier fewer a layer)."""

    def __init__(self, layers: Any, fused: list[tuple], k: list[Any], v: list[Any],
                 embed: Any, norm_w: Any, head_w: Any, cos: Any, sin: Any, max_len: int,
                 eos: int | None):
        import torch

        reason = available()
        if reason is not None:
            raise ValueError(f"Triton decode kernels unavailable: {reason}")
        _kernels(fused[0][1].device)  # raises where they can't run (no CUDA, no interpreter)
        t = layers.tiles
        x0 = fused[0][1]
        self.device, self.dtype = x0.device, x0.dtype
        tensors = [embed, norm_w, head_w, cos, sin] + [w for ws in fused for w in ws
                                                       if w is not None]
        if any(w.dtype != self.dtype or w.device != self.device for w in tensors):
            raise ValueError("the one-row step needs every weight, the embedding and the "
                             f"rotary tables in {self.dtype} on {self.device}")
        strides = {c.stride() for c in k + v}
        if len(strides) != 1:
            raise ValueError("the one-row step needs every layer's cache laid out alike")
        self.s_slot, self.s_head, self.s_pos, _ = strides.pop()
        rows = [[w.data_ptr() if w is not None else 0 for w in ws] + [kc.data_ptr(),
                                                                      vc.data_ptr()]
                for ws, kc, vc in zip(fused, k, v, strict=True)]
        assert all(len(row) == len(_TABLE) for row in rows)
        if any(address % 16 for row in rows for address in row):
            raise ValueError("the one-row step needs 16-byte aligned weights and caches")
        self._keep = (fused, k, v)  # the table points into these
        self.table = torch.tensor(rows, dtype=torch.int64, device=self.device)
        cuda = self.device.type == "cuda"
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 1
        self.programs = int(t["p_programs"] or sms)
        self.staged = bool(t["p_staged"])
        if self.programs < 1:
            raise ValueError(f"tile p_programs must be >= 1, got {self.programs}")
        if self.programs > 1 and not self.staged and not cuda:
            raise ValueError("more than one program needs CUDA (the interpreter runs them "
                             "one after another: no barrier is ever met); set p_staged")
        if self.staged and t["p_trace"]:
            raise ValueError("tile p_trace needs the one-launch step (p_staged off): it "
                             "times the grid barriers")
        self.pdl = self.staged and layers.uses_pdl(self.device)
        self.layers = len(fused)
        hidden, inter = fused[0][3].shape[0], fused[0][8].shape[1]
        vocab = head_w.shape[0]
        shapes = (self.layers, hidden, layers.heads, layers.kv_heads, layers.head_dim, inter,
                  vocab)
        biases = tuple(fused[0][i] is not None for i in (2, 4, 7, 9))
        self.consts = _constants(*shapes, self.programs, t, self.dtype.itemsize, biases, cuda)
        self.bs = self.consts["BS"]
        if self.staged:  # each launch its stage's units, p_programs at most where set
            cap = int(t["p_programs"]) or (1 << 30 if cuda else 1)
            c = self.consts
            qkv = (layers.heads + 2 * layers.kv_heads) * (layers.head_dim // 2 // c["BH"])
            self.grids = {kind: min(units, cap) for kind, units in (
                (0, qkv), (2, triton.cdiv(hidden, c["BN"])), (3, triton.cdiv(inter, c["BNG"])),
                (4, triton.cdiv(hidden, c["BN"])), (5, triton.cdiv(vocab, c["BV"])))}
            self.cap = cap
            # the prefetches shared by the q/k/v launch's programs, the pick over the head's
            self.consts = {**_constants(*shapes, self.grids[0], t, self.dtype.itemsize, biases,
                                        cuda), "BP": _pow2(self.grids[5])}
        self.eps, self.scale = layers.eps, layers.scale
        self.max_len, self.eos = int(max_len), eos
        self.embed, self.norm_w, self.head_w, self.cos, self.sin = embed, norm_w, head_w, cos, sin
        f32 = torch.float32
        dev = self.device
        heads, d = layers.heads, layers.head_dim
        self.x = torch.empty(hidden, dtype=self.dtype, device=dev)
        self.q = torch.empty(heads * d, dtype=self.dtype, device=dev)
        self.part = torch.empty((heads, self.bs, d), dtype=f32, device=dev)
        self.ml = torch.empty((heads, self.bs, 2), dtype=f32, device=dev)
        self.h = torch.empty(inter, dtype=self.dtype, device=dev)
        self.acc = torch.zeros((2, hidden), dtype=f32, device=dev)  # fused MLP sums
        self.r = torch.empty(hidden, dtype=self.dtype, device=dev)  # o's residual (fused)
        picks = self.grids[5] if self.staged else self.programs  # the head's programs
        self.best = torch.empty(picks, dtype=f32, device=dev)
        self.bidx = torch.empty(picks, dtype=torch.int32, device=dev)
        self.sync = torch.zeros(2, dtype=torch.int32, device=dev)  # arrivals, gave-up flag
        self.trace_buf = self.table  # (untraced: a stand-in of the pointer's type)
        if self.consts["TRACE"]:
            self.trace_buf = torch.zeros((self.layers * _STAGES + 4, self.programs, 4),
                                         dtype=torch.int64, device=dev)

    def attention_split(self, window: int) -> tuple[int, int]:
        """(positions a split, splits) for rows attending over at most `window` positions:
        whole blocks of _BL, at most p_splits splits."""
        chunk = triton.cdiv(triton.cdiv(window, self.bs), _BL) * _BL
        return chunk, triton.cdiv(window, chunk)

    def run(self, tokens: Any, pos: Any, ban: Any, slots: Any, out: Any, window: int) -> None:
        """Row 0's next greedy token: from its last token tokens[0] at position pos[0]
        (slot slots[0], attending over at most `window` positions) to out[0] and
        tokens[0]; pos[0] moves on by one and ban[0] counts down. No host sync: a CUDA
        graph can capture it."""
        chunk, splits = self.attention_split(window)
        tensors = (tokens, pos, ban, out, slots, self.embed, self.table, self.cos, self.sin,
                   self.norm_w, self.head_w, self.x, self.q, self.part, self.ml, self.h,
                   self.acc, self.r, self.best, self.bidx)
        scalars = (self.eps, -1 if self.eos is None else self.eos, self.scale, self.s_slot,
                   self.s_head, self.s_pos, chunk, splits, self.max_len - 1)
        if self.staged:  # one launch a stage, chained with PDL where the GPU has it
            chained = {"PDL": True, "launch_pdl": True} if self.pdl else {}
            grids = {**self.grids, 1: min(self.consts["KV_HEADS"] * splits, self.cap), 6: 1}
            kinds = (0, 1, 2, 3) if self.consts["FUSE"] else (0, 1, 2, 3, 4)
            for layer, kind in [(i, k) for i in range(self.layers) for k in kinds] + [
                    (0, 5), (0, 6)]:
                _jitted_stage[(grids[kind],)](*tensors, *scalars, layer, grids[5], KIND=kind,
                                              **self.consts, **chained)
            return
        self.sync[:1].zero_()
        _jitted_step[(self.programs,)](*tensors, self.sync, self.trace_buf, *scalars,
                                       **self.consts)

    def healthy(self) -> bool:
        """Whether every barrier so far was met (False: a program was not resident, and
        the steps since are garbage). Waits for the GPU."""
        return int(self.sync[1]) == 0

    def trace(self) -> dict[str, Any] | None:
        """Where the last step's time went (tile p_trace; None untraced): see
        `trace_summary`. Waits for the GPU."""
        if not self.consts["TRACE"]:
            return None
        return trace_summary(self.trace_buf.cpu(), self.layers)


_KINDS = ("qkv", "attend", "o", "gate_up", "down")  # a layer's stages, in order


def trace_summary(raw: Any, layers: int) -> dict[str, Any]:
    """What one traced step's time went to. raw [S + 2, P, 4] int64 is `OneRowStep`'s
    trace of a step of S = layers * 5 + 2 stages (layer l's l * 5 + 0..4: q/k/v,
    attention, o, gate/up, down; then the head and the pick) run by P programs: row s
    (0 < s < S) holds when program p arrived at the barrier before stage s and when it
    went on past it, each as the global timer (ns, one clock for all SMs) and its SM's
    clock (cycles); row 0 the start, row S the end (arrival columns), row S + 1 column 0
    the program's SM. A stage that ran no barrier (the fused MLP's empty down stage) has
    a row of zeros, and the stage before it counts as "mlp".

    Per stage s, on the critical path: `barrier` the last arrival at the barrier before
    it to the first program going on (the barrier's own latency), `work` from then to
    the last arrival at the next barrier (the stage, plus late wake-ups), `own` the
    slowest program's own time in it (also in its SM's cycles), `wake_spread` the first
    to the last program going on, `arrival_spread` the first to the last arrival after
    it; and in SM cycles, which don't depend on the global timer's resolution,
    `barrier_cycles`: the shortest wait there of any program (the last to arrive
    waits about the barrier's own latency). Returned: the step's total, barrier and
    work microseconds (they add up), the medians of each figure over the layers for
    each kind of stage, program 0's step and the barriers' sum in cycles, the programs
    and the distinct SMs they ran on, the SM clock (GHz) and the launch's skew."""
    import itertools
    import statistics

    import torch

    raw = torch.as_tensor(raw, dtype=torch.int64)
    last = layers * _STAGES + 2
    if raw.dim() != 3 or raw.shape[0] != last + 2 or raw.shape[2] != 4:
        raise ValueError(f"a trace of {layers} layers is [{last + 2}, programs, 4], got "
                         f"{list(raw.shape)}")
    arrive, go = raw[:last + 1, :, 0], raw[:last + 1, :, 1]
    c_arrive, c_go = raw[:last + 1, :, 2], raw[:last + 1, :, 3]
    a_last = arrive.max(dim=1).values  # [s]: the last arrival at the barrier before s
    go_first, go_last = go.min(dim=1).values, go.max(dim=1).values
    us = 1e-3
    per: dict[str, dict[str, list[float]]] = {}
    barrier = work = barrier_cycles = 0
    # the stages that ran (the fused MLP's empty down stage has no barrier: no row)
    ran = [s for s in range(last + 1) if s == 0 or bool((arrive[s] != 0).any())]
    for s, after in itertools.pairwise(ran):
        kind = _KINDS[s % _STAGES] if s < layers * _STAGES else ("head", "pick")[s % _STAGES]
        if kind == "gate_up" and after == s + 2:
            kind = "mlp"  # gate/up and down as one stage (tile p_fuse_mlp)
        fig = per.setdefault(kind, {})
        wait = int(go_first[s] - a_last[s]) if s > 0 else 0
        wait_cycles = int((c_go[s] - c_arrive[s]).min()) if s > 0 else 0
        span = int(a_last[after] - go_first[s])
        barrier, work = barrier + wait, work + span
        barrier_cycles += wait_cycles
        for name, value in (
                ("barrier_us", wait * us), ("barrier_cycles", wait_cycles), ("work_us", span * us),
                ("own_us", int((arrive[after] - go[s]).max()) * us),
                ("own_cycles", int((c_arrive[after] - c_go[s]).max())),
                ("wake_spread_us", int(go_last[s] - go_first[s]) * us),
                ("arrival_spread_us", int(a_last[after] - arrive[after].min()) * us)):
            fig.setdefault(name, []).append(value)
    ns = int(arrive[last, 0] - go[0, 0])
    return {
        "step_us": round(int(a_last[last] - go_first[0]) * us, 3),
        "barrier_us": round(barrier * us, 3), "work_us": round(work * us, 3),
        "step_cycles": int(c_arrive[last, 0] - c_go[0, 0]), "barrier_cycles": barrier_cycles,
        "barriers": len(ran) - 2, "programs": raw.shape[1],
        "sms": len(set(raw[last + 1, :, 0].tolist())),
        "sm_ghz": round(int(c_arrive[last, 0] - c_go[0, 0]) / ns, 3) if ns > 0 else None,
        "launch_skew_us": round(int(go_last[0] - go_first[0]) * us, 3),
        "stages": {kind: {name: round(statistics.median(values), 3)
                          for name, values in fig.items()} for kind, fig in per.items()},
    }


_STAGE_KINDS = ("qkv", "attend", "o", "gate_up", "down", "head", "pick")  # `_one_stage`'s


def compile_for_gpu(arch: int = 90, dtype: str = "bf16", hidden: int = 576, heads: int = 9,
                    kv_heads: int = 3, head_dim: int = 64, inter: int = 1536,
                    vocab: int = 49152, layers: int = 30, programs: int = 132,
                    tiles: dict[str, int] | None = None, bias: bool = False,
                    stage: str | None = None) -> dict[str, Any]:
    """Compile the one-row step for CUDA compute capability `arch` without a GPU
    (Triton's bundled ptxas), SmolLM2-135M's shapes by default, with `OneRowStep`'s
    constants for the tiles (DEFAULT_TILES, then `tiles`); or (stage: one of
    _STAGE_KINDS) that stage as the staged form's launch, chained with PDL: its cubin
    size, shared memory, registers and spills a thread, and PTX. Raises if it does not
    lower."""
    if triton is None:
        raise ValueError("triton is not installed")
    p, f, i = f"*{dtype}", "*fp32", "*i64"
    signature = {"tok_ptr": i, "pos_ptr": i, "ban_ptr": i, "out_ptr": i, "slot_ptr": i,
                 "embed_ptr": p, "table_ptr": i, "cos_ptr": p, "sin_ptr": p, "normf_ptr": p,
                 "head_ptr": p, "x_ptr": p, "q_ptr": p, "part_ptr": f, "ml_ptr": f, "h_ptr": p,
                 "acc_ptr": f, "r_ptr": p,
                 "best_ptr": f, "bidx_ptr": "*i32", "sync_ptr": "*i32", "trace_ptr": i,
                 "eps": "fp32",
                 "eos": "i32", "scale": "fp32", "s_slot": "i32", "s_head": "i32",
                 "s_pos": "i32", "chunk": "i32", "splits": "i32", "max_pos": "i32"}
    constexprs = _constants(layers, hidden, heads, kv_heads, head_dim, inter, vocab, programs,
                            {**DEFAULT_TILES, **(tiles or {})}, 4 if dtype == "fp32" else 2,
                            (bias,) * 4, gpu=True)
    options = {"num_warps": constexprs.pop("num_warps")}
    if stage is None:
        fn = _jitted_step
    else:
        if stage not in _STAGE_KINDS:
            raise ValueError(f"stage must be one of {_STAGE_KINDS}, got {stage!r}")
        if constexprs["TRACE"]:
            raise ValueError("tile p_trace needs the one-launch step (not a stage)")
        fn = _jitted_stage
        for name in ("sync_ptr", "trace_ptr"):
            del signature[name]
        signature.update(layer="i32", picks="i32")
        constexprs.update(KIND=_STAGE_KINDS.index(stage), PDL=True)
        options["launch_pdl"] = True
    compiled = compile_offline(fn, signature, constexprs, arch, options,
                               aligned=("s_slot", "s_head", "s_pos"))
    return {"cubin_bytes": len(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
            **_registers(compiled.asm["ptx"], arch), "ptx": compiled.asm["ptx"]}


def _registers(ptx: str, arch: int) -> dict[str, int]:
    """Registers a thread and bytes spilled to local memory, as triton's bundled ptxas
    reports them for `ptx` (-1 each where it can't say)."""
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        suffix = "a" if arch >= 90 else ""
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            report = subprocess.run(
                [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name,
                 "-o", "/dev/null"], capture_output=True, text=True, timeout=600,
                check=False).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        return {"registers": int(regs.group(1)) if regs else -1,
                "spills": int(spill.group(1)) if spill else -1}
    except Exception:  # noqa: BLE001  (a report for humans: never fail the compile check)
        return {"registers": -1, "spills": -1}
