"""``torch.nn`` modules around the functional API, for trainers that compose losses as modules.

Hyper-parameters go to the constructor, tensors to ``forward``; the modules hold no parameters
(the LM-head weight stays the model's, passed in each call) and add nothing to the math of
``spot_kernels.token_logprobs`` / ``spot_kernels.spot_loss`` (README, "The math").
"""
from __future__ import annotations

import torch

from . import functional as F

__all__ = ["TokenLogprobs", "SPoTLoss"]


class TokenLogprobs(torch.nn.Module):
    """Per-token ``log p(target)`` from hidden states and an LM head, without ``[N, V]`` logits.

    Example::

        weight, bias, softcap, temperature = sk.hf.lm_head(model)  # Gemma-2 softcap, Granite...
        head_logp = sk.nn.TokenLogprobs(softcap=softcap, temperature=temperature)
        logp = head_logp(hidden, weight, targets, bias)          # float32, targets' shape
        (logp.sum() / (targets != -100).sum()).neg().backward()   # SFT-style NLL

    ``forward(hidden, weight, targets, bias=None)``; with ``return_entropy=True`` it returns
    ``(logp, entropy)``. ``process_group`` makes it vocab-parallel (``weight`` holds this rank's
    rows; see ``spot_kernels.token_logprobs``).
    """

    def __init__(self, *, temperature=1.0, softcap=None, ignore_index=-100, backend="auto",
                 return_entropy=False, backend_options=None, process_group=None):
        super().__init__()
        self.temperature, self.softcap, self.ignore_index = temperature, softcap, ignore_index
        self.backend, self.return_entropy = backend, return_entropy
        self.backend_options, self.process_group = backend_options, process_group

    def forward(self, hidden, weight, targets, bias=None):
        kw = {} if self.process_group is None else {"process_group": self.process_group}
        return F.token_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                softcap=self.softcap, ignore_index=self.ignore_index,
                                backend=self.backend, return_entropy=self.return_entropy,
                                backend_options=self.backend_options, **kw)

    def extra_repr(self):
        return (f"temperature={self.temperature}, softcap={self.softcap}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")


class SPoTLoss(torch.nn.Module):
    """SPoT's reward BCE loss straight from hidden states (``spot_kernels.spot_loss``).

    Example::

        loss_fn = sk.nn.SPoTLoss(beta=0.1, reduction="pairs")
        out = loss_fn(hidden, model.lm_head.weight, targets, cu_seqlens, ref_logps, labels,
                      delta=running_delta)     # delta may change every step
        out.loss.backward(); print(out.stats["accuracy"])

    ``forward(hidden, weight, targets, cu_seqlens, ref_logps, labels, bias=None, delta=None)``
    returns ``SpotLossOutput`` (``.loss``, ``.policy_logps``, ``.rewards``, ``.stats``).
    ``delta`` given to ``forward`` overrides the constructor's (a running shift is state of the
    trainer, not of the loss).
    """

    def __init__(self, *, beta=0.1, delta=0.0, temperature=1.0, softcap=None, ignore_index=-100,
                 average=False, reduction="pairs", backend="auto", backend_options=None,
                 process_group=None):
        super().__init__()
        self.beta, self.delta, self.temperature, self.softcap = beta, delta, temperature, softcap
        self.ignore_index, self.average, self.reduction = ignore_index, average, reduction
        self.backend, self.backend_options = backend, backend_options
        self.process_group = process_group

    def forward(self, hidden, weight, targets, cu_seqlens, ref_logps, labels, bias=None,
                delta=None):
        kw = {} if self.process_group is None else {"process_group": self.process_group}
        return F.spot_loss(hidden, weight, targets, cu_seqlens, ref_logps, labels, beta=self.beta,
                           delta=self.delta if delta is None else delta, bias=bias,
                           temperature=self.temperature, softcap=self.softcap,
                           ignore_index=self.ignore_index, average=self.average,
                           reduction=self.reduction, backend=self.backend,
                           backend_options=self.backend_options, **kw)

    def extra_repr(self):
        return (f"beta={self.beta}, delta={self.delta}, average={self.average}, "
                f"reduction={self.reduction!r}, softcap={self.softcap}")
