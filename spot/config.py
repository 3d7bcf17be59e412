"""The trainer's one configuration dataclass, and loading it from a YAML / JSON file.

Precedence: dataclass defaults < the ``--config`` file < command-line flags. Every field is
documented once, in ``HELP``, which the CLI reuses for ``--help``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


ATTENTION = ("auto", "flash_attention_2", "varlen", "sdpa", "eager")  # the choices of --attn
BACKENDS = ("auto", "torch", "triton", "cuda", "reference")  # spot_kernels' backends
DEVICES = ("auto", "cpu", "cuda")  # the choices of --device
# what a checkpoint's run was made of: --resume refuses a checkpoint whose values differ, since
# the data order, the schedule and the optimizer state all follow from them
RUN_DEFINING = ("model", "data", "beta", "delta", "ema_alpha", "loss", "lr", "weight_decay",
                "warmup_ratio", "epochs", "max_steps", "max_length", "tokens_per_batch",
                "max_grad_norm", "seed")  # and world size x grad_accum (train.run_settings)


class ConfigError(ValueError):
    """A bad configuration value or file; the CLI prints it on one line and exits non-zero."""


@dataclass
class TrainConfig:
    model: str | None = None
    data: str | None = None
    output: str | None = None
    beta: float = 0.1
    delta: str = "running"
    ema_alpha: float = 0.1
    loss: str = "spot"
    lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    epochs: int = 2
    max_steps: int | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    max_length: int = 1024
    tokens_per_batch: int = 8192
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    backend: str = "auto"
    device: str = "auto"
    bf16: bool = True
    attn: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    log_every: int = 1
    cache_dir: str | None = None
    progress: bool = True

    def validate(self):
        for name in ("save_every", "keep_checkpoints"):  # None (a YAML null) means 0
            if getattr(self, name) is None:
                setattr(self, name, 0)
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (give --{name} or set it in the config)")
        for name in ("output", "cache_dir"):  # refused now, not after the reference pass
            path = getattr(self, name)
            if path:
                check_folder(name, path)
        finite = {k: math.isfinite(getattr(self, k)) for k in ("beta", "lr", "weight_decay")}
        checks = [("beta", finite["beta"] and self.beta > 0, "must be a finite number > 0"),
                  ("delta", self.delta in ("running", "zero", "ema"), "must be running|zero|ema"),
                  ("ema_alpha", 0 < self.ema_alpha <= 1, "must be in (0, 1]"),
                  ("loss", self.loss in ("spot", "dpo"), "must be spot|dpo"),
                  ("lr", finite["lr"] and self.lr > 0, "must be a finite number > 0"),
                  ("weight_decay", finite["weight_decay"] and self.weight_decay >= 0,
                   "must be a finite number >= 0"),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
                  ("epochs", self.epochs >= 1, "must be >= 1"),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1"),
                  ("save_every", self.save_every >= 0, "must be >= 0 (0: never)"),
                  ("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0 (0: all)"),
                  ("max_length", self.max_length >= 8, "must be >= 8"),
                  ("tokens_per_batch", self.tokens_per_batch >= 16, "must be >= 16"),
                  ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
                  ("max_grad_norm", math.isfinite(self.max_grad_norm)
                   and self.max_grad_norm > 0, "must be a finite number > 0"),
                  ("seed", -2**63 <= self.seed < 2**64, "must be in [-2^63, 2^64)"),
                  ("backend", self.backend in BACKENDS, f"must be {'|'.join(BACKENDS)}"),
                  ("device", self.device in DEVICES, f"must be {'|'.join(DEVICES)}"),
                  ("log_every", self.log_every >= 1, "must be >= 1"),
                  ("attn", self.attn in ATTENTION, f"must be {'|'.join(ATTENTION)}")]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{option(name)}: {why}, got {getattr(self, name)!r}")
        return self

    def to_dict(self):
        return asdict(self)


HELP = {
    "model": "local path of a transformers causal LM (config + safetensors) to train",
    "data": "pairs: a .jsonl/.json file, a .parquet file or a folder of .parquet shards, or a "
            "datasets dataset saved on disk",
    "output": "output folder: checkpoints, metrics.jsonl, the final model",
    "beta": "reward scale beta in u = beta (logp - ref_logp) - delta",
    "delta": "the reward shift: running (TRL RunningMoments mean of the batch rewards, as "
             "bco_pair up to TRL 0.28), zero (the paper's SPoT-BCE; bco_pair from TRL 0.29) or "
             "ema",
    "ema_alpha": "weight of the new batch mean when --delta ema",
    "loss": "spot (reward BCE) or dpo (sigmoid DPO on the same sequence log-probs)",
    "lr": "peak learning rate of AdamW (betas 0.9/0.95)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps with linear warmup before the cosine decay",
    "epochs": "passes over the pairs",
    "max_steps": "train for exactly this many optimizer steps, in place of --epochs (the data "
                 "repeats as needed); also the length of the schedule",
    "save_every": "write OUTPUT/checkpoint-STEP every N optimizer steps (0: never); an "
                  "interrupted run (Ctrl-C, SIGTERM) also writes one at the step it stops after",
    "keep_checkpoints": "keep only the newest N checkpoint-STEP folders, 0: all (each holds the "
                        "float32 weights and AdamW state, about 12 bytes a parameter)",
    "max_length": "tokens per sequence; the prompt is cut from the left (keeping at least half), "
                  "then the response from the right",
    "tokens_per_batch": "token budget of one packed micro-batch (chosen + rejected) per process",
    "grad_accum": "micro-batches per optimizer step and process",
    "max_grad_norm": "gradient clipping norm",
    "backend": "spot_kernels backend: auto, torch, triton, cuda or reference",
    "device": "auto (each process's own GPU when torch sees CUDA, else the CPU), cpu, or cuda; "
              "under torchrun one GPU a process (LOCAL_RANK), NCCL on GPUs and gloo on CPUs",
    "bf16": "bf16 autocast on a GPU (ignored on CPU)",
    "attn": "attention kernel: auto (on a GPU under bf16 flash-attn varlen when it imports, "
            "else torch's own varlen kernel when it runs, else sdpa; on a GPU in float32 sdpa; "
            "on a CPU varlen; falling back to sdpa, then eager, for a model without the "
            "kernel), flash_attention_2, varlen (each packed sequence alone: torch's flash "
            "varlen on a GPU in bf16, one SDPA call per sequence elsewhere; no N x N mask), "
            "sdpa or eager; packed sequences never attend to each other with any of them",
    "gradient_checkpointing": "recompute activations in the backward to save memory",
    "seed": "seed of the data order and of torch",
    "skip_bad": "count and skip bad records instead of stopping at the first",
    "resume": "continue from the newest complete OUTPUT/checkpoint-STEP",
    "trust_remote_code": "allow the model folder's own Python code",
    "log_every": "print metrics to the console every N steps (metrics.jsonl gets every step)",
    "cache_dir": "folder of the reference log-prob cache (default OUTPUT/.cache)",
    "progress": "show a tqdm progress bar",
}


def check_folder(name, path):
    """``path`` is a folder or can become one: neither it nor a folder above it is a file."""
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{name}: {part} is a file, not a folder"
                                  + ("" if part == p else f" (in {path})"))
            return


def field_types():
    return {f.name: f.type for f in fields(TrainConfig)}


def load_file(path):
    """A dict from a YAML or JSON config file (keys may use '-' or '_')."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {path} is not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"config: cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of options")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def option(name):
    """A field's name as the user gives it: the flag (and config key) ``--max-steps``."""
    return "--" + name.replace("_", "-")


def make_config(file_values=None, overrides=None):
    """``TrainConfig`` from defaults, then ``file_values``, then non-None ``overrides``."""
    known = {f.name for f in fields(TrainConfig)}
    values, extra = {}, {}
    for k, v in (file_values or {}).items():
        (values if k in known else extra)[k] = v
    if extra:
        import difflib

        def named(k):  # a near miss names the option it was probably meant to be
            near = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.75)
            return f"{k} (did you mean {near[0]}?)" if near else k
        raise ConfigError(f"config: unknown option(s) {', '.join(named(k) for k in sorted(extra))}")
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None
    for f in fields(TrainConfig):  # coerce YAML/JSON scalars to the declared type
        v = getattr(cfg, f.name)
        t = f.type.split(" |")[0]
        if v is None:
            # a YAML/JSON null: allowed where the option may be None (max_steps, cache_dir; the
            # counts that read it as 0), else refused (it crashed or turned bf16 off)
            if "None" not in f.type and f.name not in ("save_every", "keep_checkpoints"):
                raise ConfigError(f"{option(f.name)}: expected {t}, got null")
            continue
        try:
            if isinstance(v, bool) and t != "bool":  # a YAML true is an int to Python
                raise ValueError
            if t == "str" and not isinstance(v, str):
                raise ValueError
            if t == "float":
                setattr(cfg, f.name, float(v))
            elif t == "int":
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                setattr(cfg, f.name, int(v))
            elif t == "bool" and not isinstance(v, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{option(f.name)}: expected {t}, got {v!r}") from None
    return cfg
