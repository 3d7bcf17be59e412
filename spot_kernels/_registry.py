"""Backend registry: which backends exist, which run on a device, and why not.

A backend module exposes ``available(device) -> (bool, reason)``, ``check_options(dict)``,
``forward(hidden, weight, targets, bias, *, temperature, softcap, ignore_index,
return_entropy, **options) -> (logp, lse, entropy | None)`` and ``backward(hidden, weight,
targets, bias, lse, logp, grad_logp, *, temperature, softcap, ignore_index, needs_input_grad,
dh_float32=False, **options) -> (dh, dW, db)`` (``dh_float32``: ``dh`` unrounded in float32,
for a vocab-parallel head to sum its shards' parts before rounding). ``hidden`` arrives 2-D
``[N, D]`` and ``targets`` int64 ``[N]``; ``logp`` and the entropy are float32 and ``lse`` is
float64 (``m + log s`` unrounded: the backward's ``p = e^(z - lse)`` keeps float32 precision
near the max, ``torch_backend.split_lse``).
The backward gets the forward's ``lse`` and ``logp``; the target column's ``1 - p_t`` comes from
``logp`` (``torch_backend.target_complement``), not from the recomputed logits.
``reference`` is special: it runs ``spot_kernels.reference`` under plain autograd.

Modules are imported lazily: importing ``spot_kernels`` never touches CUDA, Triton or the
compiled extension.
"""
from __future__ import annotations

import importlib
import os

import torch

NAMES = ("triton", "cuda", "torch", "reference")
_MODULES = {"triton": "spot_kernels.triton", "cuda": "spot_kernels.cuda",
            "torch": "spot_kernels.torch_backend"}
ENV = "SPOT_KERNELS_BACKEND"


def module(name):
    return importlib.import_module(_MODULES[name])


def availability(name, device):
    """``(True, "")`` or ``(False, why)`` for backend ``name`` on ``device``."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if name == "reference":
        return True, ""
    try:
        mod = module(name)
    except ImportError as exc:  # a backend whose dependency is missing
        return False, f"cannot import {_MODULES[name]}: {exc}"
    if not hasattr(mod, "available"):
        return False, f"{_MODULES[name]} does not implement a backend"
    return mod.available(torch.device(device))


def available_backends(device=None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [n for n in NAMES if availability(n, device)[0]]


def resolve(backend, device):
    """The backend name to run: ``auto`` becomes the fastest available for ``device``."""
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV, "auto") or "auto"
        source = f" (from ${ENV})" if backend != "auto" else ""
    if backend == "auto":
        if torch.device(device).type == "cpu":
            return "torch"  # Triton on CPU is only its (slow) interpreter
        found = next((n for n in NAMES if availability(n, device)[0]), None)
        if found is None:
            raise RuntimeError(f"no backend is available on {device}: "
                               f"{availability('reference', device)[1]}")
        return found
    if backend not in NAMES:
        raise ValueError(f"backend{source} must be 'auto' or one of {list(NAMES)}, "
                         f"got {backend!r}")
    ok, why = availability(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r}{source} is not available on {device}: {why}")
    return backend
