"""Triton backend: fused logits tiles, online log-sum-exp, recompute in the backward.

Nothing of the ``[N, V]`` logits is ever stored. The forward (``fwd.py``) streams the
vocabulary through ``tl.dot`` tiles per token tile, keeping an online ``(max, sum-exp)`` and the
target logit; with few token tiles, or an ``h`` too large for L2, it splits the vocabulary
across programs and ``merge.py`` combines the partials deterministically. The backward recomputes each tile from the saved
``lse`` and forms ``dA = g (onehot - p) / T * softcap'(a)`` in registers (the target's
``1 - p_t`` from the forward's ``logp``, ``torch_backend.target_complement``):

* default: ``bwd.py``, one program per (token tile, vocabulary tile), float32 atomics into
  ``dh``, ``dW``, ``db``; ``6 N D V`` FLOPs (``10 N D V`` for half inputs with
  ``fast_grad=False``); the summation order (last bits) varies between runs.
* ``da_bytes``: ``bwd_da.py`` writes ``dA`` in bounded blocks and cuBLAS runs the gradient
  GEMMs (below); no atomics.
* ``deterministic=True``: ``bwd_dh.py`` (one program per token tile) then
  ``bwd_dw.py`` (one per vocabulary tile), each owning its output rows, no atomics,
  bit-identical across runs. The logits are recomputed twice: ``8 N D V`` FLOPs (``12 N D V``
  for half inputs with ``fast_grad=False``), less parallelism, and float32 read-modify-writes
  of ``dh`` and ``dW`` that outgrow L2 at real sizes: at Qwen3-8B's head and N = 16384 about
  0.6 TB and 1.3 TB through HBM, so expect several times the default's time there (an
  estimate; not measured yet). For tests and small heads; ``da_bytes`` is the atomic-free
  choice at scale.

Tokens with ``g = 0`` (ignored, or zero weight) cost nothing in the default and deterministic
backwards: a tile whose rows all have ``g = 0`` skips everything, including the recompute. With
``da_bytes`` such a tile skips the recompute but is written as zeros, and its rows still pass
through the cuBLAS GEMMs.

The SPoT loss (``spot_kernels.spot_loss``) needs nothing more from this module: the sequence
sums and the BCE are O(N + S) torch ops whose autograd hands each token its ``g_i`` (the
sequence's ``dL/dpi_s``), which ``backward`` consumes with the ``lse`` saved by ``forward``:
one forward, one backward, no ``N x V`` tensor.

Memory beyond inputs and outputs: O(N) (``lse``; ``16 N splits`` bytes of split partials), and
in the backward float32 accumulators for ``dh`` (``4 N D``), ``dW`` (``4 V D``) and ``db`` when
the inputs are half precision (for float32 inputs the gradients themselves accumulate). With
``scratch_bytes`` the default backward bounds those accumulators instead: a first pass over
vocabulary chunks accumulates ``dW``/``db`` of one chunk at a time (the same kernel on the
chunk's rows of ``W``, targets shifted into it), a second over token chunks accumulates ``dh``,
each chunk's float32 sums rounded once into the gradient. That costs one more recompute of the
logits (``2 N D V`` FLOPs) and no extra atomics: the first pass does only the ``dW`` atomics
and the second only the ``dh`` ones.

``backend_options`` (all optional):

* ``filter_eps`` (float >= 0, default 0 = off): skip a backward tile when every ``|dA|`` in it,
  after scaling by ``g``, is below this; the gradient changes by at most ``filter_eps`` per
  ``dA`` element of the skipped tiles.
* ``deterministic`` (bool, default False): the atomic-free backward above.
* ``scratch_bytes`` (int >= 1, default None = off): with half inputs, at most this many bytes
  of float32 accumulators at a time (rounded up to one tile of rows), in two passes (above);
  ``32 << 20`` keeps a Qwen3-8B-sized backward within 64 MB beyond its inputs and gradients.
  No effect with float32 inputs; not combined with ``deterministic``.
* ``da_bytes`` (int >= 1, default None = off): the backward writes ``dA`` (rounded once to the
  inputs' dtype) in blocks (``bwd_da.py``) and runs ``dh = dA W`` and ``dW = dA^T h`` through
  cuBLAS: no atomics, the GEMMs at cuBLAS speed, for ``6 N V`` bytes of ``dA`` traffic in half
  precision (one sweep; ``8 N V`` in two).
  ``da_bytes`` holds a block (at least one tile) and any float32 sum (``_gemm.plan``): blocks
  span all tokens and a vocabulary chunk when ``N <= V`` (``dW`` rows in one GEMM each, ``dh``
  summed in a float32 ``N x D`` buffer when there is more than one chunk), else the reverse,
  provided that sum takes at most half of ``da_bytes``; otherwise two sweeps, ``dW`` over
  vocabulary chunks then ``dh`` over token chunks, with one more recompute and no sum. At
  Qwen3-8B's head (N = 16384) ``1 << 30`` sums ``dh`` (268 MB) beside 7 chunks; ``48 << 20``
  sweeps twice within the 64 MB target. Results are the same in every run. Not combined with
  ``deterministic``, ``scratch_bytes``, ``filter_eps`` or ``fast_grad=False``.
* ``fast_grad`` (bool, default True): with half inputs, round ``dA`` to the input dtype once
  for the gradient dots, as autograd in that dtype does and as the ``cuda`` backend does
  (backward ``6 N D V`` FLOPs). Each rounding moves a product ``dA_v W_v`` by up to half an
  ulp, so a gradient element is off by up to ``2^-9 sum_v |dA_v W_v|`` in bfloat16: about one
  ulp of the dtype at the output's scale beyond the tolerance rule, more where the sum cancels
  (about 0.3% of small random bfloat16 heads, by up to 10%; autograd in bfloat16 carries the
  same error). ``False`` splits ``dA = hi + lo`` into two half values and runs two dots each,
  float32-grade ``dA`` that meets the rule with half an ulp, at twice the gradient-GEMM cost
  (``10 N D V``). The four GEMMs' worth of work that the speed target counts (``8 N D V`` with
  the forward) leaves no room for the split, hence on by default.
  float16 (5 exponent bits) would also flush the small ``|dA|`` of a small upstream gradient
  (``g p`` with ``|g| ~ 1e-4``, ``p ~ 1/V``) to 0: the fused backward (default,
  ``deterministic``, ``scratch_bytes``, ``fast_grad=False``) scales each ``dA`` tile by a power
  of two first (``tiles.split_half``), exactly undone on its float32 products. ``da_bytes``
  writes ``dA`` for cuBLAS unscaled, as autograd in float16 and the ``cuda`` backend do: with
  float16 and small gradients, scale the loss (``torch.amp.GradScaler``) or take the fused
  backward.
* ``split_vocab`` (int >= 1): vocabulary splits of the forward; 1 disables. Default automatic
  (``_splits``; never for CPU tensors): with fewer token tiles than SMs, up to about two
  programs per SM; with ``h`` larger than a quarter of L2, about ``sqrt(2 SMs)`` (16 on an
  H200) so that the programs resident at once keep their ``h`` rows in L2; at least 8
  vocabulary tiles per split.
* ``block_m``, ``block_v``, ``block_d`` (powers of two, 16 to 1024), ``num_warps`` (1, 2, 4, 8, 16),
  ``num_stages`` (>= 1): override ``configs.py`` for both passes; ``group_m`` (>= 1): token
  tiles per group in the program order of the default backward (``bwd.py``) and of
  ``da_bytes``'s ``dA`` blocks (``bwd_da.py``).

On CPU the kernels run through Triton's interpreter, only when ``TRITON_INTERPRET=1`` is set
before the kernels are first used (that is how the tests run; it is slow: small shapes only).
The kernel modules are imported on first use, so importing this module compiles nothing and
touches no GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import warnings

import torch

from .. import _checks, _gemm, torch_backend

OPTIONS = ("filter_eps", "deterministic", "fast_grad", "split_vocab", "block_m", "block_v",
           "block_d", "num_warps", "num_stages", "group_m", "scratch_bytes", "da_bytes")


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(text):
    return tuple(int(x) for x in text.split("+")[0].split(".")[:2] if x.isdigit())


def _interpreter_problem():
    """Why Triton's interpreter cannot run here, or None. Before Triton 3.7 it converts
    one-element arrays with ``int()``, which numpy >= 2.4 refuses (a TypeError in every kernel
    with a loop over tensor bounds)."""
    import numpy
    import triton
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter does not run with numpy "
                f"{numpy.__version__} (fixed in Triton 3.7); install triton>=3.7 or numpy<2.4")
    return None


def available(device):
    device = torch.device(device)
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return False, f"triton does not import ({exc}); pip install 'triton>=3.3'"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available in this torch build or machine"
        if _interpret_env():  # the kernels were decorated for the interpreter: they run there
            why = _interpreter_problem()
            if why:
                return False, f"TRITON_INTERPRET=1 interprets the kernels on the CPU, and {why}"
        elif torch.cuda.get_device_capability(device) < (8, 0):
            return False, ("the Triton kernels need a GPU of compute capability 8.0 or newer "
                           "(bfloat16 tensor cores)")
        return True, ""
    if device.type == "cpu":
        if _interpret_env():
            why = _interpreter_problem()
            return (False, why) if why else (True, "")
        return False, "Triton runs on CPU only through its interpreter: set TRITON_INTERPRET=1"
    return False, f"Triton kernels run on CUDA devices (or CPU when interpreted), not {device.type}"


def _pow2(x):
    return x >= 16 and x & (x - 1) == 0


def check_options(options):
    _checks.backend_options("triton", options, OPTIONS)

    def bad(key, want):
        raise ValueError(f"backend_options: {key} must be {want}, got {options[key]!r}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if "filter_eps" in options:
        x = options["filter_eps"]
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)
                              or not x >= 0 or x == float("inf")):
            bad("filter_eps", "a finite number >= 0 (0 or None: off)")
    for key in ("deterministic", "fast_grad"):
        if key in options and not isinstance(options[key], bool):
            bad(key, "True or False")
    if "split_vocab" in options:
        x = options["split_vocab"]
        if x is not None and (not is_int(x) or x < 1):
            bad("split_vocab", "an int >= 1 (1: no split) or None (automatic)")
    for key in ("block_m", "block_v", "block_d"):
        if key in options and not (is_int(options[key]) and _pow2(options[key])
                                   and options[key] <= 1024):
            bad(key, "a power of two from 16 to 1024")  # Triton's tiles hold at most 2^20
    if "num_warps" in options and not (is_int(options["num_warps"])
                                       and options["num_warps"] in (1, 2, 4, 8, 16)):
        bad("num_warps", "one of 1, 2, 4, 8, 16")
    for key in ("num_stages", "group_m"):
        if key in options and not (is_int(options[key]) and options[key] >= 1):
            bad(key, "an int >= 1")
    if options.get("scratch_bytes") is not None:
        if not (is_int(options["scratch_bytes"]) and options["scratch_bytes"] >= 1):
            bad("scratch_bytes", "an int >= 1 (bytes) or None (off)")
        if options.get("deterministic"):
            raise ValueError("backend_options: scratch_bytes bounds the default backward; it "
                             "cannot be combined with deterministic=True")
    if options.get("da_bytes") is not None:
        if not (is_int(options["da_bytes"]) and options["da_bytes"] >= 1):
            bad("da_bytes", "an int >= 1 (bytes) or None (off)")
        clash = [k for k in ("deterministic", "scratch_bytes", "filter_eps") if options.get(k)]
        if options.get("fast_grad") is False:
            clash.append("fast_grad=False")
        if clash:
            raise ValueError(f"backend_options: da_bytes (dA blocks through cuBLAS) cannot be "
                             f"combined with {', '.join(clash)}")


def _kernels():
    """The kernel modules, imported (not compiled) on first use."""
    from . import bwd, bwd_dh, bwd_dw, configs, fwd, merge
    return fwd, merge, bwd, bwd_dh, bwd_dw, configs



def _precision(dtype, device):
    """The ``tl.dot`` precision: IEEE float32 (no TF32) for float32 inputs; tensor cores for
    half inputs ("tf32" is ignored there); "upcast" under the interpreter (see ``tiles.py``)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _interpreted(device) else "tf32"


def _interpreted(device):
    return torch.device(device).type != "cuda" or _interpret_env()


def _splits(n, v, d, itemsize, cfg, device, requested):
    """Vocabulary splits of the forward (``fwd.py``, whose programs run split-fastest).

    * Too few token tiles to fill the GPU: enough splits for about two programs per SM.
    * ``h`` larger than a quarter of L2: at least ``sqrt(2 SMs BLOCK_M / BLOCK_V)`` splits
      (16 on an H200). The ``R`` programs resident at once (one or two per SM: one for the
      Hopper forward, whose 128 x 128 tiles take 242 registers a thread) then hold
      ``R / splits`` token tiles of ``h`` and ``splits`` tiles of ``W``, a sum near its
      smallest there (24 to 33 MB at D = 4096 in bf16, in a 60 MB L2), so ``h`` is read from
      HBM about once and ``W`` once per group of token tiles. With one split the resident
      programs are all the token tiles at one vocabulary tile: all of ``h`` (128 MB at
      N = 16384, D = 4096) passes through L2 for every vocabulary tile, from HBM each time.
    Each split stays at least 8 vocabulary tiles wide.
    """
    most = (2**31 - 1) // max(n, 1)  # the merge's int32 offsets into [splits, N] partials
    if requested is not None:
        return max(1, min(requested, most))
    configs = _kernels()[5]
    _, sms = configs.device_info(device)
    bm, bv = cfg["block_m"], cfg["block_v"]
    tiles = -(-n // bm)
    splits = 1 if tiles >= sms else -(-2 * sms // tiles)
    if n * d * itemsize > configs.l2_bytes(device) / 4:
        splits = max(splits, math.isqrt(2 * sms * bm // bv))
    return max(1, min(splits, v // (8 * bv), most))


_COPIED = [False]  # whether _int32_columns has warned


def _int32_columns(x):
    """The kernels step along D with int32 ``d * stride``: a view whose column stride would
    overflow that (a transposed ``[V, D]`` weight with huge ``V D``) is copied first, in every
    forward and backward (said once: a whole head's copy is gigabytes)."""
    if x.stride(1) * max(x.shape[1] - 1, 0) < 2**31:
        return x
    if not _COPIED[0]:
        _COPIED[0] = True
        warnings.warn(f"spot_kernels triton backend: a {tuple(x.shape)} input with column stride "
                      f"{x.stride(1)} (a transposed weight) is copied to a contiguous one in "
                      f"every forward and backward ({x.numel() * x.element_size() / 2**30:.1f} "
                      f"GiB); pass it contiguous (weight.contiguous() once) to avoid that",
                      stacklevel=3)
    return x.contiguous()


def _on(device):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None,
            ignore_index=-100, return_entropy=False, **options):
    """Returns ``(logp, lse, entropy or None)``, ``[N]`` each: float32, ``lse`` float64."""
    hidden, weight = _int32_columns(hidden), _int32_columns(weight)
    with _on(hidden.device):
        return _forward(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                        return_entropy, options)


def _forward(hidden, weight, targets, bias, temperature, softcap, ignore_index, return_entropy,
             options):
    fwd, merge, _, _, _, configs = _kernels()
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.empty(n, **f32), torch.empty(n, dtype=torch.float64, device=dev)
    entropy = torch.empty(n, **f32) if return_entropy else None
    if n == 0:
        return logp, lse, entropy
    targets = targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    cfg = configs.pick("forward", n, d, v, hidden.dtype, dev, _interpreted(dev), options)
    splits = _splits(n, v, d, hidden.element_size(), cfg, dev, options.get("split_vocab"))
    parts = fwd.launch_forward(hidden, weight, targets, bias, logp, lse, entropy,
                               temperature=temperature, softcap=softcap,
                               ignore_index=ignore_index, splits=splits, cfg=cfg,
                               precision=_precision(hidden.dtype, dev))
    if parts is not None:
        merge.launch_merge(parts, targets, logp, lse, entropy, ignore_index=ignore_index)
    return logp, lse, entropy


def backward(hidden, weight, targets, bias, lse, logp, grad_logp, *, temperature=1.0,
             softcap=None, ignore_index=-100, needs_input_grad=(True, True, True),
             dh_float32=False, **options):
    """Returns ``(dh, dW, db)`` in the dtypes of ``hidden``, ``weight``, ``bias`` (None where
    not needed; ``dh_float32``: ``dh`` in float32, unrounded, for a sum over vocab shards).
    ``lse`` and ``logp`` are the forward's."""
    hidden, weight = _int32_columns(hidden), _int32_columns(weight)
    q = torch_backend.target_complement(logp).contiguous()
    with _on(hidden.device):
        return _backward(hidden, weight, targets, bias, lse, q, grad_logp, temperature, softcap,
                         ignore_index, needs_input_grad, dh_float32, options)


def _backward(hidden, weight, targets, bias, lse, q, grad_logp, temperature, softcap,
              ignore_index, needs_input_grad, dh_float32, options):
    _, _, bwd, bwd_dh, bwd_dw, configs = _kernels()
    n, d = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = needs_input_grad
    need_b = bool(need_b and bias is not None)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n and options.get("da_bytes") and (need_h or need_w or need_b):
        return _backward_gemm(hidden, weight, targets, bias, lse, q, grad_logp, temperature,
                              softcap, ignore_index, need_h, need_w, need_b, dh_float32,
                              options)
    if n and options.get("scratch_bytes") and hidden.dtype != torch.float32:
        return _backward_bounded(hidden, weight, targets, bias, lse, q, grad_logp, temperature,
                                 softcap, ignore_index, need_h, need_w, need_b, dh_float32,
                                 options)
    dh = torch.zeros(n, d, **f32) if need_h else None
    dw = torch.zeros(v, d, **f32) if need_w else None
    db = torch.zeros(v, **f32) if need_b else None
    if n and (need_h or need_w or need_b):
        targets = targets.contiguous()
        grad = grad_logp.float().contiguous()
        lse = lse.double().contiguous()
        bias = None if bias is None else bias.contiguous()
        cfg = configs.pick("backward", n, d, v, hidden.dtype, dev, _interpreted(dev), options)
        common = _backward_common(hidden, temperature, softcap, ignore_index, cfg, options)
        if options.get("deterministic", False):
            if need_h:
                bwd_dh.launch_backward_dh(hidden, weight, targets, bias, lse, q, grad, dh,
                                          **common)
            if need_w or need_b:
                bwd_dw.launch_backward_dw(hidden, weight, targets, bias, lse, q, grad, dw, db,
                                          **common)
        else:
            bwd.launch_backward(hidden, weight, targets, bias, lse, q, grad, dh, dw, db,
                                **common)
    return torch_backend.in_dtypes(dh, dw, db, hidden, weight, bias, dh_float32)


def _backward_common(hidden, temperature, softcap, ignore_index, cfg, options):
    return dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                filter_eps=options.get("filter_eps") or 0.0, cfg=cfg,
                split=hidden.dtype != torch.float32 and not options.get("fast_grad", True),
                precision=_precision(hidden.dtype, hidden.device))


def _backward_bounded(hidden, weight, targets, bias, lse, q, grad_logp, temperature, softcap,
                      ignore_index, need_h, need_w, need_b, dh_float32, options):
    """The default backward in two passes whose float32 accumulators hold at most
    ``scratch_bytes`` (module docstring): ``dW``/``db`` over vocabulary chunks, then ``dh``
    over token chunks; each chunk's sums are rounded once into the gradient."""
    _, _, bwd, _, _, configs = _kernels()
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = configs.pick("backward", n, d, v, hidden.dtype, dev, _interpreted(dev), options)
    common = _backward_common(hidden, temperature, softcap, cfg=cfg, options=options,
                              ignore_index=_gemm.NEVER)
    rows_fit = max(1, options["scratch_bytes"] // (4 * d))
    ignored = targets == ignore_index
    grad = torch.where(ignored, 0.0, grad_logp.float()).contiguous()
    lse = lse.double().contiguous()
    bias = None if bias is None else bias.contiguous()
    dh = None
    if need_h:
        dh = (torch.empty(n, d, dtype=torch.float32, device=dev) if dh_float32 else
              torch.empty_like(hidden, memory_format=torch.contiguous_format))
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    if need_w or need_b:
        step = _gemm.round_to(rows_fit, cfg["block_v"], v)
        acc = torch.empty(step, d, dtype=torch.float32, device=dev) if need_w else None
        for v0 in range(0, v, step):
            rows = min(step, v - v0)
            # the chunk's own ids become 0..rows-1; every other target matches no column
            shifted = torch.where(ignored, -1, targets - v0).contiguous()
            part = None
            if need_w:
                part = acc[:rows].zero_()
            bwd.launch_backward(hidden, weight[v0:v0 + rows], shifted,
                                None if bias is None else bias[v0:v0 + rows], lse, q, grad, None,
                                part, None if db is None else db[v0:v0 + rows], **common)
            if need_w:
                dw[v0:v0 + rows].copy_(part)
        del acc
    if need_h:
        step = _gemm.round_to(rows_fit, cfg["block_m"], n)
        # a float32 dh is its own accumulator
        acc = None if dh_float32 else torch.empty(step, d, dtype=torch.float32, device=dev)
        targets = targets.contiguous()
        for n0 in range(0, n, step):
            rows = min(step, n - n0)
            sl = slice(n0, n0 + rows)
            part = dh[sl].zero_() if dh_float32 else acc[:rows].zero_()
            bwd.launch_backward(hidden[sl], weight, targets[sl], bias, lse[sl], q[sl], grad[sl],
                                part, None, None, **dict(common, ignore_index=ignore_index))
            if not dh_float32:
                dh[sl].copy_(part)
    return dh, dw, None if db is None else db.to(bias.dtype)


def _backward_gemm(hidden, weight, targets, bias, lse, q, grad_logp, temperature, softcap,
                   ignore_index, need_h, need_w, need_b, dh_float32, options):
    """The backward with ``da_bytes`` (module docstring): ``bwd_da.py`` writes ``dA`` one block
    at a time, in the inputs' dtype, and cuBLAS runs the gradient GEMMs
    (``_gemm.blockwise_backward``, in the sweeps of ``_gemm.plan``)."""
    from . import bwd_da
    configs = _kernels()[5]
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    cfg = configs.pick("forward", n, d, v, dtype, dev, _interpreted(dev), options)
    common = dict(temperature=temperature, softcap=softcap, cfg=cfg,
                  precision=_precision(dtype, dev), ignore_index=_gemm.NEVER)

    def fill(block, h, w, b, t, rowwise, g):
        bwd_da.launch_backward_da(h, w, t, b, *rowwise, g, block, **common)

    return _gemm.blockwise_backward(
        hidden, weight, targets, bias, (lse.double(), q), grad_logp, ignore_index,
        (need_h, need_w, need_b),
        options["da_bytes"], fill,
        align=(cfg["block_m"], cfg["block_v"]), dh_float32=dh_float32)