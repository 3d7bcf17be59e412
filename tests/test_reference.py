"""The ground truth itself: gradients against finite differences, and the log-softmax identity."""
import pytest
import torch
from torch.autograd import gradcheck

from spot_kernels import reference


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_float64(softcap, temperature):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 1])

    def f(h, w, b):
        return reference.token_logprobs(h, w, t, b, temperature=temperature, softcap=softcap,
                                        compute_dtype=torch.float64, return_entropy=True)

    assert gradcheck(f, (h, w, b))


def test_matches_explicit_softmax():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 3, dtype=torch.float64, generator=g)
    w = torch.randn(9, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 8, 4, -100, 2, 2])
    logp, ent = reference.token_logprobs(h, w, t, compute_dtype=torch.float64,
                                         return_entropy=True)
    z = h @ w.T
    p = z.exp() / z.exp().sum(1, keepdim=True)
    for i in range(6):
        expect = 0.0 if t[i] < 0 else torch.log(p[i, t[i]]).item()
        assert logp[i].item() == pytest.approx(expect, abs=1e-12)
        assert ent[i].item() == pytest.approx(-(p[i] * p[i].log()).sum().item(), abs=1e-12)


def test_sequence_loop():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    cu = torch.tensor([0, 2, 2, 5])
    valid = torch.tensor([True, False, True, True, False])
    assert reference.sequence_logprobs(x, cu).tolist() == [3.0, 0.0, 12.0]
    assert reference.sequence_logprobs(x, cu, valid, average=True).tolist() == [1.0, 0.0, 3.5]
