"""The host emulation that runs ``csrc/`` on the CPU (``tests/cuda_host``): before its results
vouch for the CUDA kernels, it must give right sums through the kernels' own warp and block
reductions, expose a missing barrier, report a shuffle some lanes never reach, and refuse
launches a GPU refuses. The kernels themselves must stay inside their buffers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_host


@pytest.fixture(scope="module")
def checks(cuda_host_module):  # the fixture skips, with the reason, where nothing can build
    return cuda_host.selftest()


def test_reductions_of_common_cuh(checks):
    assert checks["warp_sum"] == ("cudaSuccess", sum(range(32)))  # and every lane agrees
    assert checks["block_sum"] == ("cudaSuccess", sum(range(256)))


def test_a_missing_barrier_changes_the_result(checks):
    """Thread 0 reads too early when threads take turns from 0, thread 255 when from 255."""
    for order in ("forward", "reverse"):
        for reader in (0, 1):
            assert checks[f"with_barrier_{order}_reader{reader}"] == ("cudaSuccess", 36.0)
    assert checks["without_barrier_forward_reader0"][1] != 36.0
    assert checks["without_barrier_reverse_reader1"][1] != 36.0


def test_a_warp_running_ahead_shows_a_write_after_read_hazard(checks):
    """block_sum twice: without its first barrier, warps that run ahead overwrite the partial
    sums warp 0 has not read yet (when warp 0 runs last)."""
    want = sum(range(256))
    assert checks["two_sums_forward"] == checks["two_sums_reverse"] == ("cudaSuccess", want)
    assert checks["two_sums_forward_second"][1] == checks["two_sums_reverse_second"][1] == 256
    assert checks["two_sums_no_first_barrier_reverse"][1] != want


def test_a_shuffle_with_exited_lanes_fails_the_launch(checks):
    assert checks["exited_lanes"] == ("cudaErrorLaunchFailure", -1.0)


@pytest.mark.parametrize("case", ["block_2048", "grid_y_65536", "grid_x_0"])
def test_launch_limits(checks, case):
    assert checks[case][0] == "cudaErrorInvalidConfiguration"


def test_rewrite_launches():
    src = ("  k<T, 4, true><<<dim3(unsigned(n)), dim3(32, R), 0, s>>>(\n      a, b);\n"
           "  g<<<1, kThreads, 0, stream>>>(x);\n")
    assert cuda_host.rewrite_launches(src) == (
        "  ::emu::launch(k<T, 4, true>, ::emu::Config{dim3(unsigned(n)), dim3(32, R), 0, s}, \n"
        "      a, b);\n"
        "  ::emu::launch(g, ::emu::Config{1, kThreads, 0, stream}, x);\n")
    with pytest.raises(ValueError, match="does not understand"):
        cuda_host.rewrite_launches("f(k<<<1, 1>>>(x));")


def test_kernels_stay_inside_their_buffers(cuda_host_module):
    """``cuda_host/bounds.py`` runs every kernel path, built under the undefined-behaviour
    sanitizer, on buffers flush against inaccessible pages; a byte past either end is a
    segmentation fault and a misaligned vector load or signed overflow an abort, so it runs in
    its own process."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(here),
                                                                    os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "cuda_host.bounds"], cwd=here, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"exit {proc.returncode} (-11: a kernel touched a guard page; "
                                  f"else the sanitizer's report below)"
                                  f"\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert "stayed inside their buffers" in proc.stdout


def test_the_gpu_memcheck_script_runs_on_the_host_build(cuda_host, monkeypatch, capsys):
    """``benchmarks/cuda_memcheck.py`` (run under compute-sanitizer by the GPU suite) goes
    through all its cases on CPU tensors, so a GPU lease never finds it broken."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import cuda_memcheck
    assert cuda_memcheck.main("cpu") == 0, capsys.readouterr().out[-3000:]
    assert "FAIL" not in capsys.readouterr().out
