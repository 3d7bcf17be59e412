"""Bad input gets a clear TypeError/ValueError that names the argument (README, Usage)."""
import pytest
import torch

import spot_kernels as sk

from conftest import dispatched

N, D, V = 6, 8, 11


def head(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden=torch.randn(N, D, generator=g), weight=torch.randn(V, D, generator=g),
              targets=torch.randint(0, V, (N,), generator=g))
    kw.update(over)
    return kw


def call_logprobs(**over):
    kw = head(**over)
    return sk.token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def call_sequence(**over):
    kw = dict(token_logps=torch.randn(N), cu_seqlens=torch.tensor([0, 2, 6]))
    kw.update(over)
    return sk.sequence_logprobs(kw.pop("token_logps"), kw.pop("cu_seqlens"), **kw)


def call_bce(**over):
    kw = dict(policy_logps=torch.randn(4), ref_logps=torch.randn(4),
              labels=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    kw.update(over)
    return sk.bce_reward_loss(kw.pop("policy_logps"), kw.pop("ref_logps"), kw.pop("labels"), **kw)


def call_spot(**over):
    kw = head()
    kw.update(cu_seqlens=torch.tensor([0, 1, 3, 4, 6]), ref_logps=torch.randn(4),
              labels=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    kw.update(over)
    return sk.spot_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"),
                        kw.pop("cu_seqlens"), kw.pop("ref_logps"), kw.pop("labels"), **kw)


CASES = [
    # token_logprobs
    (call_logprobs, dict(hidden=[[1.0]]), TypeError, "hidden"),
    (call_logprobs, dict(hidden=torch.randn(N, D).double()), TypeError, "hidden"),
    (call_logprobs, dict(hidden=torch.randint(0, 3, (N, D))), TypeError, "hidden"),
    (call_logprobs, dict(weight=torch.randn(V, D).half()), TypeError, "weight"),
    (call_logprobs, dict(weight=torch.randn(V, D + 1)), ValueError, "hidden"),
    (call_logprobs, dict(weight=torch.randn(V)), ValueError, "weight"),
    (call_logprobs, dict(weight=torch.randn(0, D)), ValueError, "weight"),
    (call_logprobs, dict(hidden=torch.randn(N, 0), weight=torch.randn(V, 0)), ValueError, "D >= 1"),
    (call_logprobs, dict(targets=torch.randn(N)), TypeError, "targets"),
    (call_logprobs, dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, "targets"),
    (call_logprobs, dict(targets=torch.full((N,), V)), ValueError, "targets"),
    (call_logprobs, dict(targets=torch.full((N,), -1)), ValueError, "targets"),
    (call_logprobs, dict(targets=torch.full((N,), -100), ignore_index=-1), ValueError, "targets"),
    # uint8 targets: 156 is -100 wrapped to 8 bits, still no id of a V = 11 vocabulary
    (call_logprobs, dict(targets=torch.full((N,), 156, dtype=torch.uint8)), ValueError, "targets"),
    (call_logprobs, dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (call_logprobs, dict(bias=torch.randn(V).double()), TypeError, "bias"),
    (call_logprobs, dict(temperature=0.0), ValueError, "temperature"),
    (call_logprobs, dict(temperature=float("nan")), ValueError, "temperature"),
    (call_logprobs, dict(softcap=-1.0), ValueError, "softcap"),
    (call_logprobs, dict(ignore_index=1.5), TypeError, "ignore_index"),
    (call_logprobs, dict(ignore_index=2**63), ValueError, "ignore_index"),
    (call_logprobs, dict(ignore_index=-2**63 - 1), ValueError, "ignore_index"),
    (call_logprobs, dict(backend="nope"), ValueError, "backend"),
    (call_logprobs, dict(backend="torch", backend_options={"bogus": 1}), ValueError,
     "backend_options"),
    (call_logprobs, dict(backend="torch", backend_options={"token_chunk": 0}), ValueError,
     "token_chunk"),
    (call_logprobs, dict(hidden=torch.randn(N, D, device="meta")), ValueError, "device"),
    # sequence_logprobs
    (call_sequence, dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    (call_sequence, dict(cu_seqlens=torch.tensor([1, 6])), ValueError, "cu_seqlens"),
    (call_sequence, dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
    (call_sequence, dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    (call_sequence, dict(cu_seqlens=torch.tensor([[0, 6]])), ValueError, "cu_seqlens"),
    (call_sequence, dict(token_logps=torch.randn(N, 1)), ValueError, "token_logps"),
    (call_sequence, dict(valid=torch.ones(N)), TypeError, "valid"),
    (call_sequence, dict(valid=torch.ones(N + 1, dtype=torch.bool)), ValueError, "valid"),
    # bce_reward_loss
    (call_bce, dict(beta=0.0), ValueError, "beta"),
    (call_bce, dict(beta=-0.1), ValueError, "beta"),
    (call_bce, dict(beta=torch.tensor([[0.1]])), ValueError, "beta"),
    (call_bce, dict(policy_logps=None), TypeError, "policy_logps"),
    (call_bce, dict(ref_logps=None), TypeError, "ref_logps"),
    (call_bce, dict(labels=None), TypeError, "labels"),
    (call_bce, dict(labels=torch.tensor([1.0, 2.0, 0.0, 0.0])), ValueError, "labels"),
    (call_bce, dict(labels=torch.tensor([1.0, -0.5, 0.0, 0.0])), ValueError, "labels"),
    (call_bce, dict(labels=torch.tensor([1.0, 0.0])), ValueError, "labels"),
    (call_bce, dict(ref_logps=torch.randn(3)), ValueError, "ref_logps"),
    (call_bce, dict(reduction="avg"), ValueError, "reduction"),
    (call_bce, dict(delta=float("inf")), ValueError, "delta"),
    (call_bce, dict(delta=torch.zeros(2)), ValueError, "delta"),
    (call_bce, dict(delta=True), ValueError, "delta"),
    (call_bce, dict(delta=torch.tensor(True)), ValueError, "delta"),
    (call_bce, dict(policy_logps=torch.randn(3), ref_logps=torch.randn(3),
                    labels=torch.tensor([1.0, 0.0, 1.0])), ValueError, "pairs"),
    # spot_loss
    (call_spot, dict(cu_seqlens=torch.tensor([0, 1, 3, 4, 5])), ValueError, "cu_seqlens"),
    (call_spot, dict(ref_logps=torch.randn(3)), ValueError, "ref_logps"),
    (call_spot, dict(labels=torch.tensor([1.0, 1.0, 0.0, 3.0])), ValueError, "labels"),
    (call_spot, dict(beta=0), ValueError, "beta"),
    (call_spot, dict(ref_logps=None), TypeError, "ref_logps"),
    (call_spot, dict(labels=None), TypeError, "labels"),
    (call_spot, dict(ref_logps=torch.randn(4, device="meta")), ValueError, "ref_logps"),
    (call_spot, dict(labels=torch.tensor([1.0, 1.0, 0.0, 0.0], device="meta")), ValueError,
     "labels"),
    (call_spot, dict(targets=torch.full((N,), V + 3)), ValueError, "targets"),
]


@pytest.mark.parametrize("fn,over,exc,name", CASES,
                         ids=[f"{c[0].__name__[5:]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_named(fn, over, exc, name):
    with pytest.raises(exc) as info:
        fn(**over)
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


def test_good_inputs_pass():
    call_logprobs()
    call_sequence()
    call_bce()
    call_bce(beta=torch.tensor(0.1))
    call_spot()


def test_freed_storage_weight_is_named():
    """A view whose storage was freed (what FSDP1 leaves outside its forward) is a ValueError."""
    w = torch.randn(V, D)
    w.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="weight has no storage"):
        call_logprobs(weight=w)


def _host_reads(fn):
    """The ops of ``fn`` that copy a value to the host (``.item()``, ``bool()`` of a tensor):
    on a GPU each one waits for the device."""
    return dispatched(fn, lambda name, args, kwargs: name if name == "_local_scalar_dense"
                      else None)[1]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_value_checks_off_reads_no_value_and_trusts_it(backend):
    """``value_checks(False)`` skips the checks that read values (targets, labels,
    ``cu_seqlens``): a whole ``spot_loss`` step, forward and backward, then copies nothing to
    the host, and gives the same loss; with the checks on, the same step reads values, and bad
    values raise."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (12,), generator=g)
    cu, ref = torch.tensor([0, 3, 7, 9, 12]), torch.randn(4, generator=g) - 10
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])

    def step():
        out = sk.spot_loss(h, w, t, cu, ref, labels, backend=backend)
        out.loss.backward()
        return out.loss.detach()

    loss_on = step()
    assert _host_reads(step)  # the checks read the targets and the labels
    with sk.value_checks(False):
        assert _host_reads(step) == []
        assert torch.equal(step(), loss_on)
        # trusted, not checked: a label of 2 is used as given, cu_seqlens are not read
        sk.spot_loss(h, w, t, cu, ref, torch.tensor([2.0, 0.0, 1.0, 0.0]), backend=backend)
        from spot_kernels import _checks
        assert _checks.cu_seqlens(torch.tensor([1, 0, 7]), 5, "cpu") == 2
    with pytest.raises(ValueError, match="labels"):
        sk.spot_loss(h, w, t, cu, ref, torch.tensor([2.0, 0.0, 1.0, 0.0]), backend=backend)


def test_value_checks_are_restored_and_per_thread():
    """The switch ends with its block, also when the block raises, and holds only in the
    thread that set it."""
    import threading
    bad = dict(targets=torch.full((N,), V))
    seen = []
    with pytest.raises(RuntimeError, match="inside"):
        with sk.value_checks(False):
            worker = threading.Thread(target=lambda: seen.append(
                pytest.raises(ValueError, call_logprobs, **bad)))
            worker.start()
            worker.join()
            raise RuntimeError("inside")
    assert len(seen) == 1  # the other thread still checked its targets
    with pytest.raises(ValueError, match="targets"):
        call_logprobs(**bad)


def test_numpy_integers_and_option_mappings():
    """A NumPy integer is an int for ``ignore_index``; ``backend_options`` that is not a
    mapping is a TypeError that names it (``dict("abc")``'s own message before)."""
    import numpy as np
    h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([1, 2, -100, 3, 4])
    want = sk.token_logprobs(h, w, t, backend="torch")
    torch.testing.assert_close(sk.token_logprobs(h, w, t, ignore_index=np.int64(-100),
                                                 backend="torch"), want)
    with pytest.raises(TypeError, match="backend_options must be a dict, got str"):
        sk.token_logprobs(h, w, t, backend="torch", backend_options="token_chunk=4")


def test_the_reference_sums_skip_ignored_minus_infinity():
    """``reference.sequence_logprobs`` (the tests' ground truth) leaves an ignored position out
    of the sum: a -inf there gave NaN (``-inf * 0``)."""
    from spot_kernels import reference
    logp = torch.tensor([-1.0, float("-inf"), -2.0, -0.5])
    valid = torch.tensor([True, False, True, True])
    cu = torch.tensor([0, 3, 4])
    torch.testing.assert_close(reference.sequence_logprobs(logp, cu, valid),
                               torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(sk.sequence_logprobs(logp, cu, valid=valid),
                               torch.tensor([-3.0, -0.5]))
