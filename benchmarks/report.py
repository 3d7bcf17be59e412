"""Turn pytest-benchmark JSON from ``pytest benchmarks/`` into a markdown table and plots.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--output DIR] [--summary]

Writes into ``DIR`` (default ``benchmarks/results/``):

* ``results.md``: per mode (forward; forward+backward; SPoT loss forward+backward), one row per
  shape and implementation: median ms, achieved TFLOP/s, the fraction of a same-shape GEMM timed
  in the same run, peak MB above the inputs, and time and memory relative to the naive reference;
  headed by the device, date and versions the JSON records;
* ``vs_n.png`` and ``vs_v.png``: time (top) and peak memory (bottom) against the number of tokens
  N and against the vocabulary V, one panel per mode and one line per implementation.

``--summary`` prints a compact plain-text table instead of (or as well as, with ``--output``)
writing files, then each speed and memory target of the issues as met, missed or without data
(``targets``); the GPU suite prints it last. Only the points that carry our ``extra_info`` (the
suites in this folder) are tabulated; the others (the trainer step, the CUDA epilogues) follow
as one line of numbers each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

MODES = {"fwd": "token_logprobs forward", "fwd_bwd": "token_logprobs forward+backward",
         "spot_loss": "spot_loss forward+backward"}
OURS = ("triton", "triton_da", "triton_da48", "triton_exact", "triton_filter", "triton_bounded",
        "triton_det", "cuda", "torch")
PEERS = ("naive", "naive_compile", "torch_lce", "liger", "cce", "trl")
ORDER = OURS + PEERS


def load(paths):
    """Rows (the ``extra_info`` of each point, plus its median) and the runs' metadata."""
    rows, meta, other = [], [], []
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):  # conftest's --points: one point a line, maybe cut short
                data = {"benchmarks": [p for p in map(_point, f) if p is not None]}
            else:
                data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
            raise ValueError(f"{path}: a JSON object with a list of benchmarks was expected")
        mi = data.get("machine_info") or {}
        meta.append(dict(date=str(data.get("datetime") or "")[:10], host=mi.get("node", ""),
                         cpu=(mi.get("cpu") or {}).get("brand_raw", ""),
                         python=mi.get("python_version", ""),
                         commit=(data.get("commit_info") or {}).get("id", "")[:10]))
        for b in data.get("benchmarks", []):
            if not isinstance(b, dict):
                raise ValueError(f"{path}: a benchmark entry is not an object: {b!r:.60}")
            info = dict(b.get("extra_info") or {})
            if "impl" not in info or "mode" not in info:
                other.append((b.get("name", "?"), info))
                continue
            info.setdefault("ms", b["stats"]["median"] * 1e3)
            rows.append(info)
    return rows, meta, other


def _point(line):
    """One line of a points file, or None for a line cut short by a kill."""
    try:
        point = json.loads(line)
    except json.JSONDecodeError:
        return None
    return point if isinstance(point, dict) else None


def _key(r):
    return (list(MODES).index(r["mode"]) if r["mode"] in MODES else 9, r.get("head", ""),
            r["dtype"], r["n"], r["v"],
            ORDER.index(r["impl"]) if r["impl"] in ORDER else 99)


def _fmt(x, spec, scale=1.0):
    return format(x * scale, spec) if isinstance(x, (int, float)) and x == x else "-"


def markdown(rows, meta, other=()):
    devices = sorted({r.get("device", "?") for r in rows})
    dates = sorted({m["date"] for m in meta if m["date"]})
    lines = [f"Device: {', '.join(devices)}. Date: {', '.join(dates) or '?'}."]
    commits = sorted({m["commit"] for m in meta if m["commit"]})
    if commits:
        lines[-1] += f" Commit: {', '.join(commits)}."
    lines += ["", "Median time; TFLOP/s counts the useful work (forward `2NDV`, with backward "
              "`6NDV`) for every implementation; GEMM % = that rate over a same-shape GEMM timed "
              "in the same run; x GEMMs = time over the GEMMs a fused kernel issues (1 for the "
              "forward, 4 with the backward: logits, recomputed logits, dh, dW), timed beside "
              "it; peak MB = memory above the inputs (outputs and gradients included); extra MB "
              "= peak MB less the log-probs and gradients every implementation returns; x naive "
              "= ratio to the materialised-logits reference.", ""]
    by_mode = defaultdict(list)
    for r in sorted(rows, key=_key):
        by_mode[r["mode"]].append(r)
    for mode, rs in by_mode.items():
        lines += [f"### {MODES.get(mode, mode)}", "",
                  "| head | N | D | V | dtype | implementation | ms | TFLOP/s | GEMM % | x GEMMs "
                  "| peak MB | extra MB | time x naive | memory x naive |",
                  "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | ---: |"]
        for r in rs:
            name = r.get("label", r["impl"])
            if r.get("ours"):
                name = f"**{name}**"
            lines.append(
                f"| {r.get('head', '')} | {r['n']} | {r['d']} | {r['v']} | {r['dtype']} | {name} "
                f"| {_fmt(r['ms'], '.1f')} | {_fmt(r.get('tflops'), '.3g')} "
                f"| {_fmt(r.get('gemm_fraction'), '.0f', 100)} | {_fmt(r.get('x_gemms'), '.2f')} "
                f"| {_fmt(r.get('peak_mb'), '.1f')} | {_fmt(r.get('extra_mb'), '.1f')} "
                f"| {_fmt(r.get('time_vs_naive'), '.2f')} | {_fmt(r.get('mem_vs_naive'), '.3f')} |")
        lines.append("")
    if other:
        lines += ["Other benchmarks in the same JSON:", ""]
        lines += [f"* `{name}`: {_facts(info)}" for name, info in other]
        lines.append("")
    goals = targets(rows, other)  # also here: a run killed before its summary printed keeps them
    if goals:
        lines += ["### Targets", "", "```", goals, "```", ""]
    return "\n".join(lines)


def _facts(info):
    """The numbers of a point outside the kernel table (trainer steps, epilogue bandwidth)."""
    keep = {k: v for k, v in info.items() if isinstance(v, (int, float, str))
            and k not in ("device", "rows", "v", "dtype")}
    return " ".join(f"{k}={format(v, '.4g') if isinstance(v, float) else v}"
                    for k, v in keep.items())


def summary(rows, other=()):
    """A compact plain-text table: one line per point (``launch``: the host's ms to issue a
    CUDA point's work; near ``ms``, the point is launch-bound); then the other points'
    numbers."""
    out = [f"{'mode':<9} {'head':<11} {'N':>6} {'V':>7} {'dtype':<8} {'impl':<14} {'ms':>10} "
           f"{'launch':>7} {'TFLOP/s':>8} {'GEMM%':>6} {'xGEMMs':>6} {'peakMB':>9} {'extraMB':>9} "
           f"{'t/naive':>7} {'m/naive':>7}"] if rows else []
    for r in sorted(rows, key=_key):
        out.append(f"{r['mode']:<9} {r.get('head', ''):<11} {r['n']:>6} {r['v']:>7} "
                   f"{r['dtype']:<8} {r['impl']:<14} {_fmt(r['ms'], '10.2f')} "
                   f"{_fmt(r.get('launch_ms'), '7.2f')} "
                   f"{_fmt(r.get('tflops'), '8.3g')} {_fmt(r.get('gemm_fraction'), '6.1f', 100)} "
                   f"{_fmt(r.get('x_gemms'), '6.2f')} "
                   f"{_fmt(r.get('peak_mb'), '9.1f')} {_fmt(r.get('extra_mb'), '9.1f')} "
                   f"{_fmt(r.get('time_vs_naive'), '7.2f')} "
                   f"{_fmt(r.get('mem_vs_naive'), '7.3f')}")
    out += [f"{name}: {_facts(info)}" for name, info in other if info]
    return "\n".join(out)


MAIN = ("qwen3-8b", 16384, "bfloat16")  # the head, N and dtype the GPU targets are stated at
TRITON_FWD_BWD = ("triton", "triton_da", "triton_da48", "triton_bounded", "triton_exact",
                  "triton_det")


def targets(rows, other=()):
    """The issues' speed and memory targets checked against these points, one line each:
    ``[met]``, ``[MISSED]`` or ``[no data]`` (the point did not run)."""
    out = []

    def check(ok, text):
        out.append(f"  [{'no data' if ok is None else 'met' if ok else 'MISSED'}] {text}")

    def at(mode, impl, head=MAIN, like=None):
        # ``like``: a row whose D and V the point must share (a named head's grid may hold
        # several at one N: the CPU's "small" head at V = 4096, 8192 and 16384)
        return next((r for r in rows if (r["mode"], r.get("head"), r["n"], r["dtype"],
                                         r["impl"]) == (mode, *head, impl)
                     and (like is None or (r.get("d"), r.get("v")) == (like.get("d"),
                                                                        like.get("v")))), None)

    def x(r, key, spec=".2f"):
        return _fmt(None if r is None else r.get(key), spec)

    def val(r, key):
        return None if r is None or r.get(key) is None else r[key]

    def le(a, b):
        return None if a is None or b is None else a <= b

    def both(a, b):  # three-valued and: False wins, then missing data
        return False if a is False or b is False else None if a is None or b is None else True

    if any(r.get("head") == MAIN[0] for r in rows):
        out.append("targets at the {} head, N = {}, {} (issues 3, 4, 6):".format(*MAIN))
        r = at("fwd", "triton")
        check(le(val(r, "x_gemms"), 1.25), f"triton forward within 1.25x of a GEMM: "
              f"{x(r, 'x_gemms')}x")
        for impl in TRITON_FWD_BWD:
            r = at("fwd_bwd", impl)
            if r is None and impl != "triton":
                continue
            fast, small = le(val(r, "x_gemms"), 1.5), le(val(r, "extra_mb"), 64)
            check(both(fast, small),
                  f"{impl} forward+backward within 1.5x of 4 GEMMs ({x(r, 'x_gemms')}x) and "
                  f"64 MB beyond inputs and gradients ({x(r, 'extra_mb', '.0f')} MB)")
        r, base = at("fwd_bwd", "triton_filter"), at("fwd_bwd", "triton")
        fx, bx = val(r, "x_gemms"), val(base, "x_gemms")
        check(None if fx is None or bx is None else fx < min(bx, 1.5),
              f"triton_filter faster than the unfiltered and than 1.5x: {x(r, 'x_gemms')}x")
        for peer in ("liger", "cce", "trl"):
            p = at("fwd_bwd", peer)
            if p is not None:
                check(le(val(base, "ms"), p["ms"]), f"triton forward+backward faster than "
                      f"{peer}: {x(base, 'ms')} vs {x(p, 'ms')} ms")
        r = at("fwd_bwd", "cuda")
        check(le(val(r, "x_gemms"), 1.15), f"cuda forward+backward within 1.15x of 4 GEMMs: "
              f"{x(r, 'x_gemms')}x")
        fracs = {i.get("kernel"): i.get("fraction_of_copy") for _, i in other
                 if i.get("fraction_of_copy") is not None}
        for kernel in ("lse_forward", "backward_epilogue"):
            f = fracs.get(kernel)
            check(None if f is None else f >= 0.8, f"cuda {kernel} at 80% or more of the copy's "
                  f"bandwidth: {_fmt(f, '.0f', 100)}%")
        ours = [r for r in rows if r.get("ours") and (r["mode"], r.get("head"), r["n"],
                                                      r["dtype"]) == ("spot_loss", *MAIN)]
        best = min(ours, key=lambda r: r["ms"], default=None)
        for peer in PEERS:
            p = at("spot_loss", peer)
            if p is not None:
                ok = None if best is None else both(best["ms"] < p["ms"],
                                                    le(val(best, "peak_mb"), val(p, "peak_mb")))
                check(ok, f"spot_loss ({'-' if best is None else best['impl']}) ahead of {peer}:"
                      f" {x(best, 'ms')} vs {x(p, 'ms')} ms, {x(best, 'peak_mb', '.0f')} vs "
                      f"{x(p, 'peak_mb', '.0f')} MB")
    # not a target: what the softcap costs each implementation, a "-capC" head's point against
    # the plain head's at the same N and dtype
    capped = [r for r in rows if r.get("softcap") is not None and r["mode"] == "fwd_bwd"]
    if capped:
        out.append("what a final-logit softcap costs (forward+backward, capped vs plain):")
    for r in sorted(capped, key=_key):
        plain = at("fwd_bwd", r["impl"], (r["head"].rsplit("-cap", 1)[0], r["n"], r["dtype"]), r)
        ratio = "" if val(plain, "ms") is None else f" ({r['ms'] / plain['ms']:.2f}x)"
        out.append(f"  {r['impl']} at {r['head']} N = {r['n']} {r['dtype']}: "
                   f"{x(r, 'ms')} vs {x(plain, 'ms')} ms{ratio}")
    # the CPU point of test_bench_torch_backend.py (N 4096, D 512, V 32768, float32)
    small = [r for r in rows if r.get("head") == "issue2" and r["mode"] == "fwd_bwd"]
    mine = [r for r in small if r["impl"] == "torch"]
    if mine:
        out.append("targets of the torch backend on the CPU (issue 4):")
        worst = max((r["time_vs_naive"] for r in mine if val(r, "time_vs_naive") is not None),
                    default=None)
        check(le(worst, 1.4), "forward+backward at most 1.4x the naive time: worst "
              f"{_fmt(worst, '.2f')}x")
        worst = max((r["mem_vs_naive"] for r in mine if val(r, "mem_vs_naive") is not None),
                    default=None)
        check(le(worst, 0.1), "at most 10% of the naive peak memory: worst "
              f"{_fmt(worst, '.1f', 100)}%")
        lce = {(r["n"], r["v"]): r["ms"] for r in small if r["impl"] == "torch_lce"}
        pairs = [(r["ms"], lce[(r["n"], r["v"])]) for r in mine if (r["n"], r["v"]) in lce]
        check(None if not pairs else all(a <= b for a, b in pairs),
              "not slower than F.linear_cross_entropy chunked: worst "
              + ("-" if not pairs else f"{max(a / b for a, b in pairs):.2f}x"))
    return "\n".join(out)


def _series(rows, axis):
    """Per mode, the fixed setting with the most distinct values of ``axis`` ('n' or 'v'),
    and its points per implementation: ``{mode: (title, {impl: [(x, ms, mb)]})}``. The points
    of a softcapped head are left out (each is a single point beside its plain head's)."""
    fixed = ("d", "v", "dtype") if axis == "n" else ("n", "d", "dtype")
    out = {}
    for mode in MODES:
        groups = defaultdict(list)
        for r in rows:
            if r["mode"] == mode and r.get("softcap") is None:
                groups[tuple(r[k] for k in fixed)].append(r)
        best = max(groups.items(), key=lambda kv: len({r[axis] for r in kv[1]}), default=None)
        if best is None or len({r[axis] for r in best[1]}) < 2:
            continue
        lines = defaultdict(list)
        for r in best[1]:
            lines[r["impl"]].append((r[axis], r["ms"], r.get("peak_mb"), r.get("head", "")))
        title = ", ".join(f"{k}={v}" for k, v in zip(fixed, best[0]))
        out[mode] = (title, {k: sorted(v) for k, v in lines.items()})
    return out


def plots(rows, outdir):
    """``vs_n.png`` and ``vs_v.png``; returns the paths written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"report: no plots ({exc})", file=sys.stderr)
        return []
    devices = ", ".join(sorted({r.get("device", "?") for r in rows}))
    written = []
    for axis, label in (("n", "tokens N"), ("v", "vocabulary V")):
        series = _series(rows, axis)
        if not series:
            continue
        fig, axes = plt.subplots(2, len(series), figsize=(5 * len(series), 7.5), squeeze=False)
        for col, (mode, (title, lines)) in enumerate(series.items()):
            for impl in sorted(lines, key=lambda i: ORDER.index(i) if i in ORDER else 99):
                pts = lines[impl]
                style = "-o" if impl in OURS else "--s"
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
                mem = [(p[0], p[2]) for p in pts if p[2] is not None]
                if mem:
                    axes[1][col].plot([m[0] for m in mem], [m[1] for m in mem], style, label=impl)
            axes[0][col].set_title(f"{MODES[mode]}\n{title}", fontsize=9)
            axes[0][col].set_ylabel("median time (ms)")
            axes[1][col].set_ylabel("peak memory above inputs (MB)")
            for ax in axes[:, col]:
                ax.set_xlabel(label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
            axes[0][col].legend(fontsize=8)
        fig.suptitle(f"spot-kernels vs peers against {label} ({devices})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(outdir, f"vs_{axis}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+",
                    help="pytest-benchmark JSON file(s), or the JSON lines of --points")
    ap.add_argument("--output", default=None,
                    help="folder for results.md and the plots (default benchmarks/results/)")
    ap.add_argument("--summary", action="store_true", help="print a compact table")
    args = ap.parse_args(argv)
    for path in args.results:
        if not os.path.isfile(path):
            ap.error(f"results: no such file {path!r}")
    try:
        rows, meta, other = load(args.results)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        why = str(e).splitlines()[0] if str(e) else repr(e)
        ap.error(f"results: not pytest-benchmark JSON ({why})")
    if args.summary:
        print(summary(rows, other) if rows or other
              else "no benchmark points in " + ", ".join(args.results))
        goals = targets(rows, other)
        if goals:
            print(goals)
        if args.output is None:
            return 0
    if not rows:
        print(f"report: no spot-kernels benchmark points in {args.results}", file=sys.stderr)
        return 1
    outdir = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(outdir, exist_ok=True)
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(rows, meta, other) + "\n")
    for path in [md] + plots(rows, outdir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
