"""The public functions: argument checks, backend dispatch and thin autograd Functions.

No math lives here: the backends (``torch_backend``, ``triton``, ``cuda``) hold the kernels,
``losses`` the O(N) sequence sums and the BCE loss, ``reference`` the ground truth.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _checks, _ops, _registry, losses, reference


class _NoSecondDerivative(torch.autograd.Function):
    """Passes the fused backward's gradients through, attached to what they depend on (the
    saved inputs and the incoming gradient); differentiating them raises."""

    @staticmethod
    def forward(ctx, n, *tensors):  # tensors[:n]: the gradients; the rest: their inputs
        return tuple(g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("spot_kernels: token_logprobs has no second derivative (its backward "
                           "is a fused kernel); differentiate its gradient with "
                           "backend='reference' instead (through token_logprobs: "
                           "sequence_logprobs and spot_loss sum with torch.segment_reduce, "
                           "which has none either)")


def _once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` for the fused heads, stricter: under
    ``create_graph=True`` the gradients are nodes of the graph that depend on the saved inputs
    (``hidden``, ``weight``, ``bias``) and the incoming gradient, and whose derivative raises,
    so a gradient penalty through the head fails loudly whether it is reached by
    ``backward()`` or by ``autograd.grad(..., inputs)``, instead of seeing a constant."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # autocast off: a backward run inside the caller's autocast region computes in the
        # inputs' dtypes, as the forward (run with autocast off) did
        kind = ctx.saved_tensors[0].device.type
        with torch.no_grad(), torch.autocast(kind, enabled=False):
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # create_graph=False: the usual case
            return out
        deps = [x for x in (*ctx.saved_tensors, *grads)
                if isinstance(x, torch.Tensor) and x.requires_grad]
        live = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
        if not deps or not live:
            return out
        wrapped = _NoSecondDerivative.apply(len(live), *(out[i] for i in live), *deps)
        out = list(out)
        for i, g in zip(live, wrapped):
            out[i] = g
        return tuple(out)
    return wrapper


class _TokenLogprobs(torch.autograd.Function):
    """``logp = f(hidden, weight, bias)``; saves only the inputs, ``lse`` and a copy of ``logp``
    (O(N): the backward's target column, ``torch_backend.target_complement``; a copy, so that
    the caller may change the returned tensor in place)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, impl, cfg, options, return_entropy):
        logp, lse, entropy = impl.forward(hidden, weight, targets, bias,
                                          return_entropy=return_entropy, **cfg, **options)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, logp.clone())
        ctx.impl, ctx.cfg, ctx.options = impl, cfg, options
        if entropy is None:
            return logp
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, targets, lse, logp = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None or not any(needs):
            return (None,) * 8
        dh, dw, db = ctx.impl.backward(hidden, weight, targets, bias, lse, logp,
                                       grad_logp.float().contiguous(),
                                       needs_input_grad=needs, **ctx.cfg, **ctx.options)
        return dh, dw, db, None, None, None, None, None


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None,
                   ignore_index=-100, backend="auto", return_entropy=False,
                   backend_options=None, process_group=None):
    """Per-token ``log p(target)`` of ``softcap(hidden @ weight.T + bias) / temperature``.

    ``hidden`` is ``[..., D]``, ``weight`` ``[V, D]`` (same dtype), ``targets`` has hidden's
    leading shape; ``ignore_index`` tokens give 0. Returns float32 with targets' shape; with
    ``return_entropy=True`` returns ``(logp, entropy)``, the entropy detached (a statistic, no
    gradient). Gradients flow to ``hidden``, ``weight`` and ``bias``. ``backend_options`` is a
    dict of backend-specific settings (chunk sizes, ``filter_eps``, ...) documented in each
    backend's module; an unknown key is an error.

    Sharded heads (``spot_kernels.distributed``): with ``process_group`` the head is
    vocab-parallel, ``weight``/``bias`` hold this rank's rows ``[start, stop)`` (ranks in order,
    uneven splits allowed), ``hidden`` and the global ``targets`` are the same on every rank, and
    every rank gets the full log-probs; ``dh`` is all-reduced in the backward. A ``DTensor``
    ``weight`` (FSDP2) is gathered for the call and its gradient returned sharded.

    Under ``torch.autocast`` (for the inputs' device type) the head runs as ``F.linear`` would
    there: ``hidden``, ``weight`` and ``bias`` are cast to the autocast dtype (differentiably, so
    float32 master weights get float32 gradients), and the result is exactly that of the same
    call on the cast inputs outside autocast. Outputs stay float32.
    """
    cast = _autocast_dtype(hidden)
    if cast is not None:
        hidden, weight, bias = (x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point()
                                else x for x in (hidden, weight, bias))
        with torch.autocast(hidden.device.type, enabled=False):
            return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                  softcap=softcap, ignore_index=ignore_index, backend=backend,
                                  return_entropy=return_entropy, backend_options=backend_options,
                                  process_group=process_group)
    if process_group is not None or _sharded(weight) or _sharded(bias):
        from . import distributed
        return distributed.token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
            ignore_index=ignore_index, backend=backend, return_entropy=return_entropy,
            backend_options=backend_options, process_group=process_group)
    if torch.compiler.is_compiling():
        return _compiled_token_logprobs(hidden, weight, targets, bias, temperature, softcap,
                                        ignore_index, backend, return_entropy, backend_options)
    _checks.head(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    name = _registry.resolve(backend, hidden.device)
    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).long()
    if name == "reference":
        if backend_options:
            raise ValueError("backend_options: backend 'reference' takes no options")
        out = reference.token_logprobs(h2, weight, t1, bias, temperature=temperature,
                                       softcap=softcap, ignore_index=ignore_index,
                                       return_entropy=return_entropy)
        if return_entropy:
            return out[0].reshape(shape), out[1].detach().reshape(shape)
        return out.reshape(shape)
    impl = _registry.module(name)
    options = _checks.options_dict(backend_options)
    impl.check_options(options)
    cfg = dict(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
               ignore_index=ignore_index)
    out = _TokenLogprobs.apply(h2, weight, bias, t1, impl, cfg, options, return_entropy)
    if return_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def _compiled_token_logprobs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                             backend, return_entropy, backend_options):
    """``token_logprobs`` while ``torch.compile`` traces: the same checks, except the range check
    on the targets' values, which the custom op (``_ops``) runs when it executes; the backend
    runs as an opaque custom op with a fake implementation, so the graph does not break."""
    _checks.tensor("hidden", hidden)
    _checks.tensor("targets", targets)
    if hidden.dim() < 1 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {tuple(targets.shape)}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    # (a temperature or softcap that changes between calls is symbolic here: _checks asserts
    # it in the graph, and the custom op checks it again when it runs)
    _checks.head(h2[:0], weight, t1[:0], bias, temperature, softcap, ignore_index)
    name = _ops.resolve(backend, str(hidden.device))
    if name == "reference":  # plain autograd: traced as it is
        if backend_options:
            raise ValueError("backend_options: backend 'reference' takes no options")
        out = reference.token_logprobs(h2, weight, t1.long(), bias, temperature=temperature,
                                       softcap=softcap, ignore_index=ignore_index,
                                       return_entropy=return_entropy)
        if return_entropy:
            return out[0].reshape(targets.shape), out[1].detach().reshape(targets.shape)
        return out.reshape(targets.shape)
    options = _checks.options_dict(backend_options)
    cfg = dict(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
               ignore_index=ignore_index)
    out = _ops.token_logprobs(h2, weight, t1.long(), bias, name, cfg, options, return_entropy)
    if return_entropy:
        return out[0].reshape(targets.shape), out[1].reshape(targets.shape)
    return out.reshape(targets.shape)


def _autocast_dtype(hidden):
    """The autocast dtype in force for ``hidden``'s device type, or None (autocast off, or
    arguments that the checks will reject: autocast leaves float64 alone, so float64 reaches
    the dtype check rather than being rounded to half precision)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _checks.FLOAT_DTYPES:
        return None
    kind = hidden.device.type
    try:
        on = torch.is_autocast_enabled(kind)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(kind) if on else None


def _sharded(x):
    """A ``DTensor`` (FSDP2 / tensor-parallel parameter): routed to ``spot_kernels.distributed``."""
    return x is not None and type(x).__name__ == "DTensor" and hasattr(x, "device_mesh")


def sequence_logprobs(token_logps, cu_seqlens, *, valid=None, average=False):
    """Per-sequence sums of ``token_logps [N]`` over ``cu_seqlens [S + 1]`` -> float32 ``[S]``.

    ``valid`` (bool ``[N]``) marks the tokens that count; ``None`` counts every token.
    ``average=True`` divides by the number of counted tokens (0 for a sequence with none).
    """
    _checks.sequence_inputs(token_logps, cu_seqlens, valid)
    return losses.sequence_logprobs(token_logps, cu_seqlens, valid, average)


def bce_reward_loss(policy_logps, ref_logps, labels, *, beta=0.1, delta=0.0, reduction="pairs"):
    """SPoT's reward BCE over sequences; returns ``(loss, stats)``.

    ``u = beta (policy - ref) - delta``; ``loss = sum_s [y softplus(-u) + (1-y) softplus(u)] / K``
    with ``K = S/2`` (``"pairs"``), ``S`` (``"mean"``) or 1 (``"sum"``). ``stats`` holds detached
    tensors (no host sync): ``rewards`` ``[S]`` = ``beta (policy - ref)``, ``reward_mean`` (the
    batch mean that updates a running ``delta``), ``rewards_chosen``, ``rewards_rejected``,
    ``accuracy`` and ``margin`` (the i-th chosen sequence paired with the i-th rejected one),
    ``logps_chosen``, ``logps_rejected`` and ``saturated`` (fraction of sigmoids outside
    [0.01, 0.99]). A label >= 0.5 counts as chosen.
    """
    _checks.bce_inputs(policy_logps, ref_logps, labels, beta, delta, reduction)
    return losses.bce_reward_loss(policy_logps, ref_logps, labels, beta, delta, reduction)


@dataclass
class SpotLossOutput:
    """What ``spot_loss`` returns: the scalar ``loss`` (differentiable), per-sequence
    ``policy_logps`` and ``rewards`` ``[S]``, the ``stats`` dict of ``bce_reward_loss``."""
    loss: torch.Tensor
    policy_logps: torch.Tensor
    rewards: torch.Tensor
    stats: dict


def spot_loss(hidden, weight, targets, cu_seqlens, ref_logps, labels, *, beta=0.1, delta=0.0,
              bias=None, temperature=1.0, softcap=None, ignore_index=-100, average=False,
              reduction="pairs", backend="auto", backend_options=None, process_group=None):
    """The fused SPoT loss from hidden states: ``token_logprobs -> sequence_logprobs ->
    bce_reward_loss`` without ever holding ``[N, V]`` logits. ``hidden`` is ``[N, D]`` (or
    ``[1, N, D]``) of packed sequences delimited by ``cu_seqlens``. ``process_group``: a
    vocab-parallel head, as in ``token_logprobs`` (every rank computes the same loss).

    ``delta`` may be a callable instead of a number: it is called once the policy log-probs
    exist with the batch-mean reward ``mean_s beta (pi_s - rho_s)`` (a detached 0-dim float32
    tensor) and returns the ``delta`` to use. That is how a running estimate (TRL's
    ``RunningMoments`` for ``bco_pair``, up to TRL 0.28) is updated with the current batch
    before the loss. A batch of no sequences does not call it (so a callable that runs a
    collective must not meet an empty batch on one rank only)."""
    _checks.tensor("hidden", hidden)
    _checks.tensor("targets", targets)
    s = _checks.cu_seqlens(cu_seqlens, targets.numel(), hidden.device)
    for name, x in (("ref_logps", ref_logps), ("labels", labels)):
        if isinstance(x, torch.Tensor):
            _checks.same_device(name, x, "hidden", hidden)
    _checks.bce_inputs(None, ref_logps, labels, beta, delta, reduction, s=s,
                       allow_callable_delta=True)
    logp = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                          softcap=softcap, ignore_index=ignore_index, backend=backend,
                          backend_options=backend_options,
                          process_group=process_group).reshape(-1)
    valid = targets.reshape(-1).long() != ignore_index  # long: uint8 would wrap ignore_index
    tail = _tail(backend, hidden.device)
    policy = tail.sequence_logprobs(logp, cu_seqlens, valid, average)
    if callable(delta) and s == 0:
        delta = 0.0  # no sequences: no batch mean to update a running estimate with (not NaN)
    elif callable(delta):
        delta = delta((beta * (policy.detach() - ref_logps.detach().float())).mean())
        _checks.delta_value(delta)
    loss, stats = tail.bce_reward_loss(policy, ref_logps, labels, beta, delta, reduction)
    return SpotLossOutput(loss, policy, stats["rewards"], stats)


def _tail(backend, device):
    """Who computes ``spot_loss``'s O(N + S) part: the CUDA kernels (``cuda.segment_sums``,
    ``cuda.bce_forward``) when the ``cuda`` backend runs eagerly, else plain torch (which
    ``torch.compile`` fuses)."""
    if torch.compiler.is_compiling() or _registry.resolve(backend, device) != "cuda":
        return losses
    from . import cuda
    return cuda
