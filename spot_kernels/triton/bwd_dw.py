"""Deterministic backward, pass 2 of 2: ``dW`` and ``db`` without atomics.

Math: as ``bwd.py``; here ``dW[cols] = sum_over_token_tiles dA^T h[rows]`` and
``db[cols] = sum_rows dA``.

Work split: grid ``(cdiv(V, BLOCK_V),)``: one program owns ``BLOCK_V`` vocabulary rows of
``W`` and walks the token tiles in order, skipping those whose ``g`` are all zero (so ignored
prompt tokens cost nothing). For each it recomputes the logits tile, forms ``dA`` (from the
saved ``lse``, the target's ``1 - p_t`` from the forward's ``logp``) and, per ``BLOCK_D`` chunk, read-modify-writes its own rows of the
float32 ``dW`` buffer; ``db`` stays in registers until the end. Fixed order, exclusive rows:
bit-identical results across runs. A barrier closes each token tile (see ``bwd_dh.py``).

Cost: ``4 N D V`` FLOPs (recompute + ``dW``; ``6 N D V`` with the ``hi + lo`` split);
``8 V D N / BLOCK_M`` bytes of ``dW`` read-modify-write (the resident programs' rows outgrow
L2 at real sizes: about 1.3 TB through HBM at Qwen3-8B's head and N = 16384, an estimate).
Together with ``bwd_dh.py`` the
deterministic backward does ``8 N D V`` FLOPs instead of the default's ``6 N D V`` (one extra
recompute of the logits; ``12`` vs ``10 N D V`` with the split),
in exchange for no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import launch_options
from .tiles import (any_nonzero, any_reaches, dot2_into, grad_tile, logits_tile, row_inputs,
                    split_half)


@triton.jit
def _backward_dw_kernel(H, W, B, T, LSE, Q, G, DW, DB, N, V, D, stride_hn, stride_hd, stride_wv,
                        stride_wd, ignore_index, inv_temp, softcap, filter_eps,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_W: tl.constexpr,
                        NEED_B: tl.constexpr, FILTER: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        t, g, lse_hi, lse_scale, q = row_inputs(T, G, LSE, Q, rows, row_mask, ignore_index)
        if any_nonzero(g):
            y = logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn,
                            stride_hd, stride_wv, stride_wd, inv_temp, softcap, HAS_BIAS,
                            HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION, True)
            da = grad_tile(y, lse_hi, lse_scale, q, g, t, cols, col_mask, inv_temp, softcap,
                           HAS_SOFTCAP)
            run = True
            if FILTER:
                run = any_reaches(da, filter_eps)
            if run:
                if NEED_B:
                    db += tl.sum(da, axis=0)
                if NEED_W:
                    hi, lo, unscale = split_half(da, W.dtype.element_ty, SPLIT)
                    hi_t, lo_t = tl.trans(hi), tl.trans(lo)
                    rows64 = rows.to(tl.int64)
                    for d0 in range(0, D, BLOCK_D):
                        ds = d0 + tl.arange(0, BLOCK_D)
                        d_mask = ds < D
                        h = tl.load(H + rows64[:, None] * stride_hn + ds[None, :] * stride_hd,
                                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                        ptr = DW + cols64[:, None] * D + ds[None, :]
                        mask = col_mask[:, None] & d_mask[None, :]
                        acc = tl.load(ptr, mask=mask, other=0.0)
                        acc = dot2_into(hi_t, lo_t, unscale, h, acc, PRECISION, SPLIT)
                        tl.store(ptr, acc, mask=mask)
        tl.debug_barrier()
    if NEED_B:
        tl.store(DB + cols, db, mask=col_mask)


def launch_backward_dw(hidden, weight, targets, bias, lse, q, grad, dw, db, *, temperature,
                       softcap, ignore_index, filter_eps, split, cfg, precision):
    """Accumulates into the float32, contiguous, zero-filled ``dw`` and writes ``db`` (either
    may be None)."""
    n, d = hidden.shape
    v = weight.shape[0]
    bv = cfg["block_v"]
    dummy = lse
    _backward_dw_kernel[(triton.cdiv(v, bv),)](
        hidden, weight, bias if bias is not None else dummy, targets, lse, q, grad,
        dw if dw is not None else dummy, db if db is not None else dummy, n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), ignore_index,
        1.0 / temperature, 1.0 if softcap is None else softcap, float(filter_eps or 0.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_W=dw is not None,
        NEED_B=db is not None, FILTER=bool(filter_eps), SPLIT=split, BLOCK_M=cfg["block_m"],
        BLOCK_V=bv, BLOCK_D=cfg["block_d"], PRECISION=precision, **launch_options(cfg))
