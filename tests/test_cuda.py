"""The ``cuda`` backend against the float64 reference with the tolerance rule
(``|ours - truth| <= 2 |reference in the same dtype - truth| + atol``), on a GPU (``dev`` =
"cuda", marked ``gpu``) and on the CPU through the host build of the same kernel sources
(``dev`` = "cpu", ``tests/cuda_host``): there the kernels' logic (indexing, tails, the vector and
scalar paths, the reductions and their barriers) runs in every CI run; what only a GPU shows
(speed, the memory model, compute-sanitizer) waits for the "cuda" items.

Covers every option (bias, softcap, temperature, entropy, ignore_index), both kernel layouts
(a warp per row for V <= 2048, a block per row above), 16-byte and scalar loads (V a multiple of
8 or not), several token chunks, non-contiguous inputs, N = 0, large logits, targets outside
[0, V) (vocab-parallel), the segment sums, the BCE kernel and the custom ops' fake impls
(``torch.library.opcheck``). The "cuda" items skip without CUDA; with a GPU but no built
extension they fail, unless ``SPOT_KERNELS_BUILD_CUDA=0`` says the build was skipped.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import spot_kernels as sk
from spot_kernels import cuda, reference, torch_backend

from conftest import GRAD_ATOL, assert_close, dispatched, float64_truth, make_head, references

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradients: dA is rounded once to the input dtype before the cuBLAS GEMMs. The same-dtype
# reference rounds its dA too, but an independent realisation (it adds the bias in that dtype),
# so the 2x factor alone is a coin flip at the largest outputs; hence conftest's GRAD_ATOL.


@pytest.fixture(params=[
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
    "cpu"])
def dev(request):
    """The device: a GPU with the built extension, or the CPU with the host build."""
    if request.param == "cpu":
        request.getfixturevalue("cuda_host")
    ok, why = cuda.available(torch.device(request.param))
    if not ok:
        if os.environ.get("SPOT_KERNELS_BUILD_CUDA", "") == "0":
            pytest.skip(f"cuda backend unavailable (build skipped): {why}")
        pytest.fail(f"a GPU is present but the cuda backend is unavailable: {why}")
    return request.param


def poison(fn):
    """Run ``fn`` with every new float tensor NaN-filled (torch's deterministic mode fills
    ``torch.empty``), so a value the kernels forget to write shows up."""
    from torch.utils import deterministic
    mode, warn = (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled())
    fill = deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        return fn()
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn)
        deterministic.fill_uninitialized_memory = fill


def _run(h, w, t, b, *, options=None, return_entropy=False, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = poison(lambda: sk.token_logprobs(h, w, t, bias=b, backend="cuda",
                                           backend_options=options,
                                           return_entropy=return_entropy, **kw))
    logp, ent = out if return_entropy else (out, None)
    return logp, ent, h, w, b


def _float64_grads(h, w, t, b, gout, **kw):
    """Gradients of ``sum(logp * gout)`` w.r.t. float64 copies of the inputs. (conftest's
    ``references`` returns the truth's gradients rounded to the inputs' dtype; this backend
    rounds dA to that dtype before its GEMMs, so it is compared with the unrounded truth.)"""
    leaves = [x.detach().double().requires_grad_() for x in (h, w) + ((b,) if b is not None
                                                                       else ())]
    logp = reference.token_logprobs(leaves[0], leaves[1], t, leaves[2] if b is not None else None,
                                    compute_dtype=torch.float64, **kw)
    return torch.autograd.grad((logp * gout).sum(), leaves)


def _same_dtype_fp32_bias(h, w, t, b, gout, temperature=1.0, softcap=None, ignore_index=-100):
    """The other naive same-dtype computation: the GEMM in the inputs' dtype, then the bias (and
    everything after) in float32. conftest's reference adds the bias in the inputs' dtype."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    a = (leaves[0] @ leaves[1].t()).float() + leaves[2].float()
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    lsm = torch.log_softmax(a / temperature, -1)
    valid = t != ignore_index
    logp = lsm.gather(-1, torch.where(valid, t, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    entropy = -(lsm.exp() * lsm).sum(-1).detach()
    return logp, torch.autograd.grad((logp.double() * gout).sum(), leaves), entropy


def _worse(x, y, truth):
    """Elementwise, whichever of two same-dtype results is further from the truth."""
    return torch.where((x.double() - truth).abs() >= (y.double() - truth).abs(), x.double(),
                       y.double())


def _check_against_reference(h, w, t, b, dtype, options=None, entropy=False, **kw):
    """The tolerance rule. The same-dtype error is the larger of the two naive computations'
    (bias added in the inputs' dtype, or in float32 after the rounded GEMM): this backend adds it
    in float32 to logits that cuBLAS rounded to the inputs' dtype, and with |z| ~ 10 that
    rounding alone moves p by a few percent, differently in each computation."""
    truth, same, gout = references(h, w, t.long(), b, **kw)
    truth = (truth[0], _float64_grads(h, w, t.long(), b, gout, **kw))
    alt = None
    if b is not None and dtype != torch.float32:
        alt = _same_dtype_fp32_bias(h, w, t.long(), b, gout, **kw)
        same = (_worse(same[0], alt[0], truth[0]),
                [_worse(x, y, tr) for x, y, tr in zip(same[1], alt[1], truth[1])])
    logp, ent, hh, ww, bb = _run(h, w, t, b, options=options, return_entropy=entropy, **kw)
    assert logp.dtype == torch.float32
    assert_close(logp, same[0], truth[0], dtype, "logp")
    (logp.double() * gout).sum().backward()
    grads = [hh.grad, ww.grad] + ([bb.grad] if b is not None else [])
    for name, ours, s, tr in zip(("dh", "dW", "db"), grads, same[1], truth[1]):
        assert ours.dtype == dtype, name
        assert_close(ours, s, tr, dtype, name, atol=GRAD_ATOL.get(dtype))
    if entropy:
        _, ent_truth = reference.token_logprobs(h, w, t.long(), b, compute_dtype=torch.float64,
                                                return_entropy=True, **kw)
        _, ent_same = reference.token_logprobs(h, w, t.long(), b, return_entropy=True, **kw)
        if alt is not None:
            ent_same = _worse(ent_same, alt[2], ent_truth)
        assert_close(ent, ent_same, ent_truth, dtype, "entropy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v", [(1, 16, 37), (37, 96, 256), (199, 40, 2048),
                                   (37, 64, 4099), (64, 32, 8192)])
def test_matches_reference(dtype, n, d, v, dev):
    h, w, b, t = make_head(n, d, v, dtype, dev, bias=True, seed=n + v)
    _check_against_reference(h, w, t, None, dtype)
    _check_against_reference(h, w, t, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [300, 5000])
@pytest.mark.parametrize("softcap,temperature", [(None, 0.7), (2.0, 1.0), (1.5, 1.3)])
def test_softcap_temperature_entropy_bias(dtype, v, softcap, temperature, dev):
    h, w, b, t = make_head(53, 48, v, dtype, dev, bias=True, scale=3.0, seed=v)
    _check_against_reference(h, w, t, b, dtype, entropy=True, softcap=softcap,
                             temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{"token_chunk": 7}, {"token_chunk": 1},
                                     {"chunk_bytes": 3000}])
def test_several_chunks(dtype, options, dev):
    h, w, b, t = make_head(61, 32, 1000, dtype, dev, bias=True, seed=7)
    _check_against_reference(h, w, t, b, dtype, options=options, entropy=True, softcap=3.0)


@pytest.mark.parametrize("n,v", [(40, 600), (300, 72)], ids=["vocab-blocks", "token-blocks"])
@pytest.mark.parametrize("dtype,sweeps", [(torch.float32, 1), (torch.bfloat16, 1),
                                          (torch.bfloat16, 2)], ids=str)
def test_backward_blocks_within_chunk_bytes(n, v, sweeps, dtype, dev, monkeypatch):
    """``chunk_bytes`` holds the backward's dA block and any float32 sum (``_gemm.plan``):
    with room for the smaller gradient's sum in half of it, one sweep over all tokens x
    vocabulary chunks when N <= V (summing dh, N x D), else token chunks x the vocabulary
    (summing dW, V x D); with less, two sweeps and no float32 sum (float32 inputs sum into
    their gradient: always one sweep). Results match the reference either way."""
    from spot_kernels import _gemm
    made = []
    output, plan = _gemm._output, _gemm.plan
    monkeypatch.setattr(_gemm, "_output",
                        lambda like, summed: made.append((tuple(like.shape), summed))
                        or output(like, summed))
    calls = []  # the forward's (its logits blocks) and the backward's
    monkeypatch.setattr(_gemm, "plan", lambda *a, **k: calls.append(got := plan(*a, **k)) or got)
    d = 24
    acc = 4 * d * min(n, v)
    budget = 2 * acc + 16 * max(n, v) * dtype.itemsize if sweeps == 1 else acc
    h, w, b, t = make_head(n, d, v, dtype, dev, bias=True, seed=n)
    _check_against_reference(h, w, t, b, dtype, options={"chunk_bytes": budget})
    summed = [shape for shape, s in made if s]
    assert len(calls) == 2 and calls[0][0][:2] == calls[1][0][:2]  # same blocks: same GEMMs
    blocks = calls[1]
    assert len(blocks) == sweeps
    if sweeps == 1:
        assert summed == [(n, d) if n <= v else (v, d)], made
        rows, cols, _ = blocks[0]
        assert len(rows if n > v else cols) > 1
    else:
        assert summed == [] and [len(blocks[0][0]), len(blocks[1][1])] == [1, 1], blocks


def test_dh_float32_backward_recomputes_the_forward_blocks(dev, monkeypatch):
    """A vocab-parallel head asks the backward for a float32 ``dh`` (``dh_float32``), which
    ``_gemm.plan`` could count as no extra sum; the forward planned its logits blocks without
    knowing, so the backward keeps them (its GEMMs recompute the forward's logits bit for bit)."""
    from spot_kernels import _gemm
    calls = []
    plan = _gemm.plan
    monkeypatch.setattr(_gemm, "plan", lambda *a, **k: calls.append(got := plan(*a, **k)) or got)
    n, d, v = 40, 24, 600
    h, w, b, t = make_head(n, d, v, torch.bfloat16, dev, bias=True, seed=3)
    kw = dict(temperature=1.0, softcap=None, ignore_index=-100)
    options = {"chunk_bytes": 4 * d * n}  # no room for a half dh's float32 sum: two sweeps
    logp, lse, _ = cuda.forward(h, w, t, b, return_entropy=False, **kw, **options)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dev)
    dh, dw, db = cuda.backward(h, w, t, b, lse, logp, g, **kw, dh_float32=True, **options)
    assert len(calls) == 2 and len(calls[1]) == 2 and calls[0][0][:2] == calls[1][0][:2]
    truth = float64_truth(h, w, t, b, g=g)[2:]
    assert dh.dtype == torch.float32
    for ours, want in zip((dh, dw, db), truth):
        assert (ours.double() - want).abs().max().item() <= 2.0**-7 * max(1.0, want.abs().max())


@pytest.mark.parametrize("trained", ["h", "h+b", "w+b"])
def test_frozen_parts_get_no_gradient_and_the_rest_matches(trained, dev):
    """Only the leaves that require grad get one (a frozen head: ``dh``, and ``db`` with a
    trained bias, from one sweep of token chunks); with a ``chunk_bytes`` that forces several
    blocks, against the float64 truth."""
    h, w, b, t = make_head(40, 24, 600, torch.bfloat16, dev, bias=True, scale=2.0, seed=5)
    leaves = {k: x.detach().clone().requires_grad_(k in trained)
              for k, x in (("h", h), ("w", w), ("b", b))}
    logp = sk.token_logprobs(leaves["h"], leaves["w"], t, bias=leaves["b"], backend="cuda",
                             backend_options={"chunk_bytes": 6000})
    g = torch.randn(40, generator=torch.Generator().manual_seed(2)).to(dev)
    (logp * g).sum().backward()
    truth = dict(zip("hwb", float64_truth(h, w, t, b, g=g)[2:]))
    for k, x in leaves.items():
        if k not in trained:
            assert x.grad is None
            continue
        scale = max(1.0, truth[k].abs().max().item())
        err = (x.grad.double() - truth[k]).abs().max().item()
        assert x.grad.dtype == torch.bfloat16 and err <= 2.0**-7 * scale, (k, err, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, dev):
    h, w, b, t = make_head(41, 64, 520, dtype, dev, bias=True, seed=3)
    h_nc = torch.empty(64, 41, dtype=dtype, device=dev).t().copy_(h)   # column-major
    w_nc = torch.empty(520, 128, dtype=dtype, device=dev)[:, ::2].copy_(w)  # strided rows
    b_nc = torch.empty(1040, dtype=dtype, device=dev)[::2].copy_(b)
    t_nc = torch.empty(82, dtype=torch.long, device=dev)[::2].copy_(t)
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    _check_against_reference(h_nc, w_nc, t_nc, b_nc, dtype, options={"token_chunk": 16})


def test_int32_targets_and_ignore_index(dev):
    h, w, b, t = make_head(45, 32, 700, torch.bfloat16, dev, seed=11)
    t = t.to(torch.int32)
    t[t == -100] = 5
    t[::3] = -1
    _check_against_reference(h, w, t, None, torch.bfloat16, ignore_index=-1)
    t[:] = -1  # every token ignored: logp 0, zero gradients
    logp, _, hh, ww, _ = _run(h, w, t, None, ignore_index=-1)
    assert logp.abs().max() == 0
    logp.sum().backward()
    assert hh.grad.abs().max() == 0 and ww.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype, dev):
    h, w, b, t = make_head(0, 16, 33, dtype, dev, bias=True)
    logp, ent, hh, ww, bb = _run(h, w, t, b, return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    logp.sum().backward()
    assert hh.grad.shape == (0, 16)
    assert ww.grad.abs().max() == 0 and bb.grad.abs().max() == 0


def test_large_logits_stay_finite(dev):
    h, w, b, t = make_head(29, 64, 3000, torch.float32, dev, scale=2e3, seed=5)
    a = h @ w.t()
    assert a.abs().max() > 1e3
    _check_against_reference(h, w, t, None, torch.float32, entropy=True)


@pytest.mark.parametrize("options", [{"token_chunk": 9}, {"chunk_bytes": 1 << 14}],
                         ids=["token-chunks", "vocab-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_targets_outside_vocab_shard(dtype, dev, options):
    """The shard contract (``logp = -lse``, no one-hot term) on both forward plans: token chunks
    and, N <= V within a small ``chunk_bytes``, vocabulary chunks merged as shards are (where no
    chunk owns such a target, the merge alone gave ``m - lse``, m the largest chunk's lse)."""
    h, w, b, t = make_head(40, 32, 3001, dtype, dev, bias=True, seed=9)
    t[::4] = 3001 + 17   # lives on a later shard
    t[1::4] = -5         # an earlier shard (not ignore_index)
    g = torch.randn(40, generator=torch.Generator().manual_seed(10)).to(dev)
    kw = dict(temperature=1.1, softcap=4.0, ignore_index=-100)
    logp, lse, _ = cuda.forward(h, w, t, b, **kw, **options)
    dh, dw, db = cuda.backward(h, w, t, b, lse, logp, g, **kw, **options)
    truth = float64_truth(h, w, t, b, g, **kw)
    # the same dtype's error: the torch backend (chunked, float32 accumulation, same rounding)
    from spot_kernels import torch_backend as tb
    s_logp, s_lse, _ = tb.forward(h, w, t, b, **kw)
    s_dh, s_dw, s_db = tb.backward(h, w, t, b, s_lse, s_logp, g, **kw)
    for name, ours, same, tr in zip(("logp", "lse", "dh", "dW", "db"),
                                    (logp, lse, dh, dw, db),
                                    (s_logp, s_lse, s_dh, s_dw, s_db), truth):
        assert_close(ours, same, tr, dtype, name,
                     atol=GRAD_ATOL.get(dtype) if name in ("dh", "dW", "db") else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_rows_take_the_vector_path_with_tails(dtype, dev):
    """Row stride > V with V not a multiple of the vector width: 16-byte loads with a scalar
    tail on every row (cuda.py's own buffers have stride V, so only callers of the raw ops
    reach this). The padding columns must stay untouched."""
    v, pad, rows = 1001, 7 if dtype == torch.float32 else 15, 6   # row strides 4032 / 2032 B
    g = torch.Generator().manual_seed(21)
    full = (torch.randn(rows, v + pad, generator=g) * 3).to(dtype).to(dev)
    a = full[:, :v]
    bias = (torch.randn(v, generator=g)).to(dtype).to(dev)
    t = torch.randint(0, v, (rows,), generator=g).to(dev)
    t[2] = -100
    grad = torch.randn(rows, generator=g).to(dev)
    z = (a.double() + bias.double()) * 0.8
    lse64 = torch.logsumexp(z, 1)
    logp, lse, ent = cuda._lse_forward_op(a, bias, t, 0.0, 0.8, -100, True)
    inside = t >= 0
    lp64 = torch.where(inside, z.gather(1, t.clamp(min=0)[:, None])[:, 0] - lse64, 0.0)
    p = torch.softmax(z, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=tol * 10)
    torch.testing.assert_close(logp.double(), lp64, rtol=0, atol=tol * 10)
    torch.testing.assert_close(ent.double(), lse64 - (p * z).sum(1), rtol=0, atol=tol * 10)
    before = full[:, v:].clone()
    cuda._backward_epilogue_op(a, bias, t, *torch_backend.split_lse(lse),
                               torch_backend.target_complement(logp), grad, 0.0, 0.8, -100)
    gg = torch.where(inside, grad.double(), 0.0)
    da = -p * gg[:, None]
    da[inside.nonzero()[:, 0], t[inside]] += gg[inside]
    da = da * 0.8
    # dA is stored in the logits' dtype: half an ulp at its scale, plus float32 noise
    scale = max(1.0, da.abs().max().item())
    torch.testing.assert_close(a.double(), da, rtol=0,
                               atol=(1e-5 if dtype == torch.float32 else 2.0**-8) * scale)
    assert torch.equal(full[:, v:], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_view_at_an_odd_offset(dtype, dev):
    """A bias that is a view at an odd offset (a vocab-parallel slice) gives what an aligned
    copy gives: the backend copies it so the logits keep their 16-byte loads."""
    h, w, b, t = make_head(33, 32, 3000, dtype, dev, bias=True, seed=22)
    view = torch.cat([b[:1], b])[1:]
    assert view.data_ptr() % 16 and torch.equal(view, b)
    g = torch.randn(33, generator=torch.Generator().manual_seed(11)).to(dev)
    kw = dict(temperature=0.9, softcap=None, ignore_index=-100)
    a = cuda.forward(h, w, t, view, return_entropy=True, **kw)
    c = cuda.forward(h, w, t, b.clone(), return_entropy=True, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    ga = cuda.backward(h, w, t, view, a[1], a[0], g, **kw)
    gc = cuda.backward(h, w, t, b.clone(), c[1], c[0], g, **kw)
    assert all(torch.equal(x, y) for x, y in zip(ga, gc))


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_segment_sums(cu_dtype, average, with_valid, dev):
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([0, 5, 1, 700, 0, 33, 260, 2])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(cu_dtype)
    n = int(lens.sum())
    x = torch.randn(n, generator=g, dtype=torch.float64)
    valid = torch.rand(n, generator=g) > 0.3 if with_valid else None
    if valid is not None:
        valid[int(cu[5]):int(cu[6])] = False  # a sequence with no counted token -> 0
    truth = reference.sequence_logprobs(x, cu, valid, average)
    out, count = poison(lambda: cuda.segment_sums(x.float().to(dev), cu.to(dev),
                                                  None if valid is None else valid.to(dev),
                                                  average))
    same = reference.sequence_logprobs(x.float(), cu, valid, average)
    assert_close(out, same, truth, torch.float32, "segment sums", atol=1e-6)
    # the backward: each counted token gets its sequence's gradient (over its count averaged)
    x32 = x.float().to(dev).requires_grad_()
    x64 = x.clone().requires_grad_()
    gout = torch.randn(len(lens), generator=g, dtype=torch.float64)
    vd = None if valid is None else valid.to(dev)
    (gx,) = torch.autograd.grad(cuda.segment_sums(x32, cu.to(dev), vd, average)[0],
                                x32, gout.float().to(dev))
    (gx64,) = torch.autograd.grad(reference.sequence_logprobs(x64, cu, valid, average), x64,
                                  gout)
    torch.testing.assert_close(gx.double().cpu(), gx64, rtol=1e-6, atol=1e-7)
    counted = lens if valid is None else torch.stack(
        [valid[int(cu[s]):int(cu[s + 1])].sum() for s in range(len(lens))])
    assert torch.equal(count.cpu(), counted.float())


@pytest.mark.parametrize("reduction", ["pairs", "mean", "sum"])
@pytest.mark.parametrize("delta_kind", ["number", "tensor", "cpu tensor"])
def test_bce_forward(reduction, delta_kind, dev):
    g = torch.Generator().manual_seed(2)
    s = 600
    pi = torch.randn(s, generator=g, dtype=torch.float64) * 40 - 200
    rho = pi + torch.randn(s, generator=g, dtype=torch.float64) * 30
    y = torch.rand(s, generator=g, dtype=torch.float64)
    y[: s // 2] = (y[: s // 2] > 0.5).double()
    beta, delta = 0.3, 0.25
    pi64 = pi.clone().requires_grad_()
    u = beta * (pi64 - rho) - delta
    k = {"pairs": s / 2, "mean": s, "sum": 1}[reduction]
    loss64 = (y * F.softplus(-u) + (1 - y) * F.softplus(u)).sum() / k
    (coef64,) = torch.autograd.grad(loss64, pi64)
    # a 0-dim CPU tensor broadcasts in the torch backend's loss: so it does here
    d = delta if delta_kind == "number" else torch.tensor(
        delta, device="cpu" if delta_kind == "cpu tensor" else dev)
    loss, coef = poison(lambda: cuda.bce_forward(pi.float().to(dev), rho.float().to(dev),
                                                 y.float().to(dev), beta=beta, delta=d,
                                                 reduction=reduction))
    same_loss, _ = sk.bce_reward_loss(pi.float(), rho.float(), y.float(), beta=beta,
                                      delta=delta, reduction=reduction)
    pi32 = pi.float().requires_grad_()
    l32, _ = sk.bce_reward_loss(pi32, rho.float(), y.float(), beta=beta, delta=delta,
                                reduction=reduction)
    (same_coef,) = torch.autograd.grad(l32, pi32)
    assert_close(loss, same_loss, loss64.detach(), torch.float32, "loss")
    assert_close(coef, same_coef, coef64, torch.float32, "coef")


def test_bce_coefficients_keep_their_precision_when_saturated(dev):
    """A saturated pair's coefficient ``sigmoid(u) - y`` is ``-sigmoid(-u)`` for a chosen one:
    ~1e-13 at u = 30, which ``sigmoid(u) - 1`` in float32 rounds to 0. Each label's term is
    formed on its own, so every coefficient keeps float32 precision relative to itself."""
    u = torch.tensor([30.0, -30.0, 12.0, -12.0, 30.0, -30.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    pi64 = u.clone().requires_grad_()
    loss64 = (y * F.softplus(-pi64) + (1 - y) * F.softplus(pi64)).sum()
    (coef64,) = torch.autograd.grad(loss64, pi64)
    _, coef = cuda.bce_forward(u.float().to(dev), torch.zeros(6, device=dev), y.float().to(dev),
                               beta=1.0, reduction="sum")
    rel = ((coef.double().cpu() - coef64) / coef64).abs()
    assert rel.max() < 1e-5, (coef.tolist(), coef64.tolist())


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("delta_kind", ["number", "tensor"])
def test_spot_loss_tail_runs_the_kernels_and_their_backward(average, delta_kind, dev):
    """``spot_loss(backend="cuda")`` sums the sequences and takes the BCE in the extension's
    kernels, and their backward (a gather of ``dL/dpi`` by sequence) gives every token its
    gradient: the loss, the policy log-probs and ``dh``, ``dW`` against float64, with empty
    sequences, one with no counted token and int32 ``cu_seqlens``."""
    h, w, b, t = make_head(53, 24, 90, torch.float32, dev, bias=True, scale=2.0, seed=21)
    lens = [0, 9, 6, 0, 14, 11, 13]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=dev)
    t[15:29] = -100  # the fifth sequence counts no token
    s = len(lens)
    g = torch.Generator().manual_seed(22)
    ref = (torch.randn(s, generator=g) * 5 - 60).to(dev)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.7], device=dev)
    beta, delta = 0.2, 0.3
    # a 0-dim CPU tensor broadcasts in the torch backend's loss: so it does here
    d = delta if delta_kind == "number" else torch.tensor(
        delta, device="cpu" if delta_kind == "cpu tensor" else dev)
    kw = dict(bias=b, temperature=0.8, softcap=12.0)
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    def run():
        out = sk.spot_loss(*leaves, t, cu, ref, labels, beta=beta, delta=d, average=average,
                           reduction="mean", backend="cuda", **kw)
        return out, torch.autograd.grad(out.loss, leaves)

    (out, grads), names = dispatched(run, lambda name, args, kwargs: name)
    assert {"cuda_segment_sum", "cuda_bce_forward"} <= set(names), sorted(set(names))

    leaves64 = [x.double().requires_grad_() for x in (h, w)]
    logp64 = reference.token_logprobs(*leaves64, t, b.double(), temperature=0.8, softcap=12.0,
                                      compute_dtype=torch.float64)
    pi64 = reference.sequence_logprobs(logp64, cu, t != -100, average)
    u = beta * (pi64 - ref.double()) - delta
    y = labels.double()
    loss64 = (y * F.softplus(-u) + (1 - y) * F.softplus(u)).mean()
    g64 = torch.autograd.grad(loss64, leaves64)
    # the same loss through the torch tail, in float32: the tolerance rule's same-dtype term
    leaves32 = [x.clone().requires_grad_() for x in (h, w)]
    logp32 = sk.token_logprobs(*leaves32, t, backend="torch", **kw)
    pi32 = sk.sequence_logprobs(logp32, cu, valid=t != -100, average=average)
    loss32, stats32 = sk.bce_reward_loss(pi32, ref, labels, beta=beta, delta=delta,
                                         reduction="mean")
    g32 = torch.autograd.grad(loss32, leaves32)
    assert_close(out.policy_logps, pi32, pi64, torch.float32, "policy")
    assert_close(out.loss, loss32, loss64, torch.float32, "loss")
    for name, a, same, tr in zip(("dh", "dW"), grads, g32, g64):
        assert_close(a, same, tr, torch.float32, name, atol=1e-5)
    for key, value in stats32.items():
        torch.testing.assert_close(out.stats[key], value, equal_nan=True, msg=key)


def test_custom_ops_opcheck(dev):
    h, w, b, t = make_head(9, 16, 72, torch.bfloat16, dev, bias=True)
    a = h @ w.t()
    hi, scale = torch.randn(9, device=dev), torch.rand(9, device=dev) + 0.5
    q = torch.rand(9, device=dev)
    g = torch.randn(9, device=dev)
    cu = torch.tensor([0, 4, 9], device=dev, dtype=torch.int32)
    x = torch.randn(9, device=dev)
    ops = torch.ops.spot_kernels
    torch.library.opcheck(ops.cuda_lse_forward, (a, b, t, 2.0, 0.5, -100, True))
    torch.library.opcheck(ops.cuda_backward_epilogue_,
                          (a.clone(), b, t, hi, scale, q, g, 0.0, 1.0, -100))
    for grad in (False, True):  # with a gradient: the autograd registration too
        xg = x.clone().requires_grad_(grad)
        valid = torch.rand(9, device=dev) > 0.3
        torch.library.opcheck(ops.cuda_segment_sum, (xg, None, cu, True))
        torch.library.opcheck(ops.cuda_segment_sum, (xg, valid, cu.long(), False))
        torch.library.opcheck(ops.cuda_bce_forward, (xg[:4], x[4:8], torch.rand(4, device=dev),
                                                     None, 0.1, 0.0, 0.5))


def test_raw_op_checks(dev):
    a = torch.randn(4, 10, device=dev)
    t = torch.zeros(4, dtype=torch.long, device=dev)
    with pytest.raises(TypeError, match="targets must be torch.int64"):
        cuda._lse_forward_op(a, None, t.int(), 0.0, 1.0, -100, False)
    with pytest.raises(ValueError, match="logits must have unit column stride"):
        cuda._lse_forward_op(a.t(), None, torch.zeros(10, dtype=torch.long, device=dev), 0.0,
                             1.0, -100, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        cuda._lse_forward_op(a, torch.zeros(9, device=dev), t, 0.0, 1.0, -100, False)
    with pytest.raises(ValueError, match="backend_options"):
        sk.token_logprobs(a[:, :4], torch.randn(6, 4, device=dev), t, backend="cuda",
                          backend_options={"block_bytes": 10})



def test_rows_and_sequences_past_one_grid_dimension(dev):
    """More rows than a grid's y dimension holds (65,535): the backward epilogue and the segment
    sums stride over the rest; a token chunk of 70,000 rows goes through both. (On a GPU only:
    the host build runs a grid's blocks one by one, minutes here.)"""
    if dev != "cuda":
        pytest.skip("the grid's limits are a GPU's")
    h, w, _, t = make_head(70_000, 16, 64, torch.bfloat16, dev, seed=21)
    _check_against_reference(h, w, t, None, torch.bfloat16)
    g = torch.Generator().manual_seed(22)
    lens = torch.randint(0, 3, (70_000,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    x = torch.randn(int(lens.sum()), generator=g, dtype=torch.float64)
    out, count = cuda.segment_sums(x.float().to(dev), cu.to(dev), None, False)
    truth = reference.sequence_logprobs(x, cu, None, False)
    assert_close(out, reference.sequence_logprobs(x.float(), cu, None, False), truth,
                 torch.float32, "segment sums", atol=1e-6)
    assert torch.equal(count.cpu(), lens.float())


def test_a_misaligned_logits_block_takes_the_scalar_loads(dev):
    """A block whose first element is not 16-byte aligned (a column slice of a wider buffer)
    must not take the 16-byte vector loads: the same values as its aligned copy."""
    g = torch.Generator().manual_seed(23)
    full = (torch.randn(37, 1 + 264, generator=g) * 4).to(torch.bfloat16).to(dev)
    block = full[:, 1:]  # row stride 265 * 2 bytes, base 2 bytes past an aligned address
    t = torch.randint(0, 264, (37,), generator=g).to(dev)
    got = cuda._lse_forward_op(block, None, t, 0.0, 1.0, -100, True)
    want = cuda._lse_forward_op(block.contiguous(), None, t, 0.0, 1.0, -100, True)
    for a, b in zip(got, want):  # the two paths sum in other orders: float32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # (a misread is far off)


@pytest.mark.slow
def test_a_logits_block_of_more_than_2_31_elements(dev):
    """Indexing in 64 bits: a bf16 block of 16,384 x 131,080 (2.1e9 elements, 4.3 GB), the size
    a 1 GiB-plus chunk_bytes gives at a real head; sampled rows against torch."""
    if dev != "cuda":
        pytest.skip("4.3 GB of logits: on a GPU only")
    rows, v = 16_384, 131_080
    logits = torch.empty(rows, v, dtype=torch.bfloat16, device=dev).normal_(0, 3)
    t = torch.randint(0, v, (rows,), device=dev)
    logp, lse, _ = cuda._lse_forward_op(logits, None, t, 0.0, 1.0, -100, False)
    pick = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1], device=dev)
    z = logits[pick].double()
    want_lse = torch.logsumexp(z, 1)
    torch.testing.assert_close(lse[pick], want_lse, rtol=0, atol=1e-4)
    torch.testing.assert_close(logp[pick].double(), z.gather(1, t[pick, None])[:, 0] - want_lse,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("options", [None, {"chunk_bytes": 64 << 20}], ids=["default", "64MB"])
def test_a_real_size_head_on_the_gpu(options, dev):
    """N = 4096, D = 4096, V = 32768 in bf16 with a softcap: the forward's token chunks and the
    backward's vocabulary chunks are GEMMs of other shapes, whose roundings of a logit may
    differ (the README's precision paragraph); the tolerance rule says whether that shows."""
    if dev != "cuda":
        pytest.skip("real sizes: on a GPU only")
    h, w, _, t = make_head(4096, 4096, 32768, torch.bfloat16, dev, scale=2.0, seed=24)
    _check_against_reference(h, w, t, None, torch.bfloat16, options=options, softcap=30.0)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
def test_the_backward_recomputes_the_forwards_logits(dev, frozen_head):
    """The forward computes the blocks the backward will (all tokens x vocabulary chunks for a
    trained head, token chunks for a frozen one), so the backward's recomputed logits round the
    same and p = e^(z - lse) of the non-target columns is the forward's. With other blocks, a
    cold temperature (T = 0.07) put 30x (dh) to 100x (dW) the naive float32 head's error into
    the gradients (a fuzzer's case)."""
    g = torch.Generator().manual_seed(2)
    n, d, v, temp = 40, 64, 300, 0.07
    h = torch.randn(n, d, generator=g) * 30 / d**0.5
    w = torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (n,), generator=g)

    def grads(fn, dtype):
        hh, ww = (x.to(dtype).to(dev).requires_grad_() for x in (h, w))
        ww.requires_grad_(not frozen_head)
        leaves = [hh] if frozen_head else [hh, ww]
        return [x.double().cpu() for x in torch.autograd.grad(fn(hh, ww).double().sum(), leaves)]
    truth = grads(lambda a, b: reference.token_logprobs(a, b, t.to(dev), temperature=temp,
                                                        compute_dtype=torch.float64),
                  torch.float64)
    naive = grads(lambda a, b: reference.token_logprobs(a, b, t.to(dev), temperature=temp),
                  torch.float32)
    ours = grads(lambda a, b: sk.token_logprobs(a, b, t.to(dev), temperature=temp, backend="cuda",
                                                backend_options={"chunk_bytes": 1000}),
                 torch.float32)
    for name, o, s, tr in zip(("dh", "dW"), ours, naive, truth):
        err, base = (o - tr).abs().max().item(), (s - tr).abs().max().item()
        assert err <= 2 * base + 1e-6, (name, err, base)
