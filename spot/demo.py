"""``spot demo``: SPoT end to end on a laptop CPU, with nothing to download.

* Model: a small random-init Qwen3 (``spot.tiny.build_model``, 2 layers, width 256, 2.0M
  parameters) and the character-level ChatML tokenizer of ``spot.tiny``.
* Data: rectified pairs from :func:`make_pairs`, bundled in ``spot/data/`` (``demo_train.jsonl``,
  ``demo_heldout.jsonl``; regenerate with ``python -m spot.demo --write-data``). Each problem is a
  two-step word problem on single digits (``a+b=s1. s1-c=s2. Answer: s2``); ``y-``
  (``original_answer``) has one slip, a step whose result is off by 1 or 2 (a false fact such as
  ``5+3=9``), and ``y+`` (``gemini_corrected_answer``) is the minimal fix. A held-out
  problem's numbers ``(a, b, c)`` never occur in training (nor, so, its ``y+`` and ``y-``
  texts), but its two facts do, in other problems: what can transfer is the arithmetic facts,
  which a random character-level model can pick up in a minute. (Errors that must be spotted by copying or
  comparing distant numbers are beyond it at this size and time.)
* Run: the same ``spot.train.train`` as ``spot train`` (SPoT loss, running ``delta``), then a
  before/after table on the held-out pairs and ``demo.png`` (loss and rewards per step).

"before" is the untrained model, which is also the frozen reference: every reward
``beta (pi - rho)`` is then 0, so the reward accuracy (``r+ > r-``, strict, as TRL counts it) is 0
by construction. "prefers y+" is the share of pairs where the model itself gives ``y+`` the higher
log-probability: chance-like for the random model, and what training should raise.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"  # package data; ``spot.data`` (data.py) is the module
NAMES = ["Mia", "Leo", "Ana", "Sam", "Ivy", "Tom", "Zoe", "Max", "Eva", "Ben", "Kai", "Liz"]
ITEMS = ["apples", "pens", "coins", "books", "cards", "shells", "stamps", "marbles"]
SUMS = [(a, b) for a in range(2, 9) for b in range(1, 10 - a)]  # the 28 sums the problems use
MODEL = dict(hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate_size=1024)
TRAIN = dict(beta=0.1, delta="running", lr=3e-3, warmup_ratio=0.05, tokens_per_batch=1200,
             max_steps=600)


def make_pair(rng):
    """One problem: ``{question, gemini_corrected_answer (y+), original_answer (y-)}``.

    Every number is a single digit: ``a + b = s1 <= 9``, ``s1 - c = s2 >= 0``. ``y-`` has one slip:
    the result of one step is written off by 1 or 2 (a false fact such as ``5+3=9``); the work goes
    on from the true value, so ``y+`` fixes one result (and the final answer, where the slip is in
    the second step)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.choice(SUMS)
    s1 = a + b
    c = rng.randint(1, s1)
    s2 = s1 - c
    question = f"{name} has {a} {item}, gets {b}, gives {c}. How many?"

    def answer(r1, r2):
        return f"{a}+{b}={r1}. {s1}-{c}={r2}. Answer: {r2}"
    if rng.random() < 0.5:  # the sum is written wrong
        bad = answer(rng.choice([s1 + d for d in (-2, -1, 1, 2) if 0 <= s1 + d <= 9]), s2)
    else:  # the difference is wrong, and so is the answer
        bad = answer(s1, rng.choice([s2 + d for d in (-2, -1, 1, 2) if 0 <= s2 + d <= 9]))
    return {"question": question, "gemini_corrected_answer": answer(s1, s2),
            "original_answer": bad}


def make_pairs(n, seed):
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def write_data(folder=DATA_DIR, n_train=240, n_heldout=64):
    """The bundled splits. A held-out problem's numbers ``(a, b, c)`` never occur in training
    (so neither its ``y+`` nor its ``y-`` text does: the answers do not name the person or the
    item); its two facts ``a+b`` and ``s1-c`` do, in other problems."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heldout = make_pairs(n_heldout, seed=2)
    held = {p["gemini_corrected_answer"] for p in heldout}  # one text per (a, b, c)
    train = [p for p in make_pairs(8 * n_train, seed=1)
             if p["gemini_corrected_answer"] not in held][:n_train]
    for name, rows in (("demo_train.jsonl", train), ("demo_heldout.jsonl", heldout)):
        with open(folder / name, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return folder / "demo_train.jsonl", folder / "demo_heldout.jsonl"


def heldout_stats(pi, ref, beta):
    """Reward statistics of interleaved (chosen, rejected) log-probs."""
    r = beta * (pi - ref)
    rc, rr = r[0::2], r[1::2]
    return {"reward accuracy": float((rc > rr).float().mean()),
            "prefers y+": float((pi[0::2] > pi[1::2]).float().mean()),
            "reward chosen": float(rc.mean()), "reward rejected": float(rr.mean()),
            "margin": float((rc - rr).mean())}


def plot(metrics_path, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [r["loss"] for r in rows], color="k")
    ax1.set(xlabel="step", ylabel="SPoT loss", title="loss")
    ax2.plot(steps, [r["rewards_chosen"] for r in rows], label="chosen y+")
    ax2.plot(steps, [r["rewards_rejected"] for r in rows], label="rejected y-")
    ax2.plot(steps, [r["margin"] for r in rows], label="margin", linestyle="--")
    ax2.set(xlabel="step", ylabel="beta (logp - ref)", title="rewards (train batches)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run(output="runs/demo", steps=None, progress=True, n_train=None, n_heldout=None,
        model_overrides=None, log=None, train_overrides=None, threads=None):
    """Trains the demo and returns ``{"before", "after", "metrics", "png"}``. ``threads``:
    torch's CPU threads for the run (default: torch's own, one per core; on a CPU that other
    work keeps busy, 1 avoids OpenMP's barriers waiting on descheduled threads)."""
    for name, x in (("steps", steps), ("threads", threads)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {x!r}")
    import matplotlib  # noqa: F401 - the plot's, missing: found before a minute of training
    from .model import hf_progress_bars
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with hf_progress_bars(False):
            return _run(output, steps, progress, n_train, n_heldout, model_overrides, log,
                        train_overrides)
    finally:
        torch.set_num_threads(before)


def _run(output, steps, progress, n_train, n_heldout, model_overrides, log, train_overrides):
    from . import data as D
    from .config import ConfigError, TrainConfig, check_folder
    from .model import Policy, load_model
    from .tiny import build_model, build_tokenizer
    from .train import checkpoints, sequence_logps, train

    log = log or (lambda m: print(m, file=sys.stderr))
    torch.manual_seed(0)
    out = Path(output)
    # the demo replaces its own previous run in ``out`` (metrics, checkpoints, model): only in
    # a folder it made (marked), never in one that holds anything else
    marker = out / ".spot-demo"
    older = (out / "base-model").is_dir() and (out / "demo.png").is_file()  # before the marker
    if out.is_dir() and any(out.iterdir()) and not (marker.exists() or older):
        raise ConfigError(f"output: {out} is not empty and not a spot demo folder; give a new "
                          f"or empty --output")
    check_folder("output", out)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    train_path, held_path = DATA_DIR / "demo_train.jsonl", DATA_DIR / "demo_heldout.jsonl"
    if not train_path.exists() or n_train or n_heldout:
        train_path, held_path = write_data(out / "data", n_train or 240, n_heldout or 64)
    base = out / "base-model"
    tok = build_tokenizer()
    model = build_model("qwen3", **{**MODEL, **(model_overrides or {})})
    model.save_pretrained(base)
    tok.save_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    # the demo's folder is its own: a rerun replaces the previous run's metrics and checkpoints
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for _, old in checkpoints(out):
        shutil.rmtree(old)
    settings = {**TRAIN, **(train_overrides or {})}
    steps = settings.pop("max_steps") if steps is None else steps
    settings.pop("max_steps", None)
    cfg = TrainConfig(model=str(base), data=str(train_path), output=str(out), max_steps=steps,
                      epochs=1, max_length=256, grad_accum=1, log_every=10, progress=progress,
                      seed=0, device="cpu", **settings)  # the CPU demo, with a GPU present too
    pairs, _ = D.read_pairs(held_path)
    held, _ = D.encode_pairs(tok, pairs, cfg.max_length)
    policy = Policy(load_model(str(base)))
    ref = sequence_logps(policy, held, cfg, "cpu", desc="held-out, before")
    before = heldout_stats(ref, ref, cfg.beta)
    del policy
    log(f"demo: small Qwen3 ({n_params / 1e6:.1f}M parameters, random init), "
        f"{sum(1 for _ in open(train_path))} training pairs, {len(held)} held-out pairs")
    t0 = time.perf_counter()
    result = train(cfg, log=log, handle_signals=False)  # Ctrl-C stops the demo at once
    seconds = time.perf_counter() - t0
    after = heldout_stats(sequence_logps(result["policy"], held, cfg, "cpu", desc="held-out, after"),
                          ref, cfg.beta)

    png = out / "demo.png"
    plot(out / "metrics.jsonl", png)
    lines = [f"held-out pairs ({len(held)}, never trained on) after {result['steps']} steps "
             f"in {seconds:.0f}s:",
             f"{'':18}{'before':>10}{'after':>10}"]
    for k in before:
        lines.append(f"{k:18}{before[k]:>10.3f}{after[k]:>10.3f}")
    lines.append("before = the random model, which is also the reference: rewards are 0 by "
                 "construction;\n'prefers y+' = log p(y+) > log p(y-) under the model itself.")
    lines.append(f"plot: {png}   metrics: {out / 'metrics.jsonl'}   model: {out}")
    print("\n".join(lines))
    return {"before": before, "after": after, "metrics": result["metrics"], "png": str(png)}


if __name__ == "__main__":
    if "--write-data" in sys.argv:
        print(*write_data(), sep="\n")
    else:
        run(*(sys.argv[1:2] or []))
