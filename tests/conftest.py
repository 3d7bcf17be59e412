"""Shared fixtures: every test of a public function runs on every available backend through the
``backend`` fixture, and compares against the float64 reference with the flash-attn rule

    |ours - truth| <= 2 * |reference in the same dtype - truth| + atol

where ``truth`` is ``spot_kernels.reference`` in float64 on the same (rounded) inputs, and
``atol`` is ``ATOL`` (per dtype, times the truth's scale), or ``GRAD_ATOL`` for the gradients of
half-precision inputs (one ulp: their GEMMs take ``dA`` rounded to the inputs' dtype). A test
runs on ``device="cuda"`` too when a GPU is present; those items are marked ``gpu`` and ``sweep``.
On ``device="cpu"`` the ``cuda`` backend runs too, its kernels executed by the host build of
``csrc/`` (``tests/cuda_host``).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from spot_kernels import _registry, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-10}
# Gradients of half inputs: the GEMMs behind dh and dW take dA rounded to the inputs' dtype, as
# autograd in that dtype does, so their atol is one ulp of the dtype at the output's scale (the
# values' atol above is half of that). float32 gradients keep ATOL.
GRAD_ATOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def interpreted(backend, device):
    """True when ``backend`` runs through Triton's (slow) CPU interpreter: keep shapes small."""
    return backend == "triton" and torch.device(device).type == "cpu"


def pytest_collection_modifyitems(config, items):
    """Every test run on ``device="cuda"`` is a GPU test too: ``-m gpu`` selects the dedicated
    GPU tests and this sweep of the whole backend fixture on CUDA, ``-m sweep`` only the sweep
    (the GPU suite runs the dedicated tests first). ``test_triton.py``'s small-shape kernel
    tests run on CUDA whenever it is present (``_device()`` there): part of the sweep too."""
    cuda = torch.cuda.is_available()
    for item in items:
        spec = getattr(item, "callspec", None)
        on_cuda = spec is not None and spec.params.get("device") == "cuda"
        on_cuda |= (cuda and item.module.__name__ == "test_triton"
                    and item.get_closest_marker("gpu") is None)
        if on_cuda:
            item.add_marker(pytest.mark.gpu)
            item.add_marker(pytest.mark.sweep)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def cuda_host_module():
    """The host build of ``csrc/`` (``tests/cuda_host``), built once per session."""
    import cuda_host
    why = cuda_host.why_not()
    if why:
        pytest.skip(f"host build of the CUDA kernels: {why}")
    return cuda_host.build()


@pytest.fixture
def cuda_host(cuda_host_module, monkeypatch):
    """For one test, the ``cuda`` backend runs on CPU tensors: its extension is the host build
    of the same kernel sources (the GEMMs run in torch on the CPU)."""
    from spot_kernels import cuda
    monkeypatch.setattr(cuda, "_ext", cuda_host_module)
    return cuda_host_module


@pytest.fixture(params=list(_registry.NAMES))
def backend(request, device):
    if request.param == "cuda" and torch.device(device).type == "cpu":
        request.getfixturevalue("cuda_host")
    ok, why = _registry.availability(request.param, device)
    if not ok:
        pytest.skip(f"backend {request.param} on {device}: {why}")
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP barriers collapse."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_close(ours, same_dtype, truth, dtype, name="value", atol=None):
    """The tolerance rule. ``same_dtype`` is the reference computed in the inputs' dtype."""
    ours, same_dtype, truth = (x.detach().double().cpu() for x in (ours, same_dtype, truth))
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    bound = 2 * (same_dtype - truth).abs() + (ATOL[dtype] if atol is None else atol) * scale
    err = (ours - truth).abs()
    if err.numel() and not bool((err <= bound).all()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(f"{name}: |ours - truth| = {err.flatten()[i]:.3e} exceeds bound "
                             f"{bound.flatten()[i]:.3e} at flat index {i} (max err "
                             f"{err.max():.3e}, dtype {dtype})")


def make_head(n, d, v, dtype, device, *, bias=False, ignore_frac=0.2, scale=1.0, seed=0):
    """Fresh random ``hidden [n, d]``, ``weight [v, d]``, ``bias [v]`` and targets with some
    ignored tokens. ``scale`` multiplies the logits' typical size."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale / d**0.25).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g) / d**0.25).to(dtype).to(device)
    b = (torch.randn(v, generator=g)).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, b, t.to(device)


def references(h, w, t, b=None, **kw):
    """``(truth, same_dtype)`` log-probs and gradients of ``sum(logp * gout)`` w.r.t. inputs."""
    g = torch.Generator().manual_seed(123)
    gout = torch.randn(t.shape, generator=g, dtype=torch.float64).to(h.device)
    out = {}
    for key, cd in (("truth", torch.float64), ("same", None)):
        # the truth's leaves are float64 too, or its gradients would come back rounded
        cast = (lambda x: x.detach().double()) if cd else (lambda x: x.detach().clone())
        leaves = [cast(x).requires_grad_() for x in (h, w)]
        bb = None if b is None else cast(b).requires_grad_()
        logp = reference.token_logprobs(leaves[0], leaves[1], t, bb, compute_dtype=cd, **kw)
        grads = torch.autograd.grad((logp.double() * gout).sum(),
                                    leaves + ([bb] if bb is not None else []), allow_unused=True)
        out[key] = (logp, grads)
    return out["truth"], out["same"], gout


def float64_truth(h, w, t, b=None, g=None, **kw):
    """``(logp, lse, dh, dW, db)`` in float64: the reference on float64 copies of the inputs,
    with the gradients of ``sum(logp * g)`` by autograd (``db`` None without a bias). Targets
    outside ``[0, V)`` follow the backends' shard contract (``logp = -lse``, no one-hot)."""
    leaves = [x.detach().double().requires_grad_() for x in (h, w)]
    bb = None if b is None else b.detach().double().requires_grad_()
    logp = reference.token_logprobs(leaves[0], leaves[1], t, bb, compute_dtype=torch.float64,
                                    **kw)
    kw.pop("ignore_index", None)
    with torch.no_grad():
        lse = torch.logsumexp(reference.logits(leaves[0], leaves[1], bb,
                                               compute_dtype=torch.float64, **kw), -1)
    grads = torch.autograd.grad((logp * g.double()).sum(), leaves + ([bb] if bb is not None
                                                                     else []))
    return (logp.detach(), lse) + tuple(grads) + ((None,) if bb is None else ())


def signal_once_logged(metrics, signum):
    """Starts a thread that sends ``signum`` to this process once ``metrics`` (a trainer's
    ``metrics.jsonl``) has a row: a real signal mid-run, as Ctrl-C or a scheduler sends it."""
    import os
    import threading
    import time

    def send():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n"):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    threading.Thread(target=send, daemon=True).start()


@contextlib.contextmanager
def held_by_another_process(path):
    """``spot.rectify.jsonl.OutputLock(path)`` held by a child process while the block runs."""
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from spot.rectify.jsonl import OutputLock\n"
         f"with OutputLock({str(path)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def dispatched(fn, note=lambda name, args, kwargs: (name, args)):
    """``(fn(), notes)``: every aten op ``fn`` runs, seen through the dispatcher (on the CPU it
    records the ops a GPU would run), turned into ``note(name, args, kwargs)``; ``None`` notes
    are dropped."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.notes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kept = note(func.overloadpacket.__name__, args, kwargs or {})
            if kept is not None:
                self.notes.append(kept)
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        out = fn()
    return out, rec.notes
