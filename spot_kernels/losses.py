"""Sequence sums over ``cu_seqlens`` and SPoT's reward-based BCE loss, in plain torch.

Both are O(N + S) and differentiable by autograd: the backward of the segment sum hands every
token its sequence's coefficient ``dL/dpi_s``, so the fused token backward receives ``g_i``
without a second forward. No host synchronisation happens here.

The segment sums add in a fixed order, forward and backward (``torch.segment_reduce``: CUB's
segmented reduction on CUDA, one loop per segment on the CPU), never with floating-point
atomics (``index_add``, ``scatter_add``, a float ``cumsum`` on CUDA), so a loss whose token
part is deterministic (every backend but Triton's default backward) is bit-identical run to
run. (``spot_loss(backend="cuda")`` runs the same math in the extension's kernels instead:
``spot_kernels.cuda.segment_sums`` and ``bce_forward``, with ``bce_stats`` below for the stats.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sums(x, cu_seqlens):
    """``[S]`` sums of the 1-D ``x`` over ``cu_seqlens`` (validated: 0 to N, non-decreasing),
    in a fixed order (module docstring); an empty sequence sums to 0."""
    if not x.shape[0]:  # older torch's segment_reduce refuses empty data
        return x.new_zeros(cu_seqlens.shape[0] - 1) + 0 * x.sum()  # keeps the autograd graph
    return torch.segment_reduce(x, "sum", offsets=cu_seqlens, axis=0, unsafe=True)


def sequence_logprobs(token_logps, cu_seqlens, valid=None, average=False):
    values = token_logps.float()
    if valid is not None:
        values = torch.where(valid, values, 0.0)
    out = segment_sums(values, cu_seqlens)
    if average:
        counted = torch.ones_like(values) if valid is None else valid.float()
        count = segment_sums(counted, cu_seqlens)
        out = torch.where(count > 0, out / count.clamp_min(1.0), 0.0)
    return out


SATURATED = 0.01  # a sigmoid below this or above 1 - this counts as saturated


def _bce_inputs(policy_logps, ref_logps, labels, delta):
    """float32 ``pi`` (differentiable), detached float32 ``rho`` and ``y``, ``delta`` a number or
    a detached 0-dim float32 tensor."""
    if isinstance(delta, torch.Tensor):
        delta = delta.detach().float().reshape(())
    return policy_logps.float(), ref_logps.detach().float(), labels.detach().float(), delta


def bce_reward_loss(policy_logps, ref_logps, labels, beta=0.1, delta=0.0, reduction="pairs"):
    """``L = sum_s [y softplus(-u) + (1 - y) softplus(u)] / K``, ``u = beta (pi - rho) - delta``."""
    s = policy_logps.shape[0]
    pi, rho, y, delta = _bce_inputs(policy_logps, ref_logps, labels, delta)
    u = beta * (pi - rho) - delta
    per_seq = y * F.softplus(-u) + (1.0 - y) * F.softplus(u)
    k = {"pairs": s / 2, "mean": s, "sum": 1}[reduction]
    loss = per_seq.sum() / max(k, 1)
    return loss, bce_stats(pi, rho, y, beta, delta)


def bce_stats(policy_logps, ref_logps, labels, beta, delta):
    """The detached statistics of ``bce_reward_loss`` (its inputs, ``[S]`` each), with no host
    synchronisation. Every mean is one row of a masked ``[8, S]`` sum, so the stats cost a few
    dozen small kernels per step rather than a hundred."""
    pi, rho, y, delta = _bce_inputs(policy_logps.detach(), ref_logps, labels, delta)
    s = pi.shape[0]
    with torch.no_grad():
        rewards = beta * (pi - rho)
        sig = torch.sigmoid(rewards - delta)  # sigmoid(u), u as in the loss
        chosen = y >= 0.5
        # the i-th chosen sequence against the i-th rejected one: a stable sort brings each
        # kind to the front in batch order, and the first min(#chosen, #rejected) places pair.
        # Masks and sorts, never boolean indexing: its data-dependent shape would make the
        # host wait for the device (a nonzero) on every step.
        r_c = rewards[torch.argsort((~chosen).to(torch.int8), stable=True)]
        r_r = rewards[torch.argsort(chosen.to(torch.int8), stable=True)]
        n_c = chosen.sum()
        paired = torch.arange(s, device=rewards.device) < torch.minimum(n_c, s - n_c)
        every = torch.ones_like(chosen)
        saturated = (sig < SATURATED) | (sig > 1 - SATURATED)
        rows = [("reward_mean", rewards, every), ("rewards_chosen", rewards, chosen),
                ("rewards_rejected", rewards, ~chosen), ("accuracy", r_c > r_r, paired),
                ("margin", r_c - r_r, paired), ("logps_chosen", pi, chosen),
                ("logps_rejected", pi, ~chosen), ("saturated", saturated, every)]
        values = torch.stack([v.float() for _, v, _ in rows])
        masks = torch.stack([m for _, _, m in rows])
        count = masks.sum(1)
        means = torch.where(count > 0,
                            torch.where(masks, values, 0.0).sum(1) / count.clamp_min(1),
                            float("nan"))
        return {"rewards": rewards, **dict(zip([k for k, _, _ in rows], means.unbind(0)))}
