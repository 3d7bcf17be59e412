"""pytest options and fixtures of the benchmark suites (``pytest benchmarks/``).

``--full``      the real LM heads on any device (the default on a GPU; on a CPU it takes hours);
``--budget-s``  wall-clock seconds for the whole run: points not started by then are skipped,
                so a run cut short still ends cleanly and writes its ``--benchmark-json``;
``--rounds``    timed rounds per point (default 3, after the untimed check and warm-up runs; the
                torch-backend CPU benchmark takes 1 by default, its points cost seconds each).
``--points``    append each finished point to this file as one JSON line (its ``extra_info`` and
                median), so a run killed before pytest-benchmark writes its JSON keeps them;
                ``benchmarks/report.py`` reads such a file too.

The suites run on CUDA when a GPU is present, else on the CPU. A results table is printed at the
end (``benchmarks/report.py`` turns the JSON into markdown and plots).
"""
from __future__ import annotations

import json
import time

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("spot-kernels benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="benchmark the real LM heads (default on a GPU)")
    group.addoption("--budget-s", type=float, default=None,
                    help="skip points that would start after this many seconds")
    group.addoption("--rounds", type=int, default=None, help="timed rounds per point")
    group.addoption("--points", default=None,
                    help="append each finished point to this file as a JSON line")


def pytest_configure(config):
    config._bench_t0 = time.monotonic()
    config._bench_rows = []
    config.addinivalue_line("markers", "bench_priority(p): run order of a point without a "
                            "case (a number, lower first; kernel points use 0-45, the default is 50)")


def pytest_collection_modifyitems(config, items):
    """Most important points first (stable), so a time budget cuts the least important."""
    def prio(item):
        spec = getattr(item, "callspec", None)
        case = spec.params.get("case") if spec else None
        if case is not None:
            return case.priority
        mark = item.get_closest_marker("bench_priority")
        return mark.args[0] if mark else 50  # other points without a case last
    items.sort(key=prio)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Marks a point whose call raised (failed, or skipped from inside an ``except``)."""
    yield
    if call.when == "call" and call.excinfo is not None:
        item._bench_raised = True


def pytest_runtest_teardown(item):
    """A point that raised keeps its tensors (gigabytes at the real heads) alive after it: pytest
    keeps the last failure in ``sys.last_value`` for post-mortems, and an exception raised in an
    ``except`` block chains the first one, whose frames form reference cycles that only the
    cycle collector frees. Drop both now and return the memory to the device, so the points
    after a failure do not run out of memory because of it."""
    if not getattr(item, "_bench_raised", False):
        return
    import gc
    import sys
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """A run stopped mid-point (SIGINT from ``timeout``) leaves a benchmark with no rounds, on
    which pytest-benchmark's JSON writer fails and writes nothing: drop it first, so the points
    that finished are saved."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and getattr(bs, "benchmarks", None):
        bs.benchmarks[:] = [b for b in bs.benchmarks
                            if getattr(getattr(b, "stats", None), "data", None)]
    yield


@pytest.fixture(autouse=True)
def _save_point(request):
    """``--points``: the finished point, appended as it ends (see the module docstring)."""
    yield
    path = request.config.getoption("--points")
    # funcargs is None when an interrupt (the suite's time limit) tears the point down
    bm = (getattr(request.node, "funcargs", None) or {}).get("benchmark") if path else None
    stats = getattr(getattr(bm, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return
    row = {"name": request.node.name, "extra_info": dict(bm.extra_info),
           "stats": {"median": stats.median, "rounds": len(stats.data)}}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def full(request):
    return bool(request.config.getoption("--full"))


@pytest.fixture(scope="session")
def deadline(request):
    budget = request.config.getoption("--budget-s")
    return None if budget is None else request.config._bench_t0 + budget


@pytest.fixture(scope="session")
def rounds(request, device):
    r = request.config.getoption("--rounds")
    return r if r else 3


@pytest.fixture
def record(request):
    """Call ``record(info)`` to add a row to the summary table printed at the end."""
    return request.config._bench_rows.append


def pytest_terminal_summary(terminalreporter, config):
    rows = getattr(config, "_bench_rows", [])
    notes = getattr(config, "_bench_notes", [])
    if not rows and not notes:
        return
    tr = terminalreporter
    tr.section("spot-kernels benchmark summary")
    if rows:
        tr.write_line(f"{'mode':<9} {'head':<11} {'N':>6} {'V':>7} {'dtype':<8} {'impl':<14} "
                      f"{'ms':>10} {'TFLOP/s':>8} {'GEMM%':>6} {'peak MB':>9} {'t/naive':>7} "
                      f"{'m/naive':>7}")

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"
    for r in rows:
        gf = r.get("gemm_fraction")
        tr.write_line(f"{r['mode']:<9} {r['head']:<11} {r['n']:>6} {r['v']:>7} {r['dtype']:<8} "
                      f"{r['impl']:<14} {f(r['ms'], '10.2f')} {f(r['tflops'], '8.3g')} "
                      f"{f(None if gf is None else 100 * gf, '6.1f')} "
                      f"{f(r.get('peak_mb'), '9.1f')} {f(r.get('time_vs_naive'), '7.2f')} "
                      f"{f(r.get('mem_vs_naive'), '7.3f')}")
    for line in notes:
        tr.write_line(line)
