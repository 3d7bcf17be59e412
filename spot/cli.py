"""``spot`` command line: ``spot train``, ``spot demo`` and ``spot rectify``.

``train`` flags mirror :class:`spot.config.TrainConfig` (help text from ``spot.config.HELP``);
``--config FILE`` (YAML or JSON) sets any of them and flags given on the command line win.
Bad input (a data record, a config value, a missing file) ends with one line on stderr,
``spot: error: ...``, and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

from .config import ATTENTION, DEVICES, HELP, ConfigError, load_file, make_config
from .data import DataError

TRAIN_FLAGS = {  # name -> (type, metavar); booleans (BOOL_FLAGS) are --flag / --no-flag pairs
    "model": (str, "PATH"), "data": (str, "FILE"), "output": (str, "DIR"),
    "beta": (float, None), "delta": (str, "{running,zero,ema}"), "ema_alpha": (float, None),
    "loss": (str, "{spot,dpo}"), "lr": (float, None), "weight_decay": (float, None),
    "warmup_ratio": (float, None), "epochs": (int, None), "max_steps": (int, "N"),
    "save_every": (int, "N"), "keep_checkpoints": (int, "N"), "max_length": (int, None),
    "tokens_per_batch": (int, None),
    "grad_accum": (int, None), "max_grad_norm": (float, None), "backend": (str, None),
    "device": (str, "{" + ",".join(DEVICES) + "}"),
    "attn": (str, "{" + ",".join(ATTENTION) + "}"),
    "seed": (int, None), "log_every": (int, None), "cache_dir": (str, "DIR"),
}
BOOL_FLAGS = ("bf16", "gradient_checkpointing", "skip_bad", "resume", "trust_remote_code",
              "progress")


def add_train_parser(sub):
    from .config import TrainConfig
    defaults = TrainConfig()
    p = sub.add_parser("train", help="train a model on (x, y-, y+) pairs with the SPoT loss",
                       description="Train with SPoT's reward BCE (or DPO) on packed pairs; the "
                                   "LM head's logits are never materialised.")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags win)")
    for name, (typ, metavar) in TRAIN_FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, metavar=metavar,
                       default=None, help=HELP[name] + ("" if default is None
                                                        else f" (default {default})"))
    for name in BOOL_FLAGS:  # --flag / --no-flag; None when neither is given
        on = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), dest=name,
                       action=argparse.BooleanOptionalAction, default=None,
                       help=HELP[name] + (" (default on)" if on else " (default off)"))
    p.set_defaults(func=run_train, parser=p)
    return p


def run_train(args):
    from .train import train
    values = load_file(args.config) if args.config else {}
    overrides = {k: getattr(args, k) for k in list(TRAIN_FLAGS) + list(BOOL_FLAGS)}
    cfg = make_config(values, overrides)
    result = train(cfg)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # under torchrun: NCCL warns at exit
        dist.destroy_process_group()                   # about a process group left open
    return 130 if result.get("interrupted") else 0  # stopped by a signal, checkpoint saved


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def add_demo_parser(sub):
    p = sub.add_parser("demo", help="train a small Qwen3 on bundled pairs (CPU, a minute or two)",
                       description="The embedded default: a small random-init Qwen3 (2.0M "
                                   "parameters), a download-free "
                                   "tokenizer and bundled rectified arithmetic pairs; prints a "
                                   "before/after table and writes a plot.")
    p.add_argument("--output", default="runs/demo", metavar="DIR",
                   help="output folder (default runs/demo)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="optimizer steps (default: the demo's own setting)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: torch's, one per core; 1 on a CPU that other "
                        "work keeps busy)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar")
    p.set_defaults(func=run_demo, parser=p)
    return p


def run_demo(args):
    from .demo import run
    run(args.output, steps=args.steps, progress=args.progress, threads=args.threads)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="spot", description="Surgical Post-Training (SPoT): "
                                     "train, demo, and build rectified pairs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_demo_parser(sub)
    try:  # the data pipeline registers itself (another module; optional here)
        from .rectify import cli as rectify_cli
    except ImportError:
        rectify_cli = None
    if rectify_cli is not None and hasattr(rectify_cli, "add_parser"):
        rectify_cli.add_parser(sub)
    return parser


# the [train] extras by module name -> package name (pyproject.toml)
EXTRAS = {"transformers": "transformers", "datasets": "datasets", "safetensors": "safetensors",
          "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib", "pyarrow": "pyarrow"}


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the subcommand's usage (parse_args would print the top-level one)
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = args.func(args)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"spot: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        name = (e.name or "").split(".")[0]
        if name not in EXTRAS or importlib.util.find_spec(name) is not None:
            raise  # not an extra, or an installed one missing a part: the traceback says what
        print(f"spot: error: {EXTRAS[name]} is not installed: pip install "
              f"'spot-kernels[train]' (the trainer's extras)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spot: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a folder that cannot be made or written (a permission, a full disk)
        print(f"spot: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
