"""torch.compile through the public functions on CPU: the fused head is a custom op with a fake
implementation, so ``token_logprobs`` compiles with ``fullgraph=True``; values and gradients match
eager and the float64 reference. ``aot_eager`` runs the same tracing (dynamo, fake tensors, AOT
autograd) as inductor without its C++ compile, which keeps the test fast."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_head, references

import spot_kernels as sk
from spot_kernels import _ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_opcheck():
    h, w, b, t = make_head(11, 8, 13, torch.float32, "cpu", bias=True, seed=1)
    args = (h.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), "torch", 0.9, 3.0,
            -100, True, "{}")
    torch.library.opcheck(_ops.token_logprobs_fwd, args)
    logp, lse, _ = _ops.token_logprobs_fwd(*[x.detach() if isinstance(x, torch.Tensor) else x
                                             for x in args])
    g = torch.randn(11)
    torch.library.opcheck(_ops.token_logprobs_bwd, (h.detach(), w.detach(), t, b.detach(), lse,
                                                    logp, g, "torch", 0.9, 3.0, -100, True,
                                                    True, True, "{}"))
    # transposed layouts (a column-major hidden, a weight that is a transposed [D, V]): the
    # gradients come back contiguous, and the fake op must say so
    ht, wt = h.detach().t().contiguous().t(), w.detach().t().contiguous().t()
    torch.library.opcheck(_ops.token_logprobs_bwd, (ht, wt, t, b.detach(), lse, logp, g, "torch",
                                                    0.9, 3.0, -100, True, True, True, "{}"))


def test_compiled_log_probs_may_change_in_place():
    """The compiled op keeps its own copy of logp for the backward (as the eager Function)."""
    h, w, _, t = make_head(9, 8, 21, torch.float32, "cpu", seed=4)

    def f(h, w, t):
        logp = sk.token_logprobs(h, w, t, backend="torch")
        logp.mul_(3.0)
        return logp.sum()

    leaf = h.clone().requires_grad_()
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(leaf, w, t),
                                 leaf)
    leaf = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(3.0 * sk.token_logprobs(leaf, w, t, backend="torch").sum(), leaf)
    torch.testing.assert_close(got, want)


def test_token_logprobs_fullgraph():
    h, w, b, t = make_head(37, 16, 45, torch.float32, "cpu", bias=True, seed=2)
    kw = dict(temperature=0.7, softcap=4.0)
    truth, same, gout = references(h, w, t, b, **kw)

    def f(h, w, b, t, gout):
        logp, ent = sk.token_logprobs(h, w, t, bias=b, return_entropy=True, **kw)
        return logp, ent, (logp.double() * gout).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    logp, ent, loss = compiled(hh, ww, bb, t, gout)
    assert logp.requires_grad and not ent.requires_grad  # the entropy is a statistic, as eager
    loss.backward()
    assert_close(logp, same[0], truth[0], torch.float32, "logp")
    for name, x, gs, gt in zip("hwb", (hh, ww, bb), same[1], truth[1]):
        assert_close(x.grad, gs, gt, torch.float32, f"d{name}")
    _, ent_eager = sk.token_logprobs(h, w, t, bias=b, return_entropy=True, **kw)
    torch.testing.assert_close(ent, ent_eager)
    bad = t.clone()
    bad[0] = 45
    with pytest.raises(ValueError, match="targets"):  # the range check runs inside the op
        compiled(hh, ww, bb, bad, gout)


def test_spot_loss_compiled_matches_eager():
    h, w, _, t = make_head(40, 16, 29, torch.float32, "cpu", seed=4)
    cu = torch.tensor([0, 9, 20, 31, 40])
    ref = torch.randn(4, generator=torch.Generator().manual_seed(5)) - 20
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])

    def loss_fn(h, w):
        return sk.spot_loss(h, w, t, cu, ref, labels, beta=0.2, softcap=5.0).loss

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-5)


def test_a_bad_backend_under_compile_is_the_error_eager_gives():
    """An unknown or unavailable backend raises the ``ValueError`` / ``RuntimeError`` eager
    raises (resolved outside the function dynamo takes as a constant: raised inside it came
    out as dynamo's internal error, which ``except ValueError`` does not catch)."""
    h, w, _, t = make_head(6, 8, 11, torch.float32, "cpu", seed=5)
    for backend, err in (("nope", ValueError), ("cuda", RuntimeError)):
        torch._dynamo.reset()
        with pytest.raises(err, match="backend"):
            torch.compile(lambda h, w, t: sk.token_logprobs(h, w, t, backend=backend),
                          backend="aot_eager")(h, w, t)


def test_the_reference_backend_compiles_as_plain_autograd():
    """``backend="reference"`` (or ``$SPOT_KERNELS_BACKEND=reference`` under "auto") is traced
    as the plain autograd it is, with eager's values and gradients (it was refused)."""
    h, w, b, t = make_head(13, 8, 17, torch.float32, "cpu", bias=True, seed=6)
    truth, same, gout = references(h, w, t, b, softcap=3.0)

    def f(h, w, b, t):
        logp, ent = sk.token_logprobs(h, w, t, bias=b, softcap=3.0, backend="reference",
                                      return_entropy=True)
        return logp, ent, (logp.double() * gout).sum()

    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    logp, ent, loss = torch.compile(f, fullgraph=True, backend="aot_eager")(hh, ww, bb, t)
    loss.backward()
    assert not ent.requires_grad
    assert_close(logp, same[0], truth[0], torch.float32, "logp")
    for name, x, gs, gt in zip("hwb", (hh, ww, bb), same[1], truth[1]):
        assert_close(x.grad, gs, gt, torch.float32, f"d{name}")


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_a_temperature_and_softcap_that_change_between_calls(dynamic):
    """A float that changes between calls is traced as a symbolic float from the second call on
    (on the first under ``dynamic=True``), which Python's ``math`` cannot read: the checks run
    as graph assertions, so ``fullgraph=True`` still compiles, and each call matches eager. A
    bad value still fails (here at compile time, else when the op runs)."""
    h, w, b, t = make_head(13, 8, 21, torch.float32, "cpu", bias=True, seed=6)

    def f(h, temperature, softcap):
        return sk.token_logprobs(h, w, t, bias=b, temperature=temperature, softcap=softcap,
                                 backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for temperature, softcap in ((0.5, 3.0), (0.6, 4.0), (0.7, 5.0)):
        torch.testing.assert_close(compiled(h, temperature, softcap), f(h, temperature, softcap))
    with pytest.raises(Exception, match="temperature must be a finite number > 0"):
        compiled(h, -1.0, 3.0)
