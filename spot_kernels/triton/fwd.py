"""Forward kernel: per-token ``logp``, ``lse`` (and entropy) streaming the vocabulary.

Math: for the token rows ``i`` of a tile and vocabulary tiles ``z = softcap(h W^T + b) / T``
(``tiles.logits_tile``) the program keeps the online pair ``(m, s)``::

    m' = max(m, max_v z_v);   s' = s e^{m - m'} + sum_v e^{z_v - m'}

plus the target logit ``z_t`` (picked from the tile whose columns hold ``t``; none for a target
outside this program's columns) and, for the entropy, ``q = sum_v e^{z_v - m} (z_v - m)``,
moved to each new max as ``q' = e^{m - m'} (q + (m - m') s) + sum_v e^{z_v - m'} (z_v - m')``.
At the end ``lse = m + log s``, ``logp = (z_t - m) - log s`` (0 for ``ignore_index``; not
``z_t - lse``, which loses ``ulp(|lse|)`` near the max) and
``H = lse - sum_v p_v z_v = log s - q / s``.

Work split: a 1-D grid of ``cdiv(N, BLOCK_M) splits`` programs, split fastest: program
``i splits + k`` owns ``BLOCK_M`` tokens and the vocabulary columns ``[k C, (k + 1) C)`` with
``C = cdiv(cdiv(V, splits), BLOCK_V) BLOCK_V``. With one split it writes ``logp``, ``lse``,
``H`` directly. With several (``SPLIT``) it writes its partial ``(m, s, z_t, q)`` to
``[splits, N]`` float32 buffers and ``merge.py`` combines them in a fixed order:
deterministic, no atomics, no locks, no host synchronisation. Splitting pays twice: when there
are too few token tiles to fill the GPU (short sequences, small batches), and when ``h`` does
not fit in L2 (``_splits`` in ``__init__.py``): the programs resident at once then share a few
token tiles, whose ``h`` rows stay in L2 while their vocabulary ranges stream past, instead of
all of ``h`` passing through L2 (from HBM) once per vocabulary tile.

Cost: ``2 N D V`` FLOPs (tensor cores, float32 accumulation); each program reads its ``h``
tile once per vocabulary tile (from L2) and its ``W`` range once; from HBM, ``h`` about once
and ``W`` once per group of resident token tiles; writes O(N) (``16 N splits`` bytes of
partials when split). No ``N x V`` tensor exists anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import launch_options
from .tiles import logits_tile


@triton.jit
def _forward_kernel(H, W, B, T, LOGP, LSE, ENT, PM, PS, PT, PQ,
                    N, V, D, cols_per_split, n_splits, stride_hn, stride_hd, stride_wv,
                    stride_wd,
                    ignore_index, inv_temp, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # split-fastest order: the programs resident at once share a few token tiles (their h rows
    # stay in L2) and walk a few vocabulary ranges side by side (_splits in __init__.py)
    pid = tl.program_id(0)
    pid_m = pid // n_splits
    pid_s = pid % n_splits
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    t = tl.load(T + rows, mask=row_mask, other=ignore_index)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    zt = tl.zeros([BLOCK_M], dtype=tl.float32)
    q = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                        BLOCK_M, BLOCK_V, BLOCK_D, PRECISION, False)
        hit = (cols[None, :] == t[:, None]) & col_mask[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # rows whose logits so far are all -inf (masked columns, a -inf bias) shift by 0:
        # -inf - (-inf) would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        zc = z - shift[:, None]
        e = tl.exp(zc)
        if ENTROPY:
            q = scale * (q + tl.where(s > 0, m - shift, 0.0) * s)
            q += tl.sum(e * tl.where(e > 0, zc, 0.0), axis=1)  # e = 0 where zc = -inf
        s = s * scale + tl.sum(e, axis=1)
        m = m_new

    if SPLIT:
        off = pid_s.to(tl.int64) * N + rows
        tl.store(PM + off, m, mask=row_mask)
        tl.store(PS + off, s, mask=row_mask)
        tl.store(PT + off, zt, mask=row_mask)
        if ENTROPY:
            tl.store(PQ + off, q, mask=row_mask)
    else:
        log_s = tl.log(s)
        tl.store(LSE + rows, m.to(tl.float64) + log_s.to(tl.float64), mask=row_mask)  # unrounded
        # (z_t - m) - log s: exact near the max, where z_t - lse loses ulp(|lse|)
        tl.store(LOGP + rows, tl.where(t == ignore_index, 0.0, (zt - m) - log_s), mask=row_mask)
        if ENTROPY:
            tl.store(ENT + rows, log_s - q / s, mask=row_mask)


def launch_forward(hidden, weight, targets, bias, logp, lse, entropy, *, temperature, softcap,
                   ignore_index, splits, cfg, precision):
    """Runs the forward kernel; with ``splits > 1`` returns the partial buffers
    ``(m, s, zt, q)`` (``q`` is None without entropy) for ``merge.launch_merge``."""
    n, d = hidden.shape
    v = weight.shape[0]
    bm, bv, bd = cfg["block_m"], cfg["block_v"], cfg["block_d"]
    cols_per_split = triton.cdiv(triton.cdiv(v, splits), bv) * bv
    splits = triton.cdiv(v, cols_per_split)  # every split owns at least one column
    # the merge indexes the [splits, N] partials in int32
    assert splits * n < 2**31, "split_vocab * N must stay below 2^31"
    dummy = lse
    parts = None
    if splits > 1:
        f32 = dict(dtype=torch.float32, device=hidden.device)
        parts = (torch.empty(splits, n, **f32), torch.empty(splits, n, **f32),
                 torch.empty(splits, n, **f32),
                 torch.empty(splits, n, **f32) if entropy is not None else None)
    pm, ps, pt, pq = parts if parts is not None else (dummy,) * 4
    grid = (triton.cdiv(n, bm) * splits,)
    _forward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, targets, logp, lse,
        entropy if entropy is not None else dummy, pm, ps, pt, pq if pq is not None else dummy,
        n, v, d, cols_per_split, splits, hidden.stride(0), hidden.stride(1), weight.stride(0),
        weight.stride(1), ignore_index, 1.0 / temperature,
        1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        ENTROPY=entropy is not None, SPLIT=splits > 1, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd,
        PRECISION=precision, **launch_options(cfg))
    return parts
