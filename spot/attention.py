"""``--attn varlen``: packed attention without flash-attn and without an ``N x N`` mask.

A packed row holds several sequences that must not attend to each other. With SDPA, transformers
builds a block-diagonal ``[N, N]`` mask for it and the kernel computes every block, the
off-diagonal ones too: at 8192 tokens of 16 sequences, 16 times the attention FLOPs a varlen
kernel does. flash-attn's varlen kernel avoids both, but it is often not installed.

This attention function, registered with transformers as ``spot_varlen``, runs each sequence's
causal attention alone:

* on a GPU (sm_80 or newer) in bfloat16 / float16, with PyTorch's own flash varlen kernel
  ``torch.nn.attention.varlen.varlen_attn`` (torch 2.10 and newer): one launch per layer;
* elsewhere (CPU, float32, an older torch, attention dropout) one SDPA call per sequence, each
  causal over its own tokens only.

Sequence bounds come from the ``cu_seq_lens_q`` keyword that ``spot_kernels.hf.head_inputs``
hands a varlen kernel (made once per batch), else from ``position_ids`` restarting at 0. A 2-D
padding mask (a padded batch, no packing) or a 4-D mask (``spot_kernels.hf`` builds one for
models that ignore ``position_ids``) goes to SDPA as it is. Grouped-query heads and sliding
windows are handled; attention logit soft-capping (Gemma-2) and attention sinks are not (a
clear error: use eager). ``tests/test_spot_attention.py`` compares each path with eager
attention in float64.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "spot_varlen"  # the attn_implementation transformers sees


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """``(varlen_attn, its keyword names)`` or ``None`` on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def kernel_runs(device_index=None):
    """Whether torch's flash varlen kernel runs on this GPU (``None``: the current one): the
    function exists and a tiny call (forward and backward, bfloat16) succeeds. Checked once
    per device."""
    if _torch_varlen() is None or not torch.cuda.is_available():
        return False
    return _probe(torch.cuda.current_device() if device_index is None else device_index)


@functools.lru_cache(maxsize=None)
def _probe(device_index):
    if torch.cuda.get_device_capability(device_index)[0] < 8:
        return False
    try:
        dev = torch.device("cuda", device_index)
        q = torch.randn(8, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 3, 8], device=dev, dtype=torch.int32)
        _varlen(q, q, q, cu, 5, q.shape[-1] ** -0.5, None).sum().backward()
        torch.cuda.synchronize(dev)
    except Exception:  # no flash kernel in this build, or not for this GPU
        return False
    return True


def register():
    """Registers ``spot_varlen`` with transformers (attention function and mask function: the
    mask is none for packed rows, the 2-D padding mask for a padded batch). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def supported(model):
    """Whether ``model`` can run ``spot_varlen``: its class sends attention through
    transformers' attention interface (``_supports_attention_backend``; one that does not would
    ignore the kernel and build its own mask, blind to the packing), and it has no attention
    logit soft-capping (Gemma-2) and no attention sinks (gpt-oss)."""
    if not getattr(type(model), "_supports_attention_backend", False):
        return False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return False
    return not any(hasattr(m, "sinks") for m in model.modules())


def _varlen(q, k, v, cu, longest, scale, window):
    """torch's varlen kernel on ``[T, H, Dh]`` rows: causal, ``window`` keys back at most."""
    fn, names = _torch_varlen()
    kw = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in names:
        kw["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in names:
        kw["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kw["is_causal"] = True
    return fn(q, k, v, cu, cu, longest, longest, **kw)


def _bounds(length, kwargs, device):
    """``cu`` (int32, on ``device``) of the sequences in a single packed row, or ``None``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=device, dtype=torch.int32)
    pos = kwargs.get("position_ids")
    if pos is None or pos.shape[-1] != length:
        return None
    pos = pos.reshape(-1, length)[0].to(device)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if not starts.numel():
        return None
    edges = [torch.zeros(1, dtype=torch.long, device=device), starts,
             torch.full((1,), length, dtype=torch.long, device=device)]
    return torch.cat(edges).to(torch.int32)


def _causal(lq, lk, window, device):
    """``[lq, lk]`` bool: query ``i`` (the last ``lq`` of ``lk`` positions) sees key ``j``."""
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    return ok


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: ``query [B, Hq, L, Dh]``, ``key/value [B, Hkv, L, Dh]``
    -> ``([B, L, Hq, Dh], None)``."""
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError("attn varlen: this model uses attention logit soft-capping or sinks, "
                         "which the varlen kernels do not; use --attn eager")
    b, hq, length, dh = query.shape
    scale = dh ** -0.5 if scaling is None else float(scaling)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    window = sliding_window if sliding_window and sliding_window < key.shape[2] else None
    gqa = key.shape[1] != hq
    mask = attention_mask
    if mask is not None and mask.dim() == 2:  # padding: causal (and window) on top, self always
        keep = mask.bool()[:, None, None, :]
        if causal:
            keep = keep & _causal(length, key.shape[2], window, query.device)
        if length == key.shape[2]:  # a padded query sees itself: no empty row, no NaN
            keep = keep | torch.eye(length, dtype=torch.bool, device=query.device)
        mask = keep
    if mask is not None or not causal or b != 1 or length != key.shape[2]:
        if mask is not None and mask.dim() == 4:
            mask = mask[..., :key.shape[2]]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
            is_causal=causal and mask is None and length > 1, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    cu = _bounds(length, kwargs, query.device)
    if cu is None:
        cu = torch.tensor([0, length], dtype=torch.int32, device=query.device)
    p = dropout if module.training else 0.0
    if (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not p
            and kernel_runs(query.device.index)
            and (window is None or "window_size" in _torch_varlen()[1])):
        longest = kwargs.get("max_length_q")
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        out = _varlen(query[0].transpose(0, 1), key[0].transpose(0, 1),
                      value[0].transpose(0, 1), cu, int(longest), scale, window)
        return out.unsqueeze(0), None
    parts = []
    for a, z in zip(*[x.tolist() for x in (cu[:-1], cu[1:])]):
        q, k, v = query[:, :, a:z], key[:, :, a:z], value[:, :, a:z]
        if window is not None and z - a > window:
            m, is_causal = _causal(z - a, z - a, window, query.device), False
        else:
            m, is_causal = None, z - a > 1
        parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p,
                                                    is_causal=is_causal, scale=scale,
                                                    enable_gqa=gqa))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


varlen_attention.varlen = True  # spot_kernels.hf hands it the sequence bounds
