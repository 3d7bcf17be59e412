"""Backward kernel (default mode): recompute each logits tile, form ``dA``, scatter ``dh``,
``dW``, ``db`` with float32 atomics.

Math (README, "The math"): with ``g_i = dL/dlogp_i`` (0 for ``ignore_index``) and the saved
``lse``, for one ``[BLOCK_M, BLOCK_V]`` tile ``p = exp(z - lse)`` and::

    dA = g (onehot(t) - p) / T * (1 - tanh^2(a / c))      (the last factor only with a softcap)
    dh[rows] += dA W[cols];   dW[cols] += dA^T h[rows];   db[cols] += sum_rows dA

The target's column takes ``1 - p_t = q`` from the forward's ``logp`` (``tiles.row_inputs``),
not from the recomputed logit. A target outside ``[0, V)`` matches no column, so only its
softmax term counts.

Work split: one program per (token tile, vocabulary tile). Each recomputes its logits tile
(``tiles.logits_tile``, a loop over D), builds ``dA`` in registers, then loops over D again in
``BLOCK_D`` chunks: ``dA W_chunk`` goes to ``dh`` and ``dA^T h_chunk`` to ``dW`` with
``tl.atomic_add`` on float32 buffers (relaxed: nothing reads the sums before the kernel ends, so
no ordering is paid for). With half inputs ``dA`` enters the tensor-core dots
rounded once to the input dtype, or as ``hi + lo`` (two dots each, see ``tiles.py``) with
``fast_grad=False``.

Program order (the 1-D grid): programs ``0, 1, 2, ...`` walk ``group_m`` token tiles down the
first vocabulary tile, then the same token tiles down the second, and so on through the
vocabulary before the next group of token tiles starts. The programs resident at once share a
few token tiles and a few vocabulary tiles, so the float32 rows they add into stay in L2: the
group's ``h``/``dh`` rows (``6 BLOCK_M group_m D`` bytes, 25 MB at 64 x 16 x 4096) for the whole
sweep, and ``W``/``dW`` stream once per group (``N / (BLOCK_M group_m)`` times ``6 V D``
bytes). In plain token-major order every vocabulary tile would instead sweep all of ``dh``
(``4 N D`` bytes, far beyond L2 at real sizes) through HBM: ``V / BLOCK_V`` times ``8 N D``
bytes of read-modify-write, about 600 GB at Qwen3-8B's head.

Skipping: a program whose token rows all have ``g = 0`` (ignored or zero-weight tokens) does
nothing at all, not even the recompute. With ``filter_eps > 0`` a tile whose ``|dA|`` (after
the ``g`` scaling) stays below ``filter_eps`` everywhere skips its two gradient GEMMs: the
dropped contribution is at most ``filter_eps`` per element of ``dA``.

Cost: ``6 N D V`` FLOPs (recompute, ``dh``, ``dW``) for the tiles that run (``10 N D V`` with
the ``hi + lo`` split of ``fast_grad=False``); ``N V D (1 / BLOCK_V + 1 / BLOCK_M)`` float32
atomic adds (L2 resident); memory beyond the gradients: float32 ``dh``/``dW``/``db`` buffers
when the inputs are half precision. The summation order of the atomics varies between runs
(results differ in the last bits); ``deterministic=True`` uses ``bwd_dh.py`` + ``bwd_dw.py``.

Why it may not reach the GEMM floor: the atomics scale like the FLOPs. With 64 x 128 tiles and
Qwen3-8B's head (``N=16384, D=4096, V=151936``) they are ``2.4e11`` adds (about 1 TB through
L2) next to 61 TFLOP of dots, so on an H100/H200 the backward is likely bound by L2 atomic
throughput rather than by the tensor cores. On sm_90 Triton issues the ``dh`` and ``dW`` adds
as 4-wide vector reductions (``red.global.add.v4.f32``, SASS ``REDG.E.ADD.F32x4``; seen with
3.3.1, 3.6 and 3.9) when D and the row strides are multiples of 16, as in every real head:
``6e10`` instructions rather than ``2.4e11`` (``tests/test_triton_compile.py`` keeps it so;
other sizes and older GPUs get scalar adds). ``filter_eps`` removes both the dots and the atomics
of skipped tiles (most of the vocabulary of a trained model), which is how this design is meant
to win; without filtering the ``cuda`` backend (cuBLAS on a bounded ``dA`` block) may well
be faster. None of this was measured yet: no GPU was available when it was written.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import launch_options
from .tiles import (any_nonzero, any_reaches, dot2_into, grad_tile, grouped_tile,
                    logits_tile, row_inputs, split_half)


@triton.jit
def _backward_kernel(H, W, B, T, LSE, Q, G, DH, DW, DB, N, V, D, stride_hn, stride_hd,
                     stride_wv, stride_wd, ignore_index, inv_temp, softcap, filter_eps, group_m,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_H: tl.constexpr,
                     NEED_W: tl.constexpr, NEED_B: tl.constexpr, FILTER: tl.constexpr,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # grouped order: consecutive programs cover group_m token tiles x successive vocabulary
    # tiles, so the dh rows they add into stay in L2 while the vocabulary streams past
    rows, cols = grouped_tile(tl.program_id(0), N, V, group_m, BLOCK_M, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    t, g, lse_hi, lse_scale, q = row_inputs(T, G, LSE, Q, rows, row_mask, ignore_index)
    if any_nonzero(g):
        y = logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                        BLOCK_M, BLOCK_V, BLOCK_D, PRECISION, True)
        da = grad_tile(y, lse_hi, lse_scale, q, g, t, cols, col_mask, inv_temp, softcap,
                       HAS_SOFTCAP)
        run = True
        if FILTER:
            run = any_reaches(da, filter_eps)
        if run:
            if NEED_B:
                tl.atomic_add(DB + cols, tl.sum(da, axis=0), mask=col_mask, sem="relaxed")
            if NEED_H or NEED_W:
                hi, lo, unscale = split_half(da, W.dtype.element_ty, SPLIT)
                hi_t, lo_t = tl.trans(hi), tl.trans(lo)
                rows64 = rows.to(tl.int64)
                cols64 = cols.to(tl.int64)
                for d0 in range(0, D, BLOCK_D):
                    ds = d0 + tl.arange(0, BLOCK_D)
                    d_mask = ds < D
                    if NEED_H:
                        w = tl.load(W + cols64[:, None] * stride_wv + ds[None, :] * stride_wd,
                                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                        dh = dot2_into(hi, lo, unscale, w, None, PRECISION, SPLIT)
                        tl.atomic_add(DH + rows64[:, None] * D + ds[None, :], dh,
                                      mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
                    if NEED_W:
                        h = tl.load(H + rows64[:, None] * stride_hn + ds[None, :] * stride_hd,
                                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                        dw = dot2_into(hi_t, lo_t, unscale, h, None, PRECISION, SPLIT)
                        tl.atomic_add(DW + cols64[:, None] * D + ds[None, :], dw,
                                      mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


def launch_backward(hidden, weight, targets, bias, lse, q, grad, dh, dw, db, *, temperature,
                    softcap, ignore_index, filter_eps, split, cfg, precision):
    """Accumulates into the float32, contiguous, zero-filled ``dh``/``dw``/``db`` (None where
    not needed)."""
    n, d = hidden.shape
    v = weight.shape[0]
    bm, bv = cfg["block_m"], cfg["block_v"]
    dummy = lse
    grid = (triton.cdiv(n, bm) * triton.cdiv(v, bv),)
    _backward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, targets, lse, q, grad,
        dh if dh is not None else dummy, dw if dw is not None else dummy,
        db if db is not None else dummy, n, v, d, hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1), ignore_index, 1.0 / temperature,
        1.0 if softcap is None else softcap, float(filter_eps or 0.0), cfg["group_m"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_H=dh is not None,
        NEED_W=dw is not None, NEED_B=db is not None, FILTER=bool(filter_eps),
        SPLIT=split, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=cfg["block_d"], PRECISION=precision,
        **launch_options(cfg))
