"""Every available backend against the float64 reference, values and gradients, with the
tolerance rule (conftest.assert_close)."""
import itertools
import math
import os

import pytest
import torch

import spot_kernels as sk
from spot_kernels import _registry, reference
from conftest import GRAD_ATOL, assert_close, float64_truth, interpreted, make_head, references

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(backend, h, w, t, b=None, gout=None, **kw):
    """Our log-probs and the gradients of ``sum(logp * gout)`` for ``hidden``, ``weight``, ``bias``."""
    leaves = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_())
    # poison: gradients accumulate into these, so stale memory would show
    logp = sk.token_logprobs(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None,
                             backend=backend, **kw)
    assert logp.dtype == torch.float32 and logp.shape == t.shape
    if gout is None:
        return logp, None
    grads = torch.autograd.grad((logp.double() * gout).sum(), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    return logp, grads


def check(backend, h, w, t, b=None, dtype=None, **kw):
    truth, same, gout = references(h, w, t, b, **kw)
    logp, grads = run(backend, h, w, t, b, gout, **kw)
    dtype = dtype or h.dtype
    assert_close(logp, same[0], truth[0], dtype, "logp")
    for name, ours, s, tr in zip(("dh", "dW", "db"), grads, same[1], truth[1]):
        assert_close(ours, s, tr, dtype, name, atol=GRAD_ATOL.get(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 16), (37, 200), (199, 16)])
def test_shapes_and_dtypes(backend, device, dtype, n, d):
    if interpreted(backend, device) and n * d > 4000 and dtype != torch.float32:
        pytest.skip("interpreter: large shapes run in float32 only")
    h, w, b, t = make_head(n, d, 131, dtype, device, bias=True, seed=n + d)
    check(backend, h, w, t, b, temperature=0.9, softcap=20.0)


@pytest.mark.parametrize("bias,temperature,softcap",
                         list(itertools.product([False, True], [1.0, 0.6], [None, 3.0])))
def test_options(backend, device, bias, temperature, softcap):
    h, w, b, t = make_head(23, 24, 97, torch.float32, device, bias=bias, scale=3.0, seed=7)
    check(backend, h, w, t, b, temperature=temperature, softcap=softcap)


def test_options_bf16(backend, device):
    h, w, b, t = make_head(23, 24, 97, torch.bfloat16, device, bias=True, scale=3.0, seed=8)
    check(backend, h, w, t, b, temperature=0.6, softcap=3.0)


def test_all_ignored_and_empty(backend, device):
    h, w, _, t = make_head(9, 16, 50, torch.float32, device, seed=3)
    t = torch.full_like(t, -100)
    logp, grads = run(backend, h, w, t, gout=torch.ones(9, dtype=torch.float64, device=device))
    assert logp.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)
    h0, w0, _, t0 = make_head(0, 16, 50, torch.float32, device)
    logp, grads = run(backend, h0, w0, t0, gout=torch.ones(0, dtype=torch.float64, device=device))
    assert logp.shape == (0,) and grads[0].shape == (0, 16)
    assert grads[1].abs().max() == 0


def test_custom_ignore_index(backend, device):
    h, w, _, t = make_head(17, 16, 40, torch.float32, device, ignore_frac=0.0, seed=4)
    t[::3] = 7  # a real vocabulary id used as ignore_index
    check(backend, h, w, t, ignore_index=7)


def test_non_contiguous_and_batched(backend, device):
    h, w, b, t = make_head(24, 32, 61, torch.float32, device, bias=True, seed=5)
    h_nc = torch.cat([h, h], 1)[:, ::2]  # stride 2 in the hidden dimension
    assert not h_nc.is_contiguous()
    w_nc = torch.cat([w, w], 1)[:, 1::2]
    assert not w_nc.is_contiguous()
    check(backend, h_nc, w_nc, t, b)
    # leading dims [B, T, D] flatten; targets keep [B, T]
    h3, t2 = h_nc.reshape(4, 6, 32), t.reshape(4, 6)
    out = sk.token_logprobs(h3, w_nc, t2, bias=b, backend=backend)
    flat = sk.token_logprobs(h_nc, w_nc, t, bias=b, backend=backend)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out.reshape(-1), flat, rtol=0, atol=1e-6)


def test_large_logits_stay_finite(backend, device):
    h, w, _, t = make_head(19, 16, 70, torch.float32, device, seed=6)
    h = h * 3000  # |logits| ~ 1e4
    truth = reference.token_logprobs(h.double(), w.double(), t, compute_dtype=torch.float64)
    assert truth.abs().max() > 1e3
    check(backend, h, w, t)


def _dominant_heads(device):
    """Heads (D = 1, so the logits are exact in float32) where logp or 1 - p_t is far below
    ulp(|lse|): a near tie at |z| ~ 2e4, a target ahead by 9 at |z| ~ 300, and one ahead by
    ~1300 at T = 0.3 (p_t = 1 - e^-1313)."""
    one = torch.ones(1, 1, device=device)
    return [(one, torch.tensor([[20000.0], [19999.5], [19999.0]], device=device), 1, 1.0),
            (one, torch.tensor([[300.7], [291.7]], device=device), 0, 1.0),
            (torch.full((1, 1), 393.8884582519531, device=device),
             torch.tensor([[1.0], [0.0]], device=device), 0, 0.3)]


def test_log_probs_near_the_max_keep_float32_precision(backend, device):
    """logp and the entropy are formed relative to the row max ((z_t - m) - log s), not as
    z_t - lse, which loses ulp(|lse|): 6e-4 at |z| = 2e4, a third of a logp of -1e-4 at
    |z| = 300, and a logp above 0 from the cuda kernels' base-2 round trip."""
    for h, w, target, temp in _dominant_heads(device):
        t = torch.tensor([target], device=device)
        truth, te = reference.token_logprobs(h.double(), w.double(), t, temperature=temp,
                                             compute_dtype=torch.float64, return_entropy=True)
        logp, ent = sk.token_logprobs(h, w, t, backend=backend, temperature=temp,
                                      return_entropy=True)
        assert (logp <= 0).all(), (logp, truth)
        assert (logp.double() - truth).abs().max() <= 1e-6 * max(1.0, truth.abs().max()), \
            (w.flatten().tolist(), logp.item(), truth.item())
        assert (ent.double() - te).abs().max() <= 1e-5, (w.flatten().tolist(), ent.item(), te.item())


def test_a_dominant_target_gets_no_reversed_gradient(backend, device):
    """With p_t = 1 - e^-1313 every gradient is 0 to float32 precision; the cuda backward's
    base-2 round trip of lse made p_t exceed 1 and gave dW[t] = -0.11."""
    h, w, target, temp = _dominant_heads(device)[2]
    t = torch.tensor([target], device=device)
    _, (dh, dw) = run(backend, h, w, t, gout=torch.ones(1, dtype=torch.float64, device=device),
                      temperature=temp)
    assert dh.abs().max() <= 1e-6 and dw.abs().max() <= 1e-6, (dh, dw)


def test_gradients_near_the_max_keep_float32_precision(backend, device):
    """The saved lse is float64 (m + log s unrounded): the backward's p = e^(z - lse) keeps
    float32 precision where a float32 lse kept ulp(|lse|): at |z| ~ 300 with p_t = 1 - 1.2e-4
    that was a third of dh, against the float32 naive head's 0.4 %."""
    for h, w, target, temp in _dominant_heads(device)[:2]:
        check(backend, h, w, torch.tensor([target], device=device), temperature=temp)


def test_confident_targets_at_a_real_width(backend, device):
    """A real D (4096, float32), each row's target its argmax raised further, at |z| up to ~200
    (1 - p_t from 0 to 0.3):
    the backward recomputes the logits, and where its GEMMs have other shapes than the
    forward's (the cuda backend's memory plan; token_chunk forces more of it) their last bits
    may differ, which 1 - p_t would show. The float32 naive head is the yardstick. On the CPU
    the torch backend and the CUDA host build run it; Triton's interpreter is too slow here."""
    if interpreted(backend, device):
        pytest.skip("D = 4096 is too slow for Triton's interpreter")
    g = torch.Generator().manual_seed(21)
    n, d, v = 96, 4096, 1000
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    z = (h.double() @ w.double().t())
    t = z.argmax(1)
    w[t] += 5.0 * h / (h * h).sum(1, keepdim=True)  # a row's target up by 5 (shared: the last)
    h = h * (100.0 / z.abs().max()).float()
    h, w, t = h.to(device), w.to(device), t.to(device)
    options = {"cuda": {"token_chunk": 40}}.get(backend)
    truth, same, gout = references(h, w, t)
    logp, grads = run(backend, h, w, t, None, gout, backend_options=options)
    assert_close(logp, same[0], truth[0], torch.float32, "logp")
    for name, ours, sd, tr in zip(("dh", "dW"), grads, same[1], truth[1]):
        assert_close(ours, sd, tr, torch.float32, name)


def test_the_softcap_slope_keeps_float32_precision_far_above_the_cap(backend, device):
    """``softcap'(a) = 1 - tanh(a / c)^2`` formed from a rounded ``tanh`` loses its leading
    bits where ``|a| >> c``: at ``a / c = 5`` the slope is 1.8e-4 and carries ~1e-3 relative
    error, at 8 ``tanh`` rounds to 1 and the slope to 0 (autograd through ``torch.tanh`` does
    exactly that: the float32 reference is not the bar here). The kernels form it without
    cancellation, so each vocabulary column's bias gradient (one sign: every row's target is
    column 0, which is left out) keeps float32 precision relative to itself, ``a / c`` from
    3 to 9 in both signs."""
    if backend == "reference":
        pytest.skip("autograd through torch.tanh forms 1 - tanh^2 (the cancellation)")
    g = torch.Generator().manual_seed(5)
    n, d, v = 6, 16, 40
    h = torch.randn(n, d, generator=g) * 0.1
    w = torch.randn(v, d, generator=g) * 0.1
    sign = torch.where(torch.rand(v, generator=g) < 0.5, -1.0, 1.0)
    b = sign * torch.linspace(3.0, 9.0, v)
    t = torch.zeros(n, dtype=torch.long)
    gout = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    h, w, b, t, gout = (x.to(device) for x in (h, w, b, t, gout))
    *_, db = float64_truth(h, w, t, b, gout, softcap=1.0, temperature=0.7)
    _, grads = run(backend, h, w, t, b, gout, softcap=1.0, temperature=0.7)
    rel = ((grads[2].double() - db) / db).abs()[1:]
    assert rel.max() < 1e-5, f"db relative error {rel.max():.2e} at column {int(rel.argmax()) + 1}"


def test_the_target_gradient_survives_a_recompute_that_rounds_differently(backend, device):
    """The backward recomputes the logits, and on a GPU its GEMMs (other shapes than the
    forward's) may round them differently in the last bits. Emulated here: the backward gets
    ``hidden`` moved so that each target logit is 2e-4 higher than the forward saw (float32's
    ulp at |z| ~ 3e3). Each target is its row's argmax by 16, so 1 - p_t ~ 5e-5: taken from the
    recomputed logit it would turn negative (or be capped to 0), the target's gradient lost;
    the backward takes it from the forward's logp and stays at the float64 truth of the
    forward's inputs, to the relative size of the shift."""
    if backend == "reference":
        pytest.skip("the reference has no separate backward to hand other inputs")
    impl = _registry.module(backend)
    g = torch.Generator().manual_seed(5)
    n, d, v = 8, 64, 300
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    t = torch.randint(0, v, (n,), generator=g)
    z = h @ w.t()
    others = z.scatter(1, t[:, None], float("-inf")).amax(1)
    w_t = w[t]
    h = h + ((others + 16.0 - z.gather(1, t[:, None])[:, 0]) / (w_t * w_t).sum(1))[:, None] * w_t
    shifted = h + (2e-4 / (w_t * w_t).sum(1))[:, None] * w_t
    gout = torch.randn(n, generator=g)
    h, w, t, shifted, gout = (x.to(device) for x in (h, w, t, shifted, gout))
    kw = dict(temperature=1.0, softcap=None, ignore_index=-100)
    logp, lse, _ = impl.forward(h, w, t, None, return_entropy=False, **kw)
    truth = float64_truth(h, w, t, None, gout, **kw)
    q64 = -torch.special.expm1(truth[0])
    assert ((q64 > 1e-5) & (q64 < 2e-4)).all(), q64   # confident, and below the shift
    dh, dw, _ = impl.backward(shifted, w, t, None, lse, logp, gout,
                              needs_input_grad=(True, True, False), **kw)
    for name, ours, want in (("dh", dh, truth[2]), ("dW", dw, truth[3])):
        err = ((ours.double() - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)


def test_the_log_probs_may_change_in_place(backend, device):
    """The backward keeps a copy of the forward's ``logp`` (the target column's ``1 - p_t``):
    the caller may scale or mask the returned tensor in place before the backward."""
    h, w, _, t = make_head(11, 16, 50, torch.float32, device, seed=12)
    leaf = h.clone().requires_grad_()
    logp = sk.token_logprobs(leaf, w, t, backend=backend)
    logp.mul_(3.0)
    (got,) = torch.autograd.grad(logp.sum(), leaf)
    leaf = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(sk.token_logprobs(leaf, w, t, backend=backend).sum() * 3.0,
                                  leaf)
    torch.testing.assert_close(got, want)


MASKED_OPTIONS = {"torch": [{"vocab_chunk": 16}], "triton": [{"block_v": 16},
                                                          {"block_v": 16, "split_vocab": 3}],
                  "cuda": [None, {"chunk_bytes": 21 * 16 * 4}]}  # 16-column vocabulary chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_vocabulary_blocks(backend, device, dtype):
    """A -inf bias over whole blocks of the vocabulary (a masked or padded stretch) leaves every
    logit a block or a vocabulary split has seen -inf: the online max must not shift by -inf
    (-inf - -inf = NaN), and the entropy's p log p is 0 there."""
    h, w, b, _ = make_head(21, 24, 97, dtype, device, bias=True, scale=2.0, seed=14)
    b[:48] = float("-inf")  # the first of three vocabulary splits (48 columns) entirely
    b[57:61] = float("-inf")
    t = torch.randint(61, 97, (21,), generator=torch.Generator().manual_seed(1)).to(device)
    t[::5] = -100
    truth, same, gout = references(h, w, t, b)
    _, te = reference.token_logprobs(h.double(), w.double(), t, b.double(),
                                     compute_dtype=torch.float64, return_entropy=True)
    _, se = reference.token_logprobs(h, w, t, b, return_entropy=True)
    assert torch.isfinite(truth[0]).all() and torch.isfinite(te).all()
    for opts in MASKED_OPTIONS.get(backend, [None]):
        logp, grads = run(backend, h, w, t, b, gout, backend_options=opts)
        assert_close(logp, same[0], truth[0], dtype, f"logp {opts}")
        for name, ours, sd, tr in zip(("dh", "dW", "db"), grads, same[1], truth[1]):
            assert_close(ours, sd, tr, dtype, f"{name} {opts}", atol=GRAD_ATOL.get(dtype))
        _, ent = sk.token_logprobs(h, w, t, bias=b, backend=backend, return_entropy=True,
                                   backend_options=opts)
        assert_close(ent, se, te, dtype, f"entropy {opts}")


def test_targets_on_masked_logits(backend, device):
    """A target whose logit is -inf (inside a masked stretch, even one a whole vocabulary chunk
    or split covers) has logp = -inf, not NaN, and the gradients stay finite: the forward's
    merge of chunks must not form -inf - (-inf)."""
    dtype = torch.float32
    h, w, b, _ = make_head(21, 24, 97, dtype, device, bias=True, scale=2.0, seed=15)
    b[:48] = float("-inf")
    b[57:61] = float("-inf")
    t = torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(2))
    t[:6] = torch.tensor([0, 7, 20, 47, 58, 60])
    t[6] = -100
    t = t.to(device)
    masked = (t >= 0) & ((t < 48) | ((t >= 57) & (t < 61)))
    truth, same, gout = references(h, w, t, b)
    assert bool((truth[0][masked] == -math.inf).all()) and masked.sum() >= 6
    for opts in MASKED_OPTIONS.get(backend, [None]):
        logp, grads = run(backend, h, w, t, b, gout, backend_options=opts)
        assert bool((logp[masked] == -math.inf).all()), (opts, logp[masked])
        assert_close(logp[~masked], same[0][~masked], truth[0][~masked], dtype, f"logp {opts}")
        for name, ours, sd, tr in zip(("dh", "dW", "db"), grads, same[1], truth[1]):
            assert_close(ours, sd, tr, dtype, f"{name} {opts}", atol=GRAD_ATOL.get(dtype))


@pytest.mark.parametrize("v", [5, 16, 37])
def test_nan_logits_give_nan(backend, device, v):
    """A NaN logit (here a NaN row of the head) must come out as NaN, never as a plausible
    number: the -inf guards of the online max must not swallow it. V = 5 and 37 are not
    multiples of the cuda epilogue's vector width, so the NaN reaches its scalar path."""
    h, w, _, t = make_head(3, 4, v, torch.float32, device, ignore_frac=0.0, seed=17)
    w[0] = float("nan")
    logp, ent = sk.token_logprobs(h, w, t, backend=backend, return_entropy=True)
    assert logp.isnan().all() and ent.isnan().all(), (logp, ent)


def test_entropy(backend, device):
    h, w, b, t = make_head(29, 24, 83, torch.float32, device, bias=True, scale=2.0, seed=9)
    kw = dict(temperature=0.8, softcap=5.0)
    logp, ent = sk.token_logprobs(h, w, t, bias=b, backend=backend, return_entropy=True, **kw)
    tl, te = reference.token_logprobs(h.double(), w.double(), t, b.double(),
                                      compute_dtype=torch.float64, return_entropy=True, **kw)
    sl, se = reference.token_logprobs(h, w, t, b, return_entropy=True, **kw)
    assert_close(logp, sl, tl, torch.float32, "logp")
    assert_close(ent, se, te, torch.float32, "entropy")
    assert not ent.requires_grad


def test_uint8_targets_count_like_int64(backend, device):
    """Targets of any integer dtype mean the same ids: a uint8 156 (what -100 wraps to) is a
    real token of a 200-word vocabulary, counted in the sequence sums, never ignored."""
    h, w, _, t = make_head(12, 16, 200, torch.float32, device, ignore_frac=0.0, seed=15)
    t[::3] = 156
    cu = torch.tensor([0, 4, 8, 10, 12], device=device)
    ref, labels = torch.zeros(4, device=device), torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)
    # uint16 / uint32 too (a token memmap), on the CPU: torch's kernels for them elsewhere are few
    kinds = (torch.uint8,) + ((torch.uint16, torch.uint32) if device == "cpu" else ())
    outs = [sk.spot_loss(h, w, tt, cu, ref, labels, backend=backend).policy_logps
            for tt in [t] + [t.to(k) for k in kinds]]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # the sums add in a fixed order
    truth = float64_truth(h, w, t, None, torch.ones(12, device=device))[0]
    expect = torch.stack([truth[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(outs[1].double(), expect, rtol=0, atol=1e-4)


def test_second_derivative_is_an_error(backend, device):
    """The fused backward has no derivative: differentiating its gradient (a gradient penalty)
    fails loudly instead of treating the gradient as a constant; the first derivative under
    create_graph=True is still right."""
    if backend == "reference":
        pytest.skip("the reference is plain autograd: twice differentiable")
    h, w, _, t = make_head(10, 16, 37, torch.float32, device, seed=16)
    hh = h.clone().requires_grad_()
    logp = sk.token_logprobs(hh, w, t, backend=backend)
    (gh,) = torch.autograd.grad(logp.sum(), hh, create_graph=True)
    _, _, dh64, _ = float64_truth(h, w, t, None, torch.ones(10, device=device))[:4]
    torch.testing.assert_close(gh.double(), dh64, rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gh.pow(2).sum().backward()
    # the same through autograd.grad with explicit inputs, the head fed by a function of x
    x = h.clone().requires_grad_()
    logp = sk.token_logprobs(torch.tanh(x), w, t, backend=backend)
    (gx,) = torch.autograd.grad(logp.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gx.pow(2).sum(), x)


def test_targets_outside_vocab_without_ignore(backend, device):
    """The backend contract for vocab-parallel shards: a target owned by another shard gives
    ``logp = -lse`` and no one-hot term, but the softmax term still flows."""
    if backend == "reference":
        pytest.skip("the reference materialises one full vocabulary; shards are a backend matter")
    from spot_kernels import _registry
    impl = _registry.module(backend)
    h, w, _, t = make_head(13, 16, 40, torch.float32, device, ignore_frac=0.0, seed=10)
    t[::2] += 40  # owned by a "next" shard
    logp, lse, _ = impl.forward(h, w, t, None, temperature=1.0, softcap=None, ignore_index=-100,
                                return_entropy=False)
    g = torch.randn(13, device=device)
    expect, lse64, dh64, dw64, _ = float64_truth(h, w, t, None, g)
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=1e-4)
    torch.testing.assert_close(logp.double(), expect, rtol=0, atol=1e-4)
    dh, dw, _ = impl.backward(h, w, t, None, lse, logp, g, temperature=1.0, softcap=None,
                              ignore_index=-100, needs_input_grad=(True, True, False))
    torch.testing.assert_close(dh.double(), dh64, rtol=0, atol=1e-4)
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=1e-4)

HALF_DH_PATHS = {"torch": [{}], "reference": [],
                 "triton": [{}, {"deterministic": True}, {"da_bytes": 1 << 12},
                            {"scratch_bytes": 1 << 10}],
                 "cuda": [{}, {"token_chunk": 5}, {"chunk_bytes": 1 << 10}]}


def test_dh_float32_returns_the_unrounded_sum(backend, device):
    """``dh_float32=True`` (what a vocab-parallel head asks for, to sum its shards' parts before
    rounding) gives ``dh`` in float32, unrounded, on every backward path; rounded, it is the
    default ``dh`` within one ulp (the same sums, bit-equal where the path sums in float32)."""
    from spot_kernels import _registry
    if not HALF_DH_PATHS[backend]:
        pytest.skip("the reference runs no sharded heads")
    impl = _registry.module(backend)
    h, w, b, t = make_head(37, 24, 70, torch.bfloat16, device, bias=True, seed=12, scale=3.0)
    kw = dict(temperature=0.9, softcap=5.0, ignore_index=-100)
    logp, lse, _ = impl.forward(h, w, t, b, return_entropy=False, **kw)
    g = torch.randn(37, device=device)
    _, _, dh64, _ = float64_truth(h, w, t, b, g, **kw)[:4]
    from spot_kernels import _gemm
    for options in HALF_DH_PATHS[backend]:
        plain = impl.backward(h, w, t, b, lse, logp, g, **kw, **options)
        full = impl.backward(h, w, t, b, lse, logp, g, **kw, dh_float32=True, **options)
        assert plain[0].dtype == torch.bfloat16 and full[0].dtype == torch.float32, options
        # not rounded (cuBLAS paths: where this torch has a float32-output GEMM for half inputs)
        through_gemm = backend == "cuda" or "da_bytes" in options
        if device == "cpu" or not through_gemm or _gemm._fp32_out_mm[0]:
            assert not torch.equal(full[0], full[0].bfloat16().float()), options
        ulp = torch.exp2(torch.floor(torch.log2(plain[0].double().abs().clamp_min(1e-30))) - 7)
        assert ((full[0].bfloat16().double() - plain[0].double()).abs() <= ulp).all(), options
        # the float32 sum is nearer the truth than its bfloat16 rounding
        assert ((full[0].double() - dh64).abs().sum() <
                (plain[0].double() - dh64).abs().sum()), options
        for x, y in zip(plain[1:], full[1:]):  # dW and db as before
            assert torch.equal(x, y), options
        none = impl.backward(h[:0], w, t[:0], b, lse[:0], logp[:0], g[:0], **kw, dh_float32=True,
                             **options)  # no tokens: float32 zeros
        assert none[0].dtype == torch.float32 and none[0].shape == (0, 24), options


def test_backend_selection(monkeypatch):
    assert sk.available_backends("cpu")[-2:] == ["torch", "reference"]
    assert "cuda" not in sk.available_backends("cpu")
    if not torch.cuda.is_available():  # nothing runs on a device torch does not see
        assert sk.available_backends("cuda") == []
        assert _registry.availability("torch", "cuda") == (False, "torch sees no CUDA device")
        with pytest.raises(RuntimeError, match="no backend is available on cuda: torch sees no"):
            _registry.resolve("auto", "cuda")
    with pytest.raises(ValueError, match="backend"):
        sk.token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                          backend="magic")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                          backend="cuda")
    with pytest.raises(ValueError, match="backend_options"):
        sk.token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                          backend="torch", backend_options={"tile": 3})
    # SPOT_KERNELS_BACKEND sets the default; an explicit backend wins
    args = (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long))
    monkeypatch.setenv("SPOT_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"'cuda' \(from \$SPOT_KERNELS_BACKEND\) is not "
                                           r"available"):
        sk.token_logprobs(*args)
    monkeypatch.setenv("SPOT_KERNELS_BACKEND", "magic")
    with pytest.raises(ValueError, match=r"backend \(from \$SPOT_KERNELS_BACKEND\) must be"):
        sk.token_logprobs(*args)
    assert sk.token_logprobs(*args, backend="torch").shape == (3,)
    monkeypatch.setenv("SPOT_KERNELS_BACKEND", "reference")
    assert sk.token_logprobs(*args).shape == (3,)


def test_autocast_runs_the_head_in_the_autocast_dtype(backend, device):
    """Under ``torch.autocast`` float32 inputs are cast to the autocast dtype as ``F.linear``
    would cast them: the same values and float32 gradients as an explicit bfloat16 call, and not
    the float32 head's values."""
    h, w, b, t = make_head(37, 48, 131, torch.float32, device, bias=True, scale=3.0, seed=21)
    gout = torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(device)
    kw = dict(backend=backend, softcap=20.0, temperature=0.9)
    if backend == "triton":  # two backward runs compared bit for bit: no atomics
        kw["backend_options"] = {"deterministic": True}

    def leaves():
        return [x.detach().clone().requires_grad_() for x in (h, w, b)]

    amp = leaves()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logp = sk.token_logprobs(amp[0], amp[1], t, bias=amp[2], **kw)
        assert torch.is_autocast_enabled(torch.device(device).type)  # left as it was
    (logp * gout).sum().backward()
    inside = leaves()  # the backward run inside the autocast region: the same gradients
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        (sk.token_logprobs(inside[0], inside[1], t, bias=inside[2], **kw) * gout).sum().backward()
    for a, i in zip(amp, inside):
        torch.testing.assert_close(i.grad, a.grad, rtol=0, atol=0)
    plain = leaves()
    cast = [x.to(torch.bfloat16) for x in plain]
    logp_bf16 = sk.token_logprobs(cast[0], cast[1], t, bias=cast[2], **kw)
    (logp_bf16 * gout).sum().backward()
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, logp_bf16, rtol=0, atol=1e-6)
    for a, e in zip(amp, plain):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=1e-6 * e.grad.abs().max().item())
    logp_fp32 = sk.token_logprobs(h, w, t, bias=b, **kw)
    assert (logp - logp_fp32).abs().max() > 1e-3  # the bfloat16 head, not the float32 one
    # autocast leaves float64 as it is (F.linear too): refused as outside, not rounded to bf16
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="hidden must be float32, bfloat16 or float16"):
            sk.token_logprobs(h.double(), w.double(), t, bias=b.double(), **kw)


@pytest.mark.parametrize("options", [None, {"filter_eps": 1e-3}, {"deterministic": True},
                                     {"da_bytes": 2**12}],
                         ids=["plain", "filter", "deterministic", "da_bytes"])
def test_a_nan_upstream_gradient_reaches_the_gradients(backend, device, options):
    """A NaN in ``dL/dlogp`` (a diverged loss) must show in the gradients, as autograd of the
    naive head shows it: NaN in that token's ``dh`` row and in every row of ``dW`` and ``db``
    (the softmax spreads it), other tokens' ``dh`` untouched. A skip test of the form
    ``max|g| > 0`` drops it: NaN compares false, and the GPU's max ignores NaN."""
    if options and backend != "triton":
        pytest.skip("Triton's options")
    h, w, b, t = make_head(37, 24, 45, torch.float32, device, bias=True, seed=5)
    t[5] = 3  # a counted token, in the first token tile
    gout = torch.zeros(37, dtype=torch.float64, device=device)
    gout[5] = float("nan")  # the only nonzero: every tile holds NaN or zeros
    _, (dh, dw, db) = run(backend, h, w, t, b, gout, backend_options=options)
    assert torch.isnan(dh[5]).all() and torch.isfinite(dh[torch.arange(37) != 5]).all()
    assert torch.isnan(dw).all() and torch.isnan(db).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,options", [("torch", None), ("cuda", None),
                                          ("triton", {"deterministic": True}),
                                          ("triton", {"da_bytes": 1 << 22})],
                         ids=["torch", "cuda", "triton-deterministic", "triton-da_bytes"])
def test_spot_loss_is_bit_identical_run_to_run(name, options):
    """Every backward without atomics gives the same bits twice, through the whole SPoT loss:
    the sequence sums too (8,192 tokens into 256 sequences; float atomics there, as
    ``index_add`` has on CUDA, reorder the additions from run to run)."""
    ok, why = _registry.availability(name, "cuda")
    if not ok:
        pytest.skip(why)
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: this test wants the compiled kernels")
    n, s = 8192, 256
    h, w, b, t = make_head(n, 128, 2048, torch.bfloat16, "cuda", bias=True, seed=8)
    gen = torch.Generator().manual_seed(9)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64),
                    torch.sort(torch.randperm(n - 1, generator=gen)[:s - 1] + 1).values,
                    torch.tensor([n])]).cuda()
    ref = (torch.randn(s, generator=gen) * 10 - 300).cuda()
    labels = (torch.arange(s) % 2 == 0).float().cuda()

    def run_once():
        leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        out = sk.spot_loss(leaves[0], leaves[1], t, cu, ref, labels, bias=leaves[2], beta=0.1,
                           backend=name, backend_options=options)
        return (out.loss.detach(), out.policy_logps.detach(),
                *torch.autograd.grad(out.loss, leaves))

    first, second = run_once(), run_once()
    for a, c, what in zip(first, second, ("loss", "policy", "dh", "dW", "db")):
        assert torch.equal(a, c), what


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("what", ["token_logprobs", "spot_loss"])
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_forward_and_backward_capture_in_a_cuda_graph(name, what):
    """``torch.cuda.graph`` (and ``torch.compile(mode="reduce-overhead")``) capture the fused
    head and the whole SPoT loss: nothing in a call reads a value on the host while a capture
    runs (the value checks ran in the eager warm-up), and a replay on new inputs gives what
    eager gives."""
    ok, why = _registry.availability(name, "cuda")
    if not ok:
        pytest.skip(why)
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: interpreted kernels copy to the host")
    h, w, b, t = make_head(300, 64, 1000, torch.bfloat16, "cuda", bias=True, seed=3)
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    g = torch.randn(300, generator=torch.Generator().manual_seed(4)).cuda()

    cu = torch.tensor([0, 40, 110, 180, 300], device="cuda")
    ref = torch.randn(4, generator=torch.Generator().manual_seed(5)).cuda() - 500
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], device="cuda")

    def step():
        if what == "spot_loss":
            out = sk.spot_loss(hh, ww, t, cu, ref, labels, bias=bb, beta=0.1, delta=0.02,
                               backend=name)
            return (out.loss, out.policy_logps, out.stats["accuracy"],
                    *torch.autograd.grad(out.loss, (hh, ww, bb)))
        logp = sk.token_logprobs(hh, ww, t, bias=bb, backend=name)
        return (logp, *torch.autograd.grad(logp, (hh, ww, bb), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocator), as capture wants
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        hh.mul_(1.5)
        ww.add_(0.01)
    graph.replay()
    for got, want in zip(static, step()):  # atomics may flip a bf16 gradient's last bit
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)
