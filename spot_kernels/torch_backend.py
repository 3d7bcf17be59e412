"""Chunked pure-torch backend: any device, never more than one ``token_chunk x vocab_chunk``
logits block alive.

Work split: the tokens are cut into chunks of ``token_chunk`` rows and the vocabulary into
chunks of ``vocab_chunk`` rows of ``W``. The forward keeps, per token, an online
``(max m, sum-exp s)`` pair over the vocabulary chunks (and ``sum exp(z - m) z`` for the
entropy), and picks up the target logit from the chunk that owns it::

    m' = max(m, max_v z_v);   s' = s exp(m - m') + sum_v exp(z_v - m');   lse = m + log s

The backward recomputes each block from the saved ``lse`` (no logits are kept between the
passes) and forms ``dA = g (onehot - p) / T * softcap'(a)`` in place (the target's ``1 - p_t``
from the forward's ``logp``, ``target_complement``), then
``dh += dA W_chunk``, ``dW_chunk += dA^T h`` and ``db_chunk += sum_i dA``, all in float32.

Cost: forward ``2 N D V`` FLOPs, backward ``6 N D V`` (recompute, ``dh``, ``dW``). Memory beyond
inputs and gradients: one logits block (``block_bytes``, 64 MB by default; two in the backward
with a softcap, whose slope ``1 - tanh^2(a / c)`` is kept beside ``p``, and in the forward with the
entropy, which needs ``exp(z - m)`` beside ``z - m``) plus O(N) state and float32 ``dh``/``dW``
accumulators when the inputs are half precision. The blocks are allocated once per call and
every block of the sweep is written into them (GEMMs with ``out=``): on the CPU, where large
allocations are not cached, a fresh block each time cost its page faults, a fifth of the run at
N 4096, D 512, V 32768 (0.5 of 2.3 s).

Options (``backend_options=`` of the public functions): ``token_chunk``, ``vocab_chunk``
(rows; each wins over ``block_bytes``) and ``block_bytes`` (default ``64 * 2**20``).
"""
from __future__ import annotations

import math

import torch

from . import _checks

OPTIONS = ("token_chunk", "vocab_chunk", "block_bytes")
DEFAULT_BLOCK_BYTES = 64 * 2**20
_MAX_VOCAB_CHUNK = 8192


def available(device):
    return True, ""


def check_options(options):
    _checks.backend_options("torch", options, OPTIONS, positive_ints=OPTIONS)


def chunk_sizes(n, v, token_chunk=None, vocab_chunk=None, block_bytes=None):
    """Rows per token chunk and per vocabulary chunk for a float32 block of ``block_bytes``."""
    elems = max(1, (block_bytes or DEFAULT_BLOCK_BYTES) // 4)
    if vocab_chunk is None:
        vocab_chunk = min(max(v, 1), _MAX_VOCAB_CHUNK, elems)
        if token_chunk is not None:
            vocab_chunk = max(1, min(max(v, 1), elems // token_chunk))
    if token_chunk is None:
        token_chunk = max(1, min(max(n, 1), elems // vocab_chunk))
    return token_chunk, vocab_chunk


def _mm(x, y):
    """``x @ y`` with a float32 result; half operands stay half on GPUs (tensor cores)."""
    if x.dtype != y.dtype:
        if x.device.type == "cpu":
            x, y = x.float(), y.float()
        else:
            x = x.to(y.dtype)
    return (x @ y).float()


def _acc(out, x, y):
    """``out += x @ y`` in float32, in place (no temporary) when the operands are float32."""
    if x.dtype == y.dtype == torch.float32:
        out.addmm_(x, y)
    else:
        out += _mm(x, y)


def _buffer(tc, vc, hidden, weight, wanted=True):
    """A float32 block for every block of the sweep to be written into, or None where the
    GEMM cannot write one (half operands on a GPU, whose allocator caches blocks anyway)."""
    if wanted and (hidden.device.type == "cpu" or hidden.dtype == weight.dtype == torch.float32):
        return torch.empty(tc * vc, dtype=torch.float32, device=hidden.device)
    return None


def _view(buf, rows, cols):
    """The first ``rows x cols`` elements of ``buf`` as a contiguous matrix (None: a new one)."""
    return None if buf is None else buf[:rows * cols].view(rows, cols)


def _block(h, w, b, temperature, softcap, buf, keep_slope=False, second=None):
    """Float32 logits block ``z`` in ``buf`` (None: a new one) and, with ``keep_slope``, the
    softcap's derivative ``1 - tanh^2(a / c)`` (there; the logits then go to ``second``;
    otherwise everything happens in place in one block). The derivative is ``cosh(a / c)^-2``:
    ``1 - t^2`` from a rounded ``t`` loses its leading bits where ``t`` nears 1 (~1e-3 relative
    at ``a / c = 5``, 0 once ``t`` rounds to 1)."""
    if h.device.type == "cpu":
        h, w = h.float(), w.float()  # CPU half matmuls are slow and round the output
    rows, cols = h.shape[0], w.shape[0]
    if buf is not None:
        a = torch.mm(h, w.t(), out=_view(buf, rows, cols))
    else:
        a = _mm(h, w.t())
    if b is not None:
        a += b.float()
    slope = None
    if softcap is not None:
        a.div_(softcap)
        if keep_slope:
            z = torch.tanh(a, out=_view(second, rows, cols)).mul_(softcap / temperature)
            slope, a = a.cosh_().reciprocal_().square_(), z
        else:
            a.tanh_().mul_(softcap / temperature)
    elif temperature != 1.0:
        a.div_(temperature)
    return a, slope


def lse_dtype(device):
    """float64, or float32 where the device has no float64 (MPS): there ``p = e^(z - lse)``
    keeps ``ulp(|lse|)``."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def split_lse(lse):
    """The float64 ``lse`` as float32 ``(hi, e^-lo)``: ``p = e^(z - hi) e^-lo``. ``z - hi`` is
    exact near the max, so ``p`` keeps float32 precision where ``e^(z - lse)`` with a
    float32 ``lse`` kept ``ulp(|lse|)`` (a ``1 - p`` of 1e-4 at |z| ~ 300 lost a quarter).
    Rows with an infinite or NaN ``lse`` keep it in ``hi`` (scale 1)."""
    hi = lse.float()
    if lse.dtype != torch.float64:  # lse_dtype's float32 (MPS): nothing below hi
        return hi, torch.ones_like(hi)
    lo = torch.where(torch.isfinite(lse), lse - hi.double(), 0.0)
    return hi, torch.exp(-lo).float()


def target_complement(logp):
    """``1 - p_t = -expm1(logp_t)`` from the forward's float32 ``logp``, at least 0 (NaN stays).

    The backward's target column ``g (1 - p_t)`` takes it from here rather than from its own
    recomputed logit: where the backward's GEMMs have other shapes than the forward's their last
    bits may differ, and ``1 - e^(z_t - lse)`` would carry that difference (``|z| 2^-24`` and
    more) absolutely: a shift of 2e-4 (float32's ulp at |z| ~ 3e3) turns a confident token's
    ``1 - p_t`` of 5e-5 negative. ``-expm1(logp)`` keeps it relatively, and is the gradient of
    the very log-prob the caller was given."""
    return torch.special.expm1(logp.float()).neg_().clamp_min_(0.0)


def merge_parts(lse, logp, own, entropy, valid, max_over, sum_over):
    """One row's ``(lse, logp, entropy)`` from its vocabulary parts (a vocab-parallel head's
    shards, the ``cuda`` backend's vocabulary chunks): each part's ``lse_k``, ``logp_k`` (kept
    where the part ``own``s the target) and ``H_k``, merged in float64 relative to the row's max
    ``m = max_k lse_k``: ``lse = m + log s`` with ``s = sum_k e^(lse_k - m)``,
    ``logp = (logp_k + lse_k - m) - log s``, ``H = log s + sum_k e^(lse_k - m) (H_k -
    (lse_k - m)) / s`` (a part whose logits are all -inf, ``e = 0``, adds nothing, not its NaN
    entropy, and a target it owns, a -inf logit, gets ``logp = -inf``, not its NaN). A target that no part owns (another shard's, outside the whole head) gets
    ``logp = -lse``, the shard contract. ``max_over`` and ``sum_over`` reduce over the parts (a
    tensor dimension or an all-reduce, keeping a broadcastable shape); ``valid``: the counted
    tokens (logp 0 elsewhere)."""
    lse = lse.double()
    m = max_over(lse)
    e = torch.exp(lse - m)
    own_logp = torch.where(e > 0, logp.double() - (m - lse), -math.inf)
    parts = [e, torch.where(own, own_logp, 0.0), own.double()]
    if entropy is not None:
        parts.append(torch.where(e > 0, e * (entropy.double() - (lse - m)), 0.0))
    sums = sum_over(torch.stack(parts))
    log_s = torch.log(sums[0])
    lse = (m + log_s).reshape(log_s.shape)
    logp = torch.where(valid, torch.where(sums[2] > 0, sums[1] - log_s, -lse), 0.0).float()
    entropy = None if entropy is None else (log_s + sums[3] / sums[0]).float()
    return lse, logp, entropy


def in_dtypes(dh, dw, db, hidden, weight, bias, dh_float32=False):
    """The float32 sums of a backward as its result: each gradient in its input's dtype
    (``None`` stays ``None``), ``dh`` left float32 with ``dh_float32``."""
    return (dh if dh is None or dh_float32 else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def forward(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None,
            ignore_index=-100, return_entropy=False, **options):
    """Returns ``(logp, lse, entropy or None)``, ``[N]`` each: float32, ``lse`` float64."""
    n, v = hidden.shape[0], weight.shape[0]
    tc, vc = chunk_sizes(n, v, **options)
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=lse_dtype(dev), device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if return_entropy else None
    buf = _buffer(tc, vc, hidden, weight)
    second = _buffer(tc, vc, hidden, weight, return_entropy)  # exp(z - m) beside z - m
    for i0 in range(0, n, tc):
        h = hidden[i0:i0 + tc]
        t = targets[i0:i0 + tc]
        rows = h.shape[0]
        m = torch.full((rows,), -math.inf, dtype=torch.float32, device=dev)
        s = torch.zeros(rows, dtype=torch.float32, device=dev)
        zs = torch.zeros(rows, dtype=torch.float32, device=dev) if return_entropy else None
        zt = torch.zeros(rows, dtype=torch.float32, device=dev)
        for v0 in range(0, v, vc):
            z, _ = _block(h, weight[v0:v0 + vc], None if bias is None else bias[v0:v0 + vc],
                          temperature, softcap, buf)
            cols = z.shape[1]
            local = t - v0
            here = (local >= 0) & (local < cols)
            zt += torch.where(here, z.gather(1, local.clamp(0, cols - 1).unsqueeze(1)).squeeze(1), 0.0)
            m_new = torch.maximum(m, z.amax(1))
            # a row whose logits so far are all -inf (a masked block of the vocabulary) shifts
            # by 0, not by -inf: -inf - (-inf) would be NaN
            shift = torch.where(m_new == -math.inf, 0.0, m_new)
            scale = torch.exp(m - shift)
            z -= shift.unsqueeze(1)
            if return_entropy:
                # zs = sum exp(z - m) (z - m), moved to the new max (s = 0 on the first chunk)
                zs = (zs + torch.where(s > 0, m - shift, 0.0) * s) * scale
            e = z.exp_() if not return_entropy else torch.exp(z, out=_view(second, rows, cols))
            s = s * scale + e.sum(1)
            if return_entropy:
                # e = 0 where z = -inf: clamped, that term is 0 * finite (a NaN z stays NaN)
                zs += e.mul_(z.clamp_min_(torch.finfo(z.dtype).min)).sum(1)
            m = m_new
            del z, e  # no reference to the buffers outlives the block
        log_s = torch.log(s)
        lse[i0:i0 + tc] = m.to(lse.dtype) + log_s.to(lse.dtype)  # float64: without rounding
        valid = t != ignore_index
        # (z_t - m) - log s, not z_t - lse: z_t - m is exact near the max, where z_t - lse
        # would lose ulp(|lse|) (a logp of -1e-4 at |z| ~ 300 kept one digit)
        logp[i0:i0 + tc] = torch.where(valid, (zt - m) - log_s, 0.0)
        if return_entropy:
            # H = lse - sum p z = log s - sum e (z - m) / s: no |m|-sized terms to cancel
            entropy[i0:i0 + tc] = log_s - zs / s
    return logp, lse, entropy


def backward(hidden, weight, targets, bias, lse, logp, grad_logp, *, temperature=1.0,
             softcap=None, ignore_index=-100, needs_input_grad=(True, True, True),
             dh_float32=False, **options):
    """Returns ``(dh, dW, db)`` in the dtypes of ``hidden``, ``weight``, ``bias`` (None where
    not needed; ``dh_float32``: ``dh`` in float32, unrounded, for a sum over vocab shards).
    ``lse`` and ``logp`` are the forward's."""
    n, v = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs_input_grad
    need_b = need_b and bias is not None
    tc, vc = chunk_sizes(n, v, **options)
    dev = hidden.device
    g = torch.where(targets != ignore_index, grad_logp.float(), 0.0)
    lse_hi, lse_scale = split_lse(lse)
    g_q = g * target_complement(logp)  # the target column's g (1 - p_t)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    buf = _buffer(tc, vc, hidden, weight)
    second = _buffer(tc, vc, hidden, weight, softcap is not None)  # softcap' beside p
    for i0 in range(0, n, tc):
        h = hidden[i0:i0 + tc]
        hf = h.float() if h.device.type == "cpu" else h
        t = targets[i0:i0 + tc]
        gi = g[i0:i0 + tc].unsqueeze(1)
        gq = g_q[i0:i0 + tc].unsqueeze(1)
        # -g p = -g e^(-lo) e^(z - hi) in one multiply: a pass over the block fewer than p * g
        neg_gi = -gi * lse_scale[i0:i0 + tc].unsqueeze(1)
        lse_i = lse_hi[i0:i0 + tc].unsqueeze(1)
        for v0 in range(0, v, vc):
            w = weight[v0:v0 + vc]
            z, slope = _block(hf, w, None if bias is None else bias[v0:v0 + vc], temperature,
                              softcap, buf, True, second)
            cols = z.shape[1]
            # dz = g (onehot - p), built in place in the block: -g p, then the target's column
            # (in this chunk) set to g (1 - p_t)
            da = z.sub_(lse_i).exp_().mul_(neg_gi)
            local = (t - v0).unsqueeze(1)
            here = (local >= 0) & (local < cols)
            idx = local.clamp(0, cols - 1)
            da.scatter_(1, idx, torch.where(here, gq, da.gather(1, idx)))
            if softcap is not None:
                da.mul_(slope)
            if temperature != 1.0:
                da.div_(temperature)
            if need_h:
                _acc(dh[i0:i0 + tc], da, w)
            if need_w:
                _acc(dw[v0:v0 + vc], da.t(), hf)
            if need_b:
                db[v0:v0 + vc] += da.sum(0)
            del z, slope, da  # no reference to the buffers outlives the block
    return in_dtypes(dh, dw, db, hidden, weight, bias, dh_float32)
