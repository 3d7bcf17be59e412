"""Deterministic backward, pass 1 of 2: ``dh`` without atomics.

Math: as ``bwd.py``: ``dA = g (onehot(t) - p) / T * softcap'(a)`` from the recomputed tile,
the saved ``lse`` and the target's ``1 - p_t`` from the forward's ``logp``; here only ``dh[rows] = sum_over_vocab_tiles dA W[cols]``.

Work split: grid ``(cdiv(N, BLOCK_M),)``: one program owns ``BLOCK_M`` token rows and walks the
whole vocabulary in order. For each vocabulary tile it recomputes the logits, forms ``dA``, then
for every ``BLOCK_D`` chunk reads its own rows of the float32 ``dh`` buffer, adds ``dA W_chunk``
and writes them back. No other program touches those rows, and the order of the additions is
fixed, so the result is bit-identical from run to run. A barrier closes each vocabulary tile so
every thread sees the rows written by the others before the next read-modify-write.
Token tiles whose ``g`` are all zero are skipped; ``filter_eps`` skips vocabulary tiles as in
``bwd.py``.

Cost: ``4 N D V`` FLOPs (recompute + ``dh``; ``6 N D V`` with the ``hi + lo`` split);
``8 N D V / BLOCK_V`` bytes of ``dh`` read-modify-write, from L2 only while the resident
programs' rows fit there: at Qwen3-8B's head and N = 16384 every vocabulary tile sweeps all of
``dh`` (256 MB), about 0.6 TB through HBM in all, which bounds this pass (an estimate).
Parallelism is only ``cdiv(N, BLOCK_M)`` programs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import launch_options
from .tiles import (any_nonzero, any_reaches, dot2_into, grad_tile, logits_tile, row_inputs,
                    split_half)


@triton.jit
def _backward_dh_kernel(H, W, B, T, LSE, Q, G, DH, N, V, D, stride_hn, stride_hd, stride_wv,
                        stride_wd, ignore_index, inv_temp, softcap, filter_eps,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        FILTER: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    t, g, lse_hi, lse_scale, q = row_inputs(T, G, LSE, Q, rows, row_mask, ignore_index)
    if any_nonzero(g):
        rows64 = rows.to(tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            y = logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn,
                            stride_hd, stride_wv, stride_wd, inv_temp, softcap, HAS_BIAS,
                            HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION, True)
            da = grad_tile(y, lse_hi, lse_scale, q, g, t, cols, col_mask, inv_temp, softcap,
                           HAS_SOFTCAP)
            run = True
            if FILTER:
                run = any_reaches(da, filter_eps)
            if run:
                hi, lo, unscale = split_half(da, W.dtype.element_ty, SPLIT)
                cols64 = cols.to(tl.int64)
                for d0 in range(0, D, BLOCK_D):
                    ds = d0 + tl.arange(0, BLOCK_D)
                    d_mask = ds < D
                    w = tl.load(W + cols64[:, None] * stride_wv + ds[None, :] * stride_wd,
                                mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                    ptr = DH + rows64[:, None] * D + ds[None, :]
                    mask = row_mask[:, None] & d_mask[None, :]
                    acc = tl.load(ptr, mask=mask, other=0.0)
                    acc = dot2_into(hi, lo, unscale, w, acc, PRECISION, SPLIT)
                    tl.store(ptr, acc, mask=mask)
            tl.debug_barrier()


def launch_backward_dh(hidden, weight, targets, bias, lse, q, grad, dh, *, temperature, softcap,
                       ignore_index, filter_eps, split, cfg, precision):
    """Accumulates into the float32, contiguous, zero-filled ``dh``."""
    n, d = hidden.shape
    v = weight.shape[0]
    bm = cfg["block_m"]
    _backward_dh_kernel[(triton.cdiv(n, bm),)](
        hidden, weight, bias if bias is not None else lse, targets, lse, q, grad, dh, n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), ignore_index,
        1.0 / temperature, 1.0 if softcap is None else softcap, float(filter_eps or 0.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, FILTER=bool(filter_eps),
        SPLIT=split,
        BLOCK_M=bm, BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"], PRECISION=precision,
        **launch_options(cfg))
