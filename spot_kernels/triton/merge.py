"""Merge kernel: combine the split-vocabulary partials of ``fwd.py`` into ``logp``, ``lse``
and the entropy.

Math: split ``k`` left ``(m_k, s_k, zt_k, q_k)`` with ``s_k = sum e^{z - m_k}`` and
``q_k = sum e^{z - m_k} (z - m_k)`` over its columns. With ``M = max_k m_k``::

    S = sum_k e^{m_k - M} s_k,   lse = M + log S,   z_t = sum_k zt_k  (one split holds t)
    logp = (z_t - M) - log S
    Q = sum_k e^{m_k - M} (q_k + (m_k - M) s_k),   H = log S - Q / S

Work split: one program per ``BLOCK`` tokens, two passes over the splits in index order (the
max, then the sums), so the result does not depend on scheduling: deterministic, no atomics.

Cost: reads ``16 N splits`` bytes, writes ``16 N``; negligible next to the forward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import FP_FUSION


@triton.jit
def _merge_kernel(PM, PS, PT, PQ, T, LOGP, LSE, ENT, N, splits, ignore_index,
                  ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    big_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for k in range(0, splits):
        big_m = tl.maximum(big_m, tl.load(PM + k * N + rows, mask=mask, other=0.0))
    s = tl.zeros([BLOCK], dtype=tl.float32)
    zt = tl.zeros([BLOCK], dtype=tl.float32)
    q = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, splits):
        mk = tl.load(PM + k * N + rows, mask=mask, other=0.0)
        sk = tl.load(PS + k * N + rows, mask=mask, other=1.0)
        scale = tl.exp(mk - big_m)
        s += scale * sk
        zt += tl.load(PT + k * N + rows, mask=mask, other=0.0)
        if ENTROPY:
            qk = tl.load(PQ + k * N + rows, mask=mask, other=0.0)
            # a split with no finite logit has mk = -inf and sk = 0: its term is 0, not -inf * 0
            q += scale * (qk + tl.where(sk > 0, mk - big_m, 0.0) * sk)
    log_s = tl.log(s)
    t = tl.load(T + rows, mask=mask, other=ignore_index)
    tl.store(LSE + rows, big_m.to(tl.float64) + log_s.to(tl.float64), mask=mask)  # unrounded
    tl.store(LOGP + rows, tl.where(t == ignore_index, 0.0, (zt - big_m) - log_s), mask=mask)
    if ENTROPY:
        tl.store(ENT + rows, log_s - q / s, mask=mask)


def launch_merge(parts, targets, logp, lse, entropy, *, ignore_index, block=128):
    pm, ps, pt, pq = parts
    splits, n = pm.shape
    _merge_kernel[(triton.cdiv(n, block),)](
        pm, ps, pt, pq if pq is not None else pm, targets, logp, lse,
        entropy if entropy is not None else lse, n, splits, ignore_index,
        ENTROPY=entropy is not None, BLOCK=block, num_warps=4, **FP_FUSION)
