"""Time the Triton kernels' launch configurations on one head shape, to fill ``configs.py`` from
measurements instead of tile arithmetic.

    python benchmarks/tune_triton.py [--n 16384 --d 4096 --v 151936] [--dtype bfloat16]
                                     [--budget-s 120] [--out tune.json] [--dry-run]

For each candidate of the forward and of the default backward (block sizes, warps, stages; for
the backward ``group_m``; for a few forward candidates a forced ``split_vocab``) it runs the
kernel once (compilation, and a check that the result matches the current default
configuration's), then times it with CUDA events
(``triton.testing.do_bench``, median) and reports ms, TFLOP/s and the time over one same-shape
cuBLAS GEMM timed in the same run (the forward's target is 1.25x of one GEMM; the backward does
three GEMMs' worth of work, so 3x is its floor). The backward also reports the peak memory above
its inputs. A candidate that fails to compile or runs out of resources is listed with the error;
candidates that would start after ``--budget-s`` are skipped. The fastest of each kind is
printed last, ready to paste into ``configs._HOPPER``.

``--dry-run`` (no GPU): the Triton interpreter on a tiny shape with two candidates per kind, so
the script stays tested (``tests/test_gpu_suite_dryrun.py``); its times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the first of each list is the current default; the plain kernels (no bias, softcap or
# entropy: what is timed here) of every candidate compile for sm_90 on Triton 3.6 within a
# 64-byte stack; the last few were checked only that way, so a winner among them needs its
# other variants checked (tests/test_triton_compile.py) before it goes into configs.py
# a forward candidate's sixth field, when given, forces split_vocab: 1 and 3 are what the
# heuristic gave Qwen3-8B's head at N = 16384 before it kept h in L2 (16 now, _splits)
FORWARD = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 3),
           (128, 128, 64, 8, 3, 32), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 32, 8, 3),
           (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 32, 4, 3),
           (128, 256, 64, 8, 3), (128, 256, 32, 8, 3), (128, 256, 64, 16, 3)]
BACKWARD = [(64, 128, 64, 8, 2, 16), (64, 128, 64, 8, 2, 8), (64, 128, 64, 8, 2, 32),
            (64, 128, 64, 8, 3, 16), (64, 128, 32, 8, 2, 16), (128, 128, 32, 16, 2, 16),
            (64, 64, 32, 4, 2, 16), (128, 64, 64, 8, 2, 16),
            (128, 128, 64, 8, 2, 16), (128, 128, 32, 8, 3, 16), (128, 128, 64, 16, 2, 16)]
DRY_FORWARD = [(16, 32, 16, 1, 1), (32, 32, 16, 1, 1), (16, 32, 16, 1, 1, 2)]
# a candidate counts only when it agrees with the default configuration: the forward's log-probs
# within FORWARD_TOL of their largest magnitude, the backward's dh and dW within BACKWARD_TOL in
# relative norm (other tile orders round differently; a wrong kernel misses by far more)
FORWARD_TOL, BACKWARD_TOL = 1e-4, 1e-2
DRY_BACKWARD = [(16, 32, 16, 1, 1, 2), (16, 32, 16, 1, 1, 4)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="interpreter, tiny shape (no GPU)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.n, args.d, args.v = 40, 32, 100
    import torch
    from spot_kernels import triton as tb
    from spot_kernels.triton.configs import FIELDS

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("tune_triton: no CUDA device (use --dry-run to exercise the script)")
        return 2
    dev = "cuda" if cuda else "cpu"
    ok, why = tb.available(dev)
    if not ok:
        print(f"tune_triton: the Triton backend cannot run on {dev}: {why}")
        return 2
    dtype = getattr(torch, args.dtype)
    n, d, v = args.n, args.d, args.v
    deadline = time.monotonic() + args.budget_s
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=gen).div_(d ** 0.25).to(dtype)
    w = torch.randn(v, d, device=dev, generator=gen).div_(d ** 0.25).to(dtype)
    t = torch.randint(0, v, (n,), device=dev, generator=gen)
    g = torch.randn(n, device=dev, generator=gen)

    def timed(fn):
        if cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=500, return_mode="median")
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    gemm_ms = timed(lambda: h @ w.t())
    flops = 2 * n * d * v
    print(f"tune_triton: N={n} D={d} V={v} {args.dtype} on "
          f"{torch.cuda.get_device_name() if cuda else 'the interpreter'}; one GEMM "
          f"{gemm_ms:.2f} ms ({flops / gemm_ms / 1e9:.0f} TFLOP/s)")
    rows = []

    def run(kind, cand):
        cfg = dict(zip(FIELDS, cand))
        extra = {}
        if len(cand) > 5:
            extra = {"group_m" if kind == "backward" else "split_vocab": cand[5]}
        opts = dict(cfg, **extra)
        row = dict(kind=kind, **cfg, **extra)
        if time.monotonic() > deadline:
            row["error"] = "skipped: --budget-s exhausted"
            return row
        try:
            if kind == "forward":
                def fn():
                    return tb.forward(h, w, t, None, ignore_index=-100, **opts)
                out = fn()[0]
                row["max_diff"] = float((out - base["forward"]).abs().max())
                scale = max(1.0, float(base["forward"].abs().max()))
                row["ok"] = bool(row["max_diff"] <= FORWARD_TOL * scale)  # False for NaN
                row["ms"] = timed(fn)
                row["x_gemm"] = row["ms"] / gemm_ms
                row["tflops"] = flops / row["ms"] / 1e9
            else:
                def fn():
                    return tb.backward(h, w, t, None, base["lse"], base["forward"], g,
                                       ignore_index=-100,
                                       needs_input_grad=(True, True, False), **opts)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                dh, dw, _ = fn()
                if cuda:
                    row["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                ref_dh, ref_dw = base["backward"]
                row["max_rel_diff"] = float(max(
                    (dh.float() - ref_dh.float()).norm() / ref_dh.float().norm(),
                    (dw.float() - ref_dw.float()).norm() / ref_dw.float().norm()))
                row["ok"] = bool(row["max_rel_diff"] <= BACKWARD_TOL)  # False for NaN
                del dh, dw
                row["ms"] = timed(fn)
                row["x_gemm"] = row["ms"] / gemm_ms
                row["tflops"] = 3 * flops / row["ms"] / 1e9
        except Exception as exc:  # out of resources, compile errors: list them, go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            if cuda:
                torch.cuda.empty_cache()
        return row

    fwd_c, bwd_c = (DRY_FORWARD, DRY_BACKWARD) if args.dry_run else (FORWARD, BACKWARD)
    # the default configuration's results are the yardstick for every candidate
    logp, lse, _ = tb.forward(h, w, t, None, ignore_index=-100)
    base = {"forward": logp, "lse": lse}
    base["backward"] = tb.backward(h, w, t, None, lse, logp, g, ignore_index=-100,
                                   needs_input_grad=(True, True, False))[:2]
    def save():  # after every candidate: a stage cut short keeps what it timed
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(n=n, d=d, v=v, dtype=args.dtype, gemm_ms=gemm_ms, rows=rows), f,
                          indent=1)

    for kind, cands in (("forward", fwd_c), ("backward", bwd_c)):
        for cand in cands:
            row = run(kind, cand)
            rows.append(row)
            print(_line(row), flush=True)
            save()
    print()
    for kind in ("forward", "backward"):
        best = fastest(rows, kind)
        if best is not None:
            cfg = tuple(best[f] for f in FIELDS)
            extra = "".join(f", {k}={best[k]}" for k in ("group_m", "split_vocab") if k in best)
            print(f"fastest {kind}: {cfg}{extra}  {best['ms']:.2f} ms, "
                  f"{best['x_gemm']:.2f}x one GEMM")
    return 0


def fastest(rows, kind):
    """The fastest timed row of ``kind`` that agrees with the default (``ok``), or None."""
    ok = [r for r in rows if r["kind"] == kind and "ms" in r and r.get("ok")]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _line(r):
    cfg = "x".join(str(r[f]) for f in ("block_m", "block_v", "block_d"))
    cfg += f" w{r['num_warps']} s{r['num_stages']}"
    if "group_m" in r:
        cfg += f" g{r['group_m']}"
    if "split_vocab" in r:
        cfg += f" split{r['split_vocab']}"
    if "error" in r:
        return f"{r['kind']:<9} {cfg:<22} {r['error']}"
    diff = r.get("max_diff", r.get("max_rel_diff"))
    mem = f" {r['peak_mb']:8.0f} MB" if "peak_mb" in r else ""
    return (f"{r['kind']:<9} {cfg:<22} {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
            f"{r['x_gemm']:5.2f}x GEMM  diff {diff:.1e}{mem}"
            f"{'' if r.get('ok') else '  WRONG: not a candidate'}")


if __name__ == "__main__":
    sys.exit(main())
