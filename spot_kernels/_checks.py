"""Argument checks shared by every backend: a bad call gets a ``TypeError``/``ValueError`` that
names the argument, before any kernel runs."""
from __future__ import annotations

import collections.abc
import contextlib
import math
import numbers
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# every one is read as int64 (a uint64 past 2^63 would wrap onto ignore_index)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
                 torch.uint32)


def tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


_values = threading.local()


@contextlib.contextmanager
def value_checks(enabled=True):
    """``with spot_kernels.value_checks(False):`` skips, in this thread, the checks that read
    tensor values: targets in ``[0, V)`` or ``ignore_index``, ``cu_seqlens`` from 0 to N and
    non-decreasing, labels in ``[0, 1]``. On a GPU each of them makes the host wait for the
    device once per call; a trainer that checked its batches on the host before moving them
    skips that wait. Shapes, dtypes and devices are still checked. Values are then trusted:
    a bad target gives a wrong log-prob (or, in the ``torch`` and ``reference`` backends, an
    indexing error, a device assert on a GPU), a bad ``cu_seqlens`` reads out of bounds."""
    before = getattr(_values, "on", True)
    _values.on = bool(enabled)
    try:
        yield
    finally:
        _values.on = before


def reading_values(x):
    """Whether the value checks may read ``x``: they are on in this thread (``value_checks``)
    and no CUDA graph is being captured."""
    return getattr(_values, "on", True) and not capturing(x)


def capturing(x):
    """Whether ``x``'s values cannot be read now: a CUDA graph is being captured on the current
    stream (a host read would end the capture with an error). The value checks are skipped
    then; they ran in the eager warm-up calls that capture needs first."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def targets_in_vocab(targets, v, ignore_index):
    """Targets in ``[0, V)`` or ``ignore_index`` (a host read of the device; skipped under
    ``value_checks(False)`` and while a CUDA graph is captured)."""
    if targets.numel() and reading_values(targets):
        t = targets.long()  # uint8 targets would compare with a wrapped ignore_index (-100 -> 156)
        bad = ((t < 0) | (t >= v)) & (t != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, V) = [0, {v}) or equal ignore_index "
                             f"({ignore_index}); found {t[bad][0].item()}")


def same_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         f"put them on one device")


def options_dict(options):
    """``backend_options`` as a new dict (None: empty); anything but a mapping is refused."""
    if options is None:
        return {}
    if not isinstance(options, collections.abc.Mapping):
        raise TypeError(f"backend_options must be a dict, got {type(options).__name__}")
    return dict(options)


def backend_options(backend, options, allowed, positive_ints=()):
    """Rejects keys a backend does not take, and values of ``positive_ints`` that are not ints
    > 0; each backend's ``check_options`` starts here."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"backend_options: unknown option(s) {unknown} for backend "
                         f"{backend!r}; it takes {list(allowed)}")
    for key in positive_ints:
        val = options.get(key)
        if key in options and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            raise ValueError(f"backend_options: {key} must be a positive int, got {val!r}")


def positive_number(name, x, allow_none=False):
    if x is None and allow_none:
        return
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dim() > 1:  # a [1, 1] beta would broadcast [S] rewards to [1, S]
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(x.shape)}")
        x = x.item()
    if torch.compiler.is_compiling():
        # a float that changed between calls is traced as a symbolic one, which math cannot
        # read: the type here, the value as torch._check assertions in the graph (the message's
        # closure may hold constants only: the name, not the traced value)
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat,
                                                     torch.SymInt)):
            raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
        msg = f"{name} must be a finite number > 0"
        torch._check(x > 0, lambda: msg)
        torch._check(x < math.inf, lambda: msg)
        return
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def head(hidden, weight, targets, bias, temperature, softcap, ignore_index, shard=False):
    """Checks the inputs of ``token_logprobs``; returns ``(N, D, V)``. ``shard``: ``weight`` is
    one rank's rows, which may be none (the caller checks the whole head on every rank alike:
    an error on one rank alone would leave the others waiting in a collective)."""
    tensor("hidden", hidden)
    tensor("weight", weight)
    tensor("targets", targets)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-dim tensor")
    if weight.dim() != 2:
        hint = (" (a flat FSDP1 shard? call it inside the wrapped forward, or use "
                "spot_kernels.hf.head_inputs)") if weight.dim() == 1 else ""
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}{hint}")
    if (not torch.compiler.is_compiling() and weight.numel() and weight.device.type != "meta"
            and weight.untyped_storage().nbytes() == 0):  # dynamo cannot trace storages
        raise ValueError("weight has no storage behind it (a freed FSDP1 / ZeRO-3 view used "
                         "outside the wrapped forward?)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; "
                        f"they must match")
    same_device("weight", weight, "hidden", hidden)
    v, d = weight.shape
    if v == 0 and not shard:
        raise ValueError("weight must have at least one row (V >= 1)")
    if d == 0:
        raise ValueError("weight must have at least one column (D >= 1), got [V, D] = "
                         f"{list(weight.shape)}")
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden has last dim {hidden.shape[-1]} but weight is [V, D] with "
                         f"D = {d}")
    if bias is not None:
        tensor("bias", bias)
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape [V] = [{v}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")
        same_device("bias", bias, "hidden", hidden)
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be an integer tensor of int8 to int64 or uint8 to uint32 "
                        f"(uint16: a token memmap), got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {tuple(targets.shape)}")
    same_device("targets", targets, "hidden", hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)  # a NumPy integer too
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {ignore_index}")
    positive_number("temperature", temperature)
    positive_number("softcap", softcap, allow_none=True)
    targets_in_vocab(targets, v, ignore_index)
    n = targets.numel()
    return n, d, v


def cu_seqlens(cu, n, device):
    tensor("cu_seqlens", cu)
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [S + 1] with S >= 0, got {tuple(cu.shape)}")
    if cu.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu.device} but the tokens are on {device}")
    if not reading_values(cu):
        return cu.shape[0] - 1
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if values[-1] != n:
        raise ValueError(f"cu_seqlens must end at the number of tokens N = {n}, got {values[-1]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return len(values) - 1


def sequence_inputs(token_logps, cu, valid):
    tensor("token_logps", token_logps)
    if token_logps.dim() != 1:
        raise ValueError(f"token_logps must be 1-D [N], got {tuple(token_logps.shape)}")
    if not token_logps.is_floating_point():
        raise TypeError(f"token_logps must be a float tensor, got {token_logps.dtype}")
    s = cu_seqlens(cu, token_logps.shape[0], token_logps.device)
    if valid is not None:
        tensor("valid", valid)
        if valid.shape != token_logps.shape:
            raise ValueError(f"valid must have token_logps' shape {tuple(token_logps.shape)}, "
                             f"got {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
        same_device("valid", valid, "token_logps", token_logps)
    return s


REDUCTIONS = ("pairs", "mean", "sum")


def delta_value(delta):
    # a tensor's value is not read here (that would sync the host with the device): a NaN
    # tensor gives a NaN loss, as any NaN input would
    if isinstance(delta, torch.Tensor):
        if delta.numel() != 1:
            raise ValueError(f"delta must be a number or a one-element tensor, got shape "
                             f"{tuple(delta.shape)}")
        if delta.dtype == torch.bool or delta.is_complex():  # as a Python bool is refused
            raise ValueError(f"delta must be a real number tensor, got {delta.dtype}")
    elif isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta):
        raise ValueError(f"delta must be a finite number (or, for spot_loss, a callable), "
                         f"got {delta!r}")


def bce_inputs(policy, ref, labels, beta, delta, reduction, s=None, allow_callable_delta=False):
    """Checks the BCE inputs; ``policy`` may be None when ``s`` (the sequence count) is given."""
    named = (("policy_logps", policy), ("ref_logps", ref), ("labels", labels))
    for name, x in named:
        if x is None and name == "policy_logps" and s is not None:
            continue  # spot_loss: the policy log-probs are computed after the checks
        tensor(name, x)
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D [S], got {tuple(x.shape)}")
        if name != "labels" and not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if labels.is_complex():
        raise TypeError(f"labels must be real (float, int or bool), got {labels.dtype}")
    first = "policy_logps" if policy is not None else "cu_seqlens"
    s = policy.shape[0] if policy is not None else s
    for name, x in named[1:]:
        if x.shape[0] != s:
            raise ValueError(f"{name} has {x.shape[0]} entries but {first} gives S = {s}")
        if policy is not None:
            same_device(name, x, "policy_logps", policy)
    same_device("labels", labels, "ref_logps", ref)
    positive_number("beta", beta)
    if not (callable(delta) and allow_callable_delta):
        delta_value(delta)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "pairs" and s % 2:
        raise ValueError(f"reduction='pairs' needs an even number of sequences (chosen and "
                         f"rejected), got {s}; use reduction='mean' or 'sum'")
    if s and reading_values(labels):
        lab = labels.float()
        if bool(((lab < 0) | (lab > 1) | lab.isnan()).any()):
            raise ValueError("labels must lie in [0, 1] (1 = chosen y+, 0 = rejected y-)")
    return s
