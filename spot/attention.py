"""``--attn varlen``: packed attention without flash-attn and without an ``N x N`` mask.

A packed row holds several sequences that must not attend to each other. With SDPA, transformers
builds a block-diagonal ``[N, N]`` mask for it and the kernel computes every block, the
off-diagonal ones too: at 8192 tokens of 16 sequences, 16 times the attention FLOPs a varlen
kernel does. flash-attn's varlen kernel avoids both, but it is often not installed.

This attention function, registered with transformers as ``spot_varlen``, runs each sequence's
causal attention alone:

* on a GPU (sm_80 or newer) in bfloat16 / float16 (the autocast dtype: under bf16 autocast
  RoPE leaves ``query``/``key`` float32, and they are cast, as transformers' flash path does),
  with PyTorch's own flash varlen kernel ``torch.nn.attention.varlen.varlen_attn`` (torch 2.10
  and newer; head dims up to 256, a multiple of 8, the same for values): one launch per layer;
* elsewhere (CPU, float32, an older torch, attention dropout, other head dims) one SDPA call
  per sequence, each causal over its own tokens only.

Sequence bounds come from the ``cu_seq_lens_q`` keyword that ``spot_kernels.hf.head_inputs``
hands a varlen kernel (made once per batch, over the rows flattened), else from
``position_ids``: a sequence starts wherever they do not continue by +1 (each row's own in a
batch of several rows; a model that keeps them from its attention gets no packing that way). A 2-D
padding mask (a padded batch, no packing) goes to SDPA combined with the causal (and window)
mask, each query seeing itself; a 4-D mask (``spot_kernels.hf`` builds one for models that
ignore ``position_ids``) goes to SDPA as it is. Grouped-query heads and sliding
windows are handled; attention logit soft-capping (Gemma-2) and attention sinks are not (a
clear error: use eager). ``tests/test_spot_attention.py`` compares each path with eager
attention in float64.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

from spot_kernels import hf

NAME = "spot_varlen"  # the attn_implementation transformers sees


class BoundsLost(ValueError):
    """A model dropped the packed sequences' bounds on their way to its attention, or built a
    mask of its own beside them; ``reason`` says which, for :func:`unsupported`."""

    def __init__(self, message, reason="its forward drops the sequence bounds"):
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """``(varlen_attn, its keyword names)`` or ``None`` on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def kernel_runs(device_index=None, window=False):
    """Whether torch's flash varlen kernel runs on this GPU (``None``: the current one), with a
    sliding window if ``window``: the function exists and a tiny bfloat16 call succeeds.
    Checked once per device, forward only with gradients off: safe to call inside a no-grad,
    inference-mode or checkpointed forward (the first attention call does)."""
    if _torch_varlen() is None or not torch.cuda.is_available():
        return False
    index = torch.cuda.current_device() if device_index is None else device_index
    return _probe(index)[1 if window else 0]


@functools.lru_cache(maxsize=None)
def _probe(device_index):
    """``(runs, runs with a window)`` on GPU ``device_index``."""
    if torch.cuda.get_device_capability(device_index)[0] < 8:
        return False, False
    dev = torch.device("cuda", device_index)
    ok = []
    for window in (None, 2):
        if window and "window_size" not in _torch_varlen()[1]:
            ok.append(False)
            continue
        try:
            with torch.no_grad():
                q = torch.randn(8, 2, 64, device=dev, dtype=torch.bfloat16)
                cu = torch.tensor([0, 3, 8], device=dev, dtype=torch.int32)
                _varlen(q, q, q, cu, 5, q.shape[-1] ** -0.5, window)
                torch.cuda.synchronize(dev)
            ok.append(True)
        except Exception as exc:  # no flash kernel in this build, or not for this GPU, or no
            ok.append(False)      # window: said once, as the slower path runs from now on
            warnings.warn(f"spot_varlen: torch's flash varlen kernel failed its probe on "
                          f"cuda:{device_index}{' with a window' if window else ''} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                          f"); such layers run one SDPA call per sequence", stacklevel=2)
    return ok[0], ok[0] and ok[1]


def register():
    """Registers ``spot_varlen`` with transformers (attention function and mask function: the
    mask is none for packed rows, the 2-D padding mask for a padded batch). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def supported(model):
    """Whether ``model`` can run ``spot_varlen`` (``unsupported`` says why not)."""
    return unsupported(model) is None


def unsupported(model):
    """Why ``model`` cannot run ``spot_varlen``, or ``None`` when it can: its class must send
    attention through transformers' attention interface (``_supports_attention_backend``; one
    that does not would ignore the kernel and build its own mask, blind to the packing), have no
    attention logit soft-capping (Gemma-2), chunked attention (Llama-4), attention sinks
    (gpt-oss) or sliding window that only its mask carries (PhiMoE), and pass the sequence
    bounds on to its attention without building a mask of its own (one tiny forward tells; some
    models drop their ``**kwargs``, many of transformers before 5.2 build their own mask).
    ``model`` must have ``spot_varlen`` as its attention."""
    if not getattr(type(model), "_supports_attention_backend", False):
        return "its own attention code"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "attention soft-capping"
    if getattr(text, "attention_chunk_size", None) is not None:
        return "chunked attention"
    if any(hasattr(m, "sinks") for m in model.modules()):
        return "attention sinks"
    if _window_in_mask_only(model, text):
        return "a sliding window only its mask has"
    return _bounds_lost(model)


def _bounds_lost(model):
    """``None`` where the model hands the sequence bounds its ``forward`` is given on to its
    attention, and no mask of its own with them (one no-grad forward of two 2-token sequences
    packed in a row), else why not. A model whose ``forward`` takes no ``**kwargs`` gets
    ``spot_kernels.hf``'s 4-D mask instead: it needs none."""
    if not hf._takes_kwargs(model):
        return None
    dev = next(model.parameters()).device
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=dev)
    try:
        with torch.no_grad(), hf.bounds_sent(True):
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=dev),
                  position_ids=torch.tensor([[0, 1, 0, 1]], device=dev), use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2)
    except BoundsLost as exc:
        return exc.reason
    return None


def _window_in_mask_only(model, text):
    """Whether the model has a sliding window that reaches attention only through its mask
    (PhiMoE, Doge, Qwen2-MoE with windows: their attention modules do not pass
    ``sliding_window=``), which the varlen path, having no mask, would drop."""
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    active = "sliding_attention" in layer_types or (
        window is not None and getattr(text, "use_sliding_window", True) is not False)
    if not active:
        return False
    # the text decoder's own modules: a vision tower's attention (Gemma-3's SigLIP) has no
    # window to pass
    try:
        decoder = model.get_decoder() or model
    except (AttributeError, NotImplementedError, ValueError):
        decoder = model
    for cls in {type(m) for m in decoder.modules()}:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if "attention_interface" in src and "sliding_window=" not in src:
            return True
    return False


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
    if "window_size" in names:  # a tuple: torch 2.11 tells causal by ``== (-1, 0)``
        kw["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kw["is_causal"] = True
    return fn(q, k, v, cu, cu, longest, longest, **kw)


def _bounds(b, length, kwargs, device):
    """The varlen keywords (``cu_seq_lens_q``, ``max_length_q``) over ``b`` rows flattened:
    those given, else from ``position_ids`` (``spot_kernels.hf``'s segments: a sequence starts
    where they do not continue by +1), else one sequence a row."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return {k: kwargs.get(k) for k in ("cu_seq_lens_q", "max_length_q")}
    pos = kwargs.get("position_ids")
    if pos is None or pos.numel() % length:
        seg = torch.zeros(b, length, dtype=torch.long, device=device)
    else:
        seg = hf._segment_ids(pos.reshape(-1, length).to(device).expand(b, -1))
    return hf._flash_varlen(seg)


def _causal(lq, lk, window, device):
    """``[lq, lk]`` bool: query ``i`` (the last ``lq`` of ``lk`` positions) sees key ``j``."""
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    return ok


def _sdpa(query, key, value, mask, p, causal, scale):
    """SDPA, grouped-query heads given to it only without a mask (on CUDA, GQA with a mask runs
    the math kernel, with float32 ``L x L`` intermediates: repeat the heads instead)."""
    gqa = key.shape[1] != query.shape[1]
    if gqa and mask is not None:
        rep = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p,
                                          is_causal=causal, scale=scale, enable_gqa=gqa)


def _half(query, key, value):
    """The half dtype the flash kernel runs in, or ``None``: autocast's (under bf16 autocast
    with float32 weights, RoPE leaves ``query``/``key`` float32 and ``value`` bf16), else the
    inputs' own when they are all one half dtype."""
    if torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    else:
        dt = query.dtype if key.dtype == value.dtype == query.dtype else None
    return dt if dt in (torch.float16, torch.bfloat16) else None


def _backward_needed(*xs):
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: ``query [B, Hq, L, Dh]``, ``key/value [B, Hkv, L, Dh]``
    -> ``([B, L, Hq, Dh], None)``."""
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError("attn varlen: this model uses attention logit soft-capping or sinks, "
                         "which the varlen kernels do not; use --attn eager")
    if kwargs.get("cu_seq_lens_q") is None and hf.varlen_bounds_sent():
        raise BoundsLost(f"attn varlen: {type(module).__name__} does not pass the sequence bounds "
                         f"its model was given on to its attention (it drops **kwargs), so "
                         f"packed sequences would attend to each other; use --attn sdpa")
    if attention_mask is not None and hf.varlen_bounds_sent():
        # given the bounds, a model that takes its mask from transformers' mask interface gets
        # none; one that builds its own (many of transformers before 5.2) makes it causal
        # across the whole row
        raise BoundsLost(f"attn varlen: {type(module).__name__} builds an attention mask of its "
                         f"own, blind to the packed sequences, so they would attend to each "
                         f"other; use --attn sdpa", reason="it builds its own attention mask")
    b, hq, length, dh = query.shape
    lk = key.shape[2]
    if not length:
        return query.new_empty(b, 0, hq, value.shape[-1]), None
    scale = dh ** -0.5 if scaling is None else float(scaling)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = sliding_window if sliding_window and sliding_window < lk else None
    p = dropout if module.training else 0.0
    mask = attention_mask
    if mask is not None and mask.dim() == 2:  # padding: causal (and window) on top, self always
        keep = mask.bool()[:, None, None, :]
        if causal:
            keep = keep & _causal(length, lk, window, query.device)
        if length == lk:  # a padded query sees itself: no empty row, no NaN
            keep = keep | torch.eye(length, dtype=torch.bool, device=query.device)
        mask = keep
    if mask is None and causal and length != lk:  # queries after a cache: aligned to the end
        mask = _causal(length, lk, window, query.device)
    if mask is not None or length != lk:
        if mask is not None and mask.dim() == 4:
            mask = mask[..., :lk]
        out = _sdpa(query, key, value, mask, p, causal and mask is None and length > 1, scale)
        return out.transpose(1, 2).contiguous(), None
    bounds = _bounds(b, length, kwargs, query.device)
    if b > 1:  # the rows flattened into one, as the bounds count them
        flat = [x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[-1])
                for x in (query, key, value)]
        out, _ = varlen_attention(module, *flat, None, scaling=scale, dropout=dropout,
                                  sliding_window=sliding_window, is_causal=causal, **bounds)
        return out.reshape(b, length, hq, -1), None
    cu = bounds["cu_seq_lens_q"].to(device=query.device, dtype=torch.int32)
    if window is not None and isinstance(bounds.get("max_length_q"), int) \
            and bounds["max_length_q"] <= window:
        window = None  # no sequence reaches it (a kernel without windows can still run)
    half = _half(query, key, value) if query.is_cuda else None
    if (causal and half is not None and not p and value.shape[-1] == dh and dh <= 256
            and dh % 8 == 0
            and kernel_runs(query.device.index, window=window is not None)
            and not (dh > 192 and _backward_needed(query, key, value)
                     and torch.cuda.get_device_capability(query.device) not in ((8, 0), (9, 0)))):
        # (flash's backward for head dims over 192 runs on sm_80 and sm_90 only)
        longest = bounds["max_length_q"]
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        q, k, v = (x[0].transpose(0, 1).to(half) for x in (query, key, value))
        return _varlen(q, k, v, cu, int(longest), scale, window).unsqueeze(0), None
    parts = []
    for a, z in zip(*[x.tolist() for x in (cu[:-1], cu[1:])]):
        q, k, v = query[:, :, a:z], key[:, :, a:z], value[:, :, a:z]
        # a layer that is not causal (given is_causal=False) still sees its own sequence only
        if causal and window is not None and z - a > window:
            m, is_causal = _causal(z - a, z - a, window, query.device), False
        else:
            m, is_causal = None, causal and z - a > 1
        parts.append(_sdpa(q, k, v, m, p, is_causal, scale))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


varlen_attention.varlen = True  # spot_kernels.hf hands it the sequence bounds
