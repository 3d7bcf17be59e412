"""The policy: a ``transformers`` causal LM whose LM head is never run.

``Policy(model)(batch)`` runs the model's *body* on a packed micro-batch (``spot.data.pack``) and
returns the per-sequence log-probs ``pi [S]`` of the responses, computed by
``spot_kernels.token_logprobs`` straight from the last hidden states and
``get_output_embeddings().weight``: the ``[tokens x vocab]`` logits never exist. Only the rows
whose target counts (response tokens) go through the head.

Attention: on a GPU under bf16, flash-attn varlen when it is installed, else PyTorch's own
flash varlen kernel when it runs (``spot.attention``, ``--attn varlen``), else SDPA; SDPA on a
GPU in float32; ``varlen`` on a CPU, where it runs one SDPA call per sequence (``--attn`` picks
one: flash_attention_2, varlen, sdpa or eager). Sequences packed in one row must not attend to each
other: the varlen kernels take the sequence bounds (``cu_seq_lens_q``); for SDPA/eager
transformers derives the block-diagonal causal mask from ``position_ids`` that restart at 0
(``find_packed_sequence_indices``), an ``N x N`` mask whose off-diagonal blocks are computed and
thrown away (before transformers 5.2, many of whose models build their own masks, the packed row
runs as a padded batch, a sequence a row: ``spot_kernels.hf``). ``tests/test_spot_model.py``
checks that each sequence gives the same log-probs alone and packed.

The log-probs are computed inside ``Policy.forward`` so that, under FSDP2, the root module's
parameters (embeddings, final norm, LM head) are gathered for that call and their gradients
reduce-scattered afterwards. Under bf16 autocast the body's last hidden states are float32 (the
residual stream is), and ``spot_kernels`` casts them and the head weight to bf16 as the LM
head's ``F.linear`` would; the cast is differentiable, so the float32 master weight gets its
gradient.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
import weakref
from pathlib import Path

import torch

import spot_kernels as sk

from spot_kernels import hf

from . import attention
from .config import ATTENTION, ConfigError


def attn_implementation(device, bf16=True, requested="auto"):
    """The attention kernel: ``requested`` as it is, or for ``auto`` on a GPU under bf16
    autocast (flash kernels take no float32) flash-attn varlen when it imports, else torch's
    flash varlen kernel when it runs there (``varlen``), else SDPA; on a GPU in float32 SDPA;
    on a CPU ``varlen`` (one SDPA call per sequence: at 4096 tokens of 128-token sequences
    the demo's step takes 40% of the time of SDPA's masked row)."""
    if requested not in ATTENTION:
        raise ConfigError(f"attn: must be one of {'|'.join(ATTENTION)}, got {requested!r}")
    if requested in ("varlen", "sdpa", "eager"):
        return requested
    dev = torch.device(device)
    gpu_bf16 = dev.type == "cuda" and bf16
    if not gpu_bf16:
        if requested == "auto":
            return "varlen" if dev.type == "cpu" else "sdpa"
        raise ConfigError("attn: flash_attention_2 needs a GPU and bf16 (flash-attn takes no "
                          "float32); use varlen or sdpa")
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # not installed, or broken (e.g. built for another torch)
        if requested == "auto":
            return "varlen" if attention.kernel_runs(dev.index) else "sdpa"
        raise ConfigError(f"attn: flash_attention_2 needs flash-attn, which does not import "
                          f"({exc}); use varlen or sdpa") from None
    return "flash_attention_2"


@contextlib.contextmanager
def hf_progress_bars(on):
    """transformers' own progress bars (loading, writing shards) turned off inside when ``on``
    is False; as they were afterwards."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if not on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not on:
            hf_logging.enable_progress_bar()


def first_line(exc):
    """An error's first line (200 characters at most), with the lines a trailing ``:`` goes on
    to ("... from one of:"); the exception's type when it has no text."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
    n = 1
    while n < len(lines) and lines[n - 1].endswith(":"):
        n += 1
    return " ".join(lines[:n])[:200]


def load_error(exc, trust_remote_code):
    """The first line of a transformers loading error, with the ``--trust-remote-code`` hint
    that its later lines give when the folder has code of its own."""
    first = first_line(exc)
    text = str(exc)
    if "trust_remote_code" in text and not trust_remote_code:
        first += " (pass --trust-remote-code to run the folder's own code)"
    return first


def check_tokenizer(tokenizer, path, what="model"):
    """A one-line ``ConfigError`` for a tokenizer that turns text into no tokens: what
    transformers builds from a folder with ``config.json`` but no tokenizer files."""
    if not tokenizer("Hello, world. 0123")["input_ids"]:
        raise ConfigError(f"{what}: {path} has no usable tokenizer (text encodes to no tokens): "
                          f"the folder needs the tokenizer's files (tokenizer.json or "
                          f"tokenizer_config.json and its vocabulary)")
    return tokenizer


def load_model(path, device="cpu", trust_remote_code=False, bf16=True, attn="auto"):
    """``AutoModelForCausalLM.from_pretrained(path)`` in float32 (the master weights), with the
    attention kernel ``attn_implementation(device, bf16, attn)``; ``auto`` falls back from
    flash-attn or varlen to SDPA to eager for a model without that kernel (SDPA: MPT, GPT-Neo,
    Bloom; flash-attn: MPT, XGLM) or a flash-attn that transformers refuses."""
    from transformers import AutoModelForCausalLM
    if not Path(path).exists():
        raise FileNotFoundError(f"model: no such folder {path}")
    impl = attn_implementation(device, bf16, attn)
    kinds = [impl]
    if attn == "auto":
        kinds += {"flash_attention_2": ["sdpa", "eager"], "varlen": ["sdpa", "eager"],
                  "sdpa": ["eager"]}.get(impl, [])
    for kind in kinds:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32,
                attn_implementation=attention.register() if kind == "varlen" else kind,
                trust_remote_code=trust_remote_code)
            why = attention.unsupported(model) if kind == "varlen" else None
            if why:
                raise ValueError(f"{type(model).__name__} does not support the varlen kernel "
                                 f"({why})")
            return model.to(device)
        except (ValueError, ImportError, OSError, KeyError) as exc:
            # transformers: "... does not support ... sdpa / Flash Attention ..." (ValueError),
            # "FlashAttention2 has been toggled on, but it cannot be used ..." (ImportError);
            # before 5.2 a model with attention classes of its own has none for varlen (KeyError)
            first = load_error(exc, trust_remote_code)
            text = str(exc)
            # only a kernel's own failure falls back or names --attn; anything else (a package
            # the folder's code imports, a missing file, an unknown architecture) is the model's
            kernel = ((isinstance(exc, ValueError) and "does not support" in text)
                      or (isinstance(exc, ImportError)
                          and "requires the following packages" not in text
                          and re.search(r"flash|sdpa|attention", text, re.IGNORECASE))
                      or (isinstance(exc, KeyError) and kind == "varlen"))
            if not kernel or kind == "eager":
                # not a model folder, no weights, an unknown architecture: one line
                raise ConfigError(f"model: cannot load {path}: {first}") from None
            if kind != kinds[-1]:
                continue
            other = "sdpa or eager" if kind == "varlen" else "eager"
            raise ConfigError(f"attn: {kind} does not load for this model ({first[:160]}); "
                              f"use --attn {other}") from None


def _zero_drop_rates(obj):
    """Every float attribute of ``obj`` whose name says dropping or noise (``dropout``,
    ``attn_pdrop``, ``residual_dropout``, ``layerdrop``, ``drop_path_rate``, Mixtral's
    ``router_jitter_noise``, PhiMoE's ``input_jitter_noise``...) set to 0; returns ``[(name,
    value)]`` of what it zeroed."""
    zeroed = []
    for name, value in list(vars(obj).items()):
        low = name.lower()
        if ("drop" in low or "jitter" in low) and isinstance(value, float) and value:
            setattr(obj, name, 0.0)
            zeroed.append((name, value))
    return zeroed


_CONFIG_RATES = weakref.WeakKeyDictionary()  # model -> [(config, name, rate)] zeroed


def disable_dropout(model):
    """Dropout and train-mode noise off everywhere, as TRL's ``disable_dropout`` means it: the
    reference pass runs in eval mode, so a policy with dropout would start from nonzero rewards
    and train on noise. Besides dropout modules (``nn.Dropout``, ``Dropout1d``-``3d``,
    ``AlphaDropout``), many families keep the rate as a float that their forward hands to
    ``F.dropout`` (OPT's ``dropout``, StarCoder2's ``residual_dropout``, GPT-BigCode's
    ``attn_pdrop``, Llama's ``attention_dropout``), or a router's jitter (Mixtral), or read it
    from the config there (Persimmon): those floats are zeroed on every module and on the config
    and its sub-configs. The config's own values are kept: ``config_as_loaded`` puts them back
    for saving, so a checkpoint does not hand on zeros to the next fine-tune."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_drop_rates(module)
    configs, kept = [getattr(model, "config", None)], []
    while configs:
        cfg = configs.pop()
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        kept += [(cfg, name, value) for name, value in _zero_drop_rates(cfg)]
        configs += [v for v in vars(cfg).values() if hasattr(v, "to_dict")]  # text_config...
    _CONFIG_RATES.setdefault(model, []).extend(kept)
    return model


@contextlib.contextmanager
def config_as_loaded(model):
    """Inside, ``model``'s config (and sub-configs) holds the rates ``disable_dropout`` zeroed
    as they were loaded (for ``save_pretrained``); after, zeros again."""
    kept = _CONFIG_RATES.get(model, [])
    for cfg, name, value in kept:
        setattr(cfg, name, value)
    try:
        yield model
    finally:
        for cfg, name, _ in kept:
            setattr(cfg, name, 0.0)


def enable_checkpointing(model):
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (5.24 has it)
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_fingerprint(path):
    """Hash of ``config.json``, the folder's own code (``*.py``, run with
    ``--trust-remote-code``) and the weight files (name, size, modification time, first and
    last MiB): a weight file written again, even with the same size and ends (a fine-tune that
    changed a middle layer), gets a new modification time and so a new fingerprint. Reading
    every byte would cost seconds per GB at every start."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix == ".py":  # a --trust-remote-code folder's own modeling code
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            st = f.stat()
            size = st.st_size
            h.update(f"{f.name}:{size}:{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(size - (1 << 20))
                    h.update(fh.read(1 << 20))
    return h.hexdigest()


def head_inputs(model, input_ids, position_ids, cu_seqlens):
    """``(hidden [N, D], weight [V, D], bias | None, softcap | None, temperature)`` of a packed
    row: the body's last hidden states and what the LM head would apply to them."""
    hi = hf.head_inputs(model, input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)
    return hi.hidden.reshape(-1, hi.hidden.shape[-1]), hi.weight, hi.bias, hi.softcap, \
        hi.temperature


class Policy(torch.nn.Module):
    """Wraps a causal LM. ``forward(batch) -> pi [S]`` (float32, differentiable); with
    ``ref_logps`` and ``labels`` it returns ``spot_kernels.spot_loss``'s output instead
    (``loss_kw``: ``beta``, ``delta``, ...)."""

    def __init__(self, model, backend="auto"):
        super().__init__()
        self.model = model
        self.backend = backend

    def forward(self, batch, ref_logps=None, labels=None, **loss_kw):
        # spot.data's packer built this batch on the host, from token ids checked against the
        # model's vocabulary when the data was loaded: on a GPU, skip the value checks that
        # would each make the host wait for the device (on the CPU they cost nothing)
        on_gpu = batch["input_ids"].device.type == "cuda"
        with sk.value_checks(False) if on_gpu else contextlib.nullcontext():
            return self._forward(batch, ref_logps, labels, **loss_kw)

    def _forward(self, batch, ref_logps=None, labels=None, **loss_kw):
        hidden, weight, bias, softcap, temperature = head_inputs(
            self.model, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
        rows = batch["rows"]  # only the tokens whose target counts go through the head
        h = hidden.index_select(0, rows)
        targets = batch["targets"].index_select(0, rows)
        head = dict(bias=None if bias is None else bias.to(h.dtype), softcap=softcap,
                    temperature=temperature, backend=self.backend)
        weight = weight.to(h.dtype)
        if ref_logps is None:
            logp = sk.token_logprobs(h, weight, targets, **head)
            return sk.sequence_logprobs(logp, batch["cu_rows"])
        return sk.spot_loss(h, weight, targets, batch["cu_rows"], ref_logps, labels, **head,
                            **loss_kw)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def decoder_layers(model):
    """The repeated blocks (the FSDP2 units): modules whose class is in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        body = model.get_decoder()
        layers = list(getattr(body, "layers", []))
    return layers


def config_json(model):
    return json.dumps(model.config.to_dict(), sort_keys=True, default=str)
