"""spot.attention (``--attn varlen``): each packed sequence attends only to itself, causally,
within its sliding window; compared with a float64 eager computation that builds the full mask.
On a GPU the torch varlen kernel is compared with the per-sequence SDPA path."""
from __future__ import annotations

import functools
import random
import types

import pytest
import torch

from spot import attention as A

pytestmark = pytest.mark.usefixtures("one_thread")


def eager(q, k, v, seg, scale, window=None, keys=None, causal=True):
    """float64 attention with the full ``[L, L]`` mask: same segment, causal, window, key kept."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    length = q.shape[2]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    ok = ((j <= i) | (not causal)) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        ok &= i - j < window
    if keys is not None:
        ok &= keys[:, None, :]
    s = q.double() @ k.transpose(-1, -2) * scale
    s = s.masked_fill(~ok[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _module(training=False):
    return types.SimpleNamespace(is_causal=True, training=training)


def _qkv(b, length, hq=4, hkv=2, dh=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, dh, generator=g, dtype=dtype, requires_grad=True)
            for h in (hq, hkv, hkv)]


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("bounds", ["cu", "positions"])
def test_packed_row_matches_eager(window, bounds):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))] + [1]
    rng.shuffle(lengths)
    length = sum(lengths)
    q, k, v = _qkv(1, length, seed=seed)
    cu = _cu(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    kw = dict(cu_seq_lens_q=cu, max_length_q=max(lengths)) if bounds == "cu" else {}
    out, _ = A.varlen_attention(_module(), q, k, v, None, scaling=0.3, sliding_window=window,
                                position_ids=pos, **kw)
    want = eager(q, k, v, seg, 0.3, window)
    torch.testing.assert_close(out, want, msg=f"seed {seed} lengths {lengths}")
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, msg=f"seed {seed} lengths {lengths}")
    # one sequence over the whole row (no bounds) differs: the check above can fail
    if len(lengths) > 1:
        whole, _ = A.varlen_attention(_module(), q, k, v, None, scaling=0.3,
                                      sliding_window=window)
        assert (whole - want).abs().max() > 1e-3


@pytest.mark.parametrize("how", ["module", "call"])
def test_a_layer_that_is_not_causal_still_sees_its_own_sequence_only(how):
    """A bidirectional layer (``module.is_causal = False``, or ``is_causal=False`` in the call:
    an encoder or vision tower run under this attention) attends both ways inside each packed
    sequence and never to the others (it ran one SDPA over the whole row)."""
    lengths = [[3, 5, 1], [4, 5]]
    q, k, v = _qkv(2, 9, seed=5)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    seg = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                       for row in lengths])
    module = types.SimpleNamespace(is_causal=how == "call", training=False)
    kw = {"is_causal": False} if how == "call" else {}
    out, _ = A.varlen_attention(module, q, k, v, None, scaling=0.4, position_ids=pos, **kw)
    want = eager(q, k, v, seg, 0.4, causal=False)
    torch.testing.assert_close(out, want)
    assert (want - eager(q, k, v, seg, 0.4)).abs().max() > 1e-3  # both ways, not causal
    assert (want - eager(q, k, v, torch.zeros_like(seg), 0.4, causal=False)).abs().max() > 1e-3


def test_rows_of_packed_sequences_and_other_value_widths():
    """Several rows, each packed (sequences from each row's own positions), with a value head
    wider than the query's (MLA-style) and ``is_causal=None`` (the module's: causal)."""
    lengths = [[3, 5, 1], [9]]
    q, k, _ = _qkv(2, 9)
    v = torch.randn(2, 2, 9, 12, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    seg = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                       for row in lengths])
    out, _ = A.varlen_attention(_module(), q, k, v, None, scaling=0.4, position_ids=pos,
                                is_causal=None)
    torch.testing.assert_close(out, eager(q, k, v, seg, 0.4))
    whole = eager(q, k, v, torch.zeros_like(seg), 0.4)
    assert (out[0] - whole[0]).abs().max() > 1e-3  # row 0's packing mattered


def test_hf_packed_rows_match_sdpa():
    """``spot_kernels.hf.head_inputs`` on two packed rows ([B, L] position_ids restarting): the
    varlen kernel keeps each row's sequences apart as SDPA's block mask does."""
    from spot.tiny import build_model
    from spot_kernels import hf
    model = build_model("qwen3", seed=5).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(12))])
    with torch.no_grad():
        want = hf.head_inputs(model, ids, position_ids=pos).hidden
        model.set_attn_implementation(A.register())
        got = hf.head_inputs(model, ids, position_ids=pos).hidden
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sdpa_then_varlen(cfg, vocab):
    """``(model, hidden under spot_varlen, hidden under SDPA)`` of two packed sequences (9 and 11
    tokens) through a tiny model built from ``cfg``."""
    from transformers import AutoModelForCausalLM

    from spot_kernels import hf
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, vocab, (1, 20))
    cu = torch.tensor([0, 9, 20])
    with torch.no_grad():
        want = hf.head_inputs(model, ids, cu_seqlens=cu).hidden
        model.set_attn_implementation(A.register())
        got = hf.head_inputs(model, ids, cu_seqlens=cu).hidden
    return model, got, want


@pytest.mark.parametrize("kind,extra", [
    ("mistral", {}),  # passes sliding_window= to the attention function
    ("phimoe", dict(num_local_experts=2, num_experts_per_tok=1)),  # only its mask has the window
])
def test_sliding_windows_reach_the_kernel_or_the_model_is_refused(kind, extra):
    """A model whose sliding window reaches its attention function runs varlen as SDPA runs it;
    one whose window lives only in its mask is not supported (the varlen path, mask-free,
    would drop it: the outputs then differ, which is why)."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(kind, vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, sliding_window=4, **extra)
    model, got, want = _sdpa_then_varlen(cfg, 64)
    if kind == "mistral":
        assert A.supported(model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif model.config._attn_implementation != A.NAME:
        # PhiMoE before transformers 5.2: attention code of its own, which keeps SDPA
        assert A.unsupported(model) == "its own attention code"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert not A.supported(model)
        assert (got - want).abs().max() > 1e-2


def test_a_vision_towers_attention_does_not_hide_the_text_models_window():
    """Gemma-3 image-text (what AutoModelForCausalLM loads for gemma-3-4b and up): its text
    layers pass their sliding window to the attention function, its SigLIP tower has none to
    pass; only the text decoder counts (the tower's made it "a sliding window only its mask
    has"), and packed rows run varlen as SDPA runs them."""
    from transformers import Gemma3Config
    cfg = Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62)
    model, got, want = _sdpa_then_varlen(cfg, 60)
    assert A.unsupported(model) is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _alone(model, ids):
    from spot_kernels import hf
    with torch.no_grad():
        return hf.head_inputs(model, ids[None]).hidden[0]


@pytest.mark.parametrize("kind", ["gpt_bigcode", "persimmon"])
def test_hf_rows_of_packed_sequences_for_models_that_keep_positions_to_themselves(kind):
    """Two packed rows through ``hf.head_inputs`` for models whose attention never sees
    ``position_ids``: the bounds, over the rows flattened, keep every sequence alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spot_kernels import hf
    cfg = AutoConfig.for_model(kind, vocab_size=96, hidden_size=32, n_embd=32,
                               intermediate_size=64, num_hidden_layers=2, n_layer=2,
                               num_attention_heads=4, n_head=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 90, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(6)) + list(range(6))])
    model.set_attn_implementation(A.register())
    # GPT-BigCode until transformers 5.17 drops its **kwargs, Persimmon before 5.2 builds its own
    # mask; before 5.2 a model that does not declare it uses the kernel (GPT-BigCode) runs padded
    why = A.unsupported(model)
    if why and not (hf._legacy_masks() and why == "its own attention code"):
        with pytest.raises(A.BoundsLost, match="use --attn sdpa"):
            hf.head_inputs(model, ids, position_ids=pos)
        return
    with torch.no_grad():
        got = hf.head_inputs(model, ids, position_ids=pos).hidden
    for row, cuts in ((0, (0, 5, 12)), (1, (0, 6, 12))):
        for a, z in zip(cuts[:-1], cuts[1:]):
            torch.testing.assert_close(got[row, a:z], _alone(model, ids[row, a:z]),
                                       rtol=1e-5, atol=1e-5, msg=f"row {row} [{a}:{z}]")


def test_a_model_that_drops_the_bounds_is_refused(tmp_path, monkeypatch):
    """A model whose body does not pass its ``**kwargs`` on (the sequence bounds with them)
    would let packed sequences attend to each other under varlen: ``hf.head_inputs`` raises,
    ``supported`` says no, ``load_model`` refuses varlen by name and auto falls back to SDPA."""
    from transformers.models.qwen3 import modeling_qwen3

    from spot.config import ConfigError
    from spot.model import load_model
    from spot.tiny import build_model
    from spot_kernels import hf
    build_model("qwen3", seed=2).save_pretrained(tmp_path)
    forward = modeling_qwen3.Qwen3Model.forward

    def dropping(self, *args, **kwargs):
        keep = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq", "max_length"))}
        return forward(self, *args, **keep)
    monkeypatch.setattr(modeling_qwen3.Qwen3Model, "forward", dropping)
    model = build_model("qwen3", seed=2).eval()
    model.set_attn_implementation(A.register())
    with pytest.raises(A.BoundsLost, match="does not pass the sequence bounds"):
        hf.head_inputs(model, torch.arange(8)[None], cu_seqlens=torch.tensor([0, 3, 8]))
    assert not A.supported(model)
    with pytest.raises(ConfigError, match="attn: varlen does not load"):
        load_model(str(tmp_path), attn="varlen")
    assert load_model(str(tmp_path)).config._attn_implementation == "sdpa"  # auto on a CPU


def test_a_model_that_builds_its_own_mask_is_refused(monkeypatch):
    """A model that builds a causal mask of its own, blind to the packing, and hands it to its
    attention beside the bounds (many of transformers before 5.2: Persimmon, Doge) would let
    packed sequences attend to each other: ``hf.head_inputs`` raises and ``unsupported`` says
    why."""
    from transformers.models.qwen3 import modeling_qwen3

    from spot.tiny import build_model
    from spot_kernels import hf

    def own_mask(**kwargs):  # causal over the whole row
        n = kwargs.get("input_embeds", kwargs.get("inputs_embeds")).shape[1]
        return torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    monkeypatch.setattr(modeling_qwen3, "create_causal_mask", own_mask)
    model = build_model("qwen3", seed=2).eval()
    model.set_attn_implementation(A.register())
    assert A.unsupported(model) == "it builds its own attention mask"
    with pytest.raises(A.BoundsLost, match="builds an attention mask of its own"):
        hf.head_inputs(model, torch.arange(8)[None], cu_seqlens=torch.tensor([0, 3, 8]))


def test_hf_packed_rows_with_padding_match_each_sequence_alone():
    """Packing and a padding mask together: left padding before a row's first sequence is
    kept apart from it (a sequence of its own in the bounds), padding between and after
    sequences is never seen; one row and two rows (padding positions -1, as cumsum - 1 gives)."""
    from spot.tiny import build_model
    from spot_kernels import hf
    model = build_model("qwen3", seed=3).double().eval()
    a = torch.randint(5, model.config.vocab_size, (4,))
    b = torch.randint(5, model.config.vocab_size, (3,))
    want_a, want_b = _alone(model, a), _alone(model, b)
    pad = torch.zeros(2, dtype=torch.long)
    ids = torch.stack([torch.cat([pad, a, b]), torch.cat([a, pad, b]), torch.cat([a, b, pad])])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, -1, -1, 0, 1, 2],
                        [0, 1, 2, 3, 0, 1, 2, -1, -1]])
    spans = [(slice(2, 6), slice(6, 9)), (slice(0, 4), slice(6, 9)), (slice(0, 4), slice(4, 7))]
    model.set_attn_implementation(A.register())
    for rows in ([0], [1], [0, 1, 2]):
        with torch.no_grad():
            h = hf.head_inputs(model, ids[rows], attention_mask=mask[rows],
                               position_ids=pos[rows]).hidden
        for i, r in enumerate(rows):
            torch.testing.assert_close(h[i, spans[r][0]], want_a, msg=f"rows {rows}, row {r}")
            torch.testing.assert_close(h[i, spans[r][1]], want_b, msg=f"rows {rows}, row {r}")


def test_varlen_bounds_flatten_rows_and_keep_leading_padding_apart():
    from spot_kernels import hf
    seg = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    kw = hf._flash_varlen(seg, mask)
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 4, 6, 9, 12]
    assert kw["max_length_q"] == 3
    assert hf._flash_varlen(seg)["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 12]


def test_padded_batch_and_4d_mask_match_eager():
    """A padded batch (2-D mask, left padding) is causal over the kept keys; a 4-D mask goes to
    SDPA as it is."""
    q, k, v = _qkv(2, 7)
    keys = torch.ones(2, 7, dtype=torch.bool)
    keys[1, :3] = False
    out, _ = A.varlen_attention(_module(), q, k, v, keys.long(), scaling=0.5)
    want = eager(q, k, v, torch.zeros(2, 7, dtype=torch.long), 0.5, keys=keys)
    torch.testing.assert_close(out[0], want[0])
    torch.testing.assert_close(out[1, 3:], want[1, 3:])  # padded queries: finite, not compared
    assert torch.isfinite(out).all()
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 2)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    ok = (j <= i) & (seg[:, :, None] == seg[:, None, :])
    additive = torch.zeros(2, 1, 7, 7, dtype=q.dtype).masked_fill(~ok[:, None], -1e30)
    out, _ = A.varlen_attention(_module(), q, k, v, additive, scaling=0.5)
    torch.testing.assert_close(out, eager(q, k, v, seg, 0.5))


def test_queries_after_a_cache_see_every_earlier_key():
    """Fewer queries than keys (generation with a KV cache): query ``i`` is position
    ``lk - lq + i`` and sees every key up to it (SDPA's own ``is_causal`` would align them to the
    start instead)."""
    q, k, v = _qkv(1, 9)
    out, _ = A.varlen_attention(_module(), q[:, :, 6:], k, v, None, scaling=0.5)
    full = eager(q, k, v, torch.zeros(1, 9, dtype=torch.long), 0.5)
    torch.testing.assert_close(out, full[:, 6:])
    out, _ = A.varlen_attention(_module(), q[:, :, 6:], k, v, None, scaling=0.5,
                                sliding_window=4)
    torch.testing.assert_close(out, eager(q, k, v, torch.zeros(1, 9, dtype=torch.long), 0.5,
                                          window=4)[:, 6:])


def test_softcap_and_sinks_are_refused():
    q, k, v = _qkv(1, 4)
    with pytest.raises(ValueError, match="soft-capping or sinks.*eager"):
        A.varlen_attention(_module(), q, k, v, None, softcap=50.0)
    with pytest.raises(ValueError, match="soft-capping or sinks"):
        A.varlen_attention(_module(), q, k, v, None, s_aux=torch.zeros(4))


def test_load_model_varlen_and_what_cannot_run_it(tmp_path):
    """``--attn varlen`` loads as ``spot_varlen`` and gives the same hidden states as SDPA;
    models it cannot run (their own attention: MPT; soft-capping: Gemma-2) are a one-line
    error by name and fall back to SDPA under auto."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spot.config import ConfigError
    from spot.model import load_model
    from spot.tiny import build_model
    from spot_kernels import hf
    build_model("qwen3", seed=3).save_pretrained(tmp_path / "qwen3")
    model = load_model(str(tmp_path / "qwen3"), attn="varlen")
    assert model.config._attn_implementation == A.NAME
    sdpa = load_model(str(tmp_path / "qwen3"), attn="sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, 19))
    cu = torch.tensor([0, 6, 7, 19])
    with torch.no_grad():
        a = hf.head_inputs(model, ids, cu_seqlens=cu).hidden
        b = hf.head_inputs(sdpa, ids, cu_seqlens=cu).hidden
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    mpt = AutoConfig.for_model("mpt", d_model=32, n_heads=2, n_layers=1, vocab_size=64)
    AutoModelForCausalLM.from_config(mpt).save_pretrained(tmp_path / "mpt")
    with pytest.raises(ConfigError, match="attn: varlen does not load for this model.*MptFor"):
        load_model(str(tmp_path / "mpt"), attn="varlen")
    build_model("gemma2", seed=3).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(ConfigError, match="attn: varlen does not load.*soft-capping"):
        load_model(str(tmp_path / "gemma2"), attn="varlen")


def _spy(calls):
    """torch's varlen_attn, counting its calls (its signature kept, which _torch_varlen reads)."""
    import torch.nn.attention.varlen as V
    real = V.varlen_attn

    @functools.wraps(real)
    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    return V, real, spy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_torch_varlen_kernel_matches_eager(window):
    """On a GPU under bf16 autocast, with float32 query/key and a bf16 value (what RoPE leaves
    a float32 model there), the torch varlen kernel runs (an H200 has it; the first call under
    no_grad, as the trainer's reference pass makes it) and agrees with the float64 eager truth,
    forward and backward (the per-sequence SDPA path in float32 as the gradient's truth)."""
    if not A.kernel_runs(window=window is not None):
        pytest.skip("torch's varlen kernel (with this window) does not run on this GPU / torch")
    lengths = [300, 1, 77, 512, 130]
    length = sum(lengths)
    q, k, v = [x.detach().cuda().float().requires_grad_()
               for x in _qkv(1, length, hq=8, hkv=2, dh=128)]
    cu = _cu(lengths).cuda()
    kw = dict(cu_seq_lens_q=cu, max_length_q=max(lengths), scaling=128 ** -0.5,
              sliding_window=window)
    A._probe.cache_clear()  # the first call probes, inside a no-grad forward (the reference's)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        A.varlen_attention(_module(), q, k, v.bfloat16(), None, **kw)
    assert A._probe.cache_info().currsize == 1  # the call probed, and the probe ran there:
    assert A._probe(q.device.index)[1 if window else 0]
    calls = []
    A._torch_varlen.cache_clear()
    V, real, spy = _spy(calls)
    V.varlen_attn = spy
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = A.varlen_attention(_module(), q, k, v.bfloat16(), None, **kw)
    finally:
        V.varlen_attn = real
        A._torch_varlen.cache_clear()
    assert len(calls) == 1, "the torch varlen kernel did not run"
    assert out.dtype == torch.bfloat16
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    want = eager(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), seg, 128 ** -0.5, window)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    loop, _ = A.varlen_attention(_module(), q, k, v, None, **kw)  # float32: the SDPA loop
    ref = torch.autograd.grad(loop, (q, k, v), g.float())
    for a, b in zip(got, ref):
        # bf16 inputs and upstream gradient against float32: a plumbing check, not the kernel's
        # accuracy (torch's own tests hold that)
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_load_model_varlen_runs_the_kernel(tmp_path):
    """``load_model(attn="varlen")`` on a GPU, the trainer's way (float32 weights, bf16
    autocast, a packed row through ``hf.head_inputs``): the kernel runs, and the hidden states
    match SDPA's block mask."""
    from spot.model import load_model
    from spot.tiny import build_model
    from spot_kernels import hf
    if not A.kernel_runs():
        pytest.skip("torch's varlen kernel does not run on this GPU / torch")
    build_model("qwen3", seed=3, hidden_size=256, heads=4, kv_heads=2).save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 700), device="cuda")
    cu = torch.tensor([0, 200, 201, 650, 700], device="cuda")
    hidden = {}
    for attn in ("sdpa", "varlen"):
        model = load_model(str(tmp_path), "cuda", attn=attn)
        calls = []
        A._torch_varlen.cache_clear()
        V, real, spy = _spy(calls)
        V.varlen_attn = spy
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                hidden[attn] = hf.head_inputs(model, ids, cu_seqlens=cu).hidden.float()
        finally:
            V.varlen_attn = real
            A._torch_varlen.cache_clear()
        assert bool(calls) == (attn == "varlen"), attn
    torch.testing.assert_close(hidden["varlen"], hidden["sdpa"], rtol=5e-2, atol=5e-2)
