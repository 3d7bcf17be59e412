"""``spot_kernels._gemm``: the sweeps of the blockwise backward (``plan``) and the gradients
``blockwise_backward`` builds from them, with a float64 torch ``fill`` standing in for the
backends' dA kernels (whose own tests run the same code through their kernels)."""
import random

import pytest
import torch

from spot_kernels import _gemm
from conftest import float64_truth, make_head


def _covered(rows, cols, n, v):
    """How often each (token, vocabulary) pair falls in one of the blocks ``rows x cols``."""
    hits = torch.zeros(n, v, dtype=torch.int32)
    for rs in rows:
        for cs in cols:
            hits[rs, cs] += 1
    return hits


def test_plan_tiles_every_pair_once_per_gradient_within_the_budget():
    rng = random.Random(5)
    seen = set()
    for _ in range(400):
        n, v, d = rng.randint(1, 90), rng.randint(1, 90), rng.randint(1, 40)
        itemsize = rng.choice((2, 4))
        align = (rng.choice((1, 4, 16)), rng.choice((1, 8, 16)))
        needs = (rng.random() < 0.8, rng.random() < 0.8, rng.random() < 0.5)
        if not any(needs):
            continue
        budget = rng.randint(1, 3 * (n * v * itemsize + 8 * d * min(n, v)))
        f32 = rng.random() < 0.3  # dh asked for in float32: its sum is the output, not extra
        sweeps = _gemm.plan(n, v, d, itemsize, needs, budget, align, dh_float32=f32)
        assert 1 <= len(sweeps) <= 2
        for k, want in enumerate(needs):  # each gradient comes from exactly one sweep
            assert sum(s[2][k] for s in sweeps) == want
        for rows, cols, wants in sweeps:
            assert (_covered(rows, cols, n, v) == 1).all()
            # chunks are whole multiples of the alignment (the last may be ragged)
            for chunk, a, total in ((rows, align[0], n), (cols, align[1], v)):
                assert all(s.start % a == 0 for s in chunk)
                assert all((s.stop - s.start) % a == 0 for s in chunk if s.stop != total)
            # the float32 sums: dh (N x D) when a sweep has several vocabulary chunks, dW
            # (V x D) when several token chunks; only the smaller side, only with both needed
            summed = (4 * n * d if wants[0] and len(cols) > 1 else 0) + \
                     (4 * v * d if wants[1] and len(rows) > 1 else 0)
            block = (rows[0].stop - rows[0].start) * (cols[0].stop - cols[0].start) * itemsize
            # the smallest block of the sweep's orientation (one aligned chunk)
            least = (n * min(align[1], v) if len(cols) > 1 else
                     min(align[0], n) * v if len(rows) > 1 else n * v) * itemsize
            if summed:
                assert wants[0] and wants[1] and summed == 4 * d * min(n, v)
            # float32 inputs, or a float32 dh: the sum is the gradient
            extra = 0 if itemsize == 4 or (f32 and summed == 4 * n * d) else summed
            if extra:
                assert extra <= budget / 2 and extra + block <= budget, (n, v, d, budget, sweeps)
            else:
                assert block <= max(budget, least), (n, v, d, budget, sweeps)
        # two sweeps exactly when both gradient sides are needed, not all of [N, V] fits in one
        # block, and the half-precision sum leaves no room: over half the budget, or no space
        # for one aligned chunk of the orientation that sums it
        acc = 4 * d * min(n, v)
        least1 = itemsize * (n * min(align[1], v) if n <= v else min(align[0], n) * v)
        two = (needs[0] and needs[1] and itemsize == 2 and not (f32 and n <= v)
               and n * v * itemsize > budget and (2 * acc > budget or least1 > budget - acc))
        assert (len(sweeps) == 2) == two, (n, v, d, itemsize, align, needs, budget, sweeps)
        seen.add((len(sweeps), bool(summed)))
    assert seen >= {(1, True), (1, False), (2, False)}, seen  # every regime was drawn


def test_plan_forced_token_chunks():
    sweeps = _gemm.plan(50, 30, 8, 2, (True, True, True), 10**9, rows_per_block=7)
    assert len(sweeps) == 1
    rows, cols, wants = sweeps[0]
    assert [s.stop - s.start for s in rows] == [7] * 7 + [1] and cols == [slice(0, 30)]


def _torch_fill(calls):
    """A ``fill`` in float64 torch: ``dA = g (onehot(t) - p)``, no softcap or temperature."""
    def fill(block, h, w, b, t, rowwise, g):
        (lse,) = rowwise
        z = h.double() @ w.double().t() + (0 if b is None else b.double())
        da = -torch.exp(z - lse.double()[:, None])
        hit = (t >= 0) & (t < w.shape[0])
        da[hit, t[hit]] += 1
        block.copy_(g.double()[:, None] * da)
        calls.append(tuple(block.shape))
    return fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,v", [(40, 70), (70, 40)], ids=["n<v", "n>v"])
@pytest.mark.parametrize("regime", ["one-block", "one-sweep", "two-sweeps", "dh-only",
                                    "dh-db", "dW-only"])
def test_blockwise_backward_matches_float64_in_every_regime(dtype, n, v, regime, monkeypatch):
    d = 8  # small enough that one sweep with a float32 sum needs no more than the logits
    h, w, b, t = make_head(n, d, v, dtype, "cpu", bias=True, scale=2.0, seed=n + v)
    t[3] = 5
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    truth = float64_truth(h, w, t, b, g=g, ignore_index=5)
    lse = truth[1]
    size = dtype.itemsize
    acc = 4 * d * min(n, v)
    needs, budget = {
        "one-block": ((True, True, True), n * v * size),
        "one-sweep": ((True, True, True), 2 * acc + n * v * size // 2),
        "two-sweeps": ((True, True, True), 2 * acc - 1),
        "dh-only": ((True, False, False), 9 * v * size),
        "dh-db": ((True, False, True), 9 * v * size),  # a frozen head with a trained bias
        "dW-only": ((False, True, True), 9 * n * size),
    }[regime]
    summed = []
    real = _gemm._output
    monkeypatch.setattr(_gemm, "_output", lambda like, s: summed.append(s) or real(like, s))
    calls = []
    grads = _gemm.blockwise_backward(h, w, t, b, (lse,), g, 5, needs, budget, _torch_fill(calls))
    blocks = {shape[0] * shape[1] * size for shape in calls}
    for k, (ours, want, name) in enumerate(zip(grads, truth[2:], ("dh", "dW", "db"))):
        if not needs[k]:
            assert ours is None
            continue
        like = (h, w, b)[k]
        assert ours.dtype == like.dtype and ours.shape == like.shape
        # dA and the gradient each rounded once to the dtype, float32 sums in between
        tol = (1e-6 if dtype == torch.float32 else 2.0**-7) * max(1.0, want.abs().max().item())
        err = (ours.double() - want).abs().max().item()
        assert err <= tol, (name, err, tol)
    if regime == "one-block":
        assert calls == [(n, v)] and not any(summed)
    elif regime == "one-sweep":
        assert summed.count(True) == 1 and len({c[0] == n for c in calls}) == 1
    elif regime == "two-sweeps" and dtype == torch.float32:  # the sum is the gradient: free
        assert summed.count(True) == 1 and max(blocks) <= budget
        return
    else:  # no float32 N x D or V x D sums; every block within the budget
        assert not any(summed) and max(blocks) <= budget
        full_rows = {c for c in calls if c[0] == n}
        full_cols = {c for c in calls if c[1] == v}
        frozen = regime.startswith("dh")
        assert full_rows if not frozen else not full_rows - full_cols
        assert full_cols if regime != "dW-only" else not full_cols - full_rows
    if regime == "two-sweeps":  # each (token, vocabulary) pair recomputed once per sweep
        assert sum(r * c for r, c in calls) == 2 * n * v


@pytest.mark.parametrize("n,v", [(40, 70), (70, 40)], ids=["n<v", "n>v"])
def test_float32_dh_is_not_budgeted_as_an_extra_sum(n, v):
    """A ``dh`` returned in float32 (``dh_float32``, the vocabulary-parallel heads) is its own
    sum: a budget too small for a half ``dh`` beside a block sweeps once with ``N <= V``, and
    the result still matches float64 (``N > V`` sums ``dW``, so two sweeps remain)."""
    d = 8
    h, w, b, t = make_head(n, d, v, torch.bfloat16, "cpu", bias=True, scale=2.0, seed=n * v)
    g = torch.randn(n, generator=torch.Generator().manual_seed(2))
    truth = float64_truth(h, w, t, b, g=g)
    budget = 2 * 4 * d * min(n, v) - 1  # the half-precision two-sweep regime above
    plain = _gemm.plan(n, v, d, 2, (True, True, True), budget)
    assert len(plain) == 2
    calls = []
    dh, dw, db = _gemm.blockwise_backward(h, w, t, b, (truth[1],), g, -100, (True, True, True),
                                          budget, _torch_fill(calls), dh_float32=True)
    sweeps = 1 if n <= v else 2
    assert sum(r * c for r, c in calls) == sweeps * n * v
    assert max(r * c * 2 for r, c in calls) <= budget
    assert dh.dtype == torch.float32 and dw.dtype == db.dtype == torch.bfloat16
    for ours, want in zip((dh, dw, db), truth[2:]):  # dA is rounded to bfloat16 in the blocks
        tol = 2.0**-7 * max(1.0, want.abs().max().item())
        assert (ours.double() - want).abs().max().item() <= tol


def test_no_tokens_gives_zero_gradients():
    h, w, b, t = make_head(0, 8, 30, torch.float32, "cpu", bias=True)
    calls = []
    dh, dw, db = _gemm.blockwise_backward(h, w, t, b, (torch.zeros(0),), torch.zeros(0), -100,
                                          (True, True, True), 1 << 20, _torch_fill(calls))
    assert calls == [] and dh.shape == (0, 8) and not dw.any() and not db.any()


def test_a_device_error_in_the_float32_output_gemm_is_raised_and_keeps_the_path(monkeypatch):
    """On a GPU, ``accumulate`` falls back for good from ``addmm(out_dtype=float32)`` only when
    torch lacks it (a RuntimeError / TypeError of its own); an earlier kernel's CUDA error that
    surfaces there (``torch.AcceleratorError``, or a plain RuntimeError that a 1 x 1 probe of the
    same call shows is not a missing feature) or running out of memory is raised and leaves
    the path as it was. Torch's GEMMs are stood in for: this CPU cannot run CUDA ones."""
    from types import SimpleNamespace

    from spot_kernels import _gemm
    x = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda"))
    acc = torch.zeros(2, 2)
    monkeypatch.setattr(_gemm, "_fp32_out_mm", [True])
    errors = [torch.cuda.OutOfMemoryError("out of memory")]
    if hasattr(torch, "AcceleratorError"):
        errors.append(torch.AcceleratorError("CUDA error: an illegal memory access"))
    for err in errors:
        def addmm(*a, err=err, **k):
            raise err
        monkeypatch.setattr(torch, "addmm", addmm)
        with pytest.raises(type(err)):
            _gemm.accumulate(acc, x, x)
        assert _gemm._fp32_out_mm == [True]

    # a torch without AcceleratorError: the CUDA error is a plain RuntimeError, and the 1 x 1
    # probe (here: the feature works) tells it from a missing feature
    def cuda_error(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch, "addmm", cuda_error)
    monkeypatch.setattr(_gemm, "_fp32_out_supported", lambda device, dtype: True)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _gemm.accumulate(acc, x, x)
    assert _gemm._fp32_out_mm == [True]
    monkeypatch.undo()
    monkeypatch.setattr(_gemm, "_fp32_out_mm", [True])

    def no_out_dtype(*a, **k):
        raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
    monkeypatch.setattr(torch, "addmm", no_out_dtype)
    monkeypatch.setattr(torch, "mm", lambda a, b: torch.ones(2, 2))
    _gemm.accumulate(acc, x, x)
    assert _gemm._fp32_out_mm == [False] and torch.equal(acc, torch.ones(2, 2))
