"""Device helpers shared by every Triton kernel here (``@triton.jit`` functions, no kernels).

``logits_tile`` builds one ``[BLOCK_M, BLOCK_V]`` tile of the transformed logits

    a = h[rows] W[cols]^T + b[cols]        (tl.dot over D in BLOCK_D chunks, float32 accumulator)
    z = softcap(a) / T,  softcap(a) = c tanh(a / c)

and returns ``z`` (the forward), or for the backward (``CODE``) with a softcap one float a logit
that holds both ``tanh(a / c)`` and the slope ``softcap'(a) = 1 - tanh^2(a / c)``
(``softcap_code``; ``grad_tile`` decodes it). Columns past the vocabulary come back as
``z = -inf`` (decoded ones too) so that ``exp(z - m) = 0`` there; rows past ``N`` read zeros
and must be masked by the caller.

Cost per tile: ``2 BLOCK_M BLOCK_V D`` FLOPs; it reads ``(BLOCK_M + BLOCK_V) D`` input
elements (the ``h`` rows are re-read for every vocabulary tile, from L2 in practice).

``tanh`` is written with ``exp`` (``tanh(x) = sign(x) (1 - 2 e / (1 + e))``, ``e = e^{-2|x|}``,
its Taylor series below ``|x| = 1/4``; forward and backward take it from the same code), which
never overflows and exists in every Triton >= 3.3,
also under the interpreter; the slope comes from the same ``e^{-2|x|}`` without cancellation.
One float carries both (``softcap_code``) because a second live ``[BLOCK_M, BLOCK_V]`` tile
for the slope cost 30-60 registers a thread in every backward kernel and pushed the Hopper
``dW`` pass (``bwd_dw.py``) into register spills under Triton 3.6.
fp32 inputs use ``input_precision="ieee"`` (no TF32): the results must match float32 torch. Their
dot compiles to one chain of FMAs, whose rounding error grows with its length, so each D chunk
gets its own accumulator and the chunks are summed with Kahan's compensation (four more adds
an element a chunk): a logit's error then stays near that of a blocked float32 GEMM at any D.
``PRECISION == "upcast"`` (only under the interpreter, whose ``tl.dot`` mishandles bfloat16
operands in Triton 3.9) casts half operands to float32 first: the products of two half values
are exact in float32, so this matches a tensor-core dot with float32 accumulation.

Gradient dots with half inputs: by default ``dA`` is rounded to the input dtype once (what
autograd does in that dtype), which costs about an output ulp against the float64 truth. With
``fast_grad=False`` the backward splits ``dA = hi + lo`` into two half values and runs two dots
(``split_half``/``dot2``): float32-grade ``dA`` at twice the gradient-GEMM cost.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, N, V, group_m, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(rows, cols)`` of program ``pid`` in the grouped order of a 1-D grid of
    ``cdiv(N, BLOCK_M) cdiv(V, BLOCK_V)`` tiles: consecutive programs take ``group_m`` token
    tiles (fewer in the last group) down one vocabulary tile, then the next vocabulary tile,
    through the vocabulary before the next group starts, so the programs resident at once
    share a few rows of ``h`` and a few of ``W`` in L2. A ``group_m`` beyond the token tiles is
    token-major order, clipped so that ``group_m`` times the vocabulary tiles stays in int32."""
    tiles_m = tl.cdiv(N, BLOCK_M)
    group_m = tl.minimum(group_m, tiles_m)
    per_group = group_m * tl.cdiv(V, BLOCK_V)
    first_m = (pid // per_group) * group_m
    size_m = tl.minimum(tiles_m - first_m, group_m)
    rows = (first_m + (pid % per_group) % size_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = ((pid % per_group) // size_m) * BLOCK_V + tl.arange(0, BLOCK_V)
    return rows, cols


@triton.jit
def tanh_series(ax):
    """``tanh(ax)`` for ``0 <= ax < 1/4``: the odd Taylor series to ``x^11`` (truncation below
    1e-9 relative). ``1 - e^{-2|x|}`` loses its leading bits as ``|x|`` goes to 0 (a softcap
    far above the logits: at c = 1e6 every logit was off by ~c 2^-24)."""
    x2 = ax * ax
    return ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (
        -17.0 / 315.0 + x2 * (62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))


@triton.jit
def tanh(x):
    """float32-accurate at every ``|x|``: ``tanh`` as the backward decodes it from
    ``softcap_code`` (``1 - 1 / v``), so that the forward's ``lse`` and the backward's recomputed
    logits round alike. ``(1 - e) / (1 + e)`` rounds differently for half the ``|x|`` in [1/4,
    4], by 1-2 ulp, which a cap of 1e3-1e4 turned into gradients 1e-4 off (torch's float32 at
    1e-7)."""
    return softcap_decode(softcap_code(x))[0]


@triton.jit
def softcap_code(x):
    """One float32 that holds ``tanh(x)`` and its slope ``1 - tanh^2(x)``, both to float32
    precision at every ``|x|`` (``softcap_decode`` takes them out)::

        v = tanh(x)                         |x| < 1/4     (|v| < 0.245)
        v = sign(x) / (1 - |tanh(x)|)       elsewhere     (|v| > 1.32)
          = sign(x) (1 + e) / (2 e),  e = e^{-2|x|}

    ``1 - t^2`` from a rounded ``t`` loses its leading bits as ``|x|`` grows (at ``|x| = 5``
    ~1e-3 relative; 0 once ``t`` rounds to 1, from ``|x| ~ 8.7``); ``1 - |t|`` kept this way
    does not. Where ``e`` underflows (``|x| > ~52``, and at ``x = inf``) ``v`` is infinite and
    decodes as ``tanh = +-1``, slope exactly 0, as torch's ``tanh`` gives (the interpreter's
    numpy warns of the division by zero)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    v = tl.where(ax < 0.25, tanh_series(ax), (1.0 + e) / (2.0 * e))
    return tl.where(x < 0, -v, v)


@triton.jit
def softcap_decode(v):
    """``(tanh(x), 1 - tanh^2(x))`` from ``softcap_code(x)``: ``(v, 1 - v^2)`` for ``|v| < 1``,
    else with ``r = 1 / |v| = 1 - |tanh(x)|``: ``(sign(v) (1 - r), r (2 - r))``."""
    av = tl.abs(v)
    small = av < 1.0
    r = 1.0 / tl.where(small, 1.0, av)
    t = tl.where(small, v, tl.where(v < 0, r - 1.0, 1.0 - r))
    return t, tl.where(small, 1.0 - v * v, r * (2.0 - r))


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` in float32 (``acc`` may be None: Triton 3.3's ``tl.dot`` rejects a
    None that reaches it through a jit function's argument, so it is left out there)."""
    if PRECISION == "upcast":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    prec: tl.constexpr = "ieee" if PRECISION == "upcast" else PRECISION
    if acc is None:
        out = tl.dot(a, b, input_precision=prec)
    else:
        out = tl.dot(a, b, acc, input_precision=prec)
    return out


@triton.jit
def pow2_unit(da):
    """``(da * 2^-e, 2^e)`` with ``2^e`` the power of two at or below the tile's largest
    ``|dA|`` (so that is in [1, 2)), exact both ways (built from exponent bits); a tile of
    zeros, or with an inf or NaN, is left as it is (``e = 0``)."""
    amax = tl.max(tl.max(tl.abs(da), axis=1), axis=0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2) of a normal amax
    e = tl.where((amax > 0) & (amax < float("inf")) & (e > -127), tl.minimum(e, 126), 0)
    return (da * ((127 - e) << 23).to(tl.float32, bitcast=True),
            ((127 + e) << 23).to(tl.float32, bitcast=True))


@triton.jit
def split_half(da, dtype: tl.constexpr, SPLIT: tl.constexpr):
    """``dA`` as the input dtype for tensor-core dots: ``(hi, lo, unscale)`` with ``(hi + lo)
    unscale = dA`` to about 16 bits when ``SPLIT`` (``lo`` is ``hi`` and unused otherwise).
    ``unscale`` is 1 but for float16, whose 5 exponent bits lose a ``|dA|`` below 6e-5 bit by
    bit and flush one below 6e-8 to 0: a small upstream ``g`` (SPoT's ``beta / K`` per token,
    1e-3 and less) times ``p ~ 1 / V`` is there at every real vocabulary, and the softmax term
    of the gradients was lost (dh 2-7% of its largest entry off); there the tile is first
    scaled by a power of two (``pow2_unit``) and the dots' float32 results multiplied by
    ``unscale`` before they are added up."""
    unscale = 1.0
    if dtype == tl.float16:
        da, unscale = pow2_unit(da)
    hi = da.to(dtype)
    lo = hi
    if SPLIT:
        lo = (da - hi.to(tl.float32)).to(dtype)
    return hi, lo, unscale


@triton.jit
def dot2_into(hi, lo, unscale, x, acc, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + (hi + lo) @ x * unscale`` (``split_half``'s three; ``acc`` may be None);
    ``unscale`` is applied only to float16 operands, the only ones ``split_half`` scales."""
    if hi.dtype == tl.float16:
        out = dot2(hi, lo, x, None, PRECISION, SPLIT) * unscale
        if acc is not None:
            out = out + acc
    else:
        out = dot2(hi, lo, x, acc, PRECISION, SPLIT)
    return out


@triton.jit
def dot2(hi, lo, x, acc, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + (hi + lo) @ x`` (just ``hi`` without ``SPLIT``)."""
    out = dot(hi, x, acc, PRECISION)
    if SPLIT:
        out = dot(lo, x, out, PRECISION)
    return out


@triton.jit
def logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd, stride_wv,
                stride_wd, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, CODE: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    comp = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)  # Kahan's compensation (ieee only)
    h_rows = H + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(h_rows + ds[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        w = tl.load(w_rows + ds[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if PRECISION == "ieee":
            # float32 inputs: each chunk's dot in a fresh accumulator, added with Kahan's
            # compensation. One FMA chain through all of D (what tl.dot compiles to for float32
            # operands) loses accuracy with D: about 10x torch's float32 GEMM at D = 4096
            part = dot(h, tl.trans(w), None, PRECISION)
            y = part - comp
            total = acc + y
            # (an overflow to +-inf keeps no compensation: inf - inf would be NaN)
            comp = tl.where(tl.abs(total) < float("inf"), (total - acc) - y, 0.0)
            acc = total
        else:
            acc = dot(h, tl.trans(w), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        if CODE:
            y = softcap_code(acc / softcap)  # grad_tile decodes it and masks the columns
        else:
            y = tl.where(col_mask[None, :], tanh(acc / softcap) * (softcap * inv_temp),
                         float("-inf"))
    else:
        y = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))
    return y


@triton.jit
def any_nonzero(g):
    """Whether a token tile has work: any ``g`` nonzero or NaN. (``max|g| > 0`` would skip a
    NaN, which must reach the gradients as it does through autograd: it compares false, and
    the GPU's max ignores it.)"""
    return tl.max((g != 0).to(tl.int32), axis=0) > 0


@triton.jit
def any_reaches(da, eps):
    """``filter_eps``'s test of a ``dA`` tile: any ``|dA|`` at least ``eps``, or NaN."""
    keep = tl.where(tl.abs(da) < eps, 0, 1)
    return tl.max(tl.max(keep, axis=1), axis=0) > 0


@triton.jit
def row_inputs(T, G, LSE, Q, rows, row_mask, ignore_index):
    """The backward's per-row inputs ``(t, g, hi, scale, q)``: ``g = 0`` for ``ignore_index`` and
    for rows past ``N``, which also get ``lse = inf`` so that ``p = 0`` there (their zero hidden
    states still give ``z = softcap(b) / T``, whose exp can overflow, and ``0 * inf`` would put
    NaN into ``dW`` and ``db``). The float64 ``lse`` comes apart as ``hi + lo`` (float32 each),
    ``p = e^(z - hi) e^-lo`` with ``scale = e^-lo``: ``z - hi`` is exact near the max, so
    ``p`` keeps float32 precision (an infinite or NaN ``lse`` stays in ``hi``). ``q = 1 - p_t``
    is the forward's (``torch_backend.target_complement``), float32 per row."""
    t = tl.load(T + rows, mask=row_mask, other=ignore_index)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    g = tl.where(t == ignore_index, 0.0, g)
    lse = tl.load(LSE + rows, mask=row_mask, other=float("inf"))
    hi = lse.to(tl.float32)
    finite = tl.where(tl.abs(lse) < float("inf"), lse, 0.0)
    lo = (finite - finite.to(tl.float32).to(tl.float64)).to(tl.float32)
    q = tl.load(Q + rows, mask=row_mask, other=0.0)
    return t, g, hi, tl.exp(-lo), q


@triton.jit
def grad_tile(y, hi, scale, q, g, t, cols, col_mask, inv_temp, softcap,
              HAS_SOFTCAP: tl.constexpr):
    """``dA = g (onehot(t) - p) / T * softcap'(a)`` for one tile, float32, in registers, with
    ``p = e^(z - hi) scale`` and the target's ``1 - p_t = q`` (``row_inputs``: the forward's,
    not the recomputed logit's). ``y`` is ``logits_tile(..., CODE=True)``: ``z``, or with a
    softcap its ``softcap_code``. Masked columns give 0 (a target outside ``[0, V)`` matches no
    real column)."""
    z = y
    if HAS_SOFTCAP:
        # the code of a column past V is 0 (slope 1) even where a row of h holds an inf (its
        # zero-filled W row gives inf * 0 = NaN there, and NaN * 0 stays NaN in dA). Zeroing
        # dA there once at the end instead cost 5-35 registers a thread (Triton 3.6, sm_90)
        th, slope = softcap_decode(tl.where(col_mask[None, :], y, 0.0))
        z = tl.where(col_mask[None, :], th * (softcap * inv_temp), float("-inf"))
    p = tl.exp(z - hi[:, None]) * scale[:, None]
    target = (cols[None, :] == t[:, None]) & col_mask[None, :]
    da = g[:, None] * tl.where(target, q[:, None], -p) * inv_temp
    if HAS_SOFTCAP:
        da = da * slope
    return da
