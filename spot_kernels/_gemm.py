"""The gradient GEMMs through cuBLAS, shared by the ``cuda`` backend and ``triton`` with
``da_bytes``: ``accumulate`` (``acc += x @ y`` into float32), ``plan`` (how the backward's
``dA`` blocks sweep ``[N, V]`` within a byte budget) and ``blockwise_backward``, which turns the
blocks that a backend writes into ``dh``, ``dW`` and ``db``.

Memory beyond inputs and gradients is the budget (plus O(N + V) state): a block and, when the
budget has room for it in half, the float32 sum of the smaller gradient side (``4 min(N, V) D``
bytes). At Qwen3-8B's head (N = 16384, D = 4096, V = 151936, bfloat16) a 1 GiB budget sums
``dh`` (268 MB) beside 805 MB blocks: 4 GEMMs of ``2 N D V`` FLOPs with the forward's. A 48 MB
budget sweeps twice, blocks of 1,536 columns for ``dW``, then of 165 rows (128 with Triton's
tile alignment) for ``dh``: 5 GEMMs in all, 48 MB."""
from __future__ import annotations

import torch

from . import torch_backend

_fp32_out_mm = [True]  # cleared if this torch has no float32-output GEMM for half inputs
# a CUDA error (an illegal address, a launch failure): its own class in recent torch releases
_DEVICE_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)


def _fp32_out_supported(device, dtype):
    """Whether ``addmm(out_dtype=torch.float32, out=float32)`` runs on ``dtype`` operands."""
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        out = torch.zeros(1, 1, dtype=torch.float32, device=device)
        torch.addmm(out, one, one, out_dtype=torch.float32, out=out)
        return out.item() == 1.0
    except Exception:  # noqa: BLE001 - any failure: the feature is not there
        return False


def accumulate(acc, x, y):
    """``acc += x @ y`` with ``acc`` float32: for half ``x``, ``y`` one GEMM with a float32
    output when torch offers it (``addmm(..., out_dtype=torch.float32)``), else each product
    rounded once to the inputs' dtype and summed in float32 (on CPU: float32 operands)."""
    if x.dtype == torch.float32:
        acc.addmm_(x, y)
        return
    if x.device.type != "cuda":  # tests on CPU: products of half values are exact in float32
        acc.addmm_(x.float(), y.float())
        return
    if _fp32_out_mm[0]:
        try:
            torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
            return
        except (torch.cuda.OutOfMemoryError, *_DEVICE_ERRORS):
            # not a missing feature: out of memory (the fallback would need more still), or an
            # earlier kernel's error surfacing here, which must not switch the path for good
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            # no out_dtype (older torch), or a float32 ``acc`` refused beside half operands
            # (some releases check that): from now on each product is rounded once, summed in
            # float32 (benchmarks/gpu_suite.sh records which path the GPU's torch takes). A
            # torch without AcceleratorError reports a CUDA error as a plain RuntimeError: the
            # same call on 1 x 1 operands tells the two apart, and a passing one raises it
            if _fp32_out_supported(x.device, x.dtype):
                raise
            _fp32_out_mm[0] = False
    acc.add_(torch.mm(x, y))


# the ignore index of the dA kernels of blockwise_backward, and the target of ignored tokens
# there: a target shifted into a vocabulary chunk lies in (-V, V), so it never equals this
# (the caller's ignore_index, e.g. -1 or a real id, may)
NEVER = -(2**31) + 1


def chunks(total, step):
    step = max(1, step)
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def round_to(count, block, total):
    """``count`` rounded down to whole ``block``s (at least one block), at most ``total``
    (all of it when ``count`` covers it)."""
    return total if count >= total else min(max(block, count // block * block), total)


def plan(n, v, d, itemsize, needs, budget, align=(1, 1), rows_per_block=None, dh_float32=False):
    """The sweeps of ``blockwise_backward``: a list of ``(rows, cols, needs)``, where ``rows``
    and ``cols`` are slices that tile ``[N, V]`` into ``dA`` blocks and ``needs`` says which of
    ``(dh, dW, db)`` the sweep computes.

    ``budget`` bytes hold one block (``itemsize`` bytes an element) and any float32 sum:

    * all tokens x vocabulary chunks give each chunk's ``dW``/``db`` rows whole (one GEMM), and
      token chunks x the whole vocabulary give each chunk's ``dh`` rows whole;
    * without ``dW`` (a frozen head), one sweep of token chunks: ``dh`` whole, ``db`` (``4 V``
      bytes) summed; without ``dh``, one sweep of vocabulary chunks; either sums no ``N x D`` or
      ``V x D`` buffer, nor does a single block holding all of ``[N, V]``;
    * with both, one sweep sums the smaller side in float32 (``dh``, ``4 N D`` bytes, when
      ``N <= V``; nothing extra for float32 inputs, whose gradient is that sum, nor for a
      ``dh`` asked for in float32 with ``dh_float32``, which is its own sum) if that takes
      at most half the budget and leaves room for one aligned chunk, the rest going to the
      blocks; else two sweeps, ``dW``/``db`` over vocabulary chunks, then ``dh`` over token
      chunks: one more recompute of the logits, no float32 ``N x D`` or ``V x D`` buffer.

    Chunks are whole multiples of ``align`` (rows, columns), at least one (which may exceed the
    budget). ``rows_per_block`` forces one sweep of token chunks of that many rows."""
    need_h, need_w, need_b = needs
    whole_n, whole_v = [slice(0, n)], [slice(0, v)]

    def by_vocab(space):
        return whole_n, chunks(v, round_to(space // (itemsize * max(n, 1)), align[1], v))

    def by_token(space):
        return chunks(n, round_to(space // (itemsize * v), align[0], n)), whole_v

    if rows_per_block:
        return [(chunks(n, rows_per_block), whole_v, needs)]
    if n * v * itemsize <= budget or not need_w:
        return [(*by_token(budget), needs)]
    if not need_h:
        return [(*by_vocab(budget), needs)]
    # the float32 sum of the smaller side; with float32 inputs, or a dh returned in float32,
    # it is the gradient itself
    acc = 0 if itemsize == 4 or (dh_float32 and n <= v) else 4 * d * min(n, v)
    least = itemsize * (n * min(align[1], v) if n <= v else min(align[0], n) * v)
    if not acc or (2 * acc <= budget and least <= budget - acc):
        return [(*(by_vocab if n <= v else by_token)(budget - acc), needs)]
    return [(*by_vocab(budget), (False, need_w, need_b)),
            (*by_token(budget), (True, False, False))]


def blockwise_backward(hidden, weight, targets, bias, rowwise, grad_logp, ignore_index, needs,
                       budget, fill, align=(1, 1), rows_per_block=None, dh_float32=False,
                       plan_dh_float32=None):
    """``(dh, dW, db)`` from ``dA`` blocks written one at a time, in the sweeps of ``plan``
    (``budget``: bytes for a block and any float32 sum; ``needs``: which of ``(dh, dW, db)``,
    ``db`` only with a bias).

    ``fill(block, h, w, b, t, rowwise, g)`` writes ``dA`` of tokens ``h`` against vocabulary
    rows ``w`` (``b``: their bias or None) into ``block`` ``[len(h), len(w)]`` (contiguous), in
    the inputs' dtype, with ``t`` the targets shifted into ``w``'s rows and ``NEVER`` as the
    ignore index (ignored tokens carry ``NEVER`` and ``g = 0``: the kernels may skip their
    rows); ``rowwise`` is the caller's tuple of per-token tensors (the forward's ``lse`` in the
    form its kernel reads and the target's ``1 - p_t``), sliced to the block's tokens. A
    gradient that several blocks of a sweep add into is summed in float32 and rounded once;
    otherwise each block's GEMM writes its rows in the gradient's dtype. ``dh_float32``: ``dh``
    comes back in float32, through float32-output GEMMs (on a torch without them, ``accumulate``
    rounds each block's product to half before the float32 sum). ``plan_dh_float32`` (default:
    ``dh_float32``) is what ``plan`` is told: ``False`` keeps the blocks of a forward that
    planned them before it knew ``dh`` would come back in float32."""
    needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]) and bias is not None)
    n, d = hidden.shape
    v = weight.shape[0]
    ignored = targets == ignore_index
    grad = torch.where(ignored, 0.0, grad_logp.float()).contiguous()
    rowwise = tuple(x.contiguous() for x in rowwise)
    bias = None if bias is None else bias.contiguous()
    out = [None, None, None]
    if not n:  # no tokens: zero gradients
        out = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want else None
               for x, want in zip((hidden, weight, bias), needs)]
    elif any(needs):
        own_sum = dh_float32 if plan_dh_float32 is None else plan_dh_float32
        for rows, cols, wants in plan(n, v, d, hidden.element_size(), needs, budget, align,
                                      rows_per_block, own_sum):
            done = _sweep(hidden, weight, targets, bias, rowwise, grad, ignored, rows, cols,
                          wants, fill, dh_float32)
            out = [new if want else old for old, new, want in zip(out, done, wants)]
    dh, dw, db = out
    return torch_backend.in_dtypes(dh, dw, db, hidden, weight, bias, dh_float32)


def _sweep(hidden, weight, targets, bias, rowwise, grad, ignored, rows, cols, needs, fill,
           dh_float32=False):
    need_h, need_w, need_b = needs
    # a float32 dh of half inputs: one float32-output GEMM per block, even for a single block
    sum_h = len(cols) > 1 or (dh_float32 and hidden.dtype != torch.float32)
    sum_w = len(rows) > 1
    dh = _output(hidden, sum_h) if need_h else None
    dw = _output(weight, sum_w) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
    buf = torch.empty(rows[0].stop, cols[0].stop, dtype=hidden.dtype, device=hidden.device)
    for cs in cols:
        shifted = torch.where(ignored, NEVER, targets - cs.start).contiguous()
        for rs in rows:
            r, c = rs.stop - rs.start, cs.stop - cs.start
            block = buf.view(-1)[:r * c].view(r, c)
            fill(block, hidden[rs], weight[cs], None if bias is None else bias[cs],
                 shifted[rs], tuple(x[rs] for x in rowwise), grad[rs])
            if need_h:
                _into(dh[rs], block, weight[cs], sum_h)
            if need_w:
                _into(dw[cs], block.t(), hidden[rs], sum_w)
            if need_b:
                db[cs] += block.sum(0, dtype=torch.float32)
    return dh, dw, db


def _output(like, summed):
    """Where a gradient's GEMMs go: float32 zeros when several blocks add into it, else a
    buffer in its own dtype that one GEMM per block fills."""
    if summed:
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _into(out, x, y, summed):
    if summed:
        accumulate(out, x, y)
    else:
        torch.mm(x, y, out=out)
