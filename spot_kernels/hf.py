"""Hugging Face ``transformers`` causal LMs without their logits.

A causal LM is ``logits = head(body(input_ids))``. Every fused call in this package wants the
body's last hidden states and the head's parameters instead of the logits, so this module runs
the model with its head cut out (the head's input is taken by a forward pre-hook and the head
projects an empty slice) and hands back what the head would have used::

    from spot_kernels import hf
    hi = hf.head_inputs(model, input_ids, attention_mask=mask)     # padded batch
    hi = hf.head_inputs(model, packed_ids, cu_seqlens=cu)          # packed: [1, N] or [N]
    hi.hidden   # [B, L, D] after the final norm      hi.weight  # [V, D]   hi.bias  # [V] | None
    hi.softcap  # the final-logit softcap (Gemma 2/3/4, RecurrentGemma, xLSTM) or None
    hi.temperature  # 1, or what the model divides its logits by (Granite, Cohere, Falcon-H1)
    logp = sk.token_logprobs(hi.hidden, hi.weight, targets, **hi.head_kwargs())

    lp = hf.completion_logprobs(model, input_ids, attention_mask=mask, prompt_lengths=plen)  # [B]

``head_inputs(model, input_ids=None, *, attention_mask=None, position_ids=None, cu_seqlens=None,
inputs_embeds=None, **model_kwargs) -> HeadInputs(hidden, weight, bias, softcap, temperature)``

``next_token_targets(input_ids, *, attention_mask=None, completion_mask=None, prompt_lengths=None,
position_ids=None, cu_seqlens=None, ignore_index=-100) -> targets`` (``input_ids``' shape) for
``token_logprobs(hidden, weight, targets)`` / ``spot_loss``: the next token where it is scored.

``completion_logprobs(model, input_ids, *, attention_mask=None, completion_mask=None,
prompt_lengths=None, position_ids=None, cu_seqlens=None, average=False, backend="auto",
backend_options=None) -> Tensor [S]`` with ``S`` = rows (padded) or packed sequences.

``check_logits(model, input_ids, *, atol=None, vocab_chunk=8192, **model_kwargs) -> float``: the
head as read here against the model's own logits on one short batch (``ValueError`` when they
differ).

Logits: what a model does to them after its head must be a softcap and/or a scale the fused
head expresses (``logits = softcap(hidden @ weight.T + bias) / temperature``): the softcaps
``final_logit_softcapping``, ``logits_soft_cap`` (RecurrentGemma), ``output_logit_soft_cap``
(xLSTM); the scales ``logits_scaling`` (Granite divides, HyperCLOVAX multiplies), ``logit_scale``
(Cohere) and Falcon-H1's ``lm_head_multiplier``; Inkling's cut to ``unpadded_vocab_size`` (the
head's weight is sliced). What happens before the head (MiniCPM3's ``logits_scaling``, MuP
multipliers, final norms) is in ``hidden`` already. A composite (multimodal) model keeps these
fields in its text config but applies only what its own ``forward`` does: LLaVA-style models
(LLaVA-NeXT with a Granite text config) apply none of them; Gemma 3n/4, Mistral Large 4 and
PaliGemma (since transformers 5.23) the softcap, Granite-Docling and Granite 4 Vision the
``logits_scaling`` (HyperCLOVAX-Vision multiplies), Cohere Compass and Aya Vision (since 5.25)
the ``logit_scale``, Inkling the cut (``_COMPOSITE_LOGIT_FIELDS``); one that wraps a whole
causal LM (BLIP-2's ``language_model``) gets that LM's own. ``lm_head`` raises ``ValueError``
naming the model for what the fused head does not express: a head with parameters besides
``weight`` and ``bias`` (Dory's learned per-token logit scale), a scale before a softcap
(``output_multiplier``, MuseSpark / MuseGlimmer), a softcap and a scale together, or Inkling's
cut of a sharded (DTensor, FSDP2) head's weight (the slice would gather the whole head and keep
it until the backward); ``head_inputs`` raises it, after the body, for a head that does not see
one hidden state per token (ProphetNet's n-gram streams). A family not listed here may transform
its logits in its own ``forward``: ``check_logits(model, input_ids)`` compares the fused head
with its own logits once (``spot train`` does, at start).

Batches
-------
* **Padded** ``[B, L]`` with ``attention_mask`` (left or right padding). Without ``position_ids``
  the positions are ``cumsum(mask) - 1``, so a left-padded row sees the same positions as the
  sequence run alone; given ``position_ids``, what they hold at padding does not matter.
  RoBERTa-style models count positions from ``pad_token_id + 1``: the derived positions are
  shifted to match (``position_ids`` you give go to the model as they are). Models that ignore
  ``position_ids`` (positions counted from the first column: the BART-style decoders, TrOCR,
  BLT) and recurrent ones (RWKV, xLSTM) would see a left-padded row differently: a one-time
  probe (``padding_moves``) finds them, and a batch with padding before a row's tokens runs with
  each row's tokens moved to its start (right-padded), the hidden states put back in place.
* **Packed** several sequences per row, delimited by ``cu_seqlens`` (``[S + 1]``, flash-attn
  convention, for a single row ``[1, N]`` or ``[N]``) or by ``position_ids`` restarting at each
  sequence. Packed sequences never attend to each other:
  - flash-attention (``attn_implementation="flash_attention_2/3"``): transformers runs the varlen
    kernel; this module hands it ``cu_seq_lens_q/k`` and ``max_length_q/k`` made once per batch
    (else it derives them from ``position_ids`` in every layer, two device synchronisations each);
    so it does to a registered attention function marked ``varlen = True`` (``spot.attention``,
    torch's own varlen kernel), except for the models below that build their own mask and
    models whose ``forward`` takes no ``**kwargs``. The bounds cover every row, flattened in
    order; with an ``attention_mask`` a row's leading padding is a sequence of its own (other
    padding follows its sequence's tokens, which causal attention never lets them see), and the
    mask is dropped;
  - SDPA / eager / flex with a transformers that detects packing from ``position_ids``
    (``masking_utils.find_packed_sequence_indices``, from 5.2 in every model): it builds the
    block-diagonal causal mask itself (sliding windows included), except for models that build
    their mask without ``position_ids`` (OPT, MPT, XGLM, BioGPT: this module's mask below; Bloom,
    whose ALiBi comes from the 2-D mask: packing raises ``ValueError``; other such models would
    leak across packed sequences: check a new architecture against its sequences run alone);
  - transformers before 5.2 (4.57, 5.0, 5.1), many of whose models build their masks in their
    own ways (blind to ``position_ids``; MPT and XGLM read a 4-D mask as ones and zeros, RoBERTa
    takes none; GPT-J's and OLMoE's flash paths get neither the bounds nor the positions): the
    packed batch runs as a right-padded one, a sequence a row, under every kernel but a
    registered varlen one that the model declares it sends its attention to
    (``_supports_attention_backend``; the kernel still gets the bounds, and refuses a model that
    builds a mask of its own beside them), and the hidden states go back to their packed places
    (zeros at padding). Each sequence then sees what it sees alone; the padding to the longest
    costs compute;
  - otherwise (SDPA / eager / flex where transformers would not detect the packing, or packing
    *and* an ``attention_mask`` in one call; a varlen kernel the model cannot hand bounds to)
    this module builds a 4-D additive block-diagonal causal mask ``[B, 1, L, L]`` (``0`` where a
    query may see a key, the dtype's minimum elsewhere; every query sees itself, so no row is
    empty and padding never makes NaNs). A sliding window shorter than the longest sequence
    cannot be expressed in that single mask and raises ``ValueError``.

Models whose layers carry state along the row (linear attention, state-space and recurrent
layers of hybrids) leak across packed sequences whatever the mask says; :func:`packing_leaks`
probes each model once and :func:`head_inputs` runs their packed batches as padded ones. A
model whose hidden state at a position changes with the tokens after it (:func:`sees_ahead`:
transformers' CPM-Ant, BERT-style heads built without ``is_decoder``) is not a causal LM, and
:func:`head_inputs` refuses it with ``ValueError``.

Shifting: the hidden state at token ``i`` predicts token ``i + 1``. ``completion_logprobs``
scores token ``i + 1`` from hidden ``i`` only when both are in the same sequence, both are
attended (``attention_mask``: padding predicts nothing) and token ``i + 1`` is a completion token
(``completion_mask`` or position ``>= prompt_lengths``). Only those rows of the hidden states go through the fused head, so prompt
tokens cost no head FLOPs at all. Gradients flow to the model's parameters as usual.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
import weakref
from dataclasses import dataclass

import torch

from . import distributed as _distributed
from . import functional as F
from . import reference as _reference

__all__ = ["HeadInputs", "head_inputs", "completion_logprobs", "next_token_targets", "lm_head",
           "check_logits", "packing_leaks", "sees_ahead"]


@dataclass
class HeadInputs:
    """What the LM head would consume:
    ``logits = softcap(hidden @ weight.T + bias) / temperature``."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    temperature: float = 1.0

    def head_kwargs(self):
        """``bias``, ``softcap`` and ``temperature`` as keyword arguments of ``token_logprobs``
        and ``spot_loss``."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature)


def _unwrap(model):
    """The ``PreTrainedModel`` under PEFT / DDP-style wrappers."""
    for _ in range(4):
        if hasattr(model, "get_output_embeddings") and hasattr(model, "config"):
            return model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    raise TypeError(f"model must be a transformers causal LM (PreTrainedModel with an LM head), "
                    f"got {type(model).__name__}")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# the config fields of a final-logit softcap: Gemma 2/3/4 and most, RecurrentGemma, xLSTM
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# same-named fields that do not act on the logits, by the model's type: MiniCPM3 divides the
# hidden states by its ``logits_scaling`` before the head (so it is already in ``hidden``);
# transformers' MPT never applies its config's ``logit_scale``
_NOT_ON_LOGITS = {"minicpm3": "logits_scaling", "mpt": "logit_scale"}
# models that multiply their logits by the ``logits_scaling`` that Granite divides them by
_MULTIPLY_SCALING = {"hyperclovax", "hyperclovax_vision_v2"}
# A composite (multimodal) model whose forward calls the LM head itself applies only what that
# forward does, whatever its text config holds (LLaVA-NeXT with a Granite text config never
# applies logits_scaling; Gemma 3's image-text model never its text config's softcap). These are
# the composites of transformers 5.x that apply fields of their text config, and which fields
# (checked one by one against each model's own logits in 5.24, and in the sources of 5.0 to
# 5.25); every other composite applies none.
_COMPOSITE_LOGIT_FIELDS = {
    **dict.fromkeys(("diffusion_gemma", "gemma3n", "gemma4", "gemma4_unified", "mistral_large4",
                     "paligemma", "t5gemma", "t5gemma2"), ("final_logit_softcapping",)),
    **dict.fromkeys(("aya_vision", "cohere_compass"), ("logit_scale",)),
    **dict.fromkeys(("granite4_vision", "granite_docling", "hyperclovax_vision_v2"),
                    ("logits_scaling",)),
    "inkling_mm_model": ("unpadded_vocab_size",),
    **dict.fromkeys(("inkling2", "inkling2_loop"), ("final_logit_softcapping",
                                                    "unpadded_vocab_size")),
    # a scale before the softcap: lm_head raises ValueError unless output_multiplier is 1
    **dict.fromkeys(("muse_glimmer", "muse_spark"), ("output_multiplier",
                                                     "final_logit_softcapping")),
}
# older composites that started to apply them in a later transformers release (none before); a
# development build (5.25.0.dev0) counts as its release
_COMPOSITE_LOGIT_FIELDS_SINCE = {"paligemma": (5, 23), "aya_vision": (5, 25)}


@functools.lru_cache(maxsize=None)
def _transformers_version():
    """``(major, minor)`` of the installed transformers (a development build counts as its
    release); read once, not on every ``head_inputs`` call."""
    import transformers
    return tuple(map(int, re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()))


def _composite_logit_fields(kind):
    since = _COMPOSITE_LOGIT_FIELDS_SINCE.get(kind)
    if since is not None and _transformers_version() < since:
        return ()
    return _COMPOSITE_LOGIT_FIELDS.get(kind, ())


def _head_owner(model, head):
    """The model whose forward calls ``head``: the nearest module above it with a config. A
    composite that wraps a whole causal LM (BLIP-2's ``language_model``) leaves the logits to
    that LM's own forward, transforms included."""
    if any(m is head for m in model.children()):
        return model
    path = next((n for n, m in model.named_modules() if m is head), "").split(".")[:-1]
    for i in range(len(path), 0, -1):
        sub = model.get_submodule(".".join(path[:i]))
        if hasattr(getattr(sub, "config", None), "model_type"):
            return sub
    return model


def lm_head(model, *, _before_forward=False):
    """``(weight [V, D], bias [V] | None, softcap | None, temperature)`` of a causal LM's head.

    The logit fields are read from the text config of the model that calls the head (see
    ``_COMPOSITE_LOGIT_FIELDS`` for composite models). ValueError (naming the model) for a head
    the fused one cannot express: parameters besides ``weight`` and ``bias`` (Dory's learned
    per-token logit scale), a scale applied before a softcap (``output_multiplier``), both a
    softcap and a scale, or a cut to ``unpadded_vocab_size`` of a sharded (DTensor) weight."""
    model = _unwrap(model)
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model: {name} has no LM head (get_output_embeddings)")
    extra = [n for n, _ in head.named_parameters(recurse=False) if n not in ("weight", "bias")]
    if extra:
        raise ValueError(f"model: {name}'s LM head has parameters besides weight and bias "
                         f"({', '.join(extra)}, e.g. a learned per-token logit scale), which the "
                         f"fused head does not express")
    owner = _head_owner(model, head)
    cfg = _text_config(owner)
    kind = getattr(owner.config, "model_type", "")  # the type whose forward applies the head
    composite = cfg is not owner.config

    def field(key):
        applied = (key in _composite_logit_fields(kind) if composite
                   else key != _NOT_ON_LOGITS.get(kind))
        return getattr(cfg, key, None) if applied else None

    if field("output_multiplier") not in (None, 1, 1.0):
        raise ValueError(f"model: {name} scales its logits by output_multiplier before its "
                         f"softcap, which the fused head does not express")
    softcap = next((float(c) for c in map(field, _SOFTCAPS) if c), None)
    temperature = 1.0
    scaling, scale = field("logits_scaling"), field("logit_scale")
    if scaling not in (None, 1, 1.0):
        # HyperCLOVAX (MuP) multiplies by the same-named field that Granite divides by
        temperature = 1.0 / float(scaling) if kind in _MULTIPLY_SCALING else float(scaling)
    elif scale not in (None, 1, 1.0):
        temperature = 1.0 / float(scale)
    # Falcon-H1 multiplies its logits by the body's lm_head_multiplier (copied from its config)
    multiplier = getattr(getattr(owner, "model", None), "lm_head_multiplier", None)
    if multiplier not in (None, 1, 1.0):
        temperature /= float(multiplier)
    if softcap is not None and temperature != 1.0:
        raise ValueError(f"model: {name} has both a logit softcap and a logit scale, which is not "
                         f"supported (the order of the two is model-specific)")
    weight, bias = head.weight, getattr(head, "bias", None)
    n = field("unpadded_vocab_size")  # Inkling drops its padding logits
    if n and n < weight.shape[0]:
        if _distributed.is_dtensor(weight):
            if _before_forward:  # head_inputs' check: the root's forward will gather it
                return weight, bias, softcap, temperature
            # a slice of a sharded weight gathers the whole head in the forward and keeps it
            # alive until the backward
            raise ValueError(f"model: {name}'s LM head weight is sharded (DTensor, e.g. FSDP2 "
                             f"fully_shard) and is cut from {weight.shape[0]} rows to "
                             f"unpadded_vocab_size={n}: the cut would gather the whole "
                             f"head in the forward and keep it until the backward; keep the head "
                             f"in the root's FSDP unit and call hf.head_inputs on the root, or cut "
                             f"its weight to {n} rows before sharding")
        weight, bias = weight[:n], None if bias is None else bias[:n]
    return weight, bias, softcap, temperature


def _rows(name, x, b, length):
    """A per-token ``[N]`` or ``[B, L]`` tensor as ``[B, L]``; a ValueError naming it otherwise."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if tuple(x.shape) != (b, length):
        raise ValueError(f"{name} must have input_ids' shape {(b, length)}, got "
                         f"{tuple(x.shape)}")
    return x


def _positions_from_cu(cu, n, device):
    cu = cu.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=n)  # sized: no host wait
    return (torch.arange(n, device=device) - starts).unsqueeze(0)


def _segment_ids(position_ids, attention_mask=None):
    """Sequence index of each token, per row: a new sequence starts where positions do not
    continue by +1 (the convention of flash-attn varlen and transformers' packing detection),
    between two attended tokens: padding positions (whatever they hold) start nothing."""
    # each attended token continues from the previous *attended* one (padding between two
    # packed sequences must not merge them, nor start one by itself)
    att = (torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None
           else attention_mask.bool())
    idx = torch.arange(att.shape[-1], device=att.device).expand_as(att)
    last = torch.where(att, idx, -1).cummax(-1).values          # last attended index up to i
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)
    prev_pos = position_ids.gather(-1, prev.clamp(min=0))
    return (att & (prev >= 0) & (position_ids != prev_pos + 1)).cumsum(-1)


# model types whose attention mask ignores position_ids: packing needs this module's 4-D mask
# (OPT builds its causal mask without them) or cannot work at all (Bloom's ALiBi is built from
# the 2-D attention mask and it rejects a 4-D one)
_OWN_PACKING_MASK = {"opt", "mpt", "xglm", "biogpt"}
_NO_PACKING = {"bloom"}
# model types that count positions from pad_token_id + 1 (fairseq's convention): the positions
# this module derives are shifted to match
_POSITIONS_AFTER_PAD = {"roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
                        "camembert", "data2vec-text", "xmod"}
# they build their mask without position_ids too: packed, they need this module's mask
_OWN_PACKING_MASK = _OWN_PACKING_MASK | _POSITIONS_AFTER_PAD


def _transformers_detects_packing():
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def _legacy_masks():
    """Whether many models of the installed transformers build their attention mask in their
    own ways (releases before 5.2: blind to ``position_ids``, some of them reading a 4-D mask as
    ones and zeros, some taking none; some flash paths get neither the bounds nor the
    positions). A packed batch then runs as a padded one (:func:`_packed_as_padded`)."""
    return _transformers_version() < (5, 2)


def _block_causal_mask(seg, attention_mask, dtype, window=None):
    """Additive ``[B, 1, L, L]`` mask: query ``i`` sees key ``j`` iff ``j <= i``, same sequence,
    key attended (and ``i - j < window``); every query sees itself."""
    length = seg.shape[-1]
    idx = torch.arange(length, device=seg.device)
    ok = (idx[None, :] <= idx[:, None]).unsqueeze(0) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        ok &= (idx[:, None] - idx[None, :] < window).unsqueeze(0)
    if attention_mask is not None:
        ok &= attention_mask.bool()[:, None, :]
    ok |= torch.eye(length, dtype=torch.bool, device=seg.device).unsqueeze(0)
    mask = torch.zeros(ok.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _prepare(model, input_ids, inputs_embeds, attention_mask, position_ids, cu_seqlens):
    """Normalises the batch to ``[B, L]``; returns ``(ids, embeds, mask, pos, seg, packed)``."""
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None:
        raise ValueError("input_ids: give input_ids or inputs_embeds")
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("input_ids: give input_ids or inputs_embeds, not both")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            raise TypeError("input_ids must be an integer torch.Tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] or [N], got {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        device = input_ids.device
    else:
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds.unsqueeze(0)
        b, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
    if attention_mask is not None:
        attention_mask = _rows("attention_mask", attention_mask, b, length)
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens: packed input must be one row [1, N] or [N], got "
                             f"{b} rows")
        from . import _checks
        _checks.cu_seqlens(cu_seqlens, length, cu_seqlens.device)
        if position_ids is None:
            position_ids = _positions_from_cu(cu_seqlens, length, device)
        seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).to(device).long(),
                                      output_size=length)
        seg = seg.unsqueeze(0)
        packed = True
    elif position_ids is not None:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.shape[-1] != length:
            raise ValueError(f"position_ids must have {length} positions per row, got "
                             f"{tuple(position_ids.shape)}")
        position_ids = position_ids.expand(b, -1)
        seg = _segment_ids(position_ids, attention_mask)
        packed = bool((seg[:, -1] > 0).any())
    else:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(length, device=device).unsqueeze(0).expand(b, -1)
        seg = torch.zeros(b, length, dtype=torch.long, device=device)
        packed = False
    return input_ids, inputs_embeds, attention_mask, position_ids.to(device), seg, packed


def _takes_kwargs(model):
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def _takes(model, name):
    """Whether ``model.forward`` takes the keyword ``name`` (by name or through ``**kwargs``):
    the BART-style decoders and ProphetNet of transformers 4.x take no ``position_ids``."""
    return name in inspect.signature(model.forward).parameters or _takes_kwargs(model)


def _takes_varlen(impl):
    """Whether the attention kernel runs packed rows as flash-attn varlen does (sequence bounds
    in ``cu_seq_lens_q/k``, no mask): flash-attention, or a registered attention function marked
    ``varlen = True`` (``spot.attention``'s)."""
    if impl.startswith("flash"):
        return True
    try:
        from transformers import AttentionInterface
        return bool(getattr(AttentionInterface._global_mapping.get(impl), "varlen", False))
    except ImportError:
        return False


# True while head_inputs runs a model whose varlen attention function (not flash-attn's) was
# handed the sequence bounds: ``varlen_bounds_sent()`` lets that function check they arrived (a
# model that drops its forward's **kwargs would leave it to attend across packed sequences)
_BOUNDS_SENT = contextvars.ContextVar("spot_kernels_hf_bounds_sent", default=False)


def varlen_bounds_sent():
    """Whether the running ``head_inputs`` handed the attention function ``cu_seq_lens_q``:
    a varlen attention function that then sees none must refuse to run (see
    ``spot.attention``)."""
    return _BOUNDS_SENT.get()


@contextlib.contextmanager
def bounds_sent(sent):
    """Marks the model call inside as one whose attention was (``sent``) handed the bounds."""
    token = _BOUNDS_SENT.set(sent)
    try:
        yield
    finally:
        _BOUNDS_SENT.reset(token)


def _flash_varlen(seg, attention_mask=None):
    """flash-attn's varlen arguments for packed rows ``seg`` (segment ids ``[B, L]``), over the
    rows flattened in order (as transformers' flash path and ``spot.attention`` take them), made
    once per batch: given them, transformers no longer derives them from ``position_ids`` in
    every layer (two device synchronisations a layer, and again in checkpointed recomputes).
    A row's leading padding (before its first attended token) is a sequence of its own: in the
    first sequence's segment it would be attended by it. Other padding follows the tokens of
    its segment, which causal attention never lets them see. One read of the device: the
    tokens' sequence indices come to the host (8 bytes a token), where the bounds and the
    longest sequence (which the kernels need as a number) are counted."""
    b, length = seg.shape
    if attention_mask is None:
        lead = torch.zeros_like(seg, dtype=torch.bool)
    else:
        lead = attention_mask.bool().long().cumsum(-1) == 0
    rows = torch.arange(b, device=seg.device)[:, None] * (length + 1)
    counts = torch.bincount((seg + (~lead).long() + rows).flatten().cpu())
    counts = counts[counts > 0]
    if not counts.numel():
        return {}
    cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    cu = cu.to(seg.device, non_blocking=True)  # no stream sync for the way back
    longest = int(counts.max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def _packed_as_padded(model, ids, embeds, mask, seg, position_ids, model_kwargs):
    """:func:`head_inputs` of a packed batch run as a right-padded one, a sequence a row (what
    follows a sequence's tokens changes nothing they see), the hidden states put back where the
    packed tokens were (zeros where the packed batch has padding). ``position_ids``, when given,
    go along with their tokens."""
    b, length = seg.shape
    att = torch.ones_like(seg, dtype=torch.bool) if mask is None else mask.bool()
    where = att.flatten().nonzero().squeeze(-1)  # the attended tokens, row-major
    per_row = seg[:, -1:] + 1
    gseq = (seg + torch.cumsum(per_row, 0) - per_row).flatten()[where]
    _, row, counts = torch.unique_consecutive(gseq, return_inverse=True, return_counts=True)
    col = torch.arange(where.numel(), device=seg.device) - (torch.cumsum(counts, 0) - counts)[row]
    rows, width = counts.numel(), int(counts.max())

    def spread(x):  # [B, L, ...] -> [rows, width, ...], zeros after each sequence
        if x is None:
            return None
        flat = x.reshape(b * length, *x.shape[2:])[where]
        return flat.new_zeros(rows, width, *x.shape[2:]).index_put((row, col), flat)

    padded_mask = spread(torch.ones_like(seg))
    hi = head_inputs(model, spread(ids), attention_mask=padded_mask, position_ids=spread(
        position_ids), inputs_embeds=spread(embeds), **model_kwargs)
    hidden = hi.hidden[row, col]
    if where.numel() < b * length:
        hidden = hidden.new_zeros(b * length, hidden.shape[-1]).index_copy(0, where, hidden)
    hi.hidden = hidden.reshape(b, length, -1)
    return hi


_PROBED = weakref.WeakKeyDictionary()  # model -> {(probe, attention implementation): verdict}
_PROBE_LEN = 8  # tokens of the sequence packed before the probed one


def _probe(model, name, make, moved):
    """``moved(a, b)`` of the hidden states ``[len(cols), D]`` (as computed) of the two rows of
    ``make(dev, vocab) -> (ids [2, L], head_inputs kwargs, cols)`` through ``model``'s body:
    once per model and attention implementation (cached, weakly keyed on the model), in eval
    mode without gradients, a row per forward (a batch of two would leave state sized for two
    in models that keep it between calls: RecurrentGemma on transformers 4.57). A safe model
    gives the same bits in both rows, or differs by rounding (a mixture of experts' GEMMs change
    shape as the last token routes: ~1e-7 in float32). While the probe runs, its verdict reads
    False (its own call takes the ordinary path); a probe whose forward fails counts as False
    (the real call reports the error)."""
    inner = _unwrap(model)
    key = (name, getattr(inner.config, "_attn_implementation", None) or "eager")
    seen = _PROBED.setdefault(inner, {})
    if key in seen:
        return seen[key]
    seen[key] = False
    try:
        ids, kwargs, cols = make(next(inner.parameters()).device,
                                 inner.get_input_embeddings().num_embeddings)
        with _eval_mode(model), torch.no_grad():
            sel = cols if isinstance(cols, tuple) else (cols, cols)  # per row, or shared
            a, b = (head_inputs(model, ids[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
                    .hidden[0, sel[i]] for i in range(2))
        verdict = bool(moved(a, b))
    except Exception:  # noqa: BLE001 - the probe only informs; the real call reports errors
        verdict = False
    seen[key] = verdict
    return verdict


@contextlib.contextmanager
def _eval_mode(model):
    """``model.eval()`` inside; after, every module's own training flag as it was (a root
    ``model.train(flag)`` would also switch the submodules a user put in eval mode, and their
    dropout, back on)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def _probe_ids(dev, vocab, steps, tails):
    """One row per (step, tail): ``_PROBE_LEN`` tokens spaced by ``step``, then ``tail``."""
    return torch.stack([torch.cat([torch.arange(_PROBE_LEN) * step + 11, torch.tensor(tail)])
                        for step, tail in zip(steps, tails)]).to(dev) % vocab


def packing_leaks(model):
    """Whether sequences packed in one row still see each other in ``model`` (under its current
    attention implementation) although :func:`head_inputs` keeps them apart for attention: state
    carried along the row by linear-attention, state-space or recurrent layers (Qwen3-Next,
    Jamba, Falcon-H1, Bamba, RecurrentGemma...), or a mask built blind to the packing.

    One no-grad forward pair in eval mode tells, once per model and attention implementation:
    the same 4 tokens packed after an 8-token sequence must come out as they do first in a row,
    at columns 0-3 (the same up to rounding where packing is safe: the other sequence's scores
    are masked to exactly 0; a leak moves them ~1% or more). Against the tail at the row's start,
    not after another sequence, the probe also catches a body that ignores ``position_ids`` and
    counts positions by column (Marian and Pegasus on transformers 5), whose leak alone can be
    small at random init.
    A model that fails the probe's forward counts as safe (its real batches will say why).
    :func:`head_inputs` runs a packed batch of a leaking model as a padded one."""
    def make(dev, vocab):
        pos = torch.stack([torch.cat([torch.arange(_PROBE_LEN), torch.arange(4)]),
                           torch.cat([torch.arange(4), torch.arange(_PROBE_LEN)])]).to(dev)
        return _tail_last_and_first(dev, vocab), dict(position_ids=pos), _TAIL_COLS
    return _probe(model, "packing", make, _tail_moved)


_TAIL_COLS = (slice(_PROBE_LEN, None), slice(0, 4))  # the tail in each row of the two below


def _tail_last_and_first(dev, vocab):
    """``[2, _PROBE_LEN + 4]`` ids: 4 tokens after ``_PROBE_LEN`` others, then before them."""
    head = (torch.arange(_PROBE_LEN, device=dev) * 3 + 11) % vocab
    tail = torch.tensor([3, 4, 5, 6], device=dev) % vocab
    return torch.stack([torch.cat([head, tail]), torch.cat([tail, head])])


def _tail_moved(a, b):
    """The tail's hidden states moved anywhere by 0.1% of the largest value: a leak missed is
    silently wrong (log-probs); a false alarm costs the padding's compute."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() > 1e-3 * max(1.0, a.abs().max().item())


def padding_moves(model):
    """Whether padding before a row's tokens changes their hidden states in ``model`` (with the
    positions :func:`head_inputs` derives from the mask): bodies that ignore ``position_ids`` and
    count positions by column (the BART-style decoders, TrOCR, BLT, Marian and Pegasus on
    transformers 5) and recurrent ones that run over the padding (RWKV, xLSTM). Probed once per
    model and attention implementation, as :func:`packing_leaks`: the same 4 tokens after 8
    masked ones and at the start of a right-padded row. :func:`head_inputs` runs a batch with
    such padding with each row's tokens moved to its start."""
    def make(dev, vocab):
        on, off = torch.ones(4, device=dev), torch.zeros(_PROBE_LEN, device=dev)
        mask = torch.stack([torch.cat([off, on]), torch.cat([on, off])]).long()
        return _tail_last_and_first(dev, vocab), dict(attention_mask=mask), _TAIL_COLS
    return _probe(model, "padding", make, _tail_moved)


def _moved_ahead(a, b, tol=1e-2):
    """:func:`sees_ahead`'s rule on two rows' hidden states ``[positions, D]``: the first
    position (which sees only itself in a causal model) and two more moved by ``tol`` of their
    norm. A false alarm stops a run, so one position's move is not enough: rounding (an MoE's
    GEMMs change shape as the last token routes) moves entries by ~1e-7 in float32 and by up to
    ~1e-3 in half precision, and a routing flip it might cause moves one position; attending
    both ways moves many (CPM-Ant: 4 of 8 by 10-66% at random init, 1 layer; BERT-style heads
    without ``is_decoder``: all by 0.07-0.4% at random init, far more trained)."""
    r = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-30)
    return bool(r[0] > tol) and int((r > tol).sum()) >= 3


def _ahead_tol(inner):
    """:func:`_moved_ahead`'s threshold for a forward of ``inner`` under the current autocast
    and matmul settings: 1e-4 where it runs in full float32 on the CPU (rounding moves ~1e-7
    there, so BERT-style heads are caught at random init too), else 1e-2 (half precision,
    autocast, TF32 or bf16 matmuls: rounding alone may move ~1e-3). :func:`sees_ahead` also
    takes 1e-2 when the hidden states come out in half precision (a wrapper's mixed precision,
    such as FSDP2's ``param_dtype``, that the parameters do not show)."""
    full = (all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
                for p in inner.parameters())
            and not torch.is_autocast_enabled("cpu")
            and torch.get_float32_matmul_precision() == "highest")
    return 1e-4 if full else 1e-2


def sees_ahead(model):
    """Whether ``model``'s hidden state at a position changes with the tokens after it (its
    attention is not causal under its current implementation: transformers' CPM-Ant lets every
    token see the whole row). Its next-token log-probs would see their own targets, so
    :func:`head_inputs` refuses it. One no-grad forward pair of 9 tokens that differ only in the
    last, once per model and attention implementation (as :func:`packing_leaks`). Composite
    (multimodal) models are not probed: a prefix attended both ways is their design (PaliGemma
    on transformers 4.57 without ``token_type_ids``), set by inputs the probe does not see."""
    inner = _unwrap(model)
    if _text_config(inner) is not inner.config:
        return False

    def make(dev, vocab):
        return _probe_ids(dev, vocab, (3, 3), [(5,), (9,)]), {}, slice(None, -1)
    tol = _ahead_tol(inner)  # probed again when it changes (first under autocast, then not)

    def moved(a, b):  # hidden states in half precision: the half-precision rule
        full = a.dtype in (torch.float32, torch.float64)
        return _moved_ahead(a.float(), b.float(), tol if full else 1e-2)
    return _probe(model, f"ahead {tol:g}", make, moved)


def head_inputs(model, input_ids=None, *, attention_mask=None, position_ids=None, cu_seqlens=None,
                inputs_embeds=None, **model_kwargs):
    """Runs ``model``'s body (not its head); returns :class:`HeadInputs`.

    ``hidden`` is ``[B, L, D]`` (``[1, N, D]`` for packed ``[N]`` input), the final norm applied,
    exactly what the LM head would multiply. ``model_kwargs`` go to the model (``use_cache`` is
    off unless given). The *root* model runs, so wrappers' hooks (FSDP2's unshard, DDP, PEFT) see
    an ordinary call; a pre-hook on the LM head takes its input and lets it project zero rows.
    Under FSDP1 the head's weight is the view gathered inside the root's forward (see
    ``spot_kernels.distributed``; the head must be in the root FSDP unit).
    See the module docstring for padded and packed batches.
    """
    inner = _unwrap(model)
    ids, embeds, mask, pos, seg, packed = _prepare(inner, input_ids, inputs_embeds,
                                                   attention_mask, position_ids, cu_seqlens)
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    kind = getattr(_text_config(inner), "model_type", "")
    if sees_ahead(model):
        # dynamic int8 quantization scales each activation tensor by its max over every token
        quant = next((type(m).__name__ for m in inner.modules()
                      if "quantized.dynamic" in type(m).__module__), None)
        why = (f"its dynamically quantized {quant} layers scale each activation by its max "
               f"over the whole row" if quant else f"under {impl} attention")
        raise ValueError(f"model: {type(inner).__name__} is not causal: a position's hidden "
                         f"state changes with the tokens after it ({why}), so its next-token "
                         f"log-probs would see their own targets; spot_kernels.hf needs a causal "
                         f"LM")
    if packed and kind in _NO_PACKING:
        raise ValueError(f"cu_seqlens / position_ids: {type(inner).__name__} cannot keep packed "
                         f"sequences apart (its attention bias comes from the 2-D "
                         f"attention_mask); pass a padded batch")
    # flash-attn: the bounds always; another varlen kernel (spot.attention): where the model
    # passes them on and its mask would not ignore position_ids (else the 4-D mask below, which
    # such a kernel takes as SDPA does)
    flash = impl.startswith("flash")
    other_varlen = (not flash and _takes_varlen(impl) and kind not in _OWN_PACKING_MASK
                    and _takes_kwargs(inner))
    # before transformers 5.2 a padded batch, but for a varlen kernel that the model declares it
    # sends its attention to (many 4.x models have attention code of their own)
    # and, on any release, a model whose packed sequences still see each other (layers that
    # carry state along the row: linear-attention, state-space and recurrent layers of hybrids)
    if packed and ((_legacy_masks() and not (
            other_varlen and getattr(type(inner), "_supports_attention_backend", False)))
            or packing_leaks(model)):
        return _packed_as_padded(model, ids, embeds, mask, seg,
                                 None if position_ids is None else pos, model_kwargs)
    # padding before a row's tokens (left padding, or gaps) and a model that counts positions by
    # column or carries state along the row: each row's tokens moved to its start
    if (not packed and mask is not None and padding_moves(model)
            and bool((mask[:, 1:] > mask[:, :-1]).any())):
        return _packed_as_padded(model, ids, embeds, mask, seg,
                                 None if position_ids is None else pos, model_kwargs)
    sent = False
    if packed and not (flash or other_varlen) and (mask is not None
                                                   or not _transformers_detects_packing()
                                                   or kind in _OWN_PACKING_MASK):
        cfg = _text_config(inner)
        window = getattr(cfg, "sliding_window", None)
        longest = int(torch.bincount((seg + seg.shape[-1] * torch.arange(
            seg.shape[0], device=seg.device)[:, None]).flatten()).max())
        if window is not None and window < longest:
            raise ValueError(f"attention_mask: packing with a padding mask needs a 4-D mask that "
                             f"cannot express the sliding window ({window}) shorter than the "
                             f"longest sequence ({longest}); drop the padding or pack shorter")
        dtype = embeds.dtype if embeds is not None else inner.get_input_embeddings().weight.dtype
        mask = _block_causal_mask(seg, mask, dtype)
    elif packed:
        if other_varlen or (flash and _takes_kwargs(inner)):  # padding kept apart
            model_kwargs = {**_flash_varlen(seg, mask), **model_kwargs}
            sent = other_varlen
        mask = None  # transformers (or a varlen kernel) derives the block-diagonal mask
    if position_ids is None and kind in _POSITIONS_AFTER_PAD:
        pos = pos + (_text_config(inner).pad_token_id + 1)
    model_kwargs.setdefault("use_cache", False)
    kwargs = dict(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                  **model_kwargs)
    if not _takes(inner, "position_ids"):  # it counts positions itself, from the first column
        del kwargs["position_ids"]
    # Run the root model (so wrapper hooks, FSDP2's unshard, DDP's, PEFT's, see an ordinary
    # call), catch the LM head's input on its way in and hand the head a [..., 0, D] slice
    # instead, which it does not project (an empty [..., 0, V] output stands in), and whatever
    # the model does to the hidden states before its head (final norm, scaling) is already in
    # what we caught.
    head = inner.get_output_embeddings()
    # a head the fused one cannot express fails here, before the body runs (an FSDP2 root's head
    # is still sharded here; it is gathered in the forward, and read again after it)
    first = lm_head(inner, _before_forward=True)
    caught, inside = [], []

    def take_input(mod, args, kw):
        x = args[0] if args else kw.pop("input")
        caught.append(x)
        inside.append(lm_head(inner)[:2])  # FSDP1: the gathered views, alive only in forward
        return (x[..., :0, :],) + tuple(args[1:]), kw

    def no_projection(x, *args, **kw):
        # the head's own forward would still touch the whole weight: under autocast F.linear
        # casts it (a V x D copy, cached for the autocast region) even for zero rows
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        # zero-sized, but part of the graph like real logits (FSDP1 hooks the model's outputs);
        # not a view (FSDP2 warns about a module that returns one)
        return x.sum(-1, keepdim=True).expand(*x.shape[:-1], vocab).to(dtype).clone()

    vocab = getattr(head, "out_features", None) or first[0].shape[0]
    handle = head.register_forward_pre_hook(take_input, with_kwargs=True)
    own = head.__dict__.get("forward")  # an instance-level wrapper (accelerate's hooks) stays
    head.forward = no_projection
    try:
        with bounds_sent(sent):
            out = model(**kwargs)
    finally:
        handle.remove()
        if own is None:
            del head.forward
        else:
            head.forward = own
    if not caught:
        raise TypeError(f"model: {type(inner).__name__}.forward never called its LM head "
                        f"(get_output_embeddings())")
    hidden = caught[-1]
    if hidden.shape[:-1] != seg.shape:
        raise ValueError(f"model: {type(inner).__name__}'s LM head sees hidden states of shape "
                         f"{tuple(hidden.shape)}, not one per token {tuple(seg.shape)} (e.g. "
                         f"ProphetNet's n-gram streams), which this module does not handle")
    weight, bias, softcap, temperature = lm_head(inner)
    if _distributed.is_fsdp1(model):
        weight, bias = inside[-1]
        hidden = _distributed.fsdp1_tie(hidden, weight, out)
    return HeadInputs(hidden, weight, bias, softcap, temperature)


def _completion_targets(ids, mask, seg, completion_mask, prompt_lengths, n_seq=None):
    """``(rows, targets, seq, S)``: for every scored position ``i`` (flat index into ``[B*L]``),
    its target ``ids[i + 1]`` and global sequence number; ``S`` sequences in all (``n_seq`` when
    given: ``cu_seqlens`` may end with empty sequences, which ``seg`` cannot show)."""
    b, length = ids.shape
    att = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    count = att.clone()
    if completion_mask is not None:
        count &= _rows("completion_mask", completion_mask, b, length).bool()
    if prompt_lengths is not None:
        plen = torch.as_tensor(prompt_lengths, device=ids.device).reshape(-1)
        if seg[:, -1].max() > 0:
            raise ValueError("prompt_lengths: packed batches need completion_mask instead")
        if plen.numel() != b:
            raise ValueError(f"prompt_lengths must have one entry per row ({b}), got "
                             f"{plen.numel()}")
        pos = torch.arange(length, device=ids.device)[None, :]
        if mask is not None:  # left padding: prompt length counts attended tokens only
            pos = mask.long().cumsum(-1) - 1
        count &= pos >= plen[:, None]
    # score position i with target i+1 when both are in one sequence, i is a real (attended)
    # token and i+1 counts: padding's hidden state predicts nothing
    scored = torch.zeros_like(count)
    scored[:, :-1] = count[:, 1:] & att[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    # global sequence number, row-major
    per_row = seg[:, -1] + 1
    offset = torch.cumsum(per_row, 0) - per_row
    gseq = seg + offset[:, None]
    rows = scored.flatten().nonzero().squeeze(-1)
    total = int(per_row.sum()) if n_seq is None else n_seq
    return rows, targets.flatten()[rows], gseq.flatten()[rows], total


def next_token_targets(input_ids, *, attention_mask=None, completion_mask=None,
                       prompt_lengths=None, position_ids=None, cu_seqlens=None, ignore_index=-100):
    """Targets for ``token_logprobs`` aligned with the hidden states: ``targets[..., i]`` is
    ``input_ids[..., i + 1]`` where that token is scored (same sequence, attended, completion),
    ``ignore_index`` elsewhere. Same shape as ``input_ids`` (``[B, L]`` or packed ``[N]``), int64.
    The masks mean what they mean in :func:`completion_logprobs`."""
    ids, _, mask, _, seg, _ = _prepare(None, input_ids, None, attention_mask, position_ids,
                                       cu_seqlens)
    rows, targets, _, _ = _completion_targets(ids, mask, seg, completion_mask, prompt_lengths)
    out = torch.full((ids.numel(),), ignore_index, dtype=torch.long, device=ids.device)
    out[rows] = targets.long()
    return out.reshape(input_ids.shape)


def completion_logprobs(model, input_ids, *, attention_mask=None, completion_mask=None,
                        prompt_lengths=None, position_ids=None, cu_seqlens=None, average=False,
                        backend="auto", backend_options=None, **model_kwargs):
    """Per-sequence sum (``average=True``: mean) of ``log p(completion token)``, float32 ``[S]``.

    Prompt tokens are masked by ``completion_mask`` (1 = completion token, ``input_ids``' shape)
    or ``prompt_lengths`` (``[B]``, padded batches; counted in attended tokens). With neither,
    every attended token after the first of its sequence counts. ``S`` is ``B`` for a padded batch
    and the number of packed sequences (row-major) for a packed one. Uses the fused head: no
    ``[tokens x vocab]`` logits, and prompt positions never reach the head.
    """
    hi = head_inputs(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     cu_seqlens=cu_seqlens, **model_kwargs)
    ids, _, mask, _, seg, _ = _prepare(model, input_ids, None, attention_mask, position_ids,
                                       cu_seqlens)
    rows, targets, seq, s = _completion_targets(
        ids, mask, seg, completion_mask, prompt_lengths,
        n_seq=None if cu_seqlens is None else cu_seqlens.numel() - 1)
    hidden = hi.hidden.reshape(-1, hi.hidden.shape[-1]).index_select(0, rows)
    logp = F.token_logprobs(hidden, hi.weight, targets, backend=backend,
                            backend_options=backend_options, **hi.head_kwargs())
    counts = torch.bincount(seq, minlength=s)
    cu = torch.zeros(s + 1, dtype=torch.long, device=logp.device)
    cu[1:] = torch.cumsum(counts, 0)
    return F.sequence_logprobs(logp, cu, average=average)


def _float32_gemm_eps():
    """The unit roundoff of a float32 GEMM on a GPU: TF32's or bf16's where allowed."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # newer torch: set through backends' fp32_precision instead
        precision = "high" if torch.backends.cuda.matmul.allow_tf32 else "highest"
    return {"high": 2.0 ** -10, "medium": 2.0 ** -7}.get(precision, torch.finfo(torch.float32).eps)


def check_logits(model, input_ids, *, atol=None, vocab_chunk=8192, **model_kwargs):
    """Checks this module's reading of ``model``'s head against the model's own logits on one
    short batch; returns the largest difference of their log-softmax.

    For a family this module has not seen, or a transformers release that changed what a model
    does to its logits: ``model(input_ids).logits`` is materialised once (keep ``input_ids``
    short: ``[tokens x vocab]``; ``[L]`` is one row) and compared with ``softcap(hidden W^T + b) /
    temperature`` from :func:`head_inputs`, in float64 (the weight cast ``vocab_chunk`` rows at a
    time). It checks the hidden states, softcap, scale and vocabulary cut, not the kernels. Give
    unpadded rows; with an ``attention_mask`` only attended tokens count and both forwards get
    the same positions. Both forwards run in eval mode (no dropout), each module's mode restored
    after. ``ValueError`` naming the model when the two differ by more than ``atol``
    (default ``1e-3 + 2 eps max|logit|``, with ``eps`` the coarsest rounding on the way: of the
    logits', hidden states' and weight's dtypes, an enabled autocast's, and TF32's or bf16's for
    float32 GEMMs on a GPU where ``torch.set_float32_matmul_precision`` allows them; 0.5 for
    bfloat16 logits up to 32). A random head has small logits that barely show a softcap (a
    scale shows): check trained weights.
    """
    inner = _unwrap(model)
    name = type(inner).__name__
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.numel() == 0:
        raise ValueError("input_ids: empty; check_logits needs at least one token")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and "position_ids" not in model_kwargs and _takes(inner, "position_ids"):
        model_kwargs = dict(model_kwargs, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
    # eval mode for both forwards: dropout (a model in train mode) would draw other masks in
    # each and be blamed on the logits' transform
    with _eval_mode(model), torch.no_grad():
        kw = dict(model_kwargs, use_cache=model_kwargs.get("use_cache", False))
        own = model(input_ids=input_ids, **kw).logits
        hi = head_inputs(model, input_ids, **model_kwargs)
        ws = hi.weight.split(vocab_chunk)  # the float64 copy one chunk at a time
        bs = [None] * len(ws) if hi.bias is None else hi.bias.split(vocab_chunk)
        z = torch.cat([_reference.logits(hi.hidden, w, b, temperature=hi.temperature,
                                         softcap=hi.softcap, compute_dtype=torch.float64)
                       for w, b in zip(ws, bs)], -1).log_softmax(-1)
        if own.shape != z.shape:
            raise ValueError(f"model: {name}'s logits have shape {tuple(own.shape)}, the fused "
                             f"head's {tuple(z.shape)}")
        gap = (own.double().log_softmax(-1) - z).abs().amax(-1)
        if mask is not None:
            gap = gap[mask.bool()]
        diff = float(gap.max()) if gap.numel() else 0.0
    if atol is None:  # what rounding on the model's way to its logits can explain, and a bit
        dtypes = {own.dtype, hi.hidden.dtype, hi.weight.dtype}
        kind = own.device.type
        if torch.is_autocast_enabled(kind):
            dtypes.add(torch.get_autocast_dtype(kind))
        eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
        if own.is_cuda and torch.float32 in dtypes:
            eps = max(eps, _float32_gemm_eps())
        atol = 1e-3 + 2 * eps * float(own.abs().max())
    if diff != diff:
        raise ValueError(f"model: {name}'s own log-probs or the fused head's are NaN")
    if diff > atol:
        raise ValueError(f"model: {name}'s own log-probs and the fused head's differ by up to "
                         f"{diff:.3g} (> {atol:g}): it transforms its logits in a way this module "
                         f"does not reproduce")
    return diff
