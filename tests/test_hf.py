"""spot_kernels.hf on tiny random models of three real architectures: padded (left and right) and
packed batches must give, for every sequence, what running that sequence alone through the full
model (materialised logits) gives; completion log-probs must match a float64 log_softmax of those
logits with the prompt masked, values and gradients."""
from __future__ import annotations

import pytest
import torch

import spot_kernels as sk
from spot.tiny import build_model
from spot_kernels import hf, reference

pytest.importorskip("transformers")

ARCHS = ["qwen3", "llama", "gemma2"]
LENS = [5, 9, 3]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build_model(request.param, layers=1).eval()


def _seqs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, model.config.vocab_size, (n,), generator=g) for n in LENS]


def _alone_logits(model, seq):
    with torch.no_grad():
        return model(seq[None]).logits[0].double()


def _logits(hi, rows):
    return reference.logits(rows, hi.weight, hi.bias, softcap=hi.softcap,
                            temperature=hi.temperature, compute_dtype=torch.float64)


def _padded(seqs, left):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_padded_matches_alone(model, left):
    seqs = _seqs(model)
    ids, mask = _padded(seqs, left)
    with torch.no_grad():
        hi = hf.head_inputs(model, ids, attention_mask=mask)
    assert hi.hidden.shape[:2] == ids.shape
    if model.config.model_type == "gemma2":
        assert hi.softcap == model.config.final_logit_softcapping
    for i, s in enumerate(seqs):
        rows = hi.hidden[i][mask[i].bool()]
        torch.testing.assert_close(_logits(hi, rows), _alone_logits(model, s), atol=2e-5, rtol=0)


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids", "own_mask", "as_padded"])
def test_packed_matches_alone(model, how, monkeypatch):
    seqs = _seqs(model, seed=1)
    flat = torch.cat(seqs)
    cu = torch.tensor([0] + LENS).cumsum(0)
    if how == "own_mask":  # the 4-D block-diagonal mask this module builds where transformers
        monkeypatch.setattr(hf, "_transformers_detects_packing", lambda: False)  # would not
    if how == "as_padded":  # what transformers before 5.2 gets: a padded batch
        monkeypatch.setattr(hf, "_legacy_masks", lambda: True)
    kw = {"position_ids": torch.cat([torch.arange(n) for n in LENS])[None]} \
        if how == "position_ids" else {"cu_seqlens": cu}
    with torch.no_grad():
        hi = hf.head_inputs(model, flat[None], **kw)
        leaky = hf.head_inputs(model, flat[None])  # no packing info: sequences see each other
    for i, s in enumerate(seqs):
        rows = hi.hidden[0, cu[i]:cu[i + 1]]
        torch.testing.assert_close(_logits(hi, rows), _alone_logits(model, s), atol=2e-5, rtol=0)
    # the comparison can fail: without packing information the later sequences differ
    leak = _logits(leaky, leaky.hidden[0, cu[1]:cu[2]]) - _alone_logits(model, seqs[1])
    assert leak.abs().max() > 1e-3


def _truth_completion(model, seqs, prompts):
    """float64 log_softmax of each sequence's own full-model logits, prompt masked."""
    out = []
    for s, p in zip(seqs, prompts):
        logits = model(s[None]).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, s[1:, None]).squeeze(-1)
        out.append(lp[p - 1:].sum())
    return torch.stack(out)


def test_completion_logprobs_padded_and_packed(model):
    seqs = _seqs(model, seed=2)
    prompts = [2, 4, 1]
    truth = _truth_completion(model, seqs, prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    g_truth = torch.autograd.grad(truth.sum(), params)

    ids, mask = _padded(seqs, left=True)
    ours = hf.completion_logprobs(model, ids, attention_mask=mask, prompt_lengths=prompts)
    torch.testing.assert_close(ours.double(), truth, atol=1e-4, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), params), g_truth):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3)

    flat = torch.cat(seqs)
    cm = torch.cat([torch.arange(n) >= p for n, p in zip(LENS, prompts)])
    cu = torch.tensor([0] + LENS).cumsum(0)
    ours = hf.completion_logprobs(model, flat, cu_seqlens=cu, completion_mask=cm)
    torch.testing.assert_close(ours.double(), truth.detach(), atol=1e-4, rtol=1e-5)
    # the same from hidden states: head_inputs + next_token_targets + the fused per-token call
    hi = hf.head_inputs(model, flat, cu_seqlens=cu)
    targets = hf.next_token_targets(flat, cu_seqlens=cu, completion_mask=cm)
    assert targets.shape == flat.shape and int((targets != -100).sum()) == sum(LENS) - sum(prompts)
    logp = sk.token_logprobs(hi.hidden[0], hi.weight, targets, **hi.head_kwargs())
    torch.testing.assert_close(sk.sequence_logprobs(logp, cu).double(), truth.detach(),
                               atol=1e-4, rtol=1e-5)
    mean = hf.completion_logprobs(model, flat, cu_seqlens=cu, completion_mask=cm, average=True)
    n_tok = torch.tensor([n - p for n, p in zip(LENS, prompts)], dtype=torch.float64)
    torch.testing.assert_close(mean.double(), truth.detach() / n_tok, atol=1e-4, rtol=1e-5)


def test_padding_predicts_nothing(model):
    """With no prompt lengths (or zeros) every attended token after the first of its sequence
    counts: the first real token of a left-padded row is not predicted from a padding position,
    position_ids given with the padding do not turn the batch into a packed one, and a packed
    batch whose cu_seqlens ends with empty sequences keeps them (as 0)."""
    seqs = _seqs(model, seed=5)
    truth = _truth_completion(model, seqs, [1, 1, 1]).detach()
    for left in (False, True):
        ids, mask = _padded(seqs, left)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # the usual padded positions
        for kw in ({}, {"prompt_lengths": [0, 0, 0]}, {"position_ids": pos}):
            with torch.no_grad():
                ours = hf.completion_logprobs(model, ids, attention_mask=mask, **kw)
            assert ours.shape == (3,), (left, kw, ours.shape)
            torch.testing.assert_close(ours.double(), truth, atol=1e-4, rtol=1e-5)
    # two packed sequences with a padding token between them: two sequences, not one or three
    s0, s1 = seqs[0], seqs[2]
    ids = torch.cat([s0, torch.zeros(1, dtype=torch.long), s1])[None]
    mask = torch.ones_like(ids)
    mask[0, len(s0)] = 0
    pos = torch.cat([torch.arange(len(s0)), torch.zeros(1, dtype=torch.long),
                     torch.arange(len(s1))])[None]
    with torch.no_grad():
        ours = hf.completion_logprobs(model, ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(ours.double(), truth[[0, 2]], atol=1e-4, rtol=1e-5)
    cu = torch.tensor([0] + LENS + [0, 0]).cumsum(0)  # two empty sequences at the end
    with torch.no_grad():
        ours = hf.completion_logprobs(model, torch.cat(seqs), cu_seqlens=cu)
    assert ours.shape == (5,) and ours[3:].abs().max() == 0
    torch.testing.assert_close(ours[:3].double(), truth, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("as_padded", [False, True])
def test_models_whose_mask_ignores_positions(as_padded, monkeypatch):
    """OPT, MPT, XGLM and BioGPT build their causal mask without position_ids (packing needs
    this module's 4-D mask; before transformers 5.2, which MPT and XGLM would read as ones and
    zeros, a padded batch); Bloom's ALiBi comes from the 2-D mask (packing is refused, not
    silently leaky)."""
    import transformers as T
    if as_padded:
        monkeypatch.setattr(hf, "_legacy_masks", lambda: True)
    torch.manual_seed(0)
    models = [
        T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32)),
        T.MptForCausalLM(T.MptConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                     max_seq_len=64)),
        T.XGLMForCausalLM(T.XGLMConfig(vocab_size=64, d_model=32, num_layers=1,
                                       attention_heads=4, ffn_dim=64,
                                       max_position_embeddings=64)),
        T.BioGptForCausalLM(T.BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64,
                                           max_position_embeddings=64))]
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(4, 64, (n,), generator=g) for n in (6, 4)]
    for model in models:
        model.eval()
        truth = _truth_completion(model, seqs, [1, 1]).detach()
        with torch.no_grad():
            ours = hf.completion_logprobs(model, torch.cat(seqs),
                                          cu_seqlens=torch.tensor([0, 6, 10]))
        torch.testing.assert_close(ours.double(), truth, atol=1e-4, rtol=1e-5,
                                   msg=lambda m: f"{model.config.model_type}: {m}")
    from transformers import BloomConfig, BloomForCausalLM
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="padded batch"):
        hf.completion_logprobs(bloom, torch.cat(seqs), cu_seqlens=torch.tensor([0, 6, 10]))


def test_bad_input(model):
    ids = torch.randint(4, 20, (2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        hf.head_inputs(model, ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        hf.head_inputs(model, ids, cu_seqlens=torch.tensor([0, 6, 12]))
    with pytest.raises(TypeError, match="model"):
        hf.head_inputs(torch.nn.Linear(2, 2), ids)


@pytest.mark.parametrize("arch, scale", [("granite", dict(logits_scaling=4.0)),
                                         ("cohere", dict(logit_scale=0.25))])
def test_logit_scale_configs(arch, scale):
    """Configs that scale their logits: the scale reaches the fused head as a temperature."""
    model = build_model(arch, layers=1, **scale).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, model.config.vocab_size, (1, 9), generator=g)
    assert hf.lm_head(model)[3] == 4.0
    truth = _truth_completion(model, [ids[0]], [1])
    ours = hf.completion_logprobs(model, ids)
    torch.testing.assert_close(ours.double(), truth.detach(), atol=1e-4, rtol=1e-5)


def test_hyperclovax_multiplies_by_logits_scaling():
    """HyperCLOVAX multiplies its logits by the logits_scaling that Granite divides by."""
    _needs("hyperclovax")
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM
    torch.manual_seed(0)
    model = HyperCLOVAXForCausalLM(HyperCLOVAXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)).eval()
    assert hf.lm_head(model)[3] == 0.25
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = hf.completion_logprobs(model, ids)
    torch.testing.assert_close(ours.double(), _truth_completion(model, [ids[0]], [1]),
                               atol=1e-4, rtol=1e-5)


# tiny random models of families whose logits (or positions) differ from Llama's:
# {model_type: (config overrides, expected (softcap, temperature))}
_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False, pad_token_id=0)
FAMILIES = {
    # logits * model.model.lm_head_multiplier
    "falcon_h1": (dict(head_dim=8, lm_head_multiplier=2.5, mamba_d_ssm=32, mamba_n_heads=4,
                       mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16), (None, 0.4)),
    # softcaps under other names than final_logit_softcapping
    "recurrent_gemma": (dict(num_hidden_layers=3, head_dim=8, lru_width=32,
                             attention_window_size=16, logits_soft_cap=0.5), (0.5, 1.0)),
    "xlstm": (dict(num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                   intermediate_size=None, max_position_embeddings=None, num_blocks=1,
                   embedding_dim=32, num_heads=4, output_logit_soft_cap=0.5, use_cache=False),
              (0.5, 1.0)),
    # logits_scaling divides the hidden states (already in `hidden`), not the logits
    "minicpm3": (dict(num_key_value_heads=4, head_dim=8, q_lora_rank=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dim_model_base=8),
                 (None, 1.0)),
    # a config logit_scale that transformers' MPT never applies
    "mpt": (dict(hidden_size=None, num_hidden_layers=None, num_attention_heads=None,
                 num_key_value_heads=None, intermediate_size=None, max_position_embeddings=None,
                 d_model=32, n_layers=1, n_heads=4, max_seq_len=64, logit_scale=0.5),
            (None, 1.0)),
    # logits cut to the first unpadded_vocab_size entries
    "inkling_text": (dict(head_dim=8, unpadded_vocab_size=48, swa_num_attention_heads=4,
                          swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16,
                          rel_extent=16, moe_intermediate_size=16, n_routed_experts=4,
                          num_experts_per_tok=2, n_shared_experts=1), (None, 1.0)),
    # positions counted from pad_token_id + 1 (fairseq's convention)
    "roberta": (dict(num_key_value_heads=None, is_decoder=True, pad_token_id=1), (None, 1.0)),
    # the image-text model ignores its text config's softcap (Gemma3ForCausalLM applies it)
    "gemma3": (dict(text_config=dict(_SMALL, head_dim=8, final_logit_softcapping=0.5),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=28, patch_size=14),
                    mm_tokens_per_image=4, image_token_index=63, boi_token_index=61,
                    eoi_token_index=62), (None, 1.0)),
}


def _needs(arch):
    """Skip where the installed transformers does not know ``arch`` (a newer family)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if arch not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {arch!r} models")


def _family_model(arch):
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    kwargs = FAMILIES[arch][0]
    if "text_config" not in kwargs:  # a composite config takes the sizes in its text config
        kwargs = {k: v for k, v in {**_SMALL, **kwargs}.items() if v is not None}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs)).eval()


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_families_with_their_own_logits(arch):
    """Each family's own logits, reproduced by the fused head (its softcap and temperature)."""
    model = _family_model(arch)
    assert hf.lm_head(model)[2:] == FAMILIES[arch][1]
    ids = torch.randint(4, 48, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = hf.completion_logprobs(model, ids)
    torch.testing.assert_close(ours.double(), _truth_completion(model, [ids[0]], [1]),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch, match", [
    ("dory", "DoryForCausalLM's LM head has parameters besides weight and bias \\(logit_scale"),
    ("prophetnet", "ProphetNetForCausalLM's LM head sees hidden states of shape \\(1, 2, 9, 32\\)"),
])
def test_heads_the_fused_one_cannot_express(arch, match):
    """Dory scales each token's logit by a learned parameter of its head; ProphetNet's head
    projects n-gram streams: a ValueError naming the model, not silently wrong log-probs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    kwargs = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    kwargs.update(dict(intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                       head_dim=8) if arch == "dory" else
                  dict(decoder_ffn_dim=64, num_decoder_layers=1, num_decoder_attention_heads=4,
                       ngram=2))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs)).eval()
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=match):
        hf.completion_logprobs(model, ids)


@pytest.mark.parametrize("as_padded", [False, True])
def test_packed_rows_with_padding(model, as_padded, monkeypatch):
    """Two packed rows, right-padded: the 4-D block-diagonal mask this module builds (before
    transformers 5.2: a padded batch, a sequence a row)."""
    if as_padded:
        monkeypatch.setattr(hf, "_legacy_masks", lambda: True)
    seqs = _seqs(model, seed=4)
    width = 16
    rows = [[seqs[0], seqs[1]], [seqs[2]]]
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    where = []
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            ids[r, at:at + len(s)], pos[r, at:at + len(s)], mask[r, at:at + len(s)] = \
                s, torch.arange(len(s)), 1
            where.append((r, at, len(s), s))
            at += len(s)
    with torch.no_grad():
        hi = hf.head_inputs(model, ids, attention_mask=mask, position_ids=pos)
    for r, at, n, s in where:
        torch.testing.assert_close(_logits(hi, hi.hidden[r, at:at + n]), _alone_logits(model, s),
                                   atol=2e-5, rtol=0)


def test_packed_batches_as_padded_ones(model, monkeypatch):
    """Before transformers 5.2 a packed batch runs as a padded one, a sequence a row: each
    sequence's hidden states and gradients are those it has alone, whatever padding the packed
    rows have (leading, between sequences, trailing: zeros there), embeddings given or ids."""
    monkeypatch.setattr(hf, "_legacy_masks", lambda: True)
    seqs = _seqs(model, seed=7)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    where = [(0, 2, seqs[2]), (0, 5, seqs[0]), (1, 0, seqs[1])]  # row 0: [pad pad s2 s0 pad]
    for r, at, s in where:
        ids[r, at:at + len(s)], mask[r, at:at + len(s)] = s, 1
        pos[r, at:at + len(s)] = torch.arange(len(s))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    hi = hf.head_inputs(model, attention_mask=mask, position_ids=pos, inputs_embeds=embeds)
    assert hi.hidden.shape[:2] == ids.shape and not hi.hidden[mask == 0].any()
    for r, at, s in where:
        rows = hi.hidden[r, at:at + len(s)]
        torch.testing.assert_close(_logits(hi, rows.detach()), _alone_logits(model, s),
                                   atol=2e-5, rtol=0)
        alone_embeds = embeds[r, at:at + len(s)].detach().requires_grad_()
        alone = hf.head_inputs(model, inputs_embeds=alone_embeds[None]).hidden[0]
        (g,) = torch.autograd.grad(rows.square().sum(), embeds, retain_graph=True)
        (g_alone,) = torch.autograd.grad(alone.square().sum(), alone_embeds)
        torch.testing.assert_close(g[r, at:at + len(s)], g_alone, atol=1e-4, rtol=1e-3)
        g[r, at:at + len(s)] = 0
        assert not g.any()  # nothing reaches the other sequences' embeddings


def test_the_head_projects_nothing_and_its_forward_is_restored(model, monkeypatch):
    """``head_inputs`` never runs the LM head's own forward (under autocast it would cast the
    whole weight, even for zero rows), and leaves the module as it found it, an instance-level
    forward wrapper included."""
    head = model.get_output_embeddings()
    ids = _seqs(model)[0][None]
    want = hf.head_inputs(model, ids).hidden

    class Boom(type(head)):  # this one module's class, not every Linear's
        def forward(self, *a, **k):
            raise AssertionError("the LM head's forward ran")
    monkeypatch.setattr(head, "__class__", Boom)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hf.head_inputs(model, ids)
    assert "forward" not in head.__dict__
    torch.testing.assert_close(got.hidden.float(), want.float(), rtol=2e-2, atol=2e-2)
    wrapper = []
    head.forward = lambda x: wrapper.append(1)  # e.g. accelerate's hook
    hf.head_inputs(model, ids)
    assert head.__dict__["forward"] is not None and not wrapper
    head.forward(ids)
    assert wrapper == [1]
    del head.forward


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_flash_attention_gets_the_packing_once(how, monkeypatch):
    """Under flash-attn a packed row carries flash's varlen arguments (cu_seq_lens_q/k,
    max_length_q/k), made once per batch, so transformers does not derive them from
    position_ids in every layer. No flash-attn here: the model records what it was given and
    runs with SDPA."""
    model = build_model("qwen3", layers=1).eval()
    seqs = _seqs(model, seed=4)
    flat = torch.cat(seqs)
    cu = torch.tensor([0, 5, 5, 14, 17])  # LENS with an empty sequence in the middle
    kw = {"cu_seqlens": cu} if how == "cu_seqlens" else {
        "position_ids": torch.cat([torch.arange(n) for n in LENS])[None]}
    seen, forward = {}, model.forward
    flash = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

    def recording(*args, **kwargs):
        seen.update(kwargs)
        model.config._attn_implementation = "sdpa"
        try:
            return forward(*args, **{k: v for k, v in kwargs.items() if k not in flash})
        finally:
            model.config._attn_implementation = "flash_attention_2"

    monkeypatch.setattr(model, "forward", recording)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    with torch.no_grad():
        hi = hf.head_inputs(model, flat[None], **kw)
    want = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    if hf._legacy_masks():  # transformers before 5.2: a padded batch, a sequence a row
        assert "cu_seq_lens_q" not in seen
        assert seen["attention_mask"].sum(-1).tolist() == [5, 9, 3]
    else:
        assert torch.equal(seen["cu_seq_lens_q"], want)
        assert torch.equal(seen["cu_seq_lens_k"], want)
        assert seen["max_length_q"] == seen["max_length_k"] == 9
        assert seen["attention_mask"] is None
    for i, s in enumerate(seqs):
        rows = hi.hidden[0, want[i]:want[i + 1]]
        torch.testing.assert_close(_logits(hi, rows), _alone_logits(model, s), atol=2e-5, rtol=0)


def test_flash_attention_gets_bounds_over_rows_flattened(monkeypatch):
    """Several packed rows with padding under flash-attn: the bounds cover the rows flattened in
    order (transformers' flash path flattens them so), each row's leading padding a sequence of
    its own, and no mask (flash would unpad by it and merge a row's sequences)."""
    model = build_model("qwen3", layers=1).eval()
    seen = {}

    def recording(*args, **kwargs):
        seen.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(model, "forward", recording)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    pos = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 1, 2, 0, 1, 0]])
    with pytest.raises(StopIteration):
        hf.head_inputs(model, ids, attention_mask=mask, position_ids=pos)
    if hf._legacy_masks():  # transformers before 5.2: a padded batch, a sequence a row
        assert "cu_seq_lens_q" not in seen
        assert seen["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
        assert seen["position_ids"].tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 2], [0, 1, 0]]
        return
    assert seen["attention_mask"] is None
    assert seen["cu_seq_lens_q"].tolist() == [0, 2, 4, 6, 9, 12]
    assert seen["max_length_q"] == 3


# composite (multimodal) models: {name: (model type, config, expected (softcap, temperature),
# the transformers release since which the composite applies them (before: none), or None)};
# each owns its LM head and applies only what its own forward does, whatever its text config holds
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=28, patch_size=14)
_GEMMA = dict(_SMALL, head_dim=8)
COMPOSITES = {
    # LLaVA-NeXT with a Granite text config (IBM's granite-vision) never applies logits_scaling
    "llava_next+granite": ("llava_next", dict(
        text_config=dict(_SMALL, model_type="granite", logits_scaling=8.0),
        vision_config=dict(_VISION, model_type="clip_vision_model")), (None, 1.0), None),
    # Aya Vision multiplies by its Cohere 2 text config's logit_scale since transformers 5.25
    "aya_vision": ("aya_vision", dict(
        text_config=dict(_GEMMA, model_type="cohere2", logit_scale=0.25),
        vision_config=dict(_VISION, model_type="siglip_vision_model")), (None, 4.0), (5, 25)),
    # PaliGemma 2 applies its Gemma 2 text config's softcap since transformers 5.23
    "paligemma+gemma2": ("paligemma", dict(
        text_config=dict(_GEMMA, model_type="gemma2", final_logit_softcapping=0.5),
        vision_config=dict(_VISION, model_type="siglip_vision_model")), (0.5, 1.0), (5, 23)),
    # Granite-Docling divides by its text config's logits_scaling
    "granite_docling": ("granite_docling", dict(
        text_config=dict(_SMALL, logits_scaling=8.0),
        vision_config=dict(_VISION, out_hidden_size=32, image_size=32, patch_size=16,
                           scale_factor=2, deepstack_visual_indexes=[0, 1])), (None, 8.0), None),
    # HyperCLOVAX-Vision multiplies by it, whatever model type its text config has
    "hyperclovax_vision_v2+granite": ("hyperclovax_vision_v2", dict(
        text_config=dict(_SMALL, model_type="granite", logits_scaling=4.0),
        vision_config=dict(model_type="qwen2_5_vl_vision", depth=1, hidden_size=32,
                           intermediate_size=64, num_heads=4, out_hidden_size=32,
                           fullatt_block_indexes=[0])), (None, 0.25), None),
    # MuseGlimmer with output_multiplier 1: only the softcap (see the ValueError test below)
    "muse_glimmer": ("muse_glimmer", dict(
        text_config=dict(_GEMMA, final_logit_softcapping=0.5, output_multiplier=1.0,
                         num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                         layer_rope_theta=[10000.0, 0]),
        vision_config=dict(_VISION, layer_types=["window_attention", "full_attention"]),
        out_hidden_size=32, projector_hidden_size=32), (0.5, 1.0), None),
}


def _composite_model(arch, config):
    from transformers import AutoConfig, AutoModelForImageTextToText
    _needs(arch)
    for sub in config.values():
        if isinstance(sub, dict) and "model_type" in sub:
            _needs(sub["model_type"])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(arch, **config)).eval()
    with torch.no_grad():  # logits of a few units, so that a softcap or a scale shows
        model.get_output_embeddings().weight.normal_(0, 1)
    return model


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composites_apply_what_their_forward_does(name):
    """A composite's text config's logit fields count only where the composite's own forward
    applies them: the fused head reproduces each composite's own logits."""
    import transformers
    arch, config, expected, since = COMPOSITES[name]
    model = _composite_model(arch, config)
    if since and tuple(map(int, transformers.__version__.split(".")[:2])) < since:
        expected = (None, 1.0)
    assert hf.lm_head(model)[2:] == expected
    ids = torch.randint(4, 48, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = hf.completion_logprobs(model, ids)
    torch.testing.assert_close(ours.double(), _truth_completion(model, [ids[0]], [1]),
                               atol=1e-4, rtol=1e-5)


def test_composite_scaling_before_softcap_raises():
    """MuseGlimmer scales its logits by output_multiplier before its softcap: a ValueError naming
    the model, not silently wrong log-probs."""
    arch, config, _, _ = COMPOSITES["muse_glimmer"]
    config = dict(config, text_config=dict(config["text_config"], output_multiplier=0.5))
    model = _composite_model(arch, config)
    ids = torch.randint(4, 48, (1, 9), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="MuseGlimmerForConditionalGeneration scales its logits "
                                         "by output_multiplier before its softcap"):
        hf.completion_logprobs(model, ids)


def test_composite_around_a_whole_causal_lm():
    """BLIP-2's language_model is a whole causal LM (Granite here), whose own forward divides by
    logits_scaling: the fused head does too."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=dict(small, image_size=28, patch_size=14),
        qformer_config=dict(small, encoder_hidden_size=32, vocab_size=64),
        text_config=dict(_SMALL, model_type="granite", logits_scaling=8.0),
        num_query_tokens=2, image_token_index=63)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1)
    assert hf.lm_head(model)[2:] == (None, 8.0)
    ids = torch.cat([torch.full((1, 2), 63), torch.randint(4, 48, (1, 8))], 1)  # 2 image tokens
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits[0].double()
        ours = hf.completion_logprobs(model, ids, pixel_values=pixels,
                                      completion_mask=(torch.arange(10) >= 3)[None])
    truth = torch.log_softmax(logits[2:-1], -1).gather(-1, ids[0, 3:, None]).sum()
    torch.testing.assert_close(ours.double()[0], truth, atol=1e-4, rtol=1e-5)


# Inkling's own forward slices its logits to unpadded_vocab_size (a view, which FSDP2 warns of)
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")
def test_unpadded_vocab_of_a_sharded_head(tmp_path):
    """Cutting a sharded (DTensor, FSDP2) head's weight to unpadded_vocab_size would gather the
    whole head: a ValueError naming the model and both sizes (also for a head in its own FSDP2
    unit, resharded after its forward). A head in a fully_shard'ed root is gathered during the
    root's forward: head_inputs on the root cuts it and gives the unsharded model's log-probs.
    One process, gloo, on CPU."""
    import copy

    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    model = _family_model("inkling_text")
    ids = torch.randint(4, 48, (2, 9), generator=torch.Generator().manual_seed(3))
    plen = torch.tensor([2, 3])
    with torch.no_grad():
        truth = hf.completion_logprobs(model, ids, prompt_lengths=plen, backend="reference")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = copy.deepcopy(model)
        head = sharded.get_output_embeddings()
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh,
                                                           [Shard(0)]))
        with pytest.raises(ValueError, match="InklingForCausalLM's LM head weight is sharded "
                                             "\\(DTensor.* from 64 rows to unpadded_vocab_size=48"):
            hf.lm_head(sharded)
        root = fully_shard(copy.deepcopy(model), mesh=mesh)
        for _ in range(2):  # the root's head is sharded before each call
            lp = hf.completion_logprobs(root, ids, prompt_lengths=plen, backend="reference")
            torch.testing.assert_close(lp.double(), truth.double(), atol=1e-5, rtol=1e-5)
            lp.sum().backward()
        unit = copy.deepcopy(model)
        fully_shard(unit.get_output_embeddings(), mesh=mesh)
        fully_shard(unit, mesh=mesh)
        with pytest.raises(ValueError, match="LM head weight is sharded"):
            hf.head_inputs(unit, ids)
    finally:
        dist.destroy_process_group()


def test_an_fsdp2_root_returns_no_view(tmp_path):
    """The empty logits standing in for the head's are no view: FSDP2 warns about a root module
    that returns one (an in-place op on it would skip its pre-backward hook)."""
    import warnings

    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        model = fully_shard(build_model("llama", layers=1), mesh=init_device_mesh("cpu", (1,)))
        ids = torch.randint(4, 48, (2, 9), generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            hi = hf.head_inputs(model, ids)
            (hi.hidden.sum() + hi.weight.sum()).backward()
        assert not [w for w in seen if "view" in str(w.message)], [str(w.message) for w in seen]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["roberta", "xlm-roberta"])
def test_roberta_family_packed(arch):
    """RoBERTa-style decoders count positions from pad_token_id + 1 and build their mask without
    position_ids: packed sequences (this module's block-diagonal mask, positions restarting at
    pad_token_id + 1) give each sequence's log-probs run alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    kwargs = {k: v for k, v in {**_SMALL, **FAMILIES["roberta"][0]}.items() if v is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs)).eval()
    with torch.no_grad():  # logits of a few units, so that a leak between sequences shows
        model.get_output_embeddings().weight.normal_(0, 1)
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(4, 48, (n,), generator=g) for n in LENS]
    truth = _truth_completion(model, seqs, [1, 1, 1]).detach()
    with torch.no_grad():
        ours = hf.completion_logprobs(model, torch.cat(seqs),
                                      cu_seqlens=torch.tensor([0] + LENS).cumsum(0))
    torch.testing.assert_close(ours.double(), truth, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["falcon_h1", "recurrent_gemma", "minicpm3", "inkling_text",
                                  "gemma3"])
def test_check_logits_passes_the_families_it_knows(arch):
    """check_logits reproduces each family's own logits (a head of N(0, 1) weights: logits of
    tens, where a missed softcap or scale shows), in float32 and bfloat16."""
    model = _family_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1)
    ids = torch.randint(4, 48, (2, 9), generator=torch.Generator().manual_seed(5))
    assert hf.check_logits(model, ids) <= 1e-3
    hf.check_logits(model.to(torch.bfloat16), ids)


def test_check_logits_catches_what_this_module_does_not_know(monkeypatch):
    """A model whose forward transforms its logits in a way hf does not reproduce: a
    ValueError naming the model and the difference."""
    _needs("hyperclovax")
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM
    torch.manual_seed(0)
    model = HyperCLOVAXForCausalLM(HyperCLOVAXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)).eval()
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(7))
    hf.check_logits(model, ids)
    monkeypatch.setattr(hf, "_MULTIPLY_SCALING", set())  # as if hf took it for Granite's
    with pytest.raises(ValueError, match=r"HyperCLOVAXForCausalLM's own log-probs and the fused "
                                         r"head's differ by up to [0-9.]+ \(> 0\.001"):
        hf.check_logits(model, ids)
    monkeypatch.undo()
    model.register_forward_hook(  # a forward that scales its logits after the head
        lambda mod, args, out: out.__class__(**{**out, "logits": out.logits * 1.5}))
    with pytest.raises(ValueError, match="differ by up to"):
        hf.check_logits(model, ids)


def test_check_logits_allows_for_the_models_own_rounding():
    """Mamba runs its head in bfloat16 and returns float32 logits (``.float()``): the bound
    counts the weights' rounding, not just the logits' dtype. A left-padded batch with its mask:
    only attended tokens count, both forwards at the same positions (GPT-2's own forward would
    count padding)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8)).eval()
    with torch.no_grad():
        mamba.get_output_embeddings().weight.normal_(0, 1)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    assert hf.check_logits(mamba, ids) < 1e-3
    mamba.to(torch.bfloat16)
    assert mamba(ids).logits.dtype == torch.float32  # the case at hand
    assert 0.01 < hf.check_logits(mamba, ids[0]) < 1  # a 1-D row; bf16 rounding, allowed
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128)).eval()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert hf.check_logits(gpt2, ids, attention_mask=mask) < 1e-4
    with pytest.raises(ValueError, match="empty"):
        hf.check_logits(gpt2, ids[:, :0])


_HYBRID = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, head_dim=16, pad_token_id=0)
# Bamba's defaults are a real model's state-space sizes (128 heads, d_state 256, chunks of 256):
# transformers 5.17's torch path then builds a 24 GiB tensor for a 20-token batch
_HYBRID_ARCH = {"bamba": dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                              mamba_chunk_size=16)}


@pytest.mark.parametrize("arch", ["jamba", "qwen3_next", "bamba"])
def test_layers_that_carry_state_along_the_row_run_packed_batches_padded(arch, monkeypatch):
    """Hybrids whose state-space / linear-attention layers run along the whole row would let a
    packed sequence see the ones before it, whatever the attention mask says: ``packing_leaks``
    finds it, and ``head_inputs`` runs the packed batch as a padded one, so every sequence's
    hidden states are what it gets alone. Without the probe they differ (the test can fail)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    if hf._legacy_masks():  # every packed batch runs padded there (the probe's own too)
        pytest.skip("before transformers 5.2 packed batches run padded anyway (tested above)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch, **_HYBRID, **_HYBRID_ARCH.get(arch, {}))).train()
    seqs = _seqs(model, seed=4)
    flat, cu = torch.cat(seqs)[None], torch.tensor([0] + LENS).cumsum(0)
    assert hf.packing_leaks(model) and model.training  # probed in eval mode, then put back
    with torch.no_grad():
        model.eval()
        alone = [hf.head_inputs(model, s[None]).hidden[0] for s in seqs]
        packed = hf.head_inputs(model, flat, cu_seqlens=cu).hidden[0]
        monkeypatch.setattr(hf, "packing_leaks", lambda model: False)
        leaky = hf.head_inputs(model, flat, cu_seqlens=cu).hidden[0]
    for i, want in enumerate(alone):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], want, atol=1e-5, rtol=1e-5)
    assert (leaky[cu[1]:cu[2]] - alone[1]).abs().max() > 1e-3


def test_attention_only_models_pack_without_padding(model, monkeypatch):
    """Where attention alone mixes tokens, the probe finds nothing and the packed batch runs
    packed (no padded route)."""
    assert not hf.packing_leaks(model) and not hf.sees_ahead(model)
    padded = []
    monkeypatch.setattr(hf, "_packed_as_padded", lambda *a, **k: padded.append(1))
    with torch.no_grad():
        hf.head_inputs(model, torch.cat(_seqs(model))[None],
                       cu_seqlens=torch.tensor([0] + LENS).cumsum(0))
    assert padded == [] or hf._legacy_masks()


def test_a_model_that_sees_ahead_is_refused(monkeypatch):
    """transformers' CPM-Ant lets every token attend to the whole row (not causal): changing the
    last token moves the logits before it, so its next-token log-probs would have seen their
    targets. ``sees_ahead`` finds it and ``head_inputs`` (so ``completion_logprobs`` and
    ``check_logits``, the trainer's first call) refuses it; with the probe silenced the same
    calls run (the test can fail)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs("cpmant")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("cpmant", **_HYBRID),
                                             attn_implementation="eager").eval()
    ids = _seqs(model, seed=5)[1][None]
    other = ids.clone()
    other[0, -1] = 4 + (other[0, -1] - 3) % (model.config.vocab_size - 4)
    with torch.no_grad():
        moved = (model(ids).logits[0, :-1] - model(other).logits[0, :-1]).abs().max()
    assert moved > 1e-2
    assert hf.sees_ahead(model) and not model.training  # probed in eval mode, mode put back
    for call in (hf.completion_logprobs, hf.check_logits):
        with pytest.raises(ValueError,
                           match=r"CpmAntForCausalLM is not causal: .* \(under eager attention\)"):
            call(model, ids)
    monkeypatch.setattr(hf, "sees_ahead", lambda model: False)
    assert torch.isfinite(hf.completion_logprobs(model, ids)).all()


def test_dynamic_int8_quantization_is_refused_and_named(model):
    """``quantize_dynamic`` scales each Linear's input by its max over the whole row, so a
    position's output moves (~1%) with the tokens after it: refused, and the message says why
    (the attention is causal)."""
    quantize = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize is None or not hasattr(quantize, "quantize_dynamic"):
        pytest.skip("torch.ao.quantization.quantize_dynamic is not in this torch")
    import copy
    import warnings
    with warnings.catch_warnings():  # deprecated in favour of torchao
        warnings.simplefilter("ignore")
        q = quantize.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                      dtype=torch.qint8)
    ids = _seqs(model, seed=5)[1][None]
    with pytest.raises(ValueError, match="not causal: .*dynamically quantized Linear layers"):
        hf.completion_logprobs(q, ids)
    assert not hf.sees_ahead(model)  # the float model it came from passes


@pytest.mark.parametrize("where, refused", [("one", False), ("first", False), ("first+1", False),
                                            ("first+2", True), ("all", True)])
def test_sees_ahead_needs_more_than_one_position_moved(where, refused):
    """A false alarm would stop a run: the refusal needs the first position (which sees only
    itself in a causal model) and two more moved. The second probe row's final hidden states
    are scaled by 5% where the case says: one middle position or the first alone (as a mixture
    of experts' routing flipped by rounding might), the first and one more, and so on."""
    model = build_model("qwen3", layers=1).eval()
    rows = {"one": [3], "first": [0], "first+1": [0, 5], "first+2": [0, 5, 6],
            "all": list(range(8))}[where]
    calls = []

    def perturb(module, args, out):
        calls.append(1)
        if len(calls) != 2:
            return out
        out = out.clone()
        out[:, rows] *= 1.05
        return out
    handle = model.model.norm.register_forward_hook(perturb)
    try:
        assert hf.sees_ahead(model) is refused
    finally:
        handle.remove()
    assert len(calls) == 2


_MOE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_experts=16, num_local_experts=16, num_experts_per_tok=2, pad_token_id=0)


def _last_token_pairs(model, count, device="cpu"):
    """``count`` pairs of random 24-token rows that differ only in the last token: each pair's
    float32 hidden states before it, ``(a, b)``, a row per forward, without gradients."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(count):
            ids = torch.randint(1, 1024, (2, 24), generator=g)
            ids[1, :-1] = ids[0, :-1]
            yield tuple(hf.head_inputs(model, ids[i:i + 1].to(device)).hidden[0, :-1].float()
                        for i in range(2))


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_bert_style_heads_without_is_decoder_are_refused_at_random_init(arch):
    """A BERT-style ``ForCausalLM`` built without ``is_decoder`` attends both ways. At random
    init its earlier positions move by only ~0.3% when the last token changes, under the 1% of
    the half-precision rule; in full float32 on the CPU the rule's threshold is 1e-4 and the
    model is refused. The same model with ``is_decoder=True`` is causal and passes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    for decoder in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            arch, is_decoder=decoder, max_position_embeddings=64, **_HYBRID))
        with torch.autocast("cpu", torch.bfloat16):  # the half-precision rule: not caught
            assert not hf.sees_ahead(model)
        assert hf.sees_ahead(model) is not decoder  # probed again under the full-precision rule
        if not decoder:
            with pytest.raises(ValueError, match="is not causal"):
                hf.completion_logprobs(model, _seqs(model, seed=5)[1][None])


def test_the_not_causal_threshold_follows_the_precision():
    """The tight threshold only where the forward ran in full float32 on the CPU: not under
    bf16 autocast, with bf16 weights, or with reduced-precision float32 matmuls."""
    model = build_model("qwen3", layers=1)
    assert hf._ahead_tol(model) == 1e-4
    with torch.autocast("cpu", torch.bfloat16):
        assert hf._ahead_tol(model) == 1e-2
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert hf._ahead_tol(model) == 1e-2
    finally:
        torch.set_float32_matmul_precision(before)
    assert hf._ahead_tol(model.bfloat16()) == 1e-2


def test_hidden_states_in_half_precision_take_the_half_precision_rule():
    """float32 parameters whose forward ends in half precision (a wrapper's mixed precision,
    such as FSDP2's ``param_dtype``, emulated by a hook on the final norm): the second row's
    hidden states moved by 0.5% everywhere are flagged in float32 (1e-4 rule), not when they
    come out in bfloat16 (1e-2 rule)."""
    for cast, refused in ((torch.float32, True), (torch.bfloat16, False)):
        model = build_model("qwen3", layers=1).eval()
        calls = []

        def perturb(module, args, out):
            calls.append(1)
            return (out * (1.005 if len(calls) == 2 else 1.0)).to(cast)
        handle = model.model.norm.register_forward_hook(perturb)
        try:
            assert hf.sees_ahead(model) is refused
        finally:
            handle.remove()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_the_tight_threshold_raises_no_false_alarm_on_moe_in_float32(arch):
    """A mixture of experts' GEMMs change shape as the last token routes, so rows that differ
    only there round differently: in float32 on the CPU by ~1e-7, far below the 1e-4 rule (the
    worst move over 32 random sequences must stay 10x under it), and the probe passes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **_MOE)).eval()
    assert not hf.sees_ahead(model) and hf._ahead_tol(model) == 1e-4
    worst = 0.0
    for a, b in _last_token_pairs(model, 32):
        worst = max(worst, ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item())
    assert worst < 1e-5, f"worst per-position move {worst:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("how", ["bf16 weights", "fp32 weights, bf16 autocast"])
def test_the_probes_raise_no_false_alarm_on_a_gpu(arch, how):
    """In half precision on a GPU a mixture of experts' GEMMs change shape as the last token
    routes, so two rows that differ only there round differently: over 64 random sequences the
    not-causal rule never fires (the worst per-position move is in the message), and neither
    probe flags the model (a false refusal would stop a user's run)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **_MOE)).cuda().eval()
    if how == "bf16 weights":
        model = model.bfloat16()
    worst, fired = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=how != "bf16 weights"):
        assert not hf.sees_ahead(model) and not hf.packing_leaks(model)
        for a, b in _last_token_pairs(model, 64, "cuda"):
            r = (a - b).norm(dim=-1) / a.norm(dim=-1)
            worst = max(worst, r.max().item())
            fired += hf._moved_ahead(a, b)
    assert fired == 0, f"{fired} of 64 sequences fired; worst move {worst:.2e}"
    print(f"{arch} {how}: worst per-position move {worst:.2e}")


def test_the_probes_and_check_logits_leave_each_modules_mode_and_ignore_dropout():
    """The one-time probes and ``check_logits`` run in eval mode and give every module its own
    mode back: a layer the user froze in eval mode stays there (a root ``train()`` switched its
    dropout back on), and a model in train mode with dropout is checked without it (its two
    forwards drew different masks, blamed on the logits' transform)."""
    model = build_model("qwen3", layers=2, attention_dropout=0.5).train()
    layers = model.model.layers
    layers[0].eval()
    ids = torch.randint(4, 60, (1, 10))
    cu = torch.tensor([0, 4, 10])
    hf.head_inputs(model, ids, cu_seqlens=cu)  # the first call runs the probes
    assert not layers[0].training and layers[1].training and model.training
    assert hf.check_logits(model, ids) < 1e-4  # no dropout in either forward
    assert not layers[0].training and layers[1].training and model.training


@pytest.mark.parametrize("arch", ["marian", "pegasus", "bart"])
def test_a_body_that_counts_positions_by_column_is_not_packed(arch):
    """Marian and Pegasus decoders (transformers 5) drop ``position_ids`` and count positions
    from the row's first column, and their leak across packed sequences is small at random init:
    the probe compares a packed tail with the same tail at the row's start, so a packed batch
    runs as a padded one and every sequence gets the log-probs it gets alone (~20 nats off
    before). BART's decoder counts by column on every release: so does a left-padded row, which
    runs moved to the row's start."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(arch, vocab_size=64, d_model=32, decoder_layers=1,
                               decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=1,
                               encoder_attention_heads=4, encoder_ffn_dim=64,
                               max_position_embeddings=128, pad_token_id=0,
                               decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 48, (n,), generator=g) for n in (5, 9, 3)]
    with torch.no_grad():
        alone = torch.stack([model(input_ids=s[None]).logits[0].double().log_softmax(-1)[:-1]
                             .gather(-1, s[1:, None]).sum() for s in seqs])
        cu = torch.tensor([0, 5, 14, 17])
        packed = hf.completion_logprobs(model, torch.cat(seqs), cu_seqlens=cu).double()
        ids, mask = _padded(seqs, left=True)
        left = hf.completion_logprobs(model, ids, attention_mask=mask).double()
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["rwkv", "xlstm"])
def test_a_recurrent_body_runs_left_padded_rows_from_their_start(arch):
    """RWKV and xLSTM run their state over a row's leading padding (the mask does not stop
    them): the padding probe finds it, and a left-padded batch runs with each row's tokens
    moved to its start, so every sequence gets the log-probs it gets alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _needs(arch)
    kw = dict(rwkv=dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                        intermediate_size=64, context_length=64),
              xlstm=dict(num_blocks=1, embedding_dim=32, hidden_size=32, num_heads=4,
                         use_cache=False))[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        arch, vocab_size=64, pad_token_id=0, tie_word_embeddings=False, **kw)).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 48, (n,), generator=g) for n in (5, 9, 3)]
    ids, mask = _padded(seqs, left=True)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=s[None]).logits[0].double().log_softmax(-1)[:-1]
                             .gather(-1, s[1:, None]).sum() for s in seqs])
        left = hf.completion_logprobs(model, ids, attention_mask=mask).double()
    assert hf.padding_moves(model)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-4)


def test_padding_probe_passes_attention_models(model):
    """Llama-style bodies take the derived positions and mask the padding: no move, and a
    left-padded batch runs as it is."""
    assert not hf.padding_moves(model)
