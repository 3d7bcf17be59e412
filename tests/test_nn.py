"""spot_kernels.nn modules against the float64 reference (values and gradients), every backend."""
from __future__ import annotations

import torch
from conftest import assert_close, make_head, references

import spot_kernels as sk
from spot_kernels import reference


def test_token_logprobs_module(backend, device):
    h, w, b, t = make_head(37, 24, 53, torch.float32, device, bias=True, seed=3)
    mod = sk.nn.TokenLogprobs(temperature=0.7, softcap=5.0, backend=backend)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    logp = mod(hh, ww, t, bb)
    truth, same, gout = references(h, w, t, b, temperature=0.7, softcap=5.0)
    assert_close(logp, same[0], truth[0], torch.float32, "logp")
    grads = torch.autograd.grad((logp.double() * gout).sum(), (hh, ww, bb))
    for name, g, gs, gt in zip("hwb", grads, same[1], truth[1]):
        assert_close(g, gs, gt, torch.float32, f"d{name}")
    assert "softcap=5.0" in repr(mod)


def test_spot_loss_module(backend, device):
    h, w, _, t = make_head(40, 16, 29, torch.float32, device, seed=4)
    cu = torch.tensor([0, 9, 20, 31, 40], device=device)
    g = torch.Generator().manual_seed(5)
    ref = (torch.randn(4, generator=g) - 20).to(device)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)
    mod = sk.nn.SPoTLoss(beta=0.2, delta=0.3, backend=backend)
    hh, ww = (x.clone().requires_grad_() for x in (h, w))
    out = mod(hh, ww, t, cu, ref, labels, delta=0.1)  # forward's delta overrides the constructor's
    out.loss.backward()

    h64, w64 = (x.double().requires_grad_() for x in (h, w))
    lp = reference.token_logprobs(h64, w64, t, compute_dtype=torch.float64)
    pi = reference.sequence_logprobs(lp, cu, valid=t != -100)
    u = 0.2 * (pi - ref.double()) - 0.1
    y = labels.double()
    softplus = torch.nn.functional.softplus
    loss = (y * softplus(-u) + (1 - y) * softplus(u)).sum() / 2
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hh.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ww.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
