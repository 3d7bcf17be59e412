"""``benchmarks/gpu_suite.sh --dry-run`` runs end to end on a machine without a GPU, so the script
that a short GPU lease depends on stays tested: its stages run under their time limits, the
benchmark JSON, report and ceilings come out, the summary table is printed last, and a budget too
small for anything still ends cleanly. (About 30-50 s on 2 cores.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, budget, *args):
    env = dict(os.environ, SUITE_BUDGET_S=str(budget), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_dry_run_end_to_end(tmp_path):
    res = _run(tmp_path, 110)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    # the ceilings were measured and saved
    ceil = json.loads((tmp_path / "ceilings.json").read_text())
    assert ceil["copy_gbps"] > 0 and ceil["gemm_tflops"] > 0
    # benchmark points with our extra_info, and the report made from them
    data = json.loads((tmp_path / "bench.json").read_text())
    points = [b["extra_info"] for b in data["benchmarks"]]
    impls = {p["impl"] for p in points}
    assert {"naive", "torch"} <= impls, impls
    for p in points:
        assert p["ms"] > 0 and p["check_err"] <= p["check_bound"]
        assert p["peak_mb"] is not None or "memory_note" in p  # no procfs peak RSS: says why
        assert p["x_gemms"] > 0 and ("extra_mb" in p or "memory_note" in p)
    assert "torch" in (tmp_path / "results.md").read_text()
    # the same points, line by line as they finished (what a killed run would keep), and the
    # report reads them as well, even with a last line cut short
    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["extra_info"]["impl"] for x in lines) == sorted(
        p["impl"] for p in points)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(cut),
                          "--summary"], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and sum(" fwd " in f" {x} " for x in rep.stdout.splitlines()) \
        == len(points), rep.stdout + rep.stderr
    # the summary table comes last: its header, every stage, then one line per point
    tail = out[out.rindex("= summary ="):]
    for stage in ("install", "ceilings", "gpu-tests", "memcheck", "gpu-sweep", "benchmarks"):
        assert stage in tail, tail
    assert "skipped x1: " in tail, tail  # why a row is missing (torch.compile here)
    last = [line for line in tail.strip().splitlines()][-len(points):]
    assert all(line.split()[0] == "fwd" for line in last), tail
    assert (tmp_path / "suite.log").read_text().strip().endswith(out.strip().splitlines()[-1])


def test_tiny_budget_stops_cleanly(tmp_path):
    res = _run(tmp_path, 4)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    tail = res.stdout[res.stdout.rindex("= summary ="):]
    assert "skipped (budget)" in tail and "no benchmark points were written" in tail


def test_tune_dry_run(tmp_path):
    from spot_kernels import triton as tb
    if tb._interpreter_problem():
        pytest.skip(tb._interpreter_problem())
    res = _run(tmp_path, 120, "--tune")
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    assert "fastest forward" in out and "fastest backward" in out, out[-3000:]
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"forward", "backward"}
    assert all("ms" in r and r.get("max_diff", r.get("max_rel_diff")) < 1e-2 for r in rows), rows
    tail = out[out.rindex("= summary ="):]
    assert "tune" in tail and "benchmarks" not in tail


def test_bad_argument(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "--frobnicate" in res.stderr


def test_full_grid_runs_the_triton_variants_once_at_the_main_shape():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _bench
    finally:
        sys.path.pop(0)
    for mode in ("fwd", "fwd_bwd", "spot_loss"):
        cases = _bench.cases(mode, "cpu", True)
        ids = [c.id for c in cases]
        assert len(ids) == len(set(ids)), mode
        variants = [c for c in cases if c.impl in _bench.VARIANTS]
        if mode != "fwd_bwd":
            assert not variants
            continue
        assert sorted(c.impl for c in variants) == sorted(_bench.VARIANTS)
        assert {(c.head, c.n, c.dtype) for c in variants} == {("qwen3-8b", 16384, "bfloat16")}
        # after the main shape of every mode, before the sweeps over N and V
        main = [c.priority for c in cases if c.head == "qwen3-8b" and c.n == 16384
                and c.impl not in _bench.VARIANTS and c.impl != "naive_compile"]
        assert all(v.priority >= max(main) for v in variants)
        assert all(v.priority < c.priority for v in variants for c in cases if c.n == 2048)


def test_a_stage_cut_by_its_budget_still_reports_what_failed(tmp_path):
    """With ``SOFT=1`` a stage cut by its time limit is "cut (budget)", not a failure, unless
    pytest had already reported a failed test: then the suite fails and says how many."""
    body = SCRIPT.read_text()
    stage = body[body.index("stage() {"):]
    stage = stage[:stage.index("\n}\n") + 3]
    test = tmp_path / "test_cut.py"
    test.write_text("import time\ndef test_fails():\n    assert False\n"
                    "def test_slow():\n    time.sleep(60)\n")
    script = tmp_path / "run.sh"
    script.write_text(
        "set -u -o pipefail\nBUDGET=100; T0=$SECONDS; STAGES=(); FAILED=0\n"
        "left() { echo $(( BUDGET - (SECONDS - T0) )); }\n"
        "min() { if [ \"$1\" -lt \"$2\" ]; then echo \"$1\"; else echo \"$2\"; fi; }\n"
        f"{stage}\n"
        f"MIN_S=1 SOFT=1 stage tests 8 0 {sys.executable} -m pytest -q -p no:cacheprovider {test}\n"
        "MIN_S=1 SOFT=1 stage idle 2 0 sleep 30\n"
        "printf '%s\\n' \"${STAGES[@]}\"; echo \"FAILED=$FAILED\"\n")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path).stdout
    assert "cut, 1 failed, after 8s" in out and "cut (budget) after 2s" in out, out
    assert out.rstrip().endswith("FAILED=1"), out
