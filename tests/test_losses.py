"""Sequence sums and SPoT's BCE loss: against a Python loop, against TRL's ``bco_pair`` formula
written out independently here, and ``spot_loss`` against the composition of the public parts."""
import pytest
import torch
import torch.nn.functional as F

import spot_kernels as sk
from spot_kernels import reference
from conftest import assert_close, dispatched, make_head


def random_cu(n, s, g):
    cuts = torch.sort(torch.randint(0, n + 1, (s - 1,), generator=g)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sequence_logprobs_against_loop(average, index_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    cu = random_cu(50, 9, g).to(index_dtype)
    cu[3] = cu[2]  # an empty sequence
    valid = torch.rand(50, generator=g) > 0.3
    valid[cu[4]:cu[5]] = False  # a sequence with no counted token
    ours = sk.sequence_logprobs(x, cu, valid=valid, average=average)
    expect = reference.sequence_logprobs(x, cu, valid, average)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), expect, rtol=1e-6, atol=1e-6)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((ours.double() * w).sum(), x)
    (ex,) = torch.autograd.grad((expect * w).sum(), x)
    torch.testing.assert_close(gx, ex, rtol=1e-6, atol=1e-6)
    assert sk.sequence_logprobs(x[:0], torch.tensor([0]), average=average).shape == (0,)


def trl_bco_pair(pc, pr, rc, rr, beta, delta):
    """TRL's bco_pair on a batch of pairs, written from its definition."""
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    stats = {
        "rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
        "accuracy": (chosen_rewards > rejected_rewards).double().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "logps_chosen": pc.mean(), "logps_rejected": pr.mean(),
        "reward_mean": torch.cat([chosen_rewards, rejected_rewards]).mean(),
    }
    return losses.mean(), stats


@pytest.mark.parametrize("delta", [0.0, 0.37, "tensor"])
def test_bce_matches_trl_bco_pair(delta):
    g = torch.Generator().manual_seed(1)
    p = 8
    policy = (torch.randn(2 * p, generator=g, dtype=torch.float64) * 20 - 100).requires_grad_()
    ref = policy.detach() + torch.randn(2 * p, generator=g, dtype=torch.float64) * 5
    labels = torch.cat([torch.ones(p), torch.zeros(p)])
    d = torch.tensor(-0.2) if delta == "tensor" else delta
    loss, stats = sk.bce_reward_loss(policy, ref, labels, beta=0.1, delta=d)
    expect, ex_stats = trl_bco_pair(policy[:p], policy[p:], ref[:p], ref[p:], 0.1, float(d))
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-7)
    (ours_g,) = torch.autograd.grad(loss, policy)
    (trl_g,) = torch.autograd.grad(expect, policy)
    torch.testing.assert_close(ours_g.double(), trl_g, rtol=1e-5, atol=1e-8)
    # the closed form (README, The math): dL/dpi = beta (sigmoid(u) - y) / K
    u = 0.1 * (policy.detach() - ref) - float(d)
    torch.testing.assert_close(ours_g.double(), 0.1 * (torch.sigmoid(u) - labels.double()) / p,
                               rtol=1e-5, atol=1e-8)
    for key, value in ex_stats.items():
        torch.testing.assert_close(stats[key].double(), value.detach(), rtol=1e-5, atol=1e-6,
                                   msg=key)
    torch.testing.assert_close(stats["rewards"].double(), 0.1 * (policy.detach() - ref),
                               rtol=1e-5, atol=1e-6)
    sig = torch.sigmoid(u)
    assert stats["saturated"].item() == pytest.approx(((sig < 0.01) | (sig > 0.99)).double().mean().item())
    assert not any(v.requires_grad for v in stats.values())


@pytest.mark.parametrize("reduction,k", [("pairs", 3.0), ("mean", 6.0), ("sum", 1.0)])
def test_bce_reductions_and_soft_labels(reduction, k):
    g = torch.Generator().manual_seed(2)
    policy = torch.randn(6, generator=g, dtype=torch.float64) * 10
    ref = torch.randn(6, generator=g, dtype=torch.float64) * 10
    labels = torch.rand(6, generator=g, dtype=torch.float64)
    loss, _ = sk.bce_reward_loss(policy, ref, labels, beta=0.5, delta=0.1, reduction=reduction)
    u = 0.5 * (policy - ref) - 0.1
    expect = F.binary_cross_entropy_with_logits(u, labels, reduction="sum") / k
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-7)


def test_bce_empty_batch_and_saturation():
    loss, stats = sk.bce_reward_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert loss.item() == 0.0
    # huge margins saturate the sigmoid without overflowing the loss
    loss, stats = sk.bce_reward_loss(torch.tensor([1e5, -1e5]), torch.zeros(2),
                                     torch.tensor([0.0, 1.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2e4, rel=1e-6)
    assert stats["saturated"].item() == 1.0
    # saturation is of the loss's sigmoid, delta included: u = 0.1 * 100 - 10 = 0 is not
    _, stats = sk.bce_reward_loss(torch.tensor([100.0, 100.0]), torch.zeros(2),
                                  torch.tensor([1.0, 0.0]), beta=0.1, delta=10.0)
    assert stats["saturated"].item() == 0.0


def test_a_soft_label_of_one_half_counts_as_chosen_in_the_stats():
    """The stats split the batch at label >= 0.5 (the documented rule for soft labels)."""
    pi, rho = torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([-3.0, -3.0, -3.0])
    _, stats = sk.bce_reward_loss(pi, rho, torch.tensor([1.0, 0.5, 0.0]), beta=1.0,
                                  reduction="mean")
    assert stats["rewards_chosen"].item() == pytest.approx((2.0 + 1.0) / 2)
    assert stats["rewards_rejected"].item() == pytest.approx(-1.0)


@pytest.mark.parametrize("average", [False, True])
def test_spot_loss_equals_composition(backend, device, average):
    h, w, b, t = make_head(41, 24, 77, torch.float32, device, bias=True, scale=2.0, seed=11)
    cu = torch.tensor([0, 7, 15, 30, 35, 41], device=device)
    t[15:30] = -100  # one sequence with no counted token
    ref = torch.randn(5, device=device) - 30
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5], device=device)
    kw = dict(bias=b, temperature=0.9, softcap=10.0)
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    out = sk.spot_loss(*leaves, t, cu, ref, labels, beta=0.2, delta=0.05, average=average,
                       reduction="mean", backend=backend, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    leaves2 = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    logp = sk.token_logprobs(*leaves2, t, backend=backend, **kw)
    pi = sk.sequence_logprobs(logp, cu, valid=t != -100, average=average)
    loss, stats = sk.bce_reward_loss(pi, ref, labels, beta=0.2, delta=0.05, reduction="mean")
    grads2 = torch.autograd.grad(loss, leaves2)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.policy_logps, pi)
    torch.testing.assert_close(out.rewards, stats["rewards"])
    for a, c in zip(grads, grads2):
        torch.testing.assert_close(a, c)
    # and both against the float64 truth
    leaves64 = [x.double().requires_grad_() for x in (h, w)]
    logp64 = reference.token_logprobs(*leaves64, t, b.double(), temperature=0.9, softcap=10.0,
                                      compute_dtype=torch.float64)
    pi64 = reference.sequence_logprobs(logp64, cu, t != -100, average)
    u = 0.2 * (pi64 - ref.double()) - 0.05
    y = labels.double()
    loss64 = (y * F.softplus(-u) + (1 - y) * F.softplus(u)).mean()
    g64 = torch.autograd.grad(loss64, leaves64)
    assert_close(out.loss, loss, loss64, torch.float32, "loss")
    for name, a, tr in zip(("dh", "dW"), grads, g64):
        assert_close(a, a, tr, torch.float32, name, atol=1e-5)


def test_spot_loss_callable_delta_sees_the_batch_first():
    """A callable ``delta`` receives this batch's mean reward before the loss uses its value,
    as TRL's RunningMoments update does for ``bco_pair``."""
    h, w, _, t = make_head(20, 16, 40, torch.float32, "cpu", seed=12)
    cu = torch.tensor([0, 5, 10, 15, 20])
    ref = torch.randn(4) - 20
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    seen = []

    def running(batch_mean):
        seen.append(batch_mean)
        return 0.5 * batch_mean  # any function of the current batch

    out = sk.spot_loss(h, w, t, cu, ref, labels, beta=0.3, delta=running, backend="torch")
    pi = out.policy_logps.detach()
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], (0.3 * (pi - ref)).mean())
    expect, _ = sk.bce_reward_loss(pi, ref, labels, beta=0.3, delta=0.5 * seen[0].item())
    torch.testing.assert_close(out.loss, expect)
    with pytest.raises(ValueError, match="delta"):
        sk.spot_loss(h, w, t, cu, ref, labels, delta=lambda m: float("nan"), backend="torch")
    # no sequences: no batch mean (it would be NaN), so the running estimate is not called
    seen.clear()
    out = sk.spot_loss(h[:0], w, t[:0], torch.tensor([0]), ref[:0], labels[:0], delta=running,
                       reduction="mean", backend="torch")
    assert seen == [] and out.loss.item() == 0.0


def test_bce_stats_pair_in_batch_order_with_unequal_counts():
    """Interleaved labels, more rejected than chosen: the i-th chosen pairs with the i-th
    rejected, in batch order, as a loop over the two lists does."""
    g = torch.Generator().manual_seed(5)
    for labels in ([0, 1, 0, 0, 1, 0, 1], [1, 1, 1, 0], [0, 0], [1]):
        labels = torch.tensor(labels, dtype=torch.float64)
        s = labels.numel()
        policy = torch.randn(s, generator=g, dtype=torch.float64) * 10
        ref = torch.randn(s, generator=g, dtype=torch.float64) * 10
        _, stats = sk.bce_reward_loss(policy, ref, labels, beta=0.3, reduction="mean")
        r = (0.3 * (policy - ref)).tolist()
        rc = [x for x, y in zip(r, labels) if y == 1]
        rr = [x for x, y in zip(r, labels) if y == 0]
        pairs = list(zip(rc, rr))
        nan = float("nan")
        want = {
            "rewards_chosen": sum(rc) / len(rc) if rc else nan,
            "rewards_rejected": sum(rr) / len(rr) if rr else nan,
            "accuracy": sum(a > b for a, b in pairs) / len(pairs) if pairs else nan,
            "margin": sum(a - b for a, b in pairs) / len(pairs) if pairs else nan,
            "logps_chosen": policy[labels == 1].mean().item() if rc else nan,
            "logps_rejected": policy[labels == 0].mean().item() if rr else nan,
        }
        for key, value in want.items():
            assert stats[key].item() == pytest.approx(value, rel=1e-5, nan_ok=True), (key, labels)


@pytest.fixture(params=["torch", "cuda"])
def tail(request):
    """The two tails of ``spot_loss``: plain torch, and the cuda backend's kernels (their host
    build on the CPU)."""
    if request.param == "torch":
        return sk.losses
    request.getfixturevalue("cuda_host")
    from spot_kernels import cuda
    return cuda


def _tail_ops(tail):
    """The ops (name, args) the O(N + S) part of the loss runs (sequence sums, the BCE and its
    stats, their backward), seen on the CPU through the dispatcher, which records the same ops
    as on CUDA."""
    g = torch.Generator().manual_seed(6)
    tokens = torch.randn(40, generator=g, requires_grad=True)
    cu = torch.tensor([0, 7, 15, 22, 40])
    valid = torch.rand(40, generator=g) > 0.2
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    def run():
        pi = tail.sequence_logprobs(tokens, cu, valid, average=True)
        loss, stats = tail.bce_reward_loss(pi, torch.zeros(4), labels, beta=0.2, delta=0.1)
        loss.backward()
        return stats

    stats, seen = dispatched(run)
    assert torch.isfinite(stats["accuracy"]) and tokens.grad.abs().sum() > 0
    return seen


def test_spot_loss_tail_has_no_op_that_waits_for_the_device(tail):
    """No op whose output size or value the host must read from a GPU (``nonzero``, boolean
    indexing, ``.item()``...): on CUDA each would stall the stream every step."""
    syncing = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2",
               "masked_scatter", "repeat_interleave"}
    bad = [name for name, args in _tail_ops(tail)
           if name in syncing or (name.startswith("index") and any(
               isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                         else [])))]
    assert not bad, bad


def test_spot_loss_tail_adds_without_float_atomics(tail):
    """No op that sums floats through atomics on CUDA (``torch.use_deterministic_algorithms``
    lists them), so the sums' order, and so the loss's last bits, cannot change from run to
    run: ``index_add`` here made every deterministic backend's ``spot_loss`` vary."""
    atomic = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce",
              "scatter_reduce_", "index_put", "index_put_", "_index_put_impl_", "put_",
              "index_reduce", "index_reduce_", "cumsum", "cumsum_", "embedding_dense_backward"}
    bad = [name for name, _ in _tail_ops(tail) if name in atomic]
    assert not bad, bad
