"""CUDA backend: cuBLAS GEMMs on blocks of the logits (through ``torch.mm``) and the CUDA C++
epilogues of ``csrc/`` (the extension ``spot_kernels._cuda``) for everything between the GEMMs.

Math (README, "The math"): ``a = h W^T``, ``z = softcap(a + b) / T``, ``lse = logsumexp_v z``,
``logp = z_t - lse``; backward ``dA = g (onehot - p) / T * softcap'``, ``dh = dA W``,
``dW = dA^T h``, ``db = sum_i dA_i``.

Work split (a buffer in the input dtype within ``chunk_bytes``, reused):

* forward, per block of the backward's first sweep (below: the same GEMMs, so the backward
  recomputes these logits bit for bit): ``buf = h W_c^T`` (cuBLAS, float32 accumulation, one
  rounding to the input dtype), then ``lse_forward`` reads ``buf`` once: online logsumexp,
  target gather and entropy per row (bias, softcap and temperature applied in float32 in the
  kernel); vocabulary chunks' ``(lse, logp, entropy)`` are merged in float64.
* backward, per block (``_gemm.blockwise_backward``, its sweeps from ``_gemm.plan``): all
  tokens x a chunk of the vocabulary when ``N <= V``, else a chunk of tokens x the whole
  vocabulary. ``buf = h W_c^T`` again (recompute; nothing of the logits is kept between
  passes), ``backward_epilogue`` overwrites it in place with ``dA`` (targets shifted into the
  chunk), then ``dW_c = dA^T h`` in one GEMM and ``dh += dA W_c`` into a float32 ``N x D``
  accumulator (the other orientation: ``dh_c`` in one GEMM, ``dW`` accumulated), and
  ``db += sum_i dA_i`` (float32). Accumulating GEMMs take a float32 output when torch offers
  it. When ``chunk_bytes`` has no room for that accumulator in half of it, two sweeps instead:
  ``dW``/``db`` over vocabulary chunks, then ``dh`` over token chunks (one more recompute, no
  accumulator); without ``dW`` (a frozen head) one sweep of token chunks, summing only ``db``,
  and without ``dh`` one of vocabulary chunks.

Precision: cuBLAS rounds the logits block once to the input dtype (as a naive ``h @ W.T`` does);
bias, softcap, temperature, the logsumexp and ``dA`` are float32 in the kernels, and ``dA`` is
rounded once to the input dtype for the tensor-core GEMMs that follow (float32 inputs stay
float32 throughout). In bfloat16 with large ``|z|`` the logits rounding dominates the error.
In float16 that rounding flushes a ``|dA|`` below 6e-8 to 0 (``g p`` with a small upstream
``g`` and ``p ~ 1/V``), as autograd in float16 does: with float16 and small gradients, scale the
loss (``torch.amp.GradScaler``) or use the ``triton`` backend, whose fused backward scales each
``dA`` tile first. The backward's first sweep recomputes the forward's blocks; a second sweep (token chunks, under
a budget without room for the float32 ``dh``) has other shapes and may round a logit
differently in the last bits. The target column's ``1 - p_t`` comes from the forward's ``logp``
(``torch_backend.target_complement``) in any case, not from the recomputed logit.

Cost: forward ``2 N D V`` FLOPs plus one read of the logits; backward ``6 N D V`` FLOPs plus a
read and a write of them (with two sweeps ``8 N D V``, and each twice). Memory beyond inputs and
gradients: ``chunk_bytes`` and O(N) state. In the backward the buffer shares it with the float32
accumulator of ``4 min(N, V) D`` bytes when there is one (``dh`` for the usual ``N <= V``: 268
MB for 16k tokens at D = 4096, where a ``dW`` one would take 2.5 GB at V = 151936).

Options (``backend_options=``): ``chunk_bytes`` (byte budget, default 1 GiB: the blocks and the
backward's accumulator, above) and ``token_chunk`` (rows of token chunks in both passes, one
backward sweep summing ``dW``; wins over ``chunk_bytes``).

Also here, the O(N) part of the SPoT loss on CUDA tensors, which ``spot_loss(backend="cuda")``
runs in eager mode: ``segment_sums`` (sums or means over ``cu_seqlens``) and ``bce_forward`` (the
reward BCE and its ``dL/dpi``, which is the op's backward), each a custom op with autograd.

Every kernel call goes through a ``torch.library`` custom op (``spot_kernels::cuda_*``) with a
fake implementation, so ``torch.compile`` traces through it. Kernels run on
``torch.cuda.current_stream()``; nothing here synchronises with the host. The extension is
imported on first use: importing this module never fails because it is missing, and
``available()`` then says why.

Tests without a GPU set ``_ext`` to a host build of the same kernel sources (``tests/cuda_host``,
a module whose ``HOST`` is True): everything here then runs on CPU tensors, with the kernels
executed by that build and the GEMMs by torch on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch

from . import _checks, _gemm, losses, torch_backend

OPTIONS = ("chunk_bytes", "token_chunk")
DEFAULT_CHUNK_BYTES = 1 << 30
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_ext = None
_ext_error = None
ABI = 4  # csrc/bindings.cpp's ABI: the pointer types this module passes (3: the forward's lse
# float64, the backward's as float32 hi and e^-lo; 4: and the target's 1 - p_t per row)


def _stale(ext):
    """Why ``ext`` cannot serve this module (built from older sources), or ''."""
    abi = getattr(ext, "ABI", 1)
    if abi == ABI:
        return ""
    return (f"spot_kernels._cuda was built from other sources (ABI {abi}, this package needs "
            f"{ABI}); rebuild it: pip install -e . (README: Build for a GPU)")


def _load():
    """The extension module, or None (the ImportError is kept for ``available``)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("spot_kernels._cuda")
        except ImportError as exc:
            _ext_error = exc
    return _ext


def _host():
    """Whether the loaded extension is the host build that runs the kernels on CPU memory."""
    return _ext is not None and bool(getattr(_ext, "HOST", False))


def _kernel_device(device):
    return device.type == "cuda" or (device.type == "cpu" and _host())


def _extension():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the CUDA extension spot_kernels._cuda is not built ({_ext_error}); "
                           f"reinstall with nvcc available (README: Build for a GPU)")
    why = _stale(ext)
    if why:
        raise RuntimeError(why)
    return ext


def _arch_ok(archs, major, minor):
    """Whether a module built for ``archs`` (``ext.ARCHS``: SASS for each, portable PTX for the
    highest number) runs on compute capability ``major.minor``. Plain SASS runs on its major
    version at the same or a higher minor; ``a`` SASS (``90a``) only on that exact GPU; ``f``
    SASS (``100f``) on its family (same major, same or higher minor); the PTX on any GPU at
    least as new."""
    cc = major * 10 + minor
    built = [a for a in archs.split(";") if a]
    if not built:
        return True  # unknown: let the launch report it

    def runs(a):
        b = int(a.rstrip("af"))
        if a.endswith("a"):
            return b == cc
        return b // 10 == major and b <= cc

    return any(runs(a) for a in built) or max(int(a.rstrip("af")) for a in built) <= cc


def available(device):
    device = torch.device(device)
    if device.type == "cpu" and _host():
        why = _stale(_ext)
        return not why, why
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors only, got device {device.type!r}"
    ext = _load()
    if ext is None:
        return False, (f"the CUDA extension spot_kernels._cuda is not built ({_ext_error}); "
                       f"reinstall with nvcc available (README: Build for a GPU)")
    why = _stale(ext)
    if why:
        return False, why
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
    driver, runtime = ext.versions()
    if driver // 1000 < runtime // 1000:
        return False, (f"the CUDA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but "
                       f"spot_kernels._cuda was built with CUDA {runtime // 1000}."
                       f"{runtime % 1000 // 10}; rebuild with a matching toolkit")
    major, minor = torch.cuda.get_device_capability(device)
    if not _arch_ok(ext.ARCHS, major, minor):
        return False, (f"spot_kernels._cuda was built for sm_{ext.ARCHS.replace(';', ', sm_')} "
                       f"but this GPU is sm_{major}{minor}; rebuild with "
                       f"SPOT_CUDA_ARCHS={major}{minor}")
    return True, ""


def check_options(options):
    _checks.backend_options("cuda", options, OPTIONS, positive_ints=OPTIONS)


# --- argument checks of the raw kernels (the ops below) -------------------------------------

def _need(cond, exc, msg):
    if not cond:
        raise exc(msg)


def _check_vec(name, x, n, dtype, device):
    _need(isinstance(x, torch.Tensor), TypeError, f"{name} must be a tensor")
    _need(x.dtype == dtype, TypeError, f"{name} must be {dtype}, got {x.dtype}")
    _need(x.device == device, ValueError, f"{name} is on {x.device}, expected {device}")
    _need(x.dim() == 1 and x.shape[0] == n, ValueError,
          f"{name} must have shape [{n}], got {tuple(x.shape)}")
    _need(x.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_chunk(logits, bias, targets):
    _need(_kernel_device(logits.device), ValueError,
          f"logits must be a CUDA tensor, got device {logits.device}")
    _need(logits.dtype in _DTYPE_CODE, TypeError,
          f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    _need(logits.dim() == 2, ValueError, f"logits must be 2-D [rows, V], got {tuple(logits.shape)}")
    rows, v = logits.shape
    _need(v >= 1, ValueError, "logits must have V >= 1 columns")
    _need(logits.stride(1) == 1 and logits.stride(0) >= v, ValueError,
          f"logits must have unit column stride and row stride >= V, got {logits.stride()}")
    if bias is not None:
        _check_vec("bias", bias, v, logits.dtype, logits.device)
    _check_vec("targets", targets, rows, torch.int64, logits.device)
    return rows, v


def _ptr(x):
    return 0 if x is None else x.data_ptr()


def _aligned(bias):
    """``bias`` contiguous and 16-byte aligned (a copy, V elements, when it is a view at an odd
    offset, e.g. a vocab-parallel slice): the kernels take 16-byte loads only when the logits
    and the bias both allow them."""
    if bias is None:
        return None
    bias = bias.contiguous()
    return bias.clone() if bias.data_ptr() % 16 else bias


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- custom ops: one per kernel --------------------------------------------------------------

@torch.library.custom_op("spot_kernels::cuda_lse_forward", mutates_args=())
def _lse_forward_op(logits: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                    softcap: float, inv_temp: float, ignore_index: int,
                    return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, v = _check_chunk(logits, bias, targets)
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    entropy = torch.empty(rows if return_entropy else 0, dtype=torch.float32,
                          device=logits.device)
    with _on(logits.device):
        _extension().lse_forward(_DTYPE_CODE[logits.dtype], logits.data_ptr(), rows, v,
                                 logits.stride(0), _ptr(bias), targets.data_ptr(), softcap,
                                 inv_temp, ignore_index, logp.data_ptr(), lse.data_ptr(),
                                 entropy.data_ptr() if return_entropy else 0,
                                 _stream(logits.device))
    return logp, lse, entropy


@_lse_forward_op.register_fake
def _(logits, bias, targets, softcap, inv_temp, ignore_index, return_entropy):
    rows = logits.shape[0]
    f = logits.new_empty(rows, dtype=torch.float32)
    return f, logits.new_empty(rows, dtype=torch.float64), logits.new_empty(
        rows if return_entropy else 0, dtype=torch.float32)


@torch.library.custom_op("spot_kernels::cuda_backward_epilogue_", mutates_args=("logits",))
def _backward_epilogue_op(logits: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, lse_hi: torch.Tensor, lse_scale: torch.Tensor,
                          target_q: torch.Tensor, grad: torch.Tensor, softcap: float,
                          inv_temp: float, ignore_index: int) -> None:
    rows, v = _check_chunk(logits, bias, targets)
    _check_vec("lse_hi", lse_hi, rows, torch.float32, logits.device)
    _check_vec("lse_scale", lse_scale, rows, torch.float32, logits.device)
    _check_vec("target_q", target_q, rows, torch.float32, logits.device)
    _check_vec("grad", grad, rows, torch.float32, logits.device)
    with _on(logits.device):
        _extension().backward_epilogue(_DTYPE_CODE[logits.dtype], logits.data_ptr(), rows, v,
                                       logits.stride(0), _ptr(bias), targets.data_ptr(),
                                       lse_hi.data_ptr(), lse_scale.data_ptr(),
                                       target_q.data_ptr(), grad.data_ptr(), softcap, inv_temp,
                                       ignore_index, _stream(logits.device))


@_backward_epilogue_op.register_fake
def _(logits, bias, targets, lse_hi, lse_scale, target_q, grad, softcap, inv_temp,
      ignore_index):
    return None


@torch.library.custom_op("spot_kernels::cuda_segment_sum", mutates_args=())
def _segment_sum_op(x: torch.Tensor, valid: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
                    average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dev = x.device
    _need(_kernel_device(dev), ValueError, f"token_logps must be a CUDA tensor, got {dev}")
    _check_vec("token_logps", x, x.shape[0] if x.dim() == 1 else -1, torch.float32, dev)
    if valid is not None:
        _check_vec("valid", valid, x.shape[0], torch.bool, dev)
    _need(cu_seqlens.dtype in (torch.int32, torch.int64), TypeError,
          f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    _check_vec("cu_seqlens", cu_seqlens, cu_seqlens.shape[0] if cu_seqlens.dim() == 1 else -1,
               cu_seqlens.dtype, dev)
    s = cu_seqlens.shape[0] - 1
    _need(s >= 0, ValueError, "cu_seqlens must have S + 1 >= 1 entries")
    out = torch.empty(s, dtype=torch.float32, device=dev)
    count = torch.empty(s, dtype=torch.float32, device=dev)
    with _on(dev):
        _extension().segment_sum(x.data_ptr(), _ptr(valid), cu_seqlens.data_ptr(),
                                 int(cu_seqlens.dtype == torch.int64), s, int(average),
                                 out.data_ptr(), count.data_ptr(), _stream(dev))
    return out, count


@_segment_sum_op.register_fake
def _(x, valid, cu_seqlens, average):
    s = cu_seqlens.shape[0] - 1
    return x.new_empty(s, dtype=torch.float32), x.new_empty(s, dtype=torch.float32)


@torch.library.custom_op("spot_kernels::cuda_bce_forward", mutates_args=())
def _bce_op(pi: torch.Tensor, rho: torch.Tensor, labels: torch.Tensor,
            delta: Optional[torch.Tensor], beta: float, delta_value: float,
            inv_k: float) -> tuple[torch.Tensor, torch.Tensor]:
    dev = pi.device
    _need(_kernel_device(dev), ValueError, f"policy_logps must be a CUDA tensor, got {dev}")
    s = pi.shape[0] if pi.dim() == 1 else -1
    for name, x in (("policy_logps", pi), ("ref_logps", rho), ("labels", labels)):
        _check_vec(name, x, s, torch.float32, dev)
    if delta is not None:
        _check_vec("delta", delta, 1, torch.float32, dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    coef = torch.empty(s, dtype=torch.float32, device=dev)
    with _on(dev):
        _extension().bce_forward(pi.data_ptr(), rho.data_ptr(), labels.data_ptr(), s, beta,
                                 delta_value, _ptr(delta), inv_k, loss.data_ptr(),
                                 coef.data_ptr(), _stream(dev))
    return loss, coef


@_bce_op.register_fake
def _(pi, rho, labels, delta, beta, delta_value, inv_k):
    return pi.new_empty((), dtype=torch.float32), torch.empty_like(pi)


def _segment_sum_setup(ctx, inputs, output):
    x, valid, cu_seqlens, average = inputs
    ctx.n, ctx.average = x.shape[0], average
    ctx.save_for_backward(valid, cu_seqlens, output[1])


def _segment_sum_backward(ctx, grad_out, _grad_count):
    """Every counted token of sequence ``s`` gets ``grad_out[s]`` (over ``count[s]`` when
    averaging): a gather by sequence index, no atomics, no host sync."""
    valid, cu, count = ctx.saved_tensors
    if grad_out is None or ctx.n == 0:
        return None, None, None, None
    g = grad_out / count.clamp_min(1.0) if ctx.average else grad_out
    seq = torch.searchsorted(cu[1:], torch.arange(ctx.n, device=cu.device, dtype=cu.dtype),
                             right=True)  # cu ends at N: every token has a sequence
    gx = g[seq]
    if valid is not None:
        gx = torch.where(valid, gx, 0.0)
    return gx, None, None, None


_segment_sum_op.register_autograd(_segment_sum_backward, setup_context=_segment_sum_setup)


def _bce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _bce_backward(ctx, grad_loss, _grad_coef):
    """``dloss/dpi`` is the kernel's ``coef``; ``rho``, the labels and ``delta`` are constants
    of the loss (as in ``losses.bce_reward_loss``)."""
    (coef,) = ctx.saved_tensors
    return (None if grad_loss is None else grad_loss * coef), None, None, None, None, None, None


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


# --- the backend contract ----------------------------------------------------------------------

def _check_inputs(hidden, weight, targets, bias):
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if x is not None and not _kernel_device(x.device):
            raise ValueError(f"backend 'cuda' needs CUDA tensors; {name} is on {x.device}")
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if hidden.dtype not in _DTYPE_CODE:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but hidden has {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] do not match: "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")


def _scalars(temperature, softcap):
    return (0.0 if softcap is None else float(softcap)), 1.0 / float(temperature)


@torch.no_grad()
def forward(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None,
            ignore_index=-100, return_entropy=False, **options):
    """Returns ``(logp, lse, entropy or None)``, ``[N]`` each: float32, ``lse`` float64.

    The logits blocks are those of the backward's first sweep (``_gemm.plan``, for the inputs
    that require gradients): the same GEMMs, so the backward's recomputed logits round as these
    did and its ``p = e^(z - lse)`` are this forward's. Token chunks x the vocabulary give each
    row's ``lse`` whole; all tokens x vocabulary chunks (``N <= V`` with a trained head, above
    the budget) give per-chunk ``(lse, logp, entropy)``, merged as a vocab-parallel head's
    shards are."""
    _check_inputs(hidden, weight, targets, bias)
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    cap, inv_temp = _scalars(temperature, softcap)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float64, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if return_entropy else None
    if n == 0:
        return logp, lse, entropy
    t = targets.to(torch.int64).contiguous()
    b = _aligned(bias)
    budget = options.get("chunk_bytes") or DEFAULT_CHUNK_BYTES
    # the gradients the backward will plan for (a frozen head: token chunks); nothing that
    # asks for one (no_grad, a compiled graph's detached inputs): a trained head
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = needs if any(needs) else (True, True, bias is not None)
    rows, cols, _ = _gemm.plan(n, v, hidden.shape[1], hidden.element_size(), needs, budget,
                               align=(1, 8), rows_per_block=options.get("token_chunk"))[0]
    if len(cols) > 1:
        return _forward_by_vocab(hidden, weight, t, b, cols, cap, inv_temp, ignore_index,
                                 return_entropy)
    buf = torch.empty(rows[0].stop, v, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    for rs in rows:
        a = buf[:rs.stop - rs.start]
        torch.mm(hidden[rs], wt, out=a)
        lp, ls, en = _lse_forward_op(a, b, t[rs], cap, inv_temp, ignore_index, return_entropy)
        logp[rs] = lp
        lse[rs] = ls
        if return_entropy:
            entropy[rs] = en
    return logp, lse, entropy


def _forward_by_vocab(hidden, weight, t, b, cols, cap, inv_temp, ignore_index, return_entropy):
    """All tokens x each vocabulary chunk: the chunks' ``(lse, logp, entropy)``, merged as a
    vocab-parallel head's shards are (``torch_backend.merge_parts``; a target outside ``[0, V)``,
    another shard's, is owned by no chunk and gets ``logp = -lse`` there)."""
    n = hidden.shape[0]
    ignored = t == ignore_index
    buf = torch.empty(n, cols[0].stop, dtype=hidden.dtype, device=hidden.device)
    parts = torch.empty(3 if return_entropy else 2, len(cols), n, dtype=torch.float64,
                        device=hidden.device)
    owns = torch.empty(len(cols), n, dtype=torch.bool, device=hidden.device)
    for k, cs in enumerate(cols):
        a = buf.view(-1)[:n * (cs.stop - cs.start)].view(n, -1)
        torch.mm(hidden, weight[cs].t(), out=a)
        # targets shifted into the chunk (another chunk's rows fall outside it, as a vocab
        # shard's do); ignored tokens carry NEVER
        shifted = torch.where(ignored, _gemm.NEVER, t - cs.start).contiguous()
        lp, ls, en = _lse_forward_op(a, None if b is None else b[cs], shifted, cap, inv_temp,
                                     _gemm.NEVER, return_entropy)
        owns[k] = (shifted >= 0) & (shifted < cs.stop - cs.start)
        parts[0, k] = ls
        parts[1, k] = lp
        if return_entropy:
            parts[2, k] = en
    lse, logp, entropy = torch_backend.merge_parts(
        parts[0], parts[1], owns, parts[2] if return_entropy else None, ~ignored,
        lambda x: x.max(0, keepdim=True).values, lambda x: x.sum(1))
    return logp, lse, entropy


@torch.no_grad()
def backward(hidden, weight, targets, bias, lse, logp, grad_logp, *, temperature=1.0,
             softcap=None, ignore_index=-100, needs_input_grad=(True, True, True),
             dh_float32=False, **options):
    """Returns ``(dh, dW, db)`` in the dtypes of ``hidden``, ``weight``, ``bias`` (None where
    not needed; ``dh_float32``: ``dh`` in float32, unrounded, for a sum over vocab shards);
    ``lse`` and ``logp`` are the forward's. ``dA`` blocks within ``chunk_bytes``
    (``_gemm.plan``: all tokens x a vocabulary chunk when ``N <= V``, else a token chunk x the
    vocabulary, or two sweeps; ``token_chunk`` forces token chunks):
    cuBLAS recomputes the block's logits, ``backward_epilogue`` turns them into ``dA`` in place,
    and ``_gemm.blockwise_backward`` runs the gradient GEMMs."""
    _check_inputs(hidden, weight, targets, bias)
    cap, inv_temp = _scalars(temperature, softcap)

    def fill(block, h, w, b, t, rowwise, g):
        torch.mm(h, w.t(), out=block)
        _backward_epilogue_op(block, b, t, *rowwise, g, cap, inv_temp, _gemm.NEVER)

    budget = options.get("chunk_bytes") or DEFAULT_CHUNK_BYTES
    # vocabulary chunks start at multiples of 8 columns: slices of the aligned bias and the
    # logits rows stay 16-byte aligned, so the epilogue keeps its vector loads
    # lse as (hi, e^-lo), split once per token here, not in every thread of the epilogue; the
    # target's 1 - p_t from the forward's logp
    rowwise = (*torch_backend.split_lse(lse.double()), torch_backend.target_complement(logp))
    return _gemm.blockwise_backward(hidden, weight, targets.to(torch.int64), _aligned(bias),
                                    rowwise, grad_logp,
                                    ignore_index, needs_input_grad, budget, fill,
                                    align=(1, 8), rows_per_block=options.get("token_chunk"),
                                    dh_float32=dh_float32,
                                    # the forward's blocks, bit for bit (it planned without
                                    # knowing dh_float32): the recompute matches its logits
                                    plan_dh_float32=False)


# --- the O(N) part of the SPoT loss --------------------------------------------------------------
# ``spot_loss(backend="cuda")`` runs these in eager mode: two launches forward (the sequence sums,
# the BCE with its coefficients) where the torch tail issues about fifteen, and a gather backward.
# Under ``torch.compile`` it keeps the torch tail, which the compiler fuses.

def segment_sums(token_logps, cu_seqlens, valid=None, average=False):
    """Per-sequence sums (means over counted tokens with ``average``) of ``token_logps [N]``
    over ``cu_seqlens [S + 1]`` and the counted tokens, float32 ``([S], [S])``, differentiable
    in ``token_logps``. The caller validates ``cu_seqlens`` (``spot_kernels._checks.cu_seqlens``,
    ending at N): the kernel trusts it."""
    x = token_logps.float().contiguous()
    v = None if valid is None else valid.contiguous()
    return _segment_sum_op(x, v, cu_seqlens.contiguous(), bool(average))


def bce_forward(policy_logps, ref_logps, labels, *, beta=0.1, delta=0.0, reduction="pairs"):
    """SPoT's reward BCE ``loss`` (float32 scalar, differentiable in ``policy_logps``) and
    ``coef = dloss/dpi`` ``[S]``. ``delta`` may be a number or a one-element tensor (read on
    the device, copied there from another)."""
    s = policy_logps.shape[0]
    k = {"pairs": s / 2, "mean": s, "sum": 1}[reduction]
    d_t = None
    d_v = 0.0
    if isinstance(delta, torch.Tensor):
        # read on the loss's device (a 0-dim CPU tensor broadcasts in the torch backend)
        d_t = delta.detach().reshape(1).float().to(policy_logps.device).contiguous()
    else:
        d_v = float(delta)
    return _bce_op(policy_logps.float().contiguous(),
                   ref_logps.detach().float().contiguous(),
                   labels.detach().float().contiguous(), d_t, float(beta), d_v,
                   1.0 / max(k, 1))


def sequence_logprobs(token_logps, cu_seqlens, valid=None, average=False):
    """``losses.sequence_logprobs`` through the segment-sum kernel."""
    return segment_sums(token_logps, cu_seqlens, valid, average)[0]


def bce_reward_loss(policy_logps, ref_logps, labels, beta=0.1, delta=0.0, reduction="pairs"):
    """``losses.bce_reward_loss`` through the BCE kernel; the same ``(loss, stats)``."""
    loss, _ = bce_forward(policy_logps, ref_logps, labels, beta=beta, delta=delta,
                          reduction=reduction)
    return loss, losses.bce_stats(policy_logps, ref_logps, labels, beta, delta)
