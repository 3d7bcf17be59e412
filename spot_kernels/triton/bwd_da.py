"""Backward with ``da_bytes``: write one block of ``dA`` so that cuBLAS runs the gradient GEMMs.

Math (README, "The math"): for the block's rows and columns, recompute the logits tile, then

    dA = g (onehot(t) - p) / T * (1 - tanh^2(a / c))      (the last factor only with a softcap)

(the target's ``1 - p_t`` from the forward's ``logp``, as in ``bwd.py``) rounded once to the output's dtype (the inputs' dtype: what autograd and the ``cuda`` backend
feed their gradient GEMMs). The caller then runs ``dh = dA W`` and ``dW = dA^T h`` as GEMMs
(``triton/__init__.py``, ``_backward_gemm``) and ``db = sum_rows dA``.

Why: the default backward (``bwd.py``) adds ``dh`` and ``dW`` tile by tile with float32 atomics,
``N V D (1 / BLOCK_V + 1 / BLOCK_M)`` of them, which likely bounds it by L2 atomic throughput on
a large head. Here the gradient GEMMs are cuBLAS's, with their full-size tiles and no atomics;
the cost is writing ``dA`` once and reading it twice (``6 N V`` bytes in half precision, a few
ms at Qwen3-8B's head, next to ``4 N D V`` FLOPs of GEMMs), or, when the caller's budget makes
it sweep twice (``_gemm.plan``), writing and reading it twice (``8 N V`` bytes) with one more
recompute.

Work split: one program per (token tile, vocabulary tile) of the block, in ``bwd.py``'s grouped
order: consecutive programs cover ``group_m`` token tiles down one vocabulary tile, then the next
vocabulary tile, through the block's columns before the next group starts. The programs resident
at once share a few token tiles and a few vocabulary tiles, so ``W`` comes from HBM once per
group of token tiles (with the vocabulary tile fastest, every token tile would read the block's
columns of ``W`` again: a block far larger than L2 at real sizes). A token tile whose ``g`` are
all zero writes zeros without recomputing anything.

Cost: ``2 rows D cols`` FLOPs (the recompute) and ``rows cols`` elements written per block.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import GROUP_M, launch_options
from .tiles import any_nonzero, grad_tile, grouped_tile, logits_tile, row_inputs


@triton.jit
def _backward_da_kernel(H, W, B, T, LSE, Q, G, DA, N, V, D, stride_hn, stride_hd, stride_wv,
                        stride_wd, stride_an, ignore_index, inv_temp, softcap, group_m,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    rows, cols = grouped_tile(tl.program_id(0), N, V, group_m, BLOCK_M, BLOCK_V)
    col_mask = cols < V
    row_mask = rows < N
    t, g, lse_hi, lse_scale, q = row_inputs(T, G, LSE, Q, rows, row_mask, ignore_index)
    da = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if any_nonzero(g):
        y = logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                        BLOCK_M, BLOCK_V, BLOCK_D, PRECISION, True)
        da = grad_tile(y, lse_hi, lse_scale, q, g, t, cols, col_mask, inv_temp, softcap,
                       HAS_SOFTCAP)
    ptr = DA + rows.to(tl.int64)[:, None] * stride_an + cols[None, :]
    tl.store(ptr, da.to(DA.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def launch_backward_da(hidden, weight, targets, bias, lse, q, grad, da, *, temperature, softcap,
                       ignore_index, cfg, precision):
    """Writes ``dA`` for ``hidden``'s rows and ``weight``'s rows (the block's columns) into
    ``da`` ``[N, V]`` (unit column stride)."""
    n, d = hidden.shape
    v = weight.shape[0]
    bm, bv = cfg["block_m"], cfg["block_v"]
    _backward_da_kernel[(triton.cdiv(v, bv) * triton.cdiv(n, bm),)](
        hidden, weight, bias if bias is not None else lse, targets, lse, q, grad, da, n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), da.stride(0),
        ignore_index, 1.0 / temperature, 1.0 if softcap is None else softcap,
        cfg.get("group_m", GROUP_M),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_M=bm, BLOCK_V=bv,
        BLOCK_D=cfg["block_d"], PRECISION=precision, **launch_options(cfg))
