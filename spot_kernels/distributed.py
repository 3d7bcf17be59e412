"""Sharded LM heads: vocab-parallel rows across a process group, and FSDP2 ``DTensor`` weights.

Reached through the public functions: ``token_logprobs(..., process_group=pg)`` /
``spot_loss(..., process_group=pg)``, or any call whose ``weight`` (or ``bias``) is a ``DTensor``.

Vocab-parallel (Megatron-style column-parallel head)
----------------------------------------------------
Rank ``r`` of ``process_group`` holds rows ``[start_r, stop_r)`` of ``W`` (and of ``b``); the
splits may be uneven and are found by one ``all_gather`` of the local row counts (rank order).
``hidden`` and the *global* ``targets`` are the same on every rank. Each rank runs the backend on
its rows with local targets ``t - start_r``; a target another rank owns is passed as an index
outside ``[0, V_r)``, which the backend contract turns into "no target logit, no one-hot term".
From the local ``(logp_r, lse_r, H_r)``::

    m   = allreduce_max(lse_r),   e_r = exp(lse_r - m)
    S   = allreduce_sum(e_r);                                     lse = m + log S
    u   = allreduce_sum(owner ? logp_r - (m - lse_r) : 0);        logp = u - log S
    H   = log S + allreduce_sum(e_r (H_r - (lse_r - m))) / S

(in float64; each term is a difference from the max, never of two |lse|-sized numbers, so a
logp near 0 keeps float32 precision)

(the three sums travel in one all-reduce). The backward runs the backend with the *global*
``lse``, which makes its local softmax the global one restricted to this rank's rows, so ``dW_r``
and ``db_r`` are exact locally; ``dh`` is a partial sum over this rank's rows and is all-reduced,
as a column-parallel linear's input gradient is. Communication: ``3 N`` floats forward (plus
``N`` with entropy), ``N D`` float32 backward; never ``[N, V]``.

FSDP2 / DTensor weights
-----------------------
A ``DTensor`` weight (e.g. ``fully_shard``'s ``Shard(0)`` parameter) is gathered with
``full_tensor()`` for the forward and dropped right after it; the backward gathers it again
(FSDP's reshard-after-forward trade: one more all-gather instead of a ``V x D`` tensor alive
between the passes). The full ``dW`` is reduced back to the weight's placements (reduce-scatter
over ``Shard`` dims, all-reduce over ``Replicate`` dims) and divided by the mesh size: the mean over
data-parallel ranks, as FSDP2's default gradient reduction does. The gradient comes back as a
``DTensor`` with the parameter's placements.

FSDP1 (``FullyShardedDataParallel``) and ZeRO-3
-----------------------------------------------
FSDP1 flattens a unit's parameters into one sharded ``FlatParameter``; a module's ``weight`` is a
``[V, D]`` view of the gathered flat parameter only *inside* the unit's forward. Outside it, with
``use_orig_params=True`` it is this rank's 1-D slice (often empty), and with ``False`` a stale
view. Neither can be used (``token_logprobs`` rejects a 1-D ``weight`` with a ``ValueError``).
The root unit keeps its gathered flat parameter from its forward until its backward, so an LM
head in the root unit (the usual wrap policy: decoder layers wrapped, embeddings and head in the
root) works through ``hf.head_inputs``: it takes the head's ``weight``/``bias`` views *inside*
the root's forward (gradients flow into the flat parameter, which FSDP1 reduce-scatters as usual)
and :func:`fsdp1_tie` ties the returned ``hidden`` to the model's (empty) logits with ``+ 0``,
so the root's pre-backward hook fires and FSDP1's backward bookkeeping runs. An LM head in its
own (non-root) unit is freed right after its forward and is rejected. Without ``hf``: compute the
fused loss inside the root module's forward. ZeRO-3 (untested: DeepSpeed is not a dependency)
leaves an empty partition outside the module's forward, rejected the same way; keep the head
under ``deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None)`` from the fused
call through its backward.

Both paths run eagerly (collectives inside an ``autograd.Function``); under ``torch.compile``
they graph-break around the call rather than compile into it. With half-precision hidden states
the partial ``dh`` still travel in float32 (the backends' ``dh_float32``: their float32 sums,
unrounded; the cuBLAS paths need torch's float32-output GEMM for half inputs, else each block's
product is rounded) and the total is rounded once to ``hidden``'s dtype, as one process's is: twice
the bytes of a half all-reduce (``4 N D``), against a rounding per rank and per step of the ring,
which in float16 can also overflow where the total would not.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _checks, _registry, torch_backend
from .functional import _once_differentiable


def is_dtensor(x):
    if x is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(x, DTensor)


def is_fsdp1(model):
    """Whether ``model`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


def fsdp1_tie(hidden, weight, out):
    """FSDP1, after the root's forward: check the head ``weight`` taken inside it and tie
    ``hidden`` to the model output ``out`` (whose logits have zero rows) by adding ``0``.

    FSDP1's root runs its pre-backward hook (training state, the final callback that waits for
    the gradient reductions) from a hook on its outputs; a loss built from ``hidden`` and the
    head's weight alone never reaches them, and the flat parameter's post-backward hook then
    fails. The tie costs one copy of ``hidden`` and carries no gradient."""
    if weight.dim() != 2 or weight.untyped_storage().size() == 0:
        raise ValueError(f"weight: under FSDP1 the LM head's weight was not gathered when the "
                         f"head ran (got shape {tuple(weight.shape)}); put the head in the root "
                         f"FSDP unit (do not wrap it on its own) or use FSDP2 fully_shard")
    logits = out.get("logits") if hasattr(out, "get") else out[0] if isinstance(
        out, (tuple, list)) else out
    if isinstance(logits, torch.Tensor) and logits.requires_grad and torch.is_grad_enabled():
        hidden = hidden + logits.sum().to(hidden.dtype)
    return hidden


def _full(x):
    return x.full_tensor() if is_dtensor(x) else x


def _reduce_to(grad, like):
    """Full gradient -> ``like``'s placements, averaged over its mesh (FSDP2's mean)."""
    from torch.distributed.tensor import DTensor, Partial
    mesh = like.device_mesh
    part = DTensor.from_local(grad / mesh.size(), mesh, [Partial()] * mesh.ndim, run_check=False)
    return part.redistribute(mesh, like.placements)


def vocab_range(weight, group):
    """``(start, stop, V_total)`` of this rank's rows of ``W`` in ``group`` (one all_gather)."""
    mine = torch.tensor([weight.shape[0]], dtype=torch.long, device=weight.device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    counts = torch.cat(counts).tolist()
    empty = [r for r, c in enumerate(counts) if c == 0]
    if empty:  # raised on every rank alike, after the collective every rank joined
        raise ValueError(f"weight: rank(s) {empty} of the process group hold no rows of the head; "
                         f"every rank needs at least one (rows per rank: {counts})")
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    return start, start + weight.shape[0], sum(counts)


LOCAL_IGNORE, ELSEWHERE = -1, -2  # local targets for "ignored" and "another rank's row"


def _local_targets(t, start, stop, ignore_index):
    """Global targets -> this rank's: ``t - start`` where owned, ``ELSEWHERE`` (outside
    ``[0, V_r)``) where another rank owns it, ``LOCAL_IGNORE`` for ignored tokens. Both markers
    are negative, so they never collide with a local row even when ``ignore_index`` is one."""
    own = (t >= start) & (t < stop)
    local = torch.where(own, t - start, torch.full_like(t, ELSEWHERE))
    return torch.where(t == ignore_index, torch.full_like(t, LOCAL_IGNORE), local), own


class _ShardedHead(torch.autograd.Function):
    """Token log-probs for a vocab-parallel and/or DTensor head; saves only shards and O(N)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, impl, cfg, options, return_entropy, group,
                vrange):
        w, b = _full(weight), _full(bias)
        t = targets
        if group is not None:
            t, own = _local_targets(targets, vrange[0], vrange[1], cfg["ignore_index"])
            valid = targets != cfg["ignore_index"]
            cfg = dict(cfg, ignore_index=LOCAL_IGNORE)
        logp, lse, ent = impl.forward(hidden, w, t, b, return_entropy=return_entropy, **cfg,
                                      **options)
        del w, b  # a gathered DTensor weight is freed here; the backward gathers it again
        if group is not None:

            def max_over(x):
                x = x.clone()
                dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
                return x

            def sum_over(x):
                dist.all_reduce(x, group=group)
                return x
            lse, logp, ent = torch_backend.merge_parts(lse, logp, own, ent, valid, max_over,
                                                       sum_over)
        ctx.save_for_backward(hidden, weight, bias, t, lse, logp.clone())
        ctx.impl, ctx.cfg, ctx.options, ctx.group = impl, cfg, options, group
        if ent is None:
            return logp
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, t, lse, logp = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        nothing = (None,) * 10
        if grad_logp is None or not any(needs):
            return nothing
        w, b = _full(weight), _full(bias)
        # vocab-parallel: each rank's partial dh stays float32 until the sum, rounded once
        dh, dw, db = ctx.impl.backward(hidden, w, t, b, lse, logp, grad_logp.float().contiguous(),
                                       needs_input_grad=needs, dh_float32=ctx.group is not None,
                                       **ctx.cfg, **ctx.options)
        del w, b
        if ctx.group is not None and dh is not None:
            dist.all_reduce(dh, group=ctx.group)
            dh = dh.to(hidden.dtype)
        if dw is not None and is_dtensor(weight):
            dw = _reduce_to(dw, weight)
        if db is not None and is_dtensor(bias):
            db = _reduce_to(db, bias)
        return (dh, dw, db) + nothing[3:]


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None,
                   ignore_index=-100, backend="auto", return_entropy=False, backend_options=None,
                   process_group=None):
    """``spot_kernels.token_logprobs`` for a sharded head (see the module docstring)."""
    if process_group is not None and (is_dtensor(weight) or is_dtensor(bias)):
        raise ValueError("process_group: give either a vocab-parallel local weight shard with "
                         "process_group, or a DTensor weight without it, not both")
    for name, x in (("hidden", hidden), ("targets", targets)):
        if is_dtensor(x):
            raise TypeError(f"{name} must be a plain tensor (only weight and bias may be DTensors)")
    if process_group is not None and not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised")
    if (bias is not None) and (is_dtensor(bias) != is_dtensor(weight)):
        raise TypeError("bias must be a DTensor exactly when weight is one")
    # dtype / shape / device checks on empty slices (the range check needs the global V, below)
    _checks.tensor("hidden", hidden)
    _checks.tensor("targets", targets)
    if hidden.dim() < 1 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {tuple(targets.shape)}")
    w_local = weight.to_local() if is_dtensor(weight) else weight
    b_local = bias.to_local() if is_dtensor(bias) else bias
    _checks.head(hidden.reshape(-1, hidden.shape[-1])[:0], w_local, targets.reshape(-1)[:0],
                 b_local, temperature, softcap, ignore_index, shard=True)
    if is_dtensor(weight) and weight.shape[0] == 0:  # the global shape: every rank alike
        raise ValueError("weight must have at least one row (V >= 1)")
    if is_dtensor(weight) and weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, D] = {tuple(weight.shape)} but hidden has last dim "
                         f"{hidden.shape[-1]}")
    name = _registry.resolve(backend, hidden.device)
    if name == "reference":  # under "auto" only when the environment asks for it
        source = f" (from ${_registry.ENV})" if backend == "auto" else ""
        raise ValueError(f"backend: 'reference'{source} materialises whole logits and does not "
                         f"run sharded heads; use 'torch' or a kernel backend")
    impl = _registry.module(name)
    options = _checks.options_dict(backend_options)
    impl.check_options(options)
    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).long()
    vrange = None
    if process_group is not None:
        vrange = vocab_range(weight, process_group)
        v_total = vrange[2]
    else:
        v_total = weight.shape[0]
    _checks.targets_in_vocab(t1, v_total, ignore_index)
    cfg = dict(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
               ignore_index=ignore_index)
    out = _ShardedHead.apply(h2, weight, bias, t1, impl, cfg, options, return_entropy,
                             process_group, vrange)
    if return_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)
