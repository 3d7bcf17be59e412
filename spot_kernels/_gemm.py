"""The gradient GEMMs through cuBLAS, shared by the ``cuda`` backend and ``triton`` with
``da_bytes``: ``accumulate`` (``acc += x @ y`` into float32) and ``blockwise_backward``, which
turns ``dA`` blocks that a backend writes into ``dh``, ``dW`` and ``db``."""
from __future__ import annotations

import torch

_fp32_out_mm = [True]  # cleared if this torch has no float32-output GEMM for half inputs


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
        except (RuntimeError, TypeError, NotImplementedError):
            _fp32_out_mm[0] = False
    acc.add_(torch.mm(x, y))


# the ignore index of the dA kernels of blockwise_backward, and the target of ignored tokens
# there: a target shifted into a vocabulary chunk lies in (-V, V), so it never equals this
# (the caller's ignore_index, e.g. -1 or a real id, may)
NEVER = -(2**31) + 1


def chunks(total, step):
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def round_to(count, block, total):
    """``count`` rounded down to whole ``block``s (at least one block), at most ``total``."""
    return min(max(block, count // block * block), total)


def blockwise_backward(hidden, weight, targets, bias, lse, grad_logp, ignore_index, needs,
                       budget, fill, align=(1, 1), rows_per_block=None):
    """``(dh, dW, db)`` from ``dA`` blocks of at most ``budget`` elements, one at a time.

    ``fill(block, h, w, b, t, lse, g)`` writes ``dA`` of tokens ``h`` against vocabulary rows
    ``w`` (``b``: their bias or None) into ``block`` ``[len(h), len(w)]`` (contiguous), in the
    inputs' dtype, with ``t`` the targets shifted into ``w``'s rows and ``NEVER`` as the ignore
    index (ignored tokens carry ``NEVER`` and ``g = 0``: the kernels may skip their rows). The
    blocks span all tokens and a vocabulary chunk when ``N <= V``, so each chunk's ``dW`` rows
    come from one GEMM over all tokens and
    ``dh`` sums in a float32 ``N x D`` buffer (when there is more than one chunk); else all the
    vocabulary and a token chunk (``dh`` rows in one GEMM, ``dW`` summed in float32). Chunks are
    whole multiples of ``align`` (rows, columns). ``rows_per_block`` forces token chunks of that
    many rows. ``needs``: which of ``(dh, dW, db)`` to compute (``db`` only with a bias)."""
    need_h, need_w, need_b = needs
    need_b = bool(need_b) and bias is not None
    n, v = hidden.shape[0], weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    if rows_per_block is None and n <= v:
        rows, cols = [slice(0, n)], chunks(v, round_to(budget // max(n, 1), align[1], v))
    else:
        step = rows_per_block or round_to(budget // v, align[0], n)
        rows, cols = chunks(n, max(1, min(step, n))), [slice(0, v)]
    ignored = targets == ignore_index
    grad = torch.where(ignored, 0.0, grad_logp.float()).contiguous()
    lse = lse.float().contiguous()
    bias = None if bias is None else bias.contiguous()
    # a gradient that several blocks add into is summed in float32, else written by one GEMM
    sum_h, sum_w = len(cols) > 1, len(rows) > 1
    dh = _output(hidden, sum_h) if need_h else None
    dw = _output(weight, sum_w) if need_w else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    if need_h or need_w or need_b:
        buf = torch.empty(rows[0].stop, cols[0].stop, dtype=dtype, device=dev)
        for cs in cols:
            shifted = torch.where(ignored, NEVER, targets - cs.start).contiguous()
            for rs in rows:
                r, c = rs.stop - rs.start, cs.stop - cs.start
                block = buf.view(-1)[:r * c].view(r, c)
                fill(block, hidden[rs], weight[cs], None if bias is None else bias[cs],
                     shifted[rs], lse[rs], grad[rs])
                if need_h:
                    _into(dh[rs], block, weight[cs], sum_h)
                if need_w:
                    _into(dw[cs], block.t(), hidden[rs], sum_w)
                if need_b:
                    db[cs] += block.sum(0, dtype=torch.float32)
    return (None if dh is None else dh.to(dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


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
