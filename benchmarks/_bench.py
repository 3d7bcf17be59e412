"""Shared machinery of the benchmark suites: the implementations under test, the cases, honest
timing and peak memory.

What is measured
----------------
Every implementation is reduced to one function ``logp(h [N, D], W [V, D], t [N]) -> float32
[N]`` (peers that return a per-token cross-entropy are negated), and run in one of three modes:

* ``fwd``       token log-probs under ``torch.no_grad()`` (the reference-model pass of SPoT);
* ``fwd_bwd``   log-probs, then ``torch.autograd.grad`` to ``h`` and ``W`` with a random
                per-token upstream gradient (the policy pass);
* ``spot_loss`` SPoT's loss and its gradients: ``sk.spot_loss`` for our backends, the composition
                ``logp -> sk.sequence_logprobs -> sk.bce_reward_loss`` for peers.

FLOPs counted per mode (the useful work, the same for every implementation, so TFLOP/s compare
like with like): forward ``2 N D V``; forward+backward ``6 N D V`` (logits, ``dh``, ``dW``). Our
fused backends recompute the logits in the backward (``8 N D V`` done), which shows as a lower
TFLOP/s, as it should. ``gemm_fraction`` divides the achieved rate by that of one ``[N, D] x
[D, V]`` matrix product (cuBLAS on CUDA) timed in the same run on the same device and dtype.

Timing: ``benchmark.pedantic`` with a setup step outside the clock. On CUDA ``ms`` is the time
between two CUDA events around the call, the way the GEMM baseline is timed (``time_fn``): a
short GPU spin (about 1 ms) queued before the start event covers the host's first launches, so
the figure is the GPU's time from the first kernel to the last, idle gaps included (a call whose
host work outruns the GPU shows them; ``launch_ms`` records the host's time to issue the work).
The timed calls run under ``sk.value_checks(False)``, as the trainer does on a GPU: the checks
that read values (targets, ``cu_seqlens``, labels) would make the host wait for the spin and
then leave the GPU idle while it issues the work, a cost the peers, which check no values, do
not pay; the untimed first run checks them.
pytest-benchmark's own statistics on CUDA are the wall clock of the same call and so include
what was left of the spin; on the CPU ``ms`` is that wall clock. Before the
clock starts, a forward checks the values (below) and one untimed run of the mode warms up
(allocator, cuBLAS handles, Triton and torch.compile compilation, the backward's too; for
``fwd_bwd`` that run is the gradient check's). When all
inputs together fit a few times into the last-level cache they are rotated between several copies, so
repeated rounds don't time the cache.

Memory: the peak above what was allocated before the call (the inputs), so it includes the
outputs and gradients, which every implementation must produce alike. On CUDA that is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``. On the CPU it is the
process's peak resident set: before each timed round the setup frees what the C allocator holds
(``malloc_trim``), reads ``VmRSS`` and resets the kernel's high-water mark (``VmHWM``, by writing
5 to ``/proc/self/clear_refs``); the next setup reads ``VmHWM``. Unlike a tensor-tracking dispatch
mode this also sees the allocations inside opaque custom ops (PyTorch's chunked
``linear_cross_entropy`` is one), and unlike a subprocess per measurement it costs no extra run.
On CUDA the maximum over the timed rounds is reported; on the CPU the minimum, as peak RSS also
counts what glibc kept of blocks freed before (how much moves with its dynamic mmap threshold:
identical rounds of a small case peaked up to 2x apart, and never below the live peak). Fixing
the threshold low (``mallopt``) made the rounds exact but page-faulted every fresh tensor, which
slowed the peers that allocate per call 1.5x: timings must see the allocator as a training
process does. Small CPU shapes' peaks are therefore upper bounds, a few MB to 2x; the 2 GB
logits of the issue-2 point are mapped and given back whole, and read the same every round.

Correctness before speed: before timing, each implementation's per-token values on 256 rows
spread over the benchmark's own inputs (every token chunk or tile) are compared with the float64
reference; ours must agree within ``4 x`` the naive same-dtype error plus a dtype tolerance
(else the test fails), a peer that disagrees is skipped with the numbers. For ``fwd_bwd`` the
untimed warm-up forward+backward checks the gradients the same way (``check_grads``: the upstream
gradient on those rows only; ``dh`` there and 0 elsewhere, the target rows of ``dW`` and other
rows of it, which hold the softmax term alone, each group with its own bound), so no
implementation is timed with wrong gradients.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

import spot_kernels as sk
from spot_kernels import _registry, reference

IGNORE = -100
BACKENDS = ("triton", "cuda", "torch")              # our fused backends, when available
# our backends with backend_options: (backend, options); run at the main shape's fwd_bwd only
VARIANTS = {
    "triton_exact": ("triton", {"fast_grad": False}),
    "triton_det": ("triton", {"deterministic": True}),
    # 2^-12: below bfloat16's resolution of a gradient of size 1. On these random heads the
    # softmax is near uniform (p ~ 1/V), so only the tiles holding a target survive: a best
    # case; a trained model's peaked softmax keeps more tiles
    "triton_filter": ("triton", {"filter_eps": 2.0 ** -12}),
    # float32 accumulators bounded to 32 MB a pass: the 64 MB memory target, one more recompute
    "triton_bounded": ("triton", {"scratch_bytes": 32 << 20}),
    # dA blocks, the gradient GEMMs through cuBLAS, no atomics. 1 GiB as the cuda backend: a
    # float32 dh sum (268 MB at Qwen3-8B's head, N = 16384) beside 7 vocabulary chunks
    "triton_da": ("triton", {"da_bytes": 1 << 30}),
    # 48 MB: no room for that sum, so two sweeps (dW over vocabulary chunks, dh over token
    # chunks) with one more recompute: the 64 MB memory target
    "triton_da48": ("triton", {"da_bytes": 48 << 20}),
}
OURS = BACKENDS + tuple(VARIANTS)
PEERS = ("naive", "naive_compile", "torch_lce", "liger", "cce", "trl")
IMPLS = BACKENDS + PEERS
LABELS = {
    "triton": "spot-kernels triton", "cuda": "spot-kernels cuda", "torch": "spot-kernels torch",
    "triton_exact": "spot-kernels triton fast_grad=False", "triton_det": "spot-kernels triton deterministic",
    "triton_filter": "spot-kernels triton filter_eps=2^-12",
    "triton_bounded": "spot-kernels triton scratch_bytes=32MB",
    "triton_da": "spot-kernels triton da_bytes=1GiB (cuBLAS grads)",
    "triton_da48": "spot-kernels triton da_bytes=48MB (cuBLAS grads, two sweeps)",
    "naive": "naive (materialised logits)", "naive_compile": "torch.compile(naive)",
    "torch_lce": "F.linear_cross_entropy chunked", "liger": "Liger fused linear CE",
    "cce": "Apple cut-cross-entropy (filter_eps=None)",
    "trl": "TRL's fused LM head (ChunkedLogProbFunction)",
}
FLOPS = {"fwd": 2, "fwd_bwd": 6, "spot_loss": 6}    # times N D V
# the [N,D]x[D,V] GEMMs of the kernel issues' targets (x_gemms): a fused forward+backward that
# recomputes the logits once does four; the variants that recompute twice (deterministic,
# scratch_bytes, a two-sweep da_bytes) do five and are still held to four
GEMMS = {"fwd": 1, "fwd_bwd": 4, "spot_loss": 4}
HEADS = {  # real LM heads: (D, V)
    "qwen3-8b": (4096, 151936),
    "llama-3-8b": (4096, 128256),
    "gemma-2-2b": (2304, 256000),
    "gemma-2-2b-cap30": (2304, 256000),
}
# heads with a final-logit softcap (logits c tanh(z / c)): Gemma-2's head as the model has it
# (final_logit_softcapping = 30); the plain "gemma-2-2b" points compare with the peers that take
# no softcap. "small-cap30" is the CPU grid's
SOFTCAP = {"gemma-2-2b-cap30": 30.0, "small-cap30": 30.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
CHECK_ROWS = 256


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why (becomes a skip reason)."""


@dataclass(frozen=True)
class Case:
    """One benchmark point: ``mode`` on an ``[n, d] x [v, d]`` head in ``dtype`` by ``impl``."""
    mode: str
    head: str
    n: int
    d: int
    v: int
    dtype: str
    impl: str
    priority: int = 0

    @property
    def softcap(self):
        """The head's final-logit softcap (``SOFTCAP``), None without one."""
        return SOFTCAP.get(self.head)

    @property
    def id(self):
        return f"{self.mode}-{self.head}-N{self.n}-V{self.v}-{self.dtype}-{self.impl}"

    @property
    def group(self):
        return f"{self.mode} {self.head} N={self.n} D={self.d} V={self.v} {self.dtype}"


# ----------------------------------------------------------------------------- implementations

def backend_of(name):
    """``(backend, backend_options)`` of one of ``OURS``."""
    return VARIANTS.get(name, (name, {}))


def _ours(name, device, softcap=None):
    backend, options = backend_of(name)

    def fn(h, w, t):
        return sk.token_logprobs(h, w, t, softcap=softcap, backend=backend,
                                 backend_options=options)
    if backend == "triton" and torch.device(device).type == "cpu":
        raise Unavailable("Triton on the CPU is its interpreter, a test tool: not benchmarked")
    ok, why = _registry.availability(backend, device)
    if not ok:
        raise Unavailable(f"backend {backend!r} not available on {device}: {why}")
    return fn


def _naive(h, w, t, softcap=None):
    return reference.token_logprobs(h, w, t, softcap=softcap, ignore_index=IGNORE)


_COMPILED = {}


def _naive_compile(device, full, softcap=None):
    if torch.device(device).type == "cpu" and not full:
        raise Unavailable("torch.compile on a small CPU compiles for minutes; runs with --full")
    if softcap not in _COMPILED:
        fn = _naive if softcap is None else functools.partial(_naive, softcap=softcap)
        _COMPILED[softcap] = torch.compile(fn, dynamic=False)
    return _COMPILED[softcap]


def _no_softcap(peer, softcap):
    if softcap is not None:
        raise Unavailable(f"{peer} takes no final-logit softcap")


def _torch_lce(device, softcap=None):
    import torch.nn.functional as F
    _no_softcap("F.linear_cross_entropy", softcap)
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy with "
                          "LinearCrossEntropyOptions (chunked path)")
    cache = {}

    def fn(h, w, t):
        n, v = h.shape[0], w.shape[0]
        if (n, v) not in cache:
            cache[(n, v)] = lce_options(n, v, h.device)
        return -F.linear_cross_entropy(h, w, t, reduction="none", ignore_index=IGNORE,
                                       options=cache[(n, v)]).float()
    return fn


def lce_options(n, v, device):
    """The chunking options given to ``F.linear_cross_entropy``.

    On CUDA: ``LinearCrossEntropyOptions()``, PyTorch's own per-device pick. On the CPU that pick
    (``aspect_ratio:2``: 8 to 32 rows per chunk at our shapes) runs 13x slower than a chunk of
    512 rows (measured: 18.4 s against 1.4 s at N=512, D=256, V=8192), so there we give it the
    memory budget of our ``torch`` backend instead: rows per chunk such that one float32 logits
    chunk is at most 64 MB (a power of two, at most N).
    """
    if torch.device(device).type == "cuda":
        return torch.nn.LinearCrossEntropyOptions()
    rows = max(1, (64 * 2**20 // 4) // max(v, 1))
    rows = min(1 << (rows.bit_length() - 1), max(n, 1))
    return torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=rows)


def _liger(device, softcap=None):
    if torch.device(device).type != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:  # not installed, or an import that breaks on this stack
        raise Unavailable(f"liger-kernel not importable: {type(exc).__name__}: {exc}") from None

    def fn(h, w, t):
        return -liger_fused_linear_cross_entropy(h, w, t, ignore_index=IGNORE, softcap=softcap,
                                                 reduction="none").float()
    return fn


def _cce(device, softcap=None):
    if torch.device(device).type != "cuda":
        raise Unavailable("cut-cross-entropy's kernels run on CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # not installed, or an import that breaks on this stack
        raise Unavailable(f"cut-cross-entropy not importable: {type(exc).__name__}: {exc}") from None

    def fn(h, w, t):
        # filter_eps=None: exact gradients, as ours by default (its default filter skips the
        # backward tiles whose |softmax - onehot| < 2^-12 before scaling by the incoming
        # gradient: nearly all of them on these random heads, a best case that is not compared)
        return -linear_cross_entropy(h, w, t, ignore_index=IGNORE, softcap=softcap,
                                     reduction="none", filter_eps=None).float()
    return fn


# TRL's fused LM head (add_fused_lm_head) projects 32768 vocabulary rows per tile
TRL_VOCAB_CHUNK = 32768


def _trl(device, softcap=None):
    _no_softcap("TRL's fused LM head", softcap)
    try:
        from trl.kernels import ChunkedLogProbFunction
        import trl.trainer.utils  # noqa: F401  its backward imports this (and so `datasets`)
    except Exception as exc:  # not installed, older than the fused head, or a broken import
        raise Unavailable(f"trl's fused LM head not importable: {type(exc).__name__}: {exc}") \
            from None

    def fn(h, w, t):
        # as TRL's trainers call it for the reference model: log-probs only (its policy calls add
        # entropy, mean_logits and is_top1: more work, not timed here); only the scored tokens go
        # through the head on a GPU (elsewhere it clamps and scores every row), scattered back
        keep = t != IGNORE
        if h.is_cuda:
            logp = ChunkedLogProbFunction.apply(h[keep], w, None, t[keep], 1.0, TRL_VOCAB_CHUNK,
                                                None, 1.0, ("log_probs",))[0]
            return logp.new_zeros(t.shape).masked_scatter(keep, logp)
        logp = ChunkedLogProbFunction.apply(h, w, None, t.clamp(min=0), 1.0, TRL_VOCAB_CHUNK,
                                            None, 1.0, ("log_probs",))[0]
        return logp.masked_fill(~keep, 0.0)
    return fn


STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
          "illegal instruction", "misaligned address")


def poisoned(case, exc):
    """A peer that left the CUDA context broken (errors that stick to every later call) ends
    the run here, naming it, instead of failing every later point, ours included."""
    import pytest
    text = str(exc).lower()
    if any(s in text for s in STICKY):
        pytest.exit(f"{case.impl} broke the CUDA context ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]}); the points before it stand", returncode=3)


def failed(case, where, exc):
    """An exception while running ``case``: a broken CUDA context ends the run (``poisoned``);
    ours is re-raised (a finding), a peer's point is skipped with the error's first line."""
    import pytest
    poisoned(case, exc)
    if case.impl in OURS:
        raise exc
    pytest.skip(f"{case.impl} failed {where}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}")


def disagrees(case, what):
    """A check that ``case`` missed: ours fails, a peer's point is skipped."""
    import pytest
    msg = f"{case.impl}: {what}"
    if case.impl in OURS:
        pytest.fail(msg)
    pytest.skip(msg)


def implementation(name, device, full=False, softcap=None):
    """``logp(h, w, t)`` for implementation ``name`` on ``device``, of the logits softcapped at
    ``softcap`` when one is given; raises ``Unavailable``."""
    if name in OURS:
        return _ours(name, device, softcap)
    if name == "naive":
        return functools.partial(_naive, softcap=softcap)
    if name == "naive_compile":
        return _naive_compile(device, full, softcap)
    if name == "torch_lce":
        return _torch_lce(device, softcap)
    if name == "liger":
        return _liger(device, softcap)
    if name == "cce":
        return _cce(device, softcap)
    if name == "trl":
        return _trl(device, softcap)
    raise ValueError(f"impl: unknown implementation {name!r}; known: {IMPLS}")


# ----------------------------------------------------------------------------- inputs

def make_inputs(n, d, v, dtype, device, seed=0, ignore_frac=0.1, seqlen=256):
    """Fresh random head inputs (never zeros) plus the SPoT batch around them.

    Returns a dict: ``h, w, t`` (about ``ignore_frac`` of the targets ignored), ``g`` (a random
    upstream gradient per token), ``cu`` (packed sequences of about ``seqlen`` tokens, an even
    number of them), ``ref`` and ``labels`` (first half chosen, second half rejected).
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)  # drawn on the device: fast on a GPU
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    # h, W ~ N(0, 1/sqrt(d)) keep logits O(1) like a trained head's
    h = torch.randn(n, d, generator=gen, device=dev).div_(d ** 0.25).to(dt)
    w = torch.randn(v, d, generator=gen, device=dev).div_(d ** 0.25).to(dt)
    t = torch.randint(0, v, (n,), generator=gen, device=dev)
    t[torch.rand(n, generator=gen, device=dev) < ignore_frac] = IGNORE
    s = max(2, 2 * (n // (2 * seqlen)))
    cuts = torch.linspace(0, n, s + 1).round().long().to(dev)
    labels = torch.cat([torch.ones(s // 2), torch.zeros(s - s // 2)]).to(dev)
    ref = -float(seqlen) * (1.0 + 0.1 * torch.rand(s, generator=gen, device=dev)) * math.log(v)
    g = torch.randn(n, generator=gen, device=dev)
    return dict(h=h, w=w, t=t, g=g, cu=cuts, ref=ref, labels=labels)


_INPUTS = {}


def input_sets(n, d, v, dtype, device):
    """The input sets of one shape, kept for the next points of the same shape (only the latest
    shape is kept). One set when it is at least the cache's size; otherwise enough sets to span
    twice the cache, rotated round by round, so no round finds its inputs left in the cache by
    the previous ones (at most 16 sets)."""
    key = (n, d, v, str(dtype), str(device))
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the previous shape's blocks: less fragmentation
        x0 = make_inputs(n, d, v, dtype, device, seed=0)
        size, cache = input_bytes(x0), cache_bytes(device)
        nsets = 1 if size >= cache else min(16, -(-2 * cache // max(size, 1)))
        _INPUTS[key] = [x0] + [make_inputs(n, d, v, dtype, device, seed=s)
                               for s in range(1, nsets)]
    return _INPUTS[key]


def input_bytes(x):
    return sum(v.numel() * v.element_size() for v in x.values() if torch.is_tensor(v))


def cache_bytes(device):
    """Size of the last cache the inputs might sit in: the GPU's L2, or 64 MB on a CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    return 64 * 2**20


# ----------------------------------------------------------------------------- running one mode

def run_mode(mode, impl, name, x, need_out=False, softcap=None):
    """Run ``mode`` once on inputs ``x``; returns logp (detached) when ``need_out``.
    ``softcap``: the head's, for ``spot_loss`` of ours (``impl`` has it already)."""
    h, w, t = x["h"], x["w"], x["t"]
    if mode == "fwd":
        with torch.no_grad():
            out = impl(h, w, t)
        return out if need_out else None
    hg = h.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    if mode == "fwd_bwd":
        out = impl(hg, wg, t)
        grads = torch.autograd.grad(out, (hg, wg), x["g"])
    elif mode == "spot_loss":
        if name in OURS:
            backend, options = backend_of(name)
            res = sk.spot_loss(hg, wg, t, x["cu"], x["ref"], x["labels"], softcap=softcap,
                               backend=backend, backend_options=options)
            loss, out = res.loss, None
        else:
            out = impl(hg, wg, t)
            policy = sk.sequence_logprobs(out, x["cu"], valid=t != IGNORE)
            loss, _ = sk.bce_reward_loss(policy, x["ref"], x["labels"])
        grads = torch.autograd.grad(loss, (hg, wg))
    else:
        raise ValueError(f"mode must be one of {list(FLOPS)}, got {mode!r}")
    del grads
    return None if out is None or not need_out else out.detach()


def out_of_memory(case, where, exc):
    """A peer (or the naive reference) that runs out of memory at a shape is skipped with the
    reason; one of ours failing that way is a finding, so its point fails. The cache is emptied
    either way, so the points after it start clean."""
    import pytest
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    msg = f"{case.impl}: out of memory in {where} ({str(exc).splitlines()[0]})"
    if case.impl in OURS:
        pytest.fail(msg)
    pytest.skip(msg)


def checked_rows(n, rows=CHECK_ROWS, device="cpu"):
    """``rows`` token indices spread evenly over ``[0, n)``, the last one included: every
    token chunk or tile of a backend is looked at, not only the first."""
    k = min(rows, n)
    return torch.linspace(0, n - 1, k, device=device).round().long().unique() if k else \
        torch.zeros(0, dtype=torch.long, device=device)


def _bound(truth, same, dtype, floor=0.0):
    """The tolerance rule: ``4 x`` the same-dtype reference's error plus the dtype's tolerance
    times the largest value (of this group; at least ``floor``); 0 for an empty group."""
    if not truth.numel():
        return 0.0
    err = (same.double() - truth).abs().max().item()
    return 4 * err + ATOL[dtype] * max(floor, truth.abs().max().item())


def _miss(ours, truth=None):
    """The largest ``|ours - truth|`` (``truth`` None: 0), infinite for a non-finite value."""
    if not bool(torch.isfinite(ours).all()):
        return math.inf
    if ours.numel() == 0:
        return 0.0
    return (ours.double() if truth is None else ours.double() - truth).abs().max().item()


def check_values(name, impl, x, rows=CHECK_ROWS, softcap=None):
    """Forward on the full inputs; compare ``rows`` tokens spread over all of them
    (``checked_rows``) with the float64 truth (of logits softcapped at ``softcap``, if given).

    Returns ``(max_err, bound)``; the caller decides whether a miss fails or skips.
    """
    h, w, t = x["h"], x["w"], x["t"]
    idx = checked_rows(h.shape[0], rows, h.device)
    with torch.no_grad():
        ours = impl(h, w, t).float()
        key = ("truth", softcap)
        if key not in x:  # the same for every implementation of this head: once
            x[key] = tuple(reference.token_logprobs(h[idx], w, t[idx], softcap=softcap,
                                                    compute_dtype=dt)
                           for dt in (torch.float64, None))
        truth, same = x[key]
    if ours.shape != t.shape or not bool(torch.isfinite(ours).all()):
        return math.inf, 0.0
    return _miss(ours[idx], truth), _bound(truth, same, h.dtype, floor=1.0)


GRAD_COLS = 512  # vocabulary rows of dW checked besides the checked tokens' targets


def check_grads(name, impl, x, rows=CHECK_ROWS, filter_eps=0.0, softcap=None):
    """``fwd_bwd`` with the upstream gradient on ``rows`` tokens spread over all of them
    (``checked_rows``; 0 elsewhere, so ``dW`` is theirs alone) against the float64 truth
    ``dA = g (onehot - p)``, ``dh = dA W``, ``dW = dA^T h`` (with a ``softcap`` c: ``p`` of the
    capped logits and ``dA`` times their slope ``1 - tanh^2(z / c)``), in four groups, each with
    its own bound (``_bound``) so that a small term is not hidden under a large one:

    * ``dh``: the checked rows;
    * ``dh other rows``: the rows with no upstream gradient, which must stay 0;
    * ``dW targets``: the rows of the checked tokens' targets (the ``onehot`` term dominates);
    * ``dW others``: ``GRAD_COLS`` other vocabulary rows: the softmax term alone, about
      ``sqrt(rows) p |h|``, far below the target rows.

    ``filter_eps`` (a variant that skips tiles whose ``|dA|`` stays below it) widens each bound
    by what that may drop, ``filter_eps`` per ``dA`` element: ``filter_eps sum_i |h_i|`` in a
    ``dW`` row, ``filter_eps sum_v |W_v|`` in a ``dh`` row. Returns ``[(what, max_err, bound),
    ...]``."""
    h, w, t = x["h"], x["w"], x["t"]
    idx = checked_rows(h.shape[0], rows, h.device)
    if idx.numel() == 0:
        return []
    g = torch.zeros_like(x["g"])
    g[idx] = x["g"][idx]
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    dh, dw = torch.autograd.grad(impl(hg, wg, t), (hg, wg), g)
    key = ("grad_truth", softcap)
    if key not in x:  # the same for every implementation of this head: once
        tk, gk = t[idx], x["g"][idx]
        valid = tk != IGNORE
        targets = tk[valid].unique()
        gen = torch.Generator(device=h.device).manual_seed(1)
        others = torch.randint(0, w.shape[0], (GRAD_COLS,), generator=gen, device=h.device)
        others = others[~torch.isin(others, targets)].unique()
        with torch.no_grad():
            h64, w64 = h[idx].double(), w.double()
            z = h64 @ w64.T
            if softcap is not None:
                z = torch.tanh(z / softcap)
                slope = 1 - z * z
                z *= softcap
            da = -torch.softmax(z, 1)
            da[valid.nonzero()[:, 0], tk[valid]] += 1
            da *= (gk.double() * valid)[:, None]
            if softcap is not None:
                da *= slope
            del z
            truth = (da @ w64, da[:, targets].T @ h64, da[:, others].T @ h64)
            del da, w64
        hk, wk = h[idx].detach().requires_grad_(), w.detach().requires_grad_()
        same = torch.autograd.grad(reference.token_logprobs(hk, wk, tk, softcap=softcap),
                                   (hk, wk), gk)
        x[key] = (targets, others, truth, (same[0], same[1][targets], same[1][others]))
    targets, others, truth, same = x[key]
    rest = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    rest[idx] = False
    drop_h = drop_w = 0.0
    if filter_eps:
        drop_h = filter_eps * w.float().abs().sum(0).max().item()
        drop_w = filter_eps * h[idx].float().abs().sum(0).max().item()
    bound_h = _bound(truth[0], same[0], h.dtype) + drop_h
    return [("dh", _miss(dh[idx], truth[0]), bound_h),
            # a stray write where no gradient came in; the bound of the checked rows
            ("dh other rows", _miss(dh[rest]), bound_h),
            ("dW targets", _miss(dw[targets], truth[1]),
             _bound(truth[1], same[1], h.dtype) + drop_w),
            ("dW others", _miss(dw[others], truth[2]),
             _bound(truth[2], same[2], h.dtype) + drop_w)]


# ----------------------------------------------------------------------------- memory

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak bytes allocated above a baseline, per round; see the module docstring."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.base = None
        self.peaks = []
        self.why = ""
        self.collected = False
        if not self.cuda:
            try:
                self._reset_hwm()
                if _proc_status("VmHWM") is None:
                    raise OSError("no VmHWM in /proc/self/status")
            except OSError as exc:
                self.why = f"peak RSS unavailable: {exc}"

    @staticmethod
    def _reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self):
        """Close the previous round (if any) and open a new one."""
        self.stop()
        if self.why:
            return
        if not self.cuda or not self.collected:  # a full collection costs ~0.3 s with peers loaded
            gc.collect()
            self.collected = True
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            libc = _libc()
            if libc:
                libc.malloc_trim(0)
            self.base = _proc_status("VmRSS")
            self._reset_hwm()

    def stop(self):
        if self.base is None or self.why:
            return
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status("VmHWM")
        self.peaks.append(max(0, peak - self.base))
        self.base = None

    @property
    def peak(self):
        """The largest round's on CUDA (exact); on the CPU the smallest: a round's peak RSS
        adds what glibc kept of blocks freed earlier, which varies from round to round (its
        mmap threshold moves as blocks are freed: identical rounds of naive N=512 V=8192
        peaked 80-137 MB over a live 64), and never takes away."""
        if not self.peaks:
            return None
        return max(self.peaks) if self.cuda else min(self.peaks)


# ----------------------------------------------------------------------------- GEMM baseline

_GEMM = {}


SPIN_CYCLES = 2_000_000  # about 1 ms at a GPU's ~2 GHz: longer than any launch's host work


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, reps=5, warmup=1):
    """Median seconds of ``fn()`` (CUDA events on a GPU, the wall clock on a CPU). On CUDA a
    short GPU spin (about 1 ms) is queued before the start event, so the host's launch work
    (tens of microseconds for a custom op) overlaps it instead of landing between the events:
    sub-millisecond kernels are timed alone, not with the Python that launches them."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SPIN_CYCLES)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_seconds(n, d, v, dtype, device):
    """Median time of ``h [n, d] @ W[v, d].T`` (cuBLAS on CUDA), cached per shape. The output
    is allocated once: the GEMM alone, without the CPU's page faults of a fresh ``[n, v]``
    tensor each call (the fused backends write their blocks into reused buffers)."""
    key = (n, d, v, str(dtype), str(device))
    if key not in _GEMM:
        x = input_sets(n, d, v, dtype, device)[0]
        h, w = x["h"], x["w"]
        out = torch.empty(n, v, dtype=h.dtype, device=h.device)
        cpu = torch.device(device).type == "cpu"
        _GEMM[key] = time_fn(lambda: torch.mm(h, w.t(), out=out), device, reps=3 if cpu else 10,
                             warmup=1 if cpu else 3)
        del out
    return _GEMM[key]


# ----------------------------------------------------------------------------- the benchmark

_NAIVE = {}   # (mode, n, d, v, dtype, softcap, device) -> (seconds, peak bytes) of the naive one


def bench(benchmark, case, device, *, rounds, full=False, gemm=True, deadline=None):
    """Check, warm up, time and measure ``case`` on ``device`` with pytest-benchmark; fill
    ``benchmark.extra_info``. Skips (with the reason) what cannot run here."""
    import pytest

    if deadline is not None and time.monotonic() > deadline:
        pytest.skip("time budget (--budget-s) exhausted")
    if (case.impl == "naive_compile" and deadline is not None
            and deadline - time.monotonic() < 120):
        pytest.skip("too little of the time budget left to compile (needs about 2 minutes)")
    try:
        impl = implementation(case.impl, device, full, case.softcap)
    except Unavailable as exc:
        pytest.skip(str(exc))
    if case.impl == "cce" and case.mode != "fwd" and case.dtype == "float32":
        # its backward asserts a half dtype: skipped before its float32 forward runs and compiles
        pytest.skip("cut-cross-entropy's backward takes bfloat16 / float16 only")
    dtype = DTYPES[case.dtype]
    cuda = torch.device(device).type == "cuda"
    sets = input_sets(case.n, case.d, case.v, dtype, device)
    x0, nsets = sets[0], len(sets)

    try:
        err, bound = check_values(case.impl, impl, x0, softcap=case.softcap)
    except torch.OutOfMemoryError as exc:
        out_of_memory(case, "the value check", exc)
    except Exception as exc:  # a peer that rejects this dtype / shape / device
        failed(case, "on these inputs", exc)
    if not err <= bound:
        disagrees(case, f"per-token log-probs disagree with the float64 reference: max err "
                        f"{err:.3e} > bound {bound:.3e}")

    grad_checks = []
    if case.mode in ("fwd_bwd", "spot_loss"):  # spot_loss's gradient is the per-token one's
        try:
            eps = backend_of(case.impl)[1].get("filter_eps", 0.0) if case.impl in OURS else 0.0
            grad_checks = check_grads(case.impl, impl, x0, filter_eps=eps, softcap=case.softcap)
            misses = [f"{what}: max err {err:.3e} > bound {bound:.3e}"
                      for what, err, bound in grad_checks if not err <= bound]
        except torch.OutOfMemoryError as exc:
            out_of_memory(case, "the gradient check", exc)
        except Exception as exc:
            failed(case, "in the gradient check", exc)
        if misses:
            disagrees(case, "gradients disagree with the float64 reference: " + "; ".join(misses))

    mem = PeakMemory(device)
    # rotated from the second set on (when there are several): the checks and the warm-up
    # just read the first, which a first round on it would find in the cache
    state = {"i": 1 if nsets > 1 else 0}

    def setup():
        mem.start()
        x = sets[state["i"] % len(sets)]
        state["i"] += 1
        return (x,), {}

    own = []     # our own clock too: pytest-benchmark keeps no stats under --benchmark-disable
    launch = []  # CUDA: host seconds to issue the work (launch-bound when near the GPU time)

    def target(x):
        if cuda:  # the GEMM baseline's method (time_fn): the spin hides the host's first launches
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SPIN_CYCLES)
            a.record()
        t0 = time.perf_counter()
        with sk.value_checks(False):  # the values were checked above (module docstring)
            run_mode(case.mode, impl, case.impl, x, softcap=case.softcap)
        if cuda:
            launch.append(time.perf_counter() - t0)
            b.record()
            b.synchronize()
            own.append(a.elapsed_time(b) / 1e3)
        else:
            own.append(time.perf_counter() - t0)

    try:
        if case.mode != "fwd_bwd" or not grad_checks:  # else the gradient check was the warm-up
            run_mode(case.mode, impl, case.impl, x0, softcap=case.softcap)  # compile, allocator
        sync(device)
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError as exc:
        mem.base = None
        out_of_memory(case, case.mode, exc)
    except Exception as exc:  # a peer whose backward rejects this dtype, or fails to compile
        mem.base = None
        failed(case, f"in {case.mode}", exc)
    mem.stop()

    stats = getattr(benchmark, "stats", None)
    secs = (statistics.median(own) if cuda or stats is None else stats.stats.median)
    flops = FLOPS[case.mode] * case.n * case.d * case.v
    info = dict(impl=case.impl, label=LABELS[case.impl], ours=case.impl in OURS, mode=case.mode,
                head=case.head, softcap=case.softcap, n=case.n, d=case.d, v=case.v, dtype=case.dtype,
                device=device_name(device), ms=secs * 1e3, tflops=flops / secs / 1e12,
                peak_mb=None if mem.peak is None else mem.peak / 2**20,
                check_err=err, check_bound=bound, rounds=rounds, input_sets=nsets)
    if launch:
        info["launch_ms"] = statistics.median(launch) * 1e3
    if grad_checks:
        info["grad_check"] = {what: [e, b] for what, e, b in grad_checks}
    if mem.why:
        info["memory_note"] = mem.why
    if mem.peak is not None:
        # what every implementation must hold at the end: logp, and the gradients of h and W
        made = 4 * case.n + (0 if case.mode == "fwd" else
                             (case.n + case.v) * case.d * dtype.itemsize)
        info["extra_mb"] = (mem.peak - made) / 2**20
    if gemm:
        g = gemm_seconds(case.n, case.d, case.v, dtype, device)
        info["gemm_ms"] = g * 1e3
        info["gemm_tflops"] = 2 * case.n * case.d * case.v / g / 1e12
        # the targets of the kernel issues: time over the GEMMs a fused kernel issues (1 for the
        # forward; logits, recomputed logits, dh and dW for forward+backward)
        info["x_gemms"] = secs / (GEMMS[case.mode] * g)
        info["gemm_fraction"] = info["tflops"] / info["gemm_tflops"]
    key = (case.mode, case.n, case.d, case.v, case.dtype, case.softcap, str(device))
    if case.impl == "naive":
        _NAIVE[key] = (secs, mem.peak)
    if key in _NAIVE:
        nt, nm = _NAIVE[key]
        info["time_vs_naive"] = secs / nt
        if nm and mem.peak is not None:
            info["mem_vs_naive"] = mem.peak / nm
    benchmark.extra_info.update(info)
    return info


def device_name(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the grids

SMALL_D = 256


def cases(mode, device, full):
    """The benchmark points of one suite, most important first.

    CPU default: a small head (D = 256) swept over N at V = 8192 and over V at N = 512, float32,
    plus one bfloat16 point for the forward+backward. On a GPU or with ``--full``: the real heads
    (Qwen3-8B, Llama-3-8B, Gemma-2-2B) at N in {2048, 8192, 16384} in bfloat16 (and one float32
    point), ordered so that a time budget cuts the least important points: the Qwen3-8B head at
    N = 16384 first, then the sweeps over N and over V. The forward+backward also runs once with
    a final-logit softcap of 30 (Gemma-2's), on the CPU's small head and, last, at Gemma-2's head
    at N = 8192.
    """
    out = []
    big = full or torch.device(device).type == "cuda"

    def add(prio, head, n, d, v, dtype, impls=IMPLS):
        order = sorted(impls, key=lambda i: i != "naive")  # naive (when present) first
        for impl in order:
            # torch.compile compiles per shape and mode (tens of seconds): the forward+backward at
            # the main shape after its Triton variants, the other modes after everything else
            p = prio if impl != "naive_compile" or not big else 2.5 if prio == 0 else prio + 30
            out.append(Case(mode, head, n, d, v, dtype, impl, p))

    if not big:
        grid = [(512, 8192), (256, 8192), (1024, 8192), (512, 4096), (512, 16384)]
        if mode == "spot_loss":
            grid = grid[:3]
        for n, v in grid:
            add(0, "small", n, SMALL_D, v, "float32")
        if mode == "fwd_bwd":
            add(1, "small", 512, SMALL_D, 8192, "bfloat16")
            add(1, "small-cap30", 512, SMALL_D, 8192, "float32")
        return out
    mode_rank = {"fwd_bwd": 0, "spot_loss": 1, "fwd": 2}[mode]
    no_compile = tuple(i for i in IMPLS if i != "naive_compile")
    d, v = HEADS["qwen3-8b"]
    add(0 + mode_rank, "qwen3-8b", 16384, d, v, "bfloat16")
    add(3 + mode_rank, "qwen3-8b", 8192, d, v, "bfloat16", no_compile)
    add(6 + mode_rank, "qwen3-8b", 2048, d, v, "bfloat16", no_compile)
    for head in ("llama-3-8b", "gemma-2-2b"):
        d, v = HEADS[head]
        add(9 + mode_rank, head, 8192, d, v, "bfloat16", no_compile)
    for head in ("llama-3-8b", "gemma-2-2b"):
        d, v = HEADS[head]
        for n in (16384, 2048):
            add(12 + mode_rank, head, n, d, v, "bfloat16", no_compile)
    if mode == "fwd_bwd":
        d, v = HEADS["qwen3-8b"]
        add(2, "qwen3-8b", 16384, d, v, "bfloat16", tuple(VARIANTS))
        add(15, "qwen3-8b", 8192, d, v, "float32", no_compile)
        # what the softcap costs: Gemma-2's head as the model has it, beside its plain points
        d, v = HEADS["gemma-2-2b-cap30"]
        add(16, "gemma-2-2b-cap30", 8192, d, v, "bfloat16", no_compile)
    return out
