"""The one reference implementation: materialise the logits, then ``log_softmax``.

Everything else in the package is checked against this file. It builds the full
``[N, V]`` logits tensor, which is exactly what the fused backends avoid, so use it for
tests, small problems and as the ground truth in float64 (``compute_dtype=torch.float64``).

Math (README, "The math")::

    a = h W^T + b;   z = softcap(a) / T,  softcap(a) = c tanh(a / c)
    logp_i = z_{i, t_i} - logsumexp_v z_iv          (0 where t_i == ignore_index)
    H_i    = logsumexp_v z_iv - sum_v p_iv z_iv

Gradients come from plain autograd through these ops.
"""
from __future__ import annotations

import torch


def logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None, compute_dtype=None):
    """``softcap(h W^T + b) / T`` as a full ``[N, V]`` tensor.

    With ``compute_dtype=None`` the matmul runs in the input dtype (what naive code does) and
    the rest in float32; with ``compute_dtype=torch.float64`` everything runs in float64.
    """
    if compute_dtype is None:
        a = hidden @ weight.t()
        if bias is not None:
            a = a + bias
        a = a.float()
    else:
        a = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
        if bias is not None:
            a = a + bias.to(compute_dtype)
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    return a / temperature


def token_logprobs(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None,
                   ignore_index=-100, compute_dtype=None, return_entropy=False):
    """Per-token ``log p(target)`` of ``[N, D]`` hidden states; differentiable by autograd.

    Returns ``logp`` (and the entropy ``H`` when ``return_entropy``) in the compute dtype
    (float32 unless ``compute_dtype`` says otherwise).
    """
    z = logits(hidden, weight, bias, temperature=temperature, softcap=softcap,
               compute_dtype=compute_dtype)
    logp_all = torch.log_softmax(z, dim=-1)
    targets = targets.long()  # uint8 targets would compare with a wrapped ignore_index
    valid = targets != ignore_index
    # the backends' contract for a vocabulary shard: a target outside [0, V) has no logit
    # here, so its log-prob is -lse (z - lse at any column, less z there)
    inside = valid & (targets >= 0) & (targets < z.shape[-1])
    safe = torch.where(inside, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(inside, logp, logp_all[..., 0] - z[..., 0])
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -torch.where(p == 0, 0.0, p * logp_all).sum(-1)  # p log p = 0 at p = 0; NaN stays
    return logp, entropy


def sequence_logprobs(token_logps, cu_seqlens, valid=None, average=False):
    """Per-sequence sums (or means over counted tokens) with a Python loop: obviously right."""
    out = []
    for s in range(len(cu_seqlens) - 1):
        lo, hi = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        seg = token_logps[lo:hi]
        if valid is not None:
            seg = torch.where(valid[lo:hi].bool(), seg, 0.0)  # -inf * 0 would be NaN
        total = seg.sum()
        if average:
            count = (hi - lo) if valid is None else int(valid[lo:hi].sum())
            total = total / count if count > 0 else total * 0
        out.append(total)
    if not out:
        return token_logps.new_zeros(0)
    return torch.stack(out)
