"""``benchmarks/report.py --summary`` ends with the issues' targets, each met, missed or without
data, read from a pytest-benchmark JSON file like the GPU suite's."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(mode, impl, ms, head="qwen3-8b", n=16384, v=151936, dtype="bfloat16", **info):
    return {"name": f"test_{mode}[{impl}]", "stats": {"median": ms / 1e3},
            "extra_info": dict(impl=impl, mode=mode, head=head, n=n, d=4096, v=v, dtype=dtype,
                               ms=ms, ours=not impl.startswith(("naive", "liger", "cce")),
                               **info)}


def _run(report, tmp_path, capsys, points):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": points}))
    assert report.main([str(path), "--summary"]) == 0
    text = capsys.readouterr().out
    return {line.split("] ", 1)[1].split(":")[0]: line.split("]")[0].strip(" [")
            for line in text.splitlines() if line.startswith("  [")}


def _fwd_bwd(impl, x_gemms, extra_mb):
    """The key of a Triton variant's forward+backward target line."""
    return (f"{impl} forward+backward within 1.5x of 4 GEMMs ({x_gemms}x) and 64 MB beyond "
            f"inputs and gradients ({extra_mb} MB)")


def test_targets_read_from_the_points(report, tmp_path, capsys):
    points = [
        _point("fwd", "triton", 30.0, x_gemms=1.2),
        _point("fwd_bwd", "triton", 200.0, x_gemms=1.6, extra_mb=2900.0),
        _point("fwd_bwd", "triton_da48", 150.0, x_gemms=1.3, extra_mb=50.0),
        _point("fwd_bwd", "triton_filter", 90.0, x_gemms=0.8, extra_mb=2900.0),
        _point("fwd_bwd", "liger", 180.0),
        _point("fwd_bwd", "cuda", 120.0, x_gemms=1.1, extra_mb=1000.0),
        _point("spot_loss", "cuda", 125.0, peak_mb=1100.0),
        _point("spot_loss", "triton", 150.0, peak_mb=3000.0),
        _point("spot_loss", "naive", 300.0, peak_mb=20000.0),
        _point("spot_loss", "liger", 124.0, peak_mb=900.0),
        {"name": "test_cuda_epilogue_bandwidth[lse_forward]", "stats": {"median": 1e-3},
         "extra_info": {"kernel": "lse_forward", "fraction_of_copy": 0.85}},
        {"name": "test_cuda_epilogue_bandwidth[backward_epilogue]", "stats": {"median": 1e-3},
         "extra_info": {"kernel": "backward_epilogue", "fraction_of_copy": 0.7}},
        _point("fwd_bwd", "torch", 6400.0, head="issue2", n=4096, v=32768, dtype="float32",
               time_vs_naive=1.07, mem_vs_naive=0.12),
        _point("fwd_bwd", "torch_lce", 7000.0, head="issue2", n=4096, v=32768,
               dtype="float32"),
    ]
    got = _run(report, tmp_path, capsys, points)
    assert got["triton forward within 1.25x of a GEMM"] == "met"
    assert got[_fwd_bwd("triton", "1.60", "2900")] == "MISSED"
    assert got[_fwd_bwd("triton_da48", "1.30", "50")] == "met"
    assert got["triton_filter faster than the unfiltered and than 1.5x"] == "met"
    assert got["triton forward+backward faster than liger"] == "MISSED"
    assert "triton forward+backward faster than cce" not in got  # no cce point: no line
    assert got["cuda forward+backward within 1.15x of 4 GEMMs"] == "met"
    assert got["cuda lse_forward at 80% or more of the copy's bandwidth"] == "met"
    assert got["cuda backward_epilogue at 80% or more of the copy's bandwidth"] == "MISSED"
    assert got["spot_loss (cuda) ahead of naive"] == "met"
    assert got["spot_loss (cuda) ahead of liger"] == "MISSED"  # slower, and more memory
    assert got["forward+backward at most 1.4x the naive time"] == "met"
    assert got["at most 10% of the naive peak memory"] == "MISSED"
    assert got["not slower than F.linear_cross_entropy chunked"] == "met"


def test_targets_without_their_points_say_so(report, tmp_path, capsys):
    got = _run(report, tmp_path, capsys, [_point("fwd_bwd", "naive", 500.0)])
    assert got["triton forward within 1.25x of a GEMM"] == "no data"
    assert got["cuda forward+backward within 1.15x of 4 GEMMs"] == "no data"
    assert not any(k.startswith("spot_loss") for k in got)


def test_a_missing_half_of_a_target_is_no_data_not_met(report, tmp_path, capsys):
    got = _run(report, tmp_path, capsys, [
        _point("fwd_bwd", "triton", 150.0, x_gemms=1.2),          # no extra_mb
        _point("fwd_bwd", "triton_da", 150.0, x_gemms=1.7),       # too slow: missed anyway
        _point("spot_loss", "cuda", 100.0),                       # no peak_mb
        _point("spot_loss", "liger", 120.0, peak_mb=500.0),
        _point("fwd_bwd", "torch", 6400.0, head="issue2", n=4096, v=32768, dtype="float32")])
    assert got[_fwd_bwd("triton", "1.20", "-")] == "no data"
    assert got[_fwd_bwd("triton_da", "1.70", "-")] == "MISSED"
    assert got["spot_loss (cuda) ahead of liger"] == "no data"
    assert got["forward+backward at most 1.4x the naive time"] == "no data"
    assert got["at most 10% of the naive peak memory"] == "no data"


def test_the_softcap_cost_compares_with_the_plain_point_of_the_same_vocabulary(report):
    """The plain head's grid holds several points at one N (the CPU's "small" head at V = 4096,
    8192 and 16384): the capped point is compared with the one of its own D and V, whichever
    comes first."""
    rows = [dict(mode="fwd_bwd", head="small", n=512, d=256, v=v, dtype="float32", impl="torch",
                 ms=ms) for v, ms in ((4096, 20.0), (8192, 40.0))]
    rows.append(dict(rows[1], head="small-cap30", ms=44.0, softcap=30.0))
    text = report.targets(rows)
    assert "torch at small-cap30 N = 512 float32: 44.00 vs 40.00 ms (1.10x)" in text
    text = report.targets([rows[0], rows[2]])  # the same V missing: no ratio, not the wrong one
    assert "44.00 vs - ms" in text and "2.20x" not in text
