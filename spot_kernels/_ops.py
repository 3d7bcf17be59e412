"""``torch.library`` custom ops so ``torch.compile`` traces through the fused head without a
graph break.

Two ops, registered once at import (no CUDA or Triton touched):

* ``spot_kernels::token_logprobs_fwd(hidden [N, D], weight [V, D], targets int64 [N], bias?,
  backend, temperature, softcap?, ignore_index, return_entropy, options) -> (logp [N], lse [N],
  entropy [N] or [0])``
* ``spot_kernels::token_logprobs_bwd(hidden, weight, targets, bias?, lse, logp, grad_logp, backend,
  temperature, softcap?, ignore_index, need_h, need_w, need_b, options) -> (dh, dW, db)``, an
  empty tensor standing for a gradient that is not needed (custom ops cannot return ``None``).

Their real implementations call the chosen backend's ``forward`` / ``backward`` (the contract in
``_registry``); their fake implementations only state output shapes and dtypes (``[N]`` for the
forward: float32, ``lse`` float64; the inputs' shapes and dtypes for the backward), which is all
the compiler needs.
``register_autograd`` wires the backward op in, so compiled graphs (forward and AOT backward) hold
two opaque calls and everything around them (the loss, the sequence sums) is fused normally.

The data-dependent check "targets lie in ``[0, V)`` or equal ``ignore_index``" cannot run while
tracing (it needs the values), so the forward op performs it when it runs and raises the same
``ValueError``. Backend options travel as a JSON string (the op schema has no dict type).
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

from . import _checks, _registry, torch_backend


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo``, which
    costs seconds at ``import spot_kernels``; dynamo reads this marker when it traces (the
    compile tests fail if a torch release renames it)."""
    fn._dynamo_marked_constant = True
    return fn


_ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError, "TypeError": TypeError}


@_constant_result
def _resolve(backend, device):
    try:
        return _registry.resolve(backend, device), None
    except tuple(_ERRORS.values()) as e:
        return None, (type(e).__name__, str(e))


def resolve(backend, device):
    """The backend name, resolved once while tracing (the registry imports modules, which the
    tracer must not step into). Its error is raised here, outside the function the tracer takes
    as a constant: raised inside, it would reach the user as dynamo's internal error."""
    name, err = _resolve(backend, device)
    if err is not None:
        raise _ERRORS[err[0]](err[1])
    return name


@torch.library.custom_op("spot_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                       backend: str, temperature: float, softcap: float | None, ignore_index: int,
                       return_entropy: bool, options: str) -> tuple[Tensor, Tensor, Tensor]:
    _checks.targets_in_vocab(targets, weight.shape[0], ignore_index)
    # traced as symbolic floats (they changed between calls), these were not checked before
    _checks.positive_number("temperature", temperature)
    _checks.positive_number("softcap", softcap, allow_none=True)
    impl = _registry.module(backend)
    impl.check_options(json.loads(options))
    logp, lse, ent = impl.forward(hidden, weight, targets, bias, temperature=temperature,
                                  softcap=softcap, ignore_index=ignore_index,
                                  return_entropy=return_entropy, **json.loads(options))
    if ent is None:
        ent = logp.new_empty(0)
    return logp, lse, ent


@token_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, backend, temperature, softcap, ignore_index, return_entropy,
      options):
    n = hidden.shape[0]
    out = hidden.new_empty(n, dtype=torch.float32)
    return out, hidden.new_empty(n, dtype=torch_backend.lse_dtype(hidden.device)), hidden.new_empty(
        n if return_entropy else 0, dtype=torch.float32)


@torch.library.custom_op("spot_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                       lse: Tensor, logp: Tensor, grad_logp: Tensor, backend: str,
                       temperature: float,
                       softcap: float | None, ignore_index: int, need_h: bool, need_w: bool,
                       need_b: bool, options: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _registry.module(backend)
    # a backward run inside the caller's autocast region: the kernels compute in the inputs'
    # dtypes, as the forward (run with autocast off) did
    with torch.autocast(hidden.device.type, enabled=False):
        dh, dw, db = impl.backward(hidden, weight, targets, bias, lse, logp,
                                   grad_logp.float().contiguous(), temperature=temperature,
                                   softcap=softcap, ignore_index=ignore_index,
                                   needs_input_grad=(need_h, need_w, need_b),
                                   **json.loads(options))
    dh = hidden.new_empty(0) if dh is None else dh
    dw = weight.new_empty(0) if dw is None else dw
    db = weight.new_empty(0) if db is None else db
    return dh, dw, db


@token_logprobs_bwd.register_fake
def _(hidden, weight, targets, bias, lse, logp, grad_logp, backend, temperature, softcap,
      ignore_index, need_h, need_w, need_b, options):
    # contiguous, as every backend returns them (empty_like would keep a transposed layout)
    return (hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_b and bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, backend, temperature, softcap, ignore_index, _, options = inputs
    # the forward's logp copied: the caller may change the returned tensor in place
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[0].clone())
    ctx.mark_non_differentiable(output[1], output[2])  # lse and the entropy: statistics
    ctx.args = (backend, temperature, softcap, ignore_index)
    ctx.options = options


def _backward(ctx, grad_logp, grad_lse, grad_ent):
    hidden, weight, targets, bias, lse, logp = ctx.saved_tensors
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and bias is not None
    backend, temperature, softcap, ignore_index = ctx.args
    dh, dw, db = token_logprobs_bwd(hidden, weight, targets, bias, lse, logp, grad_logp, backend,
                                    temperature, softcap, ignore_index, need_h, need_w, need_b,
                                    ctx.options)
    return (dh if need_h else None, dw if need_w else None, None, db if need_b else None,
            None, None, None, None, None, None)


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


@_constant_result
def _dumps(items):
    return json.dumps(dict(items))


def token_logprobs(h2, weight, t1, bias, name, cfg, options, return_entropy):
    """The compiled path of ``functional.token_logprobs`` (inputs already checked and flat)."""
    logp, _, ent = token_logprobs_fwd(h2, weight, t1, bias, name, cfg["temperature"],
                                      cfg["softcap"], cfg["ignore_index"], return_entropy,
                                      _dumps(tuple(sorted(options.items()))))
    return (logp, ent) if return_entropy else logp
