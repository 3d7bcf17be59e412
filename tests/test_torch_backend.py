"""The chunked torch backend's memory promise, watched op by op: no tensor it allocates in
forward or backward is larger than one ``token_chunk x vocab_chunk`` block."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import spot_kernels as sk
from spot_kernels import torch_backend
from conftest import float64_truth, make_head


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.numel() > self.largest:
                self.largest, self.shape = x.numel(), tuple(x.shape)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_largest_tensor_is_one_block(dtype):
    n, d, v = 512, 16, 4096
    h, w, b, t = make_head(n, d, v, dtype, "cpu", bias=True)
    h.requires_grad_()
    w.requires_grad_()
    opts = {"token_chunk": 128, "vocab_chunk": 512}
    with LargestOutput() as mode:
        logp = sk.token_logprobs(h, w, t, bias=b, backend="torch", softcap=5.0,
                                 backend_options=opts)
        logp.sum().backward()
    block = 128 * 512
    assert mode.largest <= max(block, v * d), (mode.largest, mode.shape)
    assert mode.largest * 16 <= n * v  # a wide margin below the logits we avoid
    # the same watcher sees the reference materialise them: the test can fail
    with LargestOutput() as mode:
        sk.token_logprobs(h, w, t, bias=b, backend="reference").sum().backward()
    assert mode.largest >= n * v


def test_default_block_is_about_64_mb():
    for n, v in [(16384, 151936), (7, 151936), (100000, 50), (1, 1)]:
        tc, vc = torch_backend.chunk_sizes(n, v)
        assert tc * vc * 4 <= 64 * 2**20
        assert tc <= max(n, 1) and vc <= max(v, 1)
    tc, vc = torch_backend.chunk_sizes(16384, 151936)
    assert tc * vc * 4 >= 32 * 2**20  # uses the budget, not a sliver of it
    assert torch_backend.chunk_sizes(100, 1000, block_bytes=4000) == (1, 1000)
    assert torch_backend.chunk_sizes(100, 1000, token_chunk=10) == (10, 1000)
    assert torch_backend.chunk_sizes(100, 1000, vocab_chunk=10) == (100, 10)


@pytest.mark.parametrize("opts", [{"token_chunk": 5}, {"vocab_chunk": 7}, {"block_bytes": 64},
                                  {"token_chunk": 3, "vocab_chunk": 1000}])
def test_chunking_does_not_change_results(opts):
    h, w, b, t = make_head(19, 16, 53, torch.float32, "cpu", bias=True, seed=2)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    a = sk.token_logprobs(leaves[0], leaves[1], t, bias=leaves[2], backend="torch",
                          temperature=0.7, softcap=4.0, backend_options=opts)
    ga = torch.autograd.grad(a.sum(), leaves)
    leaves2 = [x.clone().requires_grad_() for x in (h, w, b)]
    c = sk.token_logprobs(leaves2[0], leaves2[1], t, bias=leaves2[2], backend="torch",
                          temperature=0.7, softcap=4.0)
    gc = torch.autograd.grad(c.sum(), leaves2)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_frozen_head_and_no_grad():
    h, w, _, t = make_head(11, 16, 30, torch.float32, "cpu")
    h.requires_grad_()
    logp = sk.token_logprobs(h, w, t, backend="torch")
    (gh,) = torch.autograd.grad(logp.sum(), h)
    assert gh.shape == h.shape and w.grad is None
    with torch.no_grad():
        assert sk.token_logprobs(h, w, t, backend="torch").grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_blocks_match_reused_buffers(dtype, monkeypatch):
    """Where the GEMM cannot write into the reused float32 buffers (half inputs on a GPU), each
    block is a new tensor: both ways give the same values and gradients, entropy and softcap
    (the backward's second block) included."""
    h, w, b, t = make_head(37, 16, 300, dtype, "cpu", bias=True, seed=5)
    opts = {"token_chunk": 16, "vocab_chunk": 128}

    def run():
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        logp, ent = sk.token_logprobs(leaves[0], leaves[1], t, bias=leaves[2], backend="torch",
                                      temperature=0.8, softcap=3.0, return_entropy=True,
                                      backend_options=opts)
        return (logp, ent) + torch.autograd.grad(logp.sum(), leaves)

    reused = run()
    monkeypatch.setattr(torch_backend, "_buffer", lambda *args, **kwargs: None)
    fresh = run()
    for x, y in zip(reused, fresh):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    truth = float64_truth(h, w, t, b, torch.ones(t.shape), temperature=0.8, softcap=3.0)
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fresh[0].double(), truth[0], **tol)
    torch.testing.assert_close(fresh[2].double(), truth[2], **tol)


def test_split_lse_keeps_what_float32_rounds_off():
    """``split_lse``: hi + lo recovers a float64 lse to ~1e-7 where hi alone is off by up to
    ulp(300) / 2 = 1.5e-5; infinite rows keep their value in hi; a device without float64
    (MPS) keeps a float32 lse, split into itself and 1."""
    lse = 300.0 + torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hi, scale = torch_backend.split_lse(lse)
    assert hi.dtype == scale.dtype == torch.float32
    assert (hi.double() - lse).abs().max() > 1e-6  # what a float32 lse loses
    assert (hi.double() - scale.double().log() - lse).abs().max() < 2e-7
    hi, scale = torch_backend.split_lse(torch.tensor([float("inf"), float("nan")],
                                                     dtype=torch.float64))
    assert hi[0] == float("inf") and hi[1].isnan() and torch.equal(scale, torch.ones(2))
    assert torch_backend.lse_dtype("mps") == torch.float32
    assert torch_backend.lse_dtype("cpu") == torch_backend.lse_dtype("cuda") == torch.float64
    lse32 = torch.tensor([1.5, -2.0])
    hi, scale = torch_backend.split_lse(lse32)
    assert torch.equal(hi, lse32) and torch.equal(scale, torch.ones(2))
