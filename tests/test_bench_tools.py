"""The benchmark tools' own logic, on the CPU: what the GPU suite relies on to report honestly
(a failure of ours is a failure, a cut-short points file still reports, a wrong launch config is
never the "fastest", memcheck's synchronisation, input rotation past the cache)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# first on the path only while importing: left there, its conftest.py would shadow the tests'
# for processes spawned later (test_distributed's workers import ``conftest`` by name)
sys.path.insert(0, str(BENCH))
try:
    import _bench
    import cuda_memcheck
    import report
    import tune_triton
finally:
    sys.path.remove(str(BENCH))


def test_out_of_memory_fails_ours_and_skips_peers():
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(pytest.fail.Exception, match="triton: out of memory in fwd_bwd"):
        _bench.out_of_memory(_bench.Case("fwd_bwd", "qwen3-8b", 16384, 4096, 151936, "bfloat16",
                                         "triton"), "fwd_bwd", exc)
    with pytest.raises(pytest.skip.Exception, match="naive: out of memory"):
        _bench.out_of_memory(_bench.Case("fwd_bwd", "qwen3-8b", 16384, 4096, 151936, "bfloat16",
                                         "naive"), "fwd_bwd", exc)


def test_memcheck_sync_synchronises_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    monkeypatch.setattr(cuda_memcheck, "DEV", "cuda")
    cuda_memcheck.sync()
    monkeypatch.setattr(cuda_memcheck, "DEV", "cpu")
    cuda_memcheck.sync()
    assert len(calls) == 1


def test_report_reads_a_points_file_cut_short(tmp_path):
    point = {"name": "p", "stats": {"median": 0.5},
             "extra_info": {"impl": "torch", "mode": "fwd", "head": "h", "dtype": "float32",
                            "n": 4, "v": 8, "ms": 500.0}}
    line = json.dumps(point)
    cut = line[:line.index('"extra_info"')] + '"extra_info": {"impl": "naive"}'  # ends in "}"
    path = tmp_path / "points.jsonl"
    path.write_text(line + "\n" + cut + "\n" + line[:30])
    rows, _, _ = report.load([str(path)])
    assert [r["impl"] for r in rows] == ["torch"]


@pytest.mark.parametrize("text", ["not json at all", "[1, 2]", '{"benchmarks": 5',
                                  '{"benchmarks": 5}', '{"benchmarks": [3]}'])
def test_report_refuses_a_file_that_is_not_results_in_one_line(tmp_path, capsys, text):
    path = tmp_path / "g.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        report.main([str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "not pytest-benchmark JSON" in err[-1], err


def test_tuning_never_picks_a_config_that_disagrees():
    rows = [dict(kind="forward", ms=1.0, ok=False), dict(kind="forward", ms=2.0, ok=True),
            dict(kind="forward", ms=0.5, ok=False), dict(kind="backward", error="OOM")]
    assert tune_triton.fastest(rows, "forward")["ms"] == 2.0
    assert tune_triton.fastest(rows, "backward") is None


def test_inputs_rotate_past_the_cache():
    cache = _bench.cache_bytes("cpu")
    _bench._INPUTS.clear()
    sets = _bench.input_sets(64, 256, 20000, "float32", "cpu")  # one set: about a third of it
    size = _bench.input_bytes(sets[0])
    assert cache / 4 < size < cache / 2
    assert 2 * cache <= len(sets) * size < 2 * cache + size  # just enough sets to span 2x
    assert not torch.equal(sets[0]["h"], sets[1]["h"])
    _bench._INPUTS.clear()
    assert len(_bench.input_sets(64, 256, 80000, "float32", "cpu")) == 1  # past the cache
    _bench._INPUTS.clear()


def test_a_peer_that_breaks_the_cuda_context_ends_the_run():
    """A sticky CUDA error from a peer would fail every later point, ours included: the run
    stops there and names the peer; an ordinary peer failure is only that point's skip."""
    class Case:
        impl = "liger"
    with pytest.raises(pytest.exit.Exception, match="liger broke the CUDA context"):
        _bench.poisoned(Case, RuntimeError("CUDA error: an illegal memory access was "
                                           "encountered\nCUDA kernel errors might be ..."))
    _bench.poisoned(Case, RuntimeError("expected scalar type BFloat16 but found Float"))


def test_a_sticky_error_of_ours_ends_the_run_too(monkeypatch):
    """Our own kernel breaking the context (the likeliest first fault of a never-run kernel)
    ends the run with one message, instead of failing every later point with the same error."""
    def broken(h, w, t):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(_bench, "implementation", lambda *a, **k: broken)
    case = _bench.Case("fwd", "small", 32, 16, 64, "float32", "triton")
    with pytest.raises(pytest.exit.Exception, match="triton broke the CUDA context"):
        _bench.bench(None, case, "cpu", rounds=1)
    _bench._INPUTS.clear()


def test_cut_cross_entropy_float32_backward_is_skipped_before_it_runs(monkeypatch):
    ran = []
    monkeypatch.setattr(_bench, "implementation", lambda *a, **k: ran.append(1))
    case = _bench.Case("fwd_bwd", "small", 32, 16, 64, "float32", "cce")
    with pytest.raises(pytest.skip.Exception, match="bfloat16 / float16 only"):
        _bench.bench(None, case, "cpu", rounds=1)
    assert ran == [1]  # resolved, then skipped before any input was made or run


def test_cuda_timing_queues_a_spin_before_the_start_event(monkeypatch):
    """The host's launch work of a sub-millisecond kernel must not land between the events:
    the GPU is kept busy (``torch.cuda._sleep``) until the launch is queued."""
    calls, made = [], []

    class Event:
        def __init__(self, enable_timing):
            self.name = ("start", "stop")[len(made) % 2]
            made.append(self)

        def record(self):
            calls.append(f"record {self.name}")

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, other):
            return 0.5

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append(f"spin {cycles}"))
    secs = _bench.time_fn(lambda: calls.append("fn"), "cuda", reps=1, warmup=0)
    assert calls == [f"spin {_bench.SPIN_CYCLES}", "record start", "fn", "record stop", "sync"]
    assert secs == 0.5e-3


def _right_values_wrong_gradient(h, w, t):
    """Correct log-probs whose gradient misses the target term (``z_t`` detached)."""
    z = h.float() @ w.float().T
    zt = z.detach().gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t != _bench.IGNORE, zt - torch.logsumexp(z, 1), torch.zeros_like(zt))


def _with_backward(bug):
    """Correct log-probs whose backward is ``dA = g (onehot - p)`` changed by ``bug(dA, g, p,
    onehot)`` (float32, gradients rounded to the inputs' dtype as autograd's are)."""
    class Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, t):
            ctx.save_for_backward(h, w, t)
            with torch.no_grad():
                return _right_values_wrong_gradient(h, w, t)

        @staticmethod
        def backward(ctx, g):
            h, w, t = ctx.saved_tensors
            p = torch.softmax(h.float() @ w.float().T, 1)
            onehot = torch.zeros_like(p)
            valid = t != _bench.IGNORE
            onehot[valid.nonzero()[:, 0], t[valid]] = 1
            g = g * valid
            da = bug(g[:, None] * (onehot - p), g, p, onehot)
            return (da @ w.float()).to(h.dtype), (da.T @ h.float()).to(w.dtype), None
    return Head.apply


WRONG = {  # what a kernel could get wrong -> the check groups that must catch it
    "no target term": (lambda da, g, p, oh: -g[:, None] * p, ("dh", "dW targets")),
    "no softmax term": (lambda da, g, p, oh: g[:, None] * oh, ("dW others",)),
    "later token chunks dropped": (
        lambda da, g, p, oh: torch.where(torch.arange(len(g))[:, None] < len(g) // 2, da, 0.0),
        ("dh",)),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_check_passes_autograd_and_catches_wrong_gradients(dtype):
    """Each group has its own bound, so a small term is not hidden under a large one (the
    softmax term is all of the non-target dW rows, far below the target rows in bfloat16), and
    the checked rows span every token chunk."""
    x = _bench.make_inputs(512, 1024, 4096, dtype, "cpu")
    for name in ("naive", "torch"):
        checks = _bench.check_grads(name, _bench.implementation(name, "cpu"), x)
        assert [w for w, _, _ in checks] == ["dh", "dh other rows", "dW targets", "dW others"]
        assert all(err <= bound for _, err, bound in checks), checks
    right = _bench.check_grads("right", _with_backward(lambda da, g, p, oh: da), x)
    assert all(err <= bound for _, err, bound in right), right  # the harness itself is right
    for what, (bug, caught) in WRONG.items():
        checks = {k: (e, b) for k, e, b in _bench.check_grads(what, _with_backward(bug), x)}
        assert all(checks[k][0] > 3 * checks[k][1] for k in caught), (what, checks)
    stray = _with_backward(lambda da, g, p, oh: da + (g == 0)[:, None] * 1e-2 * p.shape[1] * p)
    checks = {k: (e, b) for k, e, b in _bench.check_grads("stray", stray, x)}
    assert checks["dh other rows"][0] > 3 * checks["dh other rows"][1], checks


def _capped_without_slope(softcap):
    """Right softcapped log-probs whose backward takes the cap's slope as 1 (a kernel that
    forgets ``1 - tanh^2(z / c)``)."""
    def fn(h, w, t):
        z = h.float() @ w.float().T
        a = z + (softcap * torch.tanh(z / softcap) - z).detach()
        logp = torch.log_softmax(a, 1).gather(1, t.clamp(min=0)[:, None])[:, 0]
        return torch.where(t != _bench.IGNORE, logp, torch.zeros_like(logp))
    return fn


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_softcapped_heads_checks_pass_ours_and_catch_a_missing_cap_or_slope(dtype):
    """The checks of a softcapped head compare with the capped float64 truth: ours and the
    naive reference given the cap pass; the uncapped values, or the right values with a
    backward that forgets the cap's slope, are caught. A cap of 1 on logits of size ~1 bends
    them enough to tell (at Gemma-2's 30 the benchmark's random logits are nearly linear)."""
    x = _bench.make_inputs(512, 1024, 4096, dtype, "cpu")
    cap = 1.0
    for name in ("naive", "torch"):
        fn = _bench.implementation(name, "cpu", softcap=cap)
        err, bound = _bench.check_values(name, fn, x, softcap=cap)
        assert err <= bound, (name, err, bound)
        checks = _bench.check_grads(name, fn, x, softcap=cap)
        assert all(err <= bound for _, err, bound in checks), (name, checks)
    uncapped = _bench.implementation("torch", "cpu")
    err, bound = _bench.check_values("uncapped", uncapped, x, softcap=cap)
    assert err > 3 * bound, (err, bound)
    # the plain head's truth is kept apart from the capped one's (both cached in x)
    err, bound = _bench.check_values("uncapped", uncapped, x)
    assert err <= bound, (err, bound)
    wrong = _capped_without_slope(cap)
    err, bound = _bench.check_values("no slope", wrong, x, softcap=cap)
    assert err <= bound, (err, bound)
    checks = {k: (e, b) for k, e, b in _bench.check_grads("no slope", wrong, x, softcap=cap)}
    assert all(checks[k][0] > 3 * checks[k][1] for k in ("dh", "dW targets", "dW others")), checks


def test_a_softcapped_point_runs_ours_and_the_naive_with_the_cap_and_skips_peers_without_one():
    """A ``-cap30`` head's point hands the cap to every implementation: ours and the naive
    reference pass its checks and are timed (the naive time is the cap's own); a peer that
    takes no cap is skipped with that reason, not run uncapped."""
    class Bench:
        extra_info = {}
        stats = None

        def pedantic(self, target, setup, rounds, iterations, warmup_rounds):
            for _ in range(rounds):
                args, kwargs = setup()
                target(*args, **kwargs)

    infos = {}
    for head in ("small-cap30", "small"):
        for impl in ("naive", "torch"):
            case = _bench.Case("fwd_bwd", head, 64, 32, 300, "float32", impl)
            assert case.softcap == (30.0 if head != "small" else None)
            b = Bench()
            b.extra_info = {}
            infos[head, impl] = _bench.bench(b, case, "cpu", rounds=2, gemm=False)
    capped = infos["small-cap30", "torch"]
    assert capped["softcap"] == 30.0 and capped["check_err"] <= 1e-4
    assert capped["time_vs_naive"] == capped["ms"] / infos["small-cap30", "naive"]["ms"]
    # the report sets each capped point beside its plain head's, and keeps it out of the plots'
    # lines (one point each, not a sweep)
    rows = list(infos.values())
    lines = report.targets(rows).splitlines()
    assert lines[0].startswith("what a final-logit softcap costs"), lines
    ratio = capped["ms"] / infos["small", "torch"]["ms"]
    assert any(line.strip().startswith("torch at small-cap30 N = 64") and f"({ratio:.2f}x)" in line
               for line in lines), lines
    md = report.markdown(rows, [])  # results.md holds the same lines (a run killed before its
    assert "### Targets" in md and lines[0] in md  # printed summary keeps them)
    rows += [dict(r, n=128) for r in rows]  # a sweep over N of both heads
    for _, lines_of in report._series(rows, "n").values():
        assert all(len(pts) == 2 for pts in lines_of.values()), lines_of
    for peer in ("torch_lce", "trl"):
        with pytest.raises(pytest.skip.Exception, match="takes no final-logit softcap"):
            _bench.bench(Bench(), _bench.Case("fwd_bwd", "small-cap30", 64, 32, 300, "float32",
                                              peer), "cpu", rounds=1, gemm=False)
    _bench._INPUTS.clear()


def test_ours_with_a_wrong_gradient_fails_before_timing(monkeypatch):
    monkeypatch.setattr(_bench, "implementation", lambda *a, **k: _right_values_wrong_gradient)
    case = _bench.Case("fwd_bwd", "small", 64, 32, 300, "float32", "torch")
    with pytest.raises(pytest.fail.Exception, match="torch: gradients disagree .* dh: max err"):
        _bench.bench(None, case, "cpu", rounds=1)
    _bench._INPUTS.clear()


def test_gradient_check_allows_what_a_filter_may_drop():
    """A filtered backward (tiles whose |dA| < eps skipped) is within its documented bound:
    the other dW rows, the softmax term alone, may be dropped whole; the same drop without the
    allowance is a miss."""
    x = _bench.make_inputs(512, 1024, 4096, "bfloat16", "cpu")
    eps = 2.0 ** -12
    dropped = _with_backward(lambda da, g, p, oh: torch.where(da.abs() < eps, 0.0, da))
    strict = {k: (e, b) for k, e, b in _bench.check_grads("filter", dropped, x)}
    assert strict["dW others"][0] > strict["dW others"][1], strict
    loose = _bench.check_grads("filter", dropped, x, filter_eps=eps)
    assert all(err <= bound for _, err, bound in loose), loose


def test_trl_peer_scores_as_trl_trainers_do():
    """The TRL peer's wrapper (ignored tokens score 0, the rest through TRL's fused head) passes
    the value and gradient checks every point runs before timing, at a shape with several of
    TRL's vocabulary tiles and ignored tokens."""
    # the head's backward imports trl.trainer.utils (accelerate, datasets)
    pytest.importorskip("trl.trainer.utils", reason="trl (with accelerate, datasets) not installed")
    x = _bench.make_inputs(96, 32, 2 * _bench.TRL_VOCAB_CHUNK + 300, "float32", "cpu", seed=3)
    fn = _bench.implementation("trl", "cpu")
    err, bound = _bench.check_values("trl", fn, x)
    assert err <= bound, (err, bound)
    assert bool((fn(x["h"], x["w"], x["t"])[x["t"] == _bench.IGNORE] == 0).all())
    for what, err, bound in _bench.check_grads("trl", fn, x):
        assert err <= bound, (what, err, bound)


LEAK = '''
import gc, weakref
import pytest, torch
gc.disable()  # as when the collector has not run yet between two points
alive = {}

def _raise_in_except(name, outcome):
    big = torch.ones(1 << 16)  # a point's inputs
    alive[name] = weakref.ref(big)
    try:
        raise RuntimeError("kernel failed")
    except RuntimeError as exc:
        err = exc  # the frame holds the first exception: a cycle, as _bench.failed makes
        outcome(f"{name}: {err}")

def test_ours_fails():
    _raise_in_except("ours", pytest.fail)

def test_a_peer_skips():
    _raise_in_except("peer", pytest.skip)

def test_the_next_point_finds_their_memory_freed():
    assert [k for k, ref in alive.items() if ref() is not None] == []
'''


@pytest.mark.parametrize("with_hooks", [False, True])
def test_a_point_that_raised_frees_its_tensors_before_the_next(tmp_path, with_hooks):
    """After a point fails (or a peer is skipped from inside an ``except``), its tensors must
    not stay alive into the next point through ``sys.last_value`` or the frames' reference
    cycles: at the real heads that is gigabytes, and the next points would run out of memory.
    Without the benchmarks' hooks the last test sees them alive (the check can fail)."""
    import os
    import subprocess
    (tmp_path / "test_leak.py").write_text(LEAK)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_leak.py"]
    if with_hooks:
        args[3:3] = ["-p", "conftest"]  # benchmarks/conftest.py, as a plugin
    env = dict(os.environ, PYTHONPATH=str(BENCH))
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    summary = out.strip().splitlines()[-1]
    if with_hooks:
        assert "1 failed, 1 passed, 1 skipped" in summary, out
    else:
        assert "2 failed, 1 skipped" in summary and "['ours', 'peer']" in out, out
