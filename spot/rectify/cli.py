"""``spot rectify``: argument parsing for the data pipeline; the work lives in the step modules.

The main CLI mounts this with ``spot.rectify.cli.add_parser(subparsers)`` and calls
``args.func(args)``; every sub-subcommand sets its own ``func``.
"""
from __future__ import annotations

import argparse

from .elicit import DTYPES


def add_parser(subparsers):
    """Register ``rectify`` (with ``elicit``, ``correct``, ``filter``, ``run``) on ``subparsers``."""
    p = subparsers.add_parser("rectify", help="build SPoT pairs: elicit errors, Oracle corrections, "
                              "proximity filter",
                              description="The SPoT data pipeline (elicit -> correct -> filter).")
    p.set_defaults(func=lambda args: p.print_help() or 2, parser=p)
    sub = p.add_subparsers(dest="rectify_command", metavar="{elicit,correct,filter,run}")

    e = sub.add_parser("elicit", help="sample the model's answers; keep the wrong ones")
    _elicit_args(e, output_help="output folder (all.jsonl, errors.jsonl)")
    e.set_defaults(func=_run_elicit)

    c = sub.add_parser("correct", help="ask an Oracle for minimal corrections of wrong answers")
    c.add_argument("--input", required=True, help="errors.jsonl from elicit")
    c.add_argument("--output", required=True, help="corrected.jsonl (appended, resumable)")
    _oracle_args(c)
    c.set_defaults(func=_run_correct)

    f = sub.add_parser("filter", help="keep verified corrections close to the original answer")
    f.add_argument("--input", required=True, help="corrected.jsonl from correct")
    f.add_argument("--output", required=True, help="pairs.jsonl for spot train")
    _filter_args(f)
    f.set_defaults(func=_run_filter)

    r = sub.add_parser("run", help="elicit, correct and filter into one output folder")
    _elicit_args(r, output_help="output folder (all, errors, corrected, pairs .jsonl)")
    _oracle_args(r)
    _filter_args(r, tokenizer_required=False)
    r.set_defaults(func=_run_all)
    for q in (e, c, f, r):
        q.set_defaults(parser=q)  # the usage an unknown argument is reported with
        q.add_argument("--no-progress", dest="progress", action="store_false",
                       help="hide the progress bars (transformers' loading bars too)")
    return p


def _elicit_args(p, output_help):
    p.add_argument("--model", required=True, help="model path or name (transformers)")
    p.add_argument("--data", required=True, help="problems JSONL: prompt|question|problem and "
                   "answer|solution|ground_truth")
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("--samples", type=int, default=1, help="answers per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature, >= 0 (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.8,
                   help="nucleus sampling, (0, 1] (default 0.8)")
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="answer length limit (default 2048)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts a generation call (default 8)")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="generation engine (vllm only when installed)")
    p.add_argument("--system-prompt", default=None, help="optional system message")
    p.add_argument("--limit", type=int, default=None, help="only the first N >= 0 problems")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model weights' dtype (default auto: bfloat16 on a GPU, else float32)")


def _oracle_args(p):
    p.add_argument("--oracle-url", required=True, help="OpenAI-compatible base URL (.../v1)")
    p.add_argument("--oracle-model", required=True, help="model name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="NAME of the environment variable holding the API key (default "
                        "OPENAI_API_KEY); never the key itself")
    p.add_argument("--workers", type=int, default=16, help="concurrent requests (default 16)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per record (default 5)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds the connection may stay idle (connecting, sending, or between "
                        "two reads of the reply); not a total per-request deadline (default 120)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="base retry delay in seconds (default 1): the k-th retry waits a random "
                        "0.5x-1x of backoff*2^(k-1), capped by --max-backoff")
    p.add_argument("--max-backoff", type=float, default=60.0,
                   help="largest retry delay in seconds (default 60)")
    p.add_argument("--with-ground-truth", action="store_true",
                   help="show the ground-truth answer to the Oracle")
    p.add_argument("--prompt-template", default=None,
                   help="file replacing the correction prompt; must contain {question}, "
                        "{answer}, {start} and {end} (the markers around the corrected "
                        "solution); {ground_truth} only with --with-ground-truth")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo the records a previous run recorded as failed (api_error, the "
                        "transient kind, is redone anyway)")
    p.add_argument("--oracle-temperature", type=float, default=0.0,
                   help="the Oracle's sampling temperature (default 0)")
    p.add_argument("--oracle-max-tokens", type=int, default=None,
                   help="reply length limit, >= 1 (default: the endpoint's)")


def _filter_args(p, tokenizer_required=True):
    p.add_argument("--tokenizer", required=tokenizer_required,
                   help="tokenizer path or name (default for run: --model)")
    p.add_argument("--gamma", type=float, default=0.6, help="max change ratio (default 0.6)")
    p.add_argument("--masks", action="store_true",
                   help="also write the positions of y+ tokens that differ from y-")


def _friendly(fn):
    """Bad input (a ``ValueError`` naming the argument), a missing optional client or a path that
    does not load ends the command with one line and exit status 2, not a traceback; Ctrl-C with
    one line and status 130 (what was written stays; rerunning the command resumes)."""
    import functools
    import sys

    @functools.wraps(fn)
    def run(args):
        try:
            return fn(args)
        except ValueError as e:
            print(f"spot rectify: error: {e}", file=sys.stderr)
            return 2
        except ImportError as e:  # an optional client (openai, vllm) that is not installed
            print(f"spot rectify: error: {e}; pip install {e.name or 'it'} (or "
                  f"'spot-kernels[train]')", file=sys.stderr)
            return 2
        except OSError as e:  # a missing file, or a model / tokenizer path that does not load
            why = str(e).splitlines()[0] if str(e) else repr(e)
            print(f"spot rectify: error: {why}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("spot rectify: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
    return run


def _hf_bars(progress):
    """transformers' own bars (loading weights, downloads) off inside with ``--no-progress``
    (imported here: ``spot rectify --help`` loads no torch)."""
    from spot.model import hf_progress_bars
    return hf_progress_bars(progress)


@_friendly
def _run_elicit(args):
    from .elicit import elicit_main
    with _hf_bars(args.progress):
        return elicit_main(args)


@_friendly
def _run_correct(args):  # no transformers: its bar is correct's own
    from .correct import correct_main
    return correct_main(args)


@_friendly
def _run_filter(args):
    from .filter import filter_main
    with _hf_bars(args.progress):
        return filter_main(args)


@_friendly
def _run_all(args):
    from .pipeline import run_main
    with _hf_bars(args.progress):
        return run_main(args)


def main(argv=None):
    """Standalone entry (``python -m spot.rectify.cli``): same as ``spot rectify ...``."""
    parser = argparse.ArgumentParser(prog="spot")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rectify", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
