"""The Triton backend against the float64 reference (the tolerance rule of conftest), on CPU
through ``TRITON_INTERPRET=1`` with tiny shapes, and on CUDA at real sizes (``gpu`` marker).

The kernel tests force 16 x 32 x 16 tiles (``SMALL``), so the shapes below reach several
token, vocabulary and D tiles with a ragged last tile in each, at interpreter-friendly sizes.
"""
import os

import pytest
import torch

import spot_kernels as sk
from spot_kernels import _registry, reference
from conftest import GRAD_ATOL, assert_close, float64_truth, make_head, references

SMALL = {"block_m": 16, "block_v": 32, "block_d": 16}


def _device():
    if torch.cuda.is_available() and _registry.availability("triton", "cuda")[0]:
        return "cuda"
    return "cpu"


needs_triton = pytest.mark.skipif(  # where the small-shape tests run (_device): a GPU that
    # runs the kernels (sm_80+), else the CPU through the interpreter
    not _registry.availability("triton", _device())[0],
    reason=f"triton backend unavailable here: {_registry.availability('triton', _device())[1]}")


def run(h, w, t, b=None, gout=None, options=None, **kw):
    """Triton log-probs and the gradients of ``sum(logp * gout)``; small tiles unless
    ``options`` has ``"config": "default"``."""
    leaves = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_())
    opts = dict(options or {})
    if opts.pop("config", None) != "default":
        opts = {**SMALL, **opts}
    logp = sk.token_logprobs(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None,
                             backend="triton", backend_options=opts, **kw)
    grads = torch.autograd.grad((logp.double() * gout).sum(), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    return logp, grads


def check(h, w, t, b=None, options=None, **kw):
    truth, same, gout = references(h, w, t, b, **kw)
    logp, grads = run(h, w, t, b, gout, options, **kw)
    assert_close(logp, same[0], truth[0], h.dtype, "logp")
    exact = (options or {}).get("fast_grad") is False
    for name, ours, s, tr in zip(("dh", "dW", "db"), grads, same[1], truth[1]):
        assert_close(ours, s, tr, h.dtype, name, atol=None if exact else GRAD_ATOL.get(h.dtype))
    return logp, grads


def _buffers_made(monkeypatch, dtype):
    """The shapes of the 2-D ``dtype`` buffers that ``torch.empty`` makes from now on."""
    shapes = []
    empty = torch.empty

    def spy(*shape, **kw):
        out = empty(*shape, **kw)
        if kw.get("dtype") == dtype and len(out.shape) == 2:
            shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "empty", spy)
    return shapes


# --- options and availability: no kernel runs ---------------------------------------------

def test_check_options_rejects_bad_keys_and_values():
    from spot_kernels import triton as tb
    tb.check_options({"filter_eps": 1e-4, "deterministic": True, "split_vocab": 2,
                      "block_m": 32, "block_v": 64, "block_d": 16, "num_warps": 4,
                      "num_stages": 3, "group_m": 4})
    bad = [{"chunk": 3}, {"filter_eps": -1.0}, {"filter_eps": "x"}, {"deterministic": 1},
           {"split_vocab": 0}, {"split_vocab": 1.5}, {"block_m": 24}, {"block_v": 8},
           {"block_d": 2048},  # a tile over Triton's 2^20 elements
           {"num_warps": 3}, {"num_warps": True}, {"num_warps": 16.0}, {"num_stages": 0}, {"group_m": 0}, {"group_m": 2.0}]
    for opts in bad:
        with pytest.raises(ValueError, match="backend_options"):
            tb.check_options(opts)


def test_available_on_cpu_needs_the_interpreter(monkeypatch):
    from spot_kernels import triton as tb
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = tb.available(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = tb._interpreter_problem()  # an interpreter that cannot run here says why
    assert tb.available(torch.device("cpu")) == ((False, problem) if problem else (True, ""))
    assert (sk.available_backends("cpu")[0] == "triton") == (problem is None)


def test_available_on_cuda(monkeypatch):
    """On a GPU the kernels compile, on compute capability 8.0 or newer; with TRITON_INTERPRET=1
    they are interpreted there too, so an interpreter that cannot run makes them unavailable
    (``make test`` on a GPU machine leaves the interpreter off)."""
    from spot_kernels import triton as tb
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tb.available(torch.device("cuda")) == (True, "")
    cap[0] = (7, 5)
    ok, why = tb.available(torch.device("cuda"))
    assert not ok and "compute capability 8.0" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for problem in (None, "numpy too new"):
        monkeypatch.setattr(tb, "_interpreter_problem", lambda: problem)
        ok, why = tb.available(torch.device("cuda"))
        assert ok == (problem is None) and (problem is None or
                                           why.startswith("TRITON_INTERPRET=1") and problem in why)


# --- kernels, on CPU through the interpreter (or on CUDA when present) --------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ragged_tiles_bias_temperature_softcap(dtype):
    # N = 19: two token tiles; V = 45: a ragged second vocabulary tile; D = 24 > block_d = 16
    h, w, b, t = make_head(19, 24, 45, dtype, _device(), bias=True, scale=3.0, seed=1)
    check(h, w, t, b, temperature=0.7, softcap=4.0)


@needs_triton
@pytest.mark.parametrize("softcap", [1e3, 1e6, 1e30], ids=["1e3", "1e6", "1e30"])
def test_a_softcap_far_above_the_logits(softcap):
    """tanh(a / c) for |a| << c: written as (1 - e^-2x) / (1 + e^-2x) it lost every bit of
    1 - e (at c = 1e30 all logits came out 0: a uniform softmax); now float32-accurate."""
    h, w, b, t = make_head(19, 24, 45, torch.float32, _device(), bias=True, scale=3.0, seed=4)
    check(h, w, t, b, temperature=0.8, softcap=softcap)


@needs_triton
@pytest.mark.parametrize("softcap", [1e3, 1e4], ids=["1e3", "1e4"])
def test_logits_near_a_large_softcap(softcap):
    """|a / c| in [1/4, 1]: the forward's tanh and the backward's decoded one must round alike,
    or p = exp(z - lse) takes ~c 1e-7 of relative error (gradients 5e-5 to 3e-4 off at c = 1e3
    to 1e4 when the forward took (1 - e) / (1 + e), torch's float32 1e-7)."""
    h, w, b, t = make_head(19, 24, 45, torch.float32, _device(), bias=True,
                           scale=softcap / 4, seed=6)
    check(h, w, t, b, softcap=softcap)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the series' x^2 overflows at |x| = 1e30
def test_the_backwards_softcap_code_holds_tanh_and_its_slope_to_float32():
    """The backward keeps one float a logit for ``tanh(x)`` and ``1 - tanh^2(x)``
    (``tiles.softcap_code``): both come back within a few float32 ulps of float64 from
    ``|x| = 1e-30`` to ``1e30``, densely around the branch at 1/4 and over the decoded branch,
    where ``1 - t^2`` from a rounded ``t`` would lose everything past ``|x| ~ 9``. Bounds: 6
    ulps for the decoded ``tanh`` (``1 - r`` near 1/4 triples ``r``'s rounding), 4 for the
    slope; a scan of every float32 from 1e-8 to 45 found at most 4.85 and 2.97. The forward's
    ``tanh`` is the decoded one, bit for bit (the backward's recomputed logits must round as the
    forward's did). (Under the interpreter, whose ``exp`` and division are numpy's. Compiled for
    a GPU, ``tl.exp`` is ``ex2.approx`` of a rounded ``x log2(e)`` (relative error growing as
    ``|x| 2^-24``) and the division ``div.full`` (2 ulps): the bound there is ``8 + ulps``
    times ``1 + |x|``.)"""
    import triton
    from softcap_code_kernel import kernel

    g = torch.Generator().manual_seed(0)
    mag = torch.cat([torch.logspace(-30, 2, 1500, dtype=torch.float64),
                     0.2 + 0.1 * torch.rand(20000, generator=g, dtype=torch.float64),
                     0.25 + 45 * torch.rand(20000, generator=g, dtype=torch.float64),
                     torch.tensor([0.0, 0.25, 0.2513645, 0.2594666, 3.6262479, 52.0, 60.0, 1e3,
                                   1e30, float("inf")], dtype=torch.float64)])
    x = torch.cat([mag, -mag]).float().to(_device())
    n = x.numel()
    t, s, f = (torch.empty_like(x) for _ in range(3))
    kernel[(1,)](x, t, s, f, n, BLOCK=triton.next_power_of_2(n))
    x64 = x.double().cpu()
    tanh64, slope64 = torch.tanh(x64), torch.cosh(x64).pow(-2)
    eps = torch.finfo(torch.float32).eps
    compiled = x.device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
    fin = torch.isfinite(x64)
    assert torch.equal(f, t)
    for name, got, want, ulps in (("tanh", t, tanh64, 6), ("slope", s, slope64, 4)):
        err = (got.double().cpu() - want).abs()
        ulps = (8 + ulps) * (1 + x64.abs()) if compiled else ulps
        # relative where the value is a normal float32; an absolute floor below that
        bound = torch.maximum(ulps * eps * want.abs(), torch.full_like(want, 1e-38))
        worst = (torch.where(fin, err / bound, 0)).argmax()
        assert (err[fin] <= bound[fin]).all(), (name, x64[worst].item(), got[worst].item(),
                                                want[worst].item())
        assert torch.equal(got.cpu()[~fin], want[~fin].float()), name  # x = +-inf: exact


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf * 0
@pytest.mark.parametrize("mode", [{}, {"deterministic": True}, {"da_bytes": 1 << 20}],
                         ids=["atomics", "deterministic", "da_bytes"])
def test_an_infinite_hidden_state_under_a_softcap_gives_torchs_gradients(mode):
    """A softcap saturates a row of h that holds an inf (its logits are +-c / T, its slope 0),
    so torch gives that row a finite dh. The columns past V in the last vocabulary tile read
    zero W rows: inf * 0 = NaN there, which once reached dA (and dh) through the decoded slope
    (V = 45: a ragged second tile). The NaN pattern and the finite values match torch."""
    h, w, b, t = make_head(19, 24, 45, torch.float32, _device(), bias=True, seed=3)
    h[3, 5] = float("inf")
    kw = dict(softcap=4.0, temperature=0.7)
    ours = run(h, w, t, b, torch.ones(19, dtype=torch.float64, device=h.device), mode, **kw)[1]
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    want = torch.autograd.grad(sk.token_logprobs(*leaves[:2], t, bias=leaves[2], backend="torch",
                                                 **kw).double().sum(), leaves)
    assert torch.isfinite(want[0][3]).all()  # the case at hand
    for name, got, ref in zip(("dh", "dW", "db"), ours, want):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), name
        fin = ~torch.isnan(ref)
        torch.testing.assert_close(got[fin], ref[fin], atol=1e-5, rtol=1e-4, msg=name)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the overflow
def test_a_logit_that_overflows_in_one_d_chunk_stays_minus_infinity():
    """Column 7's dot overflows to -inf in its first D chunk: that logit is -inf (p = 0), as in
    torch, and the compensated float32 sum does not turn it into NaN (inf - inf)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 40, generator=g), torch.randn(20, 40, generator=g)
    h[:, :16] = 1.0
    w[7, :16] = -3e38
    h, w, t = h.to(_device()), w.to(_device()), torch.tensor([1, 2, 3, 4], device=_device())
    got = sk.token_logprobs(h, w, t, backend="triton", backend_options={"block_d": 16})
    torch.testing.assert_close(got, sk.token_logprobs(h, w, t, backend="torch"))


@needs_triton
def test_plain_and_single_token():
    h, w, _, t = make_head(19, 24, 45, torch.float32, _device(), seed=2)
    check(h, w, t)
    h1, w1, b1, t1 = make_head(1, 24, 45, torch.float32, _device(), bias=True, ignore_frac=0.0,
                               seed=3)
    check(h1, w1, t1, b1, temperature=1.5)


@needs_triton
@pytest.mark.parametrize("mode", [{}, {"da_bytes": 1 << 20}], ids=["atomics", "da_bytes"])
@pytest.mark.parametrize("group_m", [1, 4, 64, 2**30])
def test_grouped_program_order_covers_every_tile_once(group_m, mode):
    # 6 token tiles x 4 vocabulary tiles: groups of 4 leave a ragged group of 2; 1 is plain
    # vocabulary-major order, 64 (more than the tiles) plain token-major order, and so is
    # 2^30, whose product with the vocabulary tiles would overflow int32 unclipped; the default
    # backward's tiles and da_bytes's dA blocks (one block here) walk the same order
    h, w, b, t = make_head(83, 24, 100, torch.float32, _device(), bias=True, scale=2.0, seed=15)
    check(h, w, t, b, options={"group_m": group_m, **mode}, softcap=5.0)


@needs_triton
@pytest.mark.parametrize("scratch_rows", [32, 64, 10_000])
def test_scratch_bytes_bounds_the_accumulators_in_two_passes(scratch_rows, monkeypatch):
    # bfloat16, 32-row tiles: 32 rows of scratch give 4 vocabulary chunks (the last 4 columns)
    # and 3 token chunks (the last 19 rows); 64 rounds to 2 tiles; 10_000 is one chunk each
    from spot_kernels import triton as tb
    n, d, v = 83, 24, 100
    h, w, b, t = make_head(n, d, v, torch.bfloat16, _device(), bias=True, scale=2.0, seed=16)
    t[5] = 7  # a real id, used as ignore_index below
    opts = {"scratch_bytes": 4 * d * scratch_rows, "block_m": 32, "block_v": 32, "block_d": 16}
    sizes = _buffers_made(monkeypatch, torch.float32)
    for ignore in (-100, 7):
        sizes.clear()
        tt = torch.where(t == -100, ignore, t)
        check(h, w, tt, b, options={"config": "default", **opts}, softcap=5.0,
              ignore_index=ignore)
        want = min(32 * max(1, scratch_rows // 32), n), min(32 * max(1, scratch_rows // 32), v)
        assert sorted(sizes) == sorted([(want[1], d), (want[0], d)]), sizes
    monkeypatch.undo()
    with pytest.raises(ValueError, match="deterministic"):
        tb.check_options({"scratch_bytes": 1024, "deterministic": True})
    with pytest.raises(ValueError, match="scratch_bytes"):
        tb.check_options({"scratch_bytes": 0})


@needs_triton
@pytest.mark.parametrize("n,v", [(83, 100), (150, 70)], ids=["n<v", "n>v"])
@pytest.mark.parametrize("dtype,sweeps", [(torch.float32, 1), (torch.bfloat16, 1),
                                          (torch.bfloat16, 2)], ids=str)
def test_da_bytes_bounds_the_da_blocks_and_float32_sums(n, v, sweeps, dtype, monkeypatch):
    """``da_bytes`` holds a dA block and any float32 sum (``_gemm.plan``). With room for the
    smaller gradient's sum in half of it: one sweep, over all tokens x vocabulary chunks when
    N <= V (dh summed), else token chunks x the whole vocabulary (dW summed). Without: two
    sweeps (dW, db over vocabulary chunks, then dh over token chunks), no float32 sum at all.
    (Float32 inputs always take one sweep: their sum is the gradient itself, ``test_gemm.py``.)
    The gradients through torch.mm against the float64 truth, a real id as ignore_index."""
    from spot_kernels import _gemm, triton as tb
    from spot_kernels.triton import bwd_da
    d = 8
    h, w, b, t = make_head(n, d, v, dtype, _device(), bias=True, scale=2.0, seed=18)
    t[5] = 7
    size = dtype.itemsize
    acc = 4 * d * min(n, v)
    budget = 2 * acc + n * v * size // 3 if sweeps == 1 else 2 * acc - 1
    if dtype == torch.float32:
        acc = 0  # the sum is the float32 gradient: nothing beyond it
    opts = {"da_bytes": budget, "block_m": 32, "block_v": 32, "block_d": 16}
    blocks, summed = [], []
    launch, output = bwd_da.launch_backward_da, _gemm._output
    monkeypatch.setattr(bwd_da, "launch_backward_da",
                        lambda *a, **k: blocks.append(tuple(a[7].shape)) or launch(*a, **k))
    monkeypatch.setattr(_gemm, "_output", lambda like, s: summed.append(s) or output(like, s))
    for ignore in (-100, 7):
        blocks.clear(), summed.clear()
        tt = torch.where(t == -100, ignore, t)
        check(h, w, tt, b, options={"config": "default", **opts}, softcap=5.0,
              temperature=0.9, ignore_index=ignore)
        by_vocab = {c for (r, c) in blocks if r == n}   # all tokens x a vocabulary chunk
        by_token = {r for (r, c) in blocks if c == v}   # a token chunk x all the vocabulary
        if sweeps == 1:
            assert summed.count(True) == 1
            assert (by_vocab and max(by_vocab) < v) if n <= v else (by_token and max(by_token) < n)
            assert len(blocks) >= 2 and all(r * c * size <= budget - acc for r, c in blocks)
        else:  # each block one 32-wide tile at most, the least a block can be
            assert not any(summed) and max(by_vocab) == max(by_token) == 32, blocks
            assert sum(r * c for r, c in blocks) == 2 * n * v
    monkeypatch.undo()
    for clash in ({"deterministic": True}, {"scratch_bytes": 64}, {"filter_eps": 1e-3},
                  {"fast_grad": False}):
        with pytest.raises(ValueError, match="da_bytes"):
            tb.check_options({"da_bytes": 1024, **clash})
    with pytest.raises(ValueError, match="da_bytes"):
        tb.check_options({"da_bytes": 0})


@needs_triton
@pytest.mark.parametrize("options,dtype", [({}, torch.float32),
                                           ({"deterministic": True}, torch.float32),
                                           ({"scratch_bytes": 4 * 24 * 32}, torch.bfloat16),
                                           ({"da_bytes": 2 * 19 * 32}, torch.bfloat16)],
                         ids=["default", "deterministic", "scratch", "da_bytes"])
def test_large_bias_with_a_ragged_token_tile_stays_finite(options, dtype):
    # rows past N (19 = 16 + 3) read zero hidden states: their logits are the bias alone, and
    # exp(100) overflows float32; those rows must not reach dW or db
    h, w, b, t = make_head(19, 24, 45, dtype, _device(), bias=True, seed=17)
    b[3] = 100.0
    check(h, w, t, b, options=options)


@needs_triton
def test_all_ignored_costs_nothing_and_gives_zeros():
    h, w, b, t = make_head(19, 24, 45, torch.float32, _device(), bias=True, seed=4)
    t = torch.full_like(t, -100)
    logp, grads = run(h, w, t, b, torch.randn(19, dtype=torch.float64, device=t.device))
    assert logp.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_vocab_forced(dtype):
    from spot_kernels import triton as tb
    h, w, b, t = make_head(19, 24, 100, dtype, _device(), bias=True, scale=2.0, seed=5)
    kw = dict(temperature=0.8, softcap=6.0)
    # 4 splits of one 32-column vocabulary tile each, the last holding only 4 columns
    logp, ent = sk.token_logprobs(h, w, t, bias=b, backend="triton", return_entropy=True,
                                  backend_options={"split_vocab": 4, **SMALL}, **kw)
    tl_, te = reference.token_logprobs(h, w, t, b, compute_dtype=torch.float64,
                                       return_entropy=True, **kw)
    sl, se = reference.token_logprobs(h, w, t, b, return_entropy=True, **kw)
    assert_close(logp, sl, tl_, dtype, "logp")
    assert_close(ent, se, te, dtype, "entropy")
    whole = tb.forward(h, w, t, b, ignore_index=-100, split_vocab=1, **SMALL, **kw)[1]
    split = tb.forward(h, w, t, b, ignore_index=-100, split_vocab=4, **SMALL, **kw)[1]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


@needs_triton
def test_deterministic_is_bit_identical_and_right():
    h, w, b, t = make_head(37, 24, 45, torch.float32, _device(), bias=True, scale=2.0, seed=6)
    opts = {"deterministic": True}
    _, first = check(h, w, t, b, options=opts, softcap=5.0)
    truth, same, gout = references(h, w, t, b, softcap=5.0)
    _, second = run(h, w, t, b, gout, opts, softcap=5.0)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@needs_triton
def test_filter_eps():
    h, w, b, t = make_head(19, 24, 45, torch.float32, _device(), bias=True, seed=7)
    truth, same, gout = references(h, w, t, b)
    # off (0) is exact; a small threshold changes each gradient a little; a huge one drops all
    _, exact = run(h, w, t, b, gout, {"filter_eps": 0.0})
    for ours, s, tr in zip(exact, same[1], truth[1]):
        assert_close(ours, s, tr, torch.float32)
    eps = 1e-3
    _, filt = run(h, w, t, b, gout, {"filter_eps": eps})
    for ours, tr in zip(filt, truth[1]):
        rel = (ours.double() - tr).norm() / tr.norm()
        assert rel < 0.05, rel
    _, none = run(h, w, t, b, gout, {"filter_eps": 1e6, "deterministic": True})
    assert all(g.abs().max() == 0 for g in none)


def check_exact_grad(h, w, t, options):
    """``fast_grad=False`` (half inputs): ``dA`` enters the gradient dots as a ``hi + lo`` pair,
    so the gradients meet the tolerance rule with the values' atol (half an ulp), where the
    default rounding once is held to one ulp."""
    check(h, w, t, options={**options, "fast_grad": False}, softcap=20.0)


@needs_triton
def test_exact_grad_bf16():
    # at this shape rounding dA once misses the values' atol (it is held to one ulp instead)
    h, w, _, t = make_head(37, 64, 131, torch.bfloat16, _device(), scale=2.0, seed=0)
    check_exact_grad(h, w, t, {})


@needs_triton
@pytest.mark.parametrize("options", [{}, {"fast_grad": False}, {"deterministic": True},
                                     {"scratch_bytes": 1 << 13}],
                         ids=["default", "exact", "deterministic", "bounded"])
def test_float16_gradients_keep_a_small_upstream_gradient(options):
    """float16 ``dA = g (onehot - p)`` with ``|g| = 1e-4`` and ``p ~ 1/V``: ~1e-7, which float16
    flushes to 0 (autograd in float16 does, and the same-dtype reference with it). Each tile is
    scaled by a power of two before the cast, so the gradients stay within a few float16 ulps of
    their largest entry (2.4e-2 of it off before, the softmax term lost)."""
    dev = _device()
    h, w, _, t = make_head(24, 32, 2048, torch.float16, dev, ignore_frac=0.0, seed=21)
    g = torch.randn(24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gout = (1e-4 * torch.sign(g)).to(dev)
    truth = float64_truth(h, w, t, g=gout)
    _, grads = run(h, w, t, None, gout, {"config": "default", **options})
    for name, ours, want in zip(("dh", "dW"), grads, truth[2:4]):
        err = (ours.double() - want).abs().max().item() / want.abs().max().item()
        assert err <= 2e-3, (name, err)


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_targets_outside_vocab_contract(deterministic):
    """Vocab-parallel shards: a target outside [0, V) that is not ignore_index gets
    ``logp = -lse`` and only the softmax term in the backward."""
    from spot_kernels import triton as tb
    dev = _device()
    h, w, b, t = make_head(19, 24, 45, torch.float32, dev, bias=True, ignore_frac=0.1, seed=8)
    t[1::3] = 45 + t[1::3]  # another shard's ids
    t[2::5] = -7            # below the shard, not ignore_index
    kw = dict(temperature=0.9, softcap=None, ignore_index=-100)
    logp, lse, _ = tb.forward(h, w, t, b, return_entropy=False, split_vocab=2, **SMALL,
                              **kw)
    g = torch.randn(19, device=dev)
    expect, _, dh64, dw64, db64 = float64_truth(h, w, t, b, g, **kw)
    torch.testing.assert_close(logp.double(), expect, rtol=0, atol=1e-5)
    dh, dw, db = tb.backward(h, w, t, b, lse, logp, g, needs_input_grad=(True, True, True),
                             deterministic=deterministic, **SMALL, **kw)
    torch.testing.assert_close(dh.double(), dh64, rtol=0, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=1e-5)
    torch.testing.assert_close(db.double(), db64, rtol=0, atol=1e-5)


@needs_triton
def test_spot_loss_matches_float64_reference():
    dev = _device()
    h, w, _, t = make_head(30, 24, 45, torch.float32, dev, scale=2.0, seed=9)
    cu = torch.tensor([0, 6, 13, 21, 30], device=dev)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0], device=dev)
    ref_logps = torch.randn(4, device=dev) * 5 - 30
    kw = dict(beta=0.3, delta=0.05, temperature=0.9, average=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = sk.spot_loss(hh, ww, t, cu, ref_logps, labels, backend="triton",
                       backend_options=SMALL, **kw)
    out.loss.backward()
    # float64 ground truth through the reference composition
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logp = reference.token_logprobs(h64, w64, t, temperature=0.9, compute_dtype=torch.float64)
    valid = t != -100
    pi = reference.sequence_logprobs(logp, cu, valid, average=True)
    u = 0.3 * (pi - ref_logps.double()) - 0.05
    y = labels.double()
    softplus = torch.nn.functional.softplus
    loss = (y * softplus(-u) + (1 - y) * softplus(u)).sum() / 2
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.policy_logps.double(), pi.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


# --- real sizes on a GPU --------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
compiled = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                              reason="TRITON_INTERPRET=1 would interpret the real-size kernels; "
                                     "run with TRITON_INTERPRET=0")


@gpu
@needs_cuda
@compiled
@pytest.mark.parametrize("options", [{}, {"deterministic": True}, {"split_vocab": 4},
                                     {"scratch_bytes": 8 << 20}, {"da_bytes": 64 << 20},
                                     {"da_bytes": 192 << 20}],
                         ids=["default", "deterministic", "split", "scratch", "da_bytes-2-sweeps",
                              "da_bytes-dh-sum"])
def test_gpu_real_size_bf16(options, monkeypatch):
    # da_bytes: the float32 dh sum (4 n d = 64 MiB) fits in half of 192 MiB (one sweep of
    # vocabulary chunks), not in half of 64 MiB (two sweeps)
    from spot_kernels import _gemm
    sweeps, plan = [], _gemm.plan
    monkeypatch.setattr(_gemm, "plan",
                        lambda *a, **k: sweeps.append(len(got := plan(*a, **k))) or got)
    n, d, v = 4096, 4096, 32768
    options = {"config": "default", **options}
    h, w, b, t = make_head(n, d, v, torch.bfloat16, "cuda", bias=False, scale=2.0, seed=11)
    check(h, w, t, options=options, softcap=30.0)
    if "da_bytes" in options:
        assert sweeps == [2 if options["da_bytes"] == 64 << 20 else 1], sweeps
    if options.get("deterministic"):
        truth, same, gout = references(h, w, t, softcap=30.0)
        _, a = run(h, w, t, None, gout, options, softcap=30.0)
        _, c = run(h, w, t, None, gout, options, softcap=30.0)
        assert all(torch.equal(x, y) for x, y in zip(a, c))


@gpu
@needs_cuda
@compiled
def test_gpu_real_size_exact_grad_bf16():
    n, d, v = 4096, 4096, 32768
    h, w, _, t = make_head(n, d, v, torch.bfloat16, "cuda", scale=2.0, seed=13)
    check_exact_grad(h, w, t, {"config": "default"})


@gpu
@needs_cuda
@compiled
def test_gpu_real_size_fp32_bias_and_filter():
    n, d, v = 1024, 2048, 50000
    h, w, b, t = make_head(n, d, v, torch.float32, "cuda", bias=True, seed=12)
    check(h, w, t, b, options={"config": "default"}, temperature=0.8)
    truth, same, gout = references(h, w, t, b, temperature=0.8)
    _, filt = run(h, w, t, b, gout, {"config": "default", "filter_eps": 1e-6}, temperature=0.8)
    for ours, tr in zip(filt, truth[1]):
        assert ((ours.double() - tr).norm() / tr.norm()) < 1e-2


@gpu
@needs_cuda
@compiled
def test_gpu_fp32_logits_keep_float32_accuracy_at_a_large_width():
    """Float32 dots compile to one FMA chain per logit; summing the D chunks with Kahan's
    compensation keeps the error near a blocked float32 GEMM's (the CPU's, measured here) at
    D = 8192, where the chain alone errs about 10x more."""
    n, d, v = 256, 8192, 4096
    g = torch.Generator().manual_seed(31)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (20 / d**0.5)  # logits of about +-20, up to ~100
    t = torch.randint(0, v, (n,), generator=g)
    truth = reference.token_logprobs(h.double(), w.double(), t)
    blocked = (reference.token_logprobs(h, w, t).double() - truth).abs().max()
    ours = sk.token_logprobs(h.cuda(), w.cuda(), t.cuda(), backend="triton").cpu().double()
    err = (ours - truth).abs().max()
    assert err <= 2 * blocked + 1e-6, (err.item(), blocked.item())


def test_interpreter_refused_where_numpy_breaks_it(monkeypatch):
    """Triton < 3.7's interpreter calls int() on one-element arrays, which numpy >= 2.4 refuses:
    the backend says so instead of failing inside the interpreter."""
    import numpy
    import triton
    from spot_kernels import triton as tb
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for tv, nv, ok in [("3.6.0", "2.4.1", False), ("3.3.1", "2.5.0", False),
                       ("3.7.0", "2.5.0", True), ("3.6.0", "2.3.5", True)]:
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        got, why = tb.available("cpu")
        assert got == ok, (tv, nv, why)
        assert ok or ("numpy" in why and "3.7" in why)


def test_auto_split_vocab_when_token_tiles_are_few_or_h_outgrows_l2(monkeypatch):
    from spot_kernels import triton as tb
    from spot_kernels.triton import configs
    monkeypatch.setattr(configs, "device_info", lambda device: ((9, 0), 132))
    monkeypatch.setattr(configs, "l2_bytes", lambda device: 60 << 20)  # an H200
    cfg = {"block_m": 128, "block_v": 128}

    def splits(n, v, d=256, requested=None):  # bf16; D = 256 keeps h within L2 / 4 below
        return tb._splits(n, v, d, 2, cfg, "cuda", requested)
    assert splits(132 * 128, 151936) == 1          # tiles cover the SMs, h (8.6 MB) fits
    assert splits(4 * 128, 151936) == 66           # 4 tiles x 66 splits
    assert splits(128, 2048) == 2                  # >= 8 vocab tiles each
    assert splits(128, 512) == 1
    assert splits(128, 151936, requested=3) == 3   # forced
    assert splits(2**29, 151936, requested=8) == 3  # int32 partial offsets
    # Qwen3-8B's head at N = 16384: h is 128 MB; 16 splits leave the 132 resident programs
    # (one an SM) about 8 token tiles (8 MB of h) and 16 vocabulary tiles of W (16 MB)
    assert splits(16384, 151936, d=4096) == 16
    assert splits(132 * 128, 151936, d=4096) == 16
    assert splits(16384, 8 * 128 * 3, d=4096) == 3  # still >= 8 vocab tiles each
    assert splits(1024, 151936, d=4096) == 33       # 8 tiles fill the GPU with 33 splits
    assert splits(2**27, 151936, d=64) == 15        # int32 partial offsets: 15 * 2^27 < 2^31


def test_a_weight_whose_column_stride_overflows_int32_is_copied_once_said(monkeypatch):
    """The kernels' ``d * stride`` is int32: a transposed head past 2^31 elements is copied
    (a meta tensor stands for it), and the first copy warns with its size; a plain one is not."""
    from spot_kernels import triton as tb
    monkeypatch.setattr(tb, "_COPIED", [False])
    plain = torch.empty(4, 3, device="meta")
    assert tb._int32_columns(plain) is plain
    wide = torch.empty(0, device="meta").as_strided((4, 3), (1, 2**30))
    with pytest.warns(UserWarning, match="copied to a contiguous one"):
        out = tb._int32_columns(wide)
    assert out.is_contiguous() and out.shape == (4, 3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb._int32_columns(wide)  # said once
