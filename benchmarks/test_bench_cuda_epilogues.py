"""The CUDA backend's epilogue kernels against the memory bandwidth (issue: "the epilogue kernels
move bytes at 80% or more of the HBM bandwidth measured by a device-to-device copy in the same
run").

On one ``[rows, V]`` logits chunk in the input dtype (4096 x 151936 bfloat16, 1.2 GB: the
Qwen3-8B head, a chunk about the size of the backend's default 1 GiB budget):

* ``lse_forward`` reads the chunk once (online logsumexp, target gather, entropy);
* ``backward_epilogue`` reads it and writes ``dA`` over it in place;
* ``copy`` is ``dst.copy_(src)`` of the same bytes, the ceiling (bytes read plus written).

Each is timed with CUDA events (median of 20 after warm-up; ``_bench.time_fn`` keeps the GPU busy
while the op is launched, so the op's host work is not timed); ``extra_info`` has the ms, GB/s and
the fraction of the copy's GB/s. They run early in a budgeted run (priority 0.5, after the main
forward+backward points): a few seconds in all, and the only figures for that target. CUDA
only: skipped without a GPU or without the extension.
"""
from __future__ import annotations

import pytest
import torch

import _bench

ROWS, V = 4096, 151936
_COPY = {}


def _ready():
    if not torch.cuda.is_available():
        pytest.skip("CUDA epilogue kernels: needs a GPU")
    from spot_kernels import cuda
    ok, why = cuda.available(torch.device("cuda"))
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    return cuda


@pytest.mark.bench_priority(0.5)
@pytest.mark.parametrize("dtype", ["bfloat16"])
@pytest.mark.parametrize("kernel", ["copy", "lse_forward", "backward_epilogue"])
def test_cuda_epilogue_bandwidth(benchmark, kernel, dtype, deadline, request):
    cuda = _ready()
    if deadline is not None and _bench.time.monotonic() > deadline:
        pytest.skip("time budget (--budget-s) exhausted")
    dt = _bench.DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf = (torch.randn(ROWS, V, device="cuda", generator=gen) * 3).to(dt)
    t = torch.randint(0, V, (ROWS,), device="cuda", generator=gen)
    g = torch.randn(ROWS, device="cuda", generator=gen)
    logp, lse, _ = cuda._lse_forward_op(buf, None, t, 0.0, 1.0, -100, False)
    hi, scale = cuda.torch_backend.split_lse(lse)
    q = cuda.torch_backend.target_complement(logp)
    nbytes = buf.numel() * buf.element_size()
    if kernel == "copy":
        dst = torch.empty_like(buf)

        def fn():
            dst.copy_(buf)
        moved = 2 * nbytes
    elif kernel == "lse_forward":
        def fn():
            cuda._lse_forward_op(buf, None, t, 0.0, 1.0, -100, True)
        moved = nbytes
    else:
        work = buf.clone()

        def fn():  # in place: after the first call it rewrites dA, the same traffic
            cuda._backward_epilogue_op(work, None, t, hi, scale, q, g, 0.0, 1.0, -100)
        moved = 2 * nbytes

    times = []

    def timed():  # one CUDA-event-timed call per round
        times.append(_bench.time_fn(fn, "cuda", reps=1, warmup=0))

    for _ in range(3):
        fn()
    benchmark.group = f"cuda epilogues: [{ROWS}, {V}] {dtype}"
    benchmark.pedantic(timed, rounds=20, iterations=1)
    secs = _bench.statistics.median(times)
    gbps = moved / secs / 1e9
    info = dict(kernel=kernel, rows=ROWS, v=V, dtype=dtype, ms=secs * 1e3, gb_per_s=gbps,
                device=_bench.device_name("cuda"))
    if kernel == "copy":
        _COPY[dtype] = gbps
    elif dtype in _COPY:
        info["fraction_of_copy"] = gbps / _COPY[dtype]
    benchmark.extra_info.update(info)
    frac = info.get("fraction_of_copy")
    request.config.__dict__.setdefault("_bench_notes", []).append(
        f"cuda epilogue {kernel} [{ROWS}x{V}] {dtype}: {secs * 1e3:.3f} ms, {gbps:.0f} GB/s"
        + ("" if frac is None else f", {100 * frac:.0f}% of the copy (target >= 80%)"))
