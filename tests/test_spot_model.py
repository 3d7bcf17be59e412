"""spot.model.Policy: packed sequences give the log-probs each sequence gets alone, through the
model's own materialised logits (the unfused truth), and do not attend to each other."""
from __future__ import annotations

import random

import pytest
import torch

from spot import attention, data as D
from spot.model import Policy, enable_checkpointing
from spot.tiny import build_model, build_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n, rng):
    def words(k):
        return " ".join("".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 6)))
                        for _ in range(k)).strip() or "x"
    return [D.Pair([{"role": "user", "content": words(rng.randint(1, 8))}],
                   [{"role": "assistant", "content": words(rng.randint(1, 8))}],
                   [{"role": "assistant", "content": words(rng.randint(1, 8))}]) for _ in range(n)]


def alone_logps(model, seq, plen):
    """Unfused: the full model on one sequence, logits materialised, float64 log-softmax."""
    ids = torch.tensor(seq)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[plen - 1:].sum()


@pytest.mark.parametrize("arch,attn", [("qwen3", "sdpa"), ("llama", "sdpa"), ("qwen3", "eager"),
                                       ("gemma2", "eager"), ("gemma2", "sdpa"),
                                       ("qwen3", "varlen"), ("llama", "varlen")])
def test_packed_equals_alone(arch, attn):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tok = build_tokenizer()
    model = build_model(arch, seed=seed % 1000).eval()
    if attn == "sdpa" and not model._supports_sdpa:  # Gemma-2 in some transformers releases
        pytest.skip(f"{type(model).__name__} has no SDPA path in this transformers")
    model.set_attn_implementation(attention.register() if attn == "varlen" else attn)
    ex, _ = D.encode_pairs(tok, _records(3, rng), 96)
    batch = D.pack(ex, [0, 1, 2])
    with torch.no_grad():
        packed = Policy(model, backend="torch")(batch).double()
    want = torch.stack([alone_logps(model, s, p) for e in ex
                        for s, p in ((e.chosen, e.chosen_prompt), (e.rejected, e.rejected_prompt))])
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-4, msg=f"seed {seed}")
    # the same row as one sequence (positions that do not restart, one bound) lets later
    # sequences see earlier ones: this must change their log-probs (the check above can fail)
    n = batch["input_ids"].shape[1]
    leaky = dict(batch, position_ids=torch.arange(n)[None], cu_seqlens=torch.tensor([0, n]))
    with torch.no_grad():
        mixed = Policy(model, backend="torch")(leaky).double()
    assert (mixed[1:] - want[1:]).abs().max() > 1e-3


def test_gradients_reach_body_and_head_with_and_without_checkpointing():
    tok = build_tokenizer()
    ex, _ = D.encode_pairs(tok, _records(2, random.Random()), 64)
    batch = D.pack(ex, [0, 1])
    grads = []
    for checkpointing in (False, True):
        model = build_model("qwen3", seed=3).train()
        if checkpointing:
            enable_checkpointing(model)
        pi = Policy(model, backend="torch")(batch)
        (pi * torch.randn(pi.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        head = model.get_output_embeddings().weight
        assert head.grad is not None and head.grad.abs().sum() > 0
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_attention_choice(tmp_path):
    from spot.config import ConfigError
    from spot.model import attn_implementation, load_model
    build_model("qwen3", seed=1).save_pretrained(tmp_path)
    assert load_model(str(tmp_path), attn="eager").config._attn_implementation == "eager"
    assert load_model(str(tmp_path)).config._attn_implementation == "spot_varlen"  # auto, CPU
    with pytest.raises(ConfigError, match="flash_attention_2 needs a GPU and bf16"):
        attn_implementation("cpu", True, "flash_attention_2")
    with pytest.raises(ConfigError, match="attn: must be one of"):
        attn_implementation("cpu", True, "flash")
    try:
        import flash_attn  # noqa: F401
    except Exception:  # the usual case here: asked for by name, its absence is an error
        with pytest.raises(ConfigError, match="needs flash-attn, which does not import"):
            attn_implementation("cuda", True, "flash_attention_2")
        assert attn_implementation("cuda", True, "auto") == "sdpa"


def test_auto_attention_falls_back_for_models_without_sdpa(tmp_path):
    """MPT has no SDPA path (Gemma-2 had none until transformers 5.17 and has none again in
    5.24, so it cannot stand for it): auto loads it with eager; asking for sdpa is a one-line
    error."""
    from transformers import AutoConfig, AutoModelForCausalLM, MptForCausalLM

    from spot.config import ConfigError
    from spot.model import load_model
    assert not MptForCausalLM._supports_sdpa  # the premise
    mpt = AutoConfig.for_model("mpt", d_model=32, n_heads=2, n_layers=1, vocab_size=64)
    AutoModelForCausalLM.from_config(mpt).save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="attn: sdpa does not load for this model"):
        load_model(str(tmp_path), attn="sdpa")


def test_auto_attention_falls_back_from_flash_attn(tmp_path, monkeypatch):
    """Where auto picks flash-attn (a GPU under bf16 with flash_attn importable) and the model
    has no flash-attn path (MPT) or transformers refuses it (here: not installed, an
    ImportError), auto loads SDPA, then eager; asked for by name it is a one-line error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spot import model as M
    from spot.config import ConfigError
    monkeypatch.setattr(M, "attn_implementation", lambda *args: "flash_attention_2")
    build_model("qwen3", seed=1).save_pretrained(tmp_path / "qwen3")
    mpt = AutoConfig.for_model("mpt", d_model=32, n_heads=2, n_layers=1, vocab_size=64)
    AutoModelForCausalLM.from_config(mpt).save_pretrained(tmp_path / "mpt")
    assert M.load_model(str(tmp_path / "qwen3")).config._attn_implementation == "sdpa"
    assert M.load_model(str(tmp_path / "mpt")).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="attn: flash_attention_2 does not load"):
        M.load_model(str(tmp_path / "qwen3"), attn="flash_attention_2")


@pytest.mark.parametrize("arch", ["stablelm", "persimmon", "olmoe"])
def test_auto_attention_keeps_packed_sequences_apart(arch, tmp_path):
    """Models that before transformers 5.2 build their mask their own way (StableLM and OLMoE
    have no attention class for varlen, Persimmon builds its mask beside the bounds): whatever
    attention auto loads, each packed sequence gets the hidden states it has alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spot.model import head_inputs, load_model
    from spot_kernels import hf
    cfg = AutoConfig.for_model(arch, vocab_size=96, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, num_experts=4, num_experts_per_tok=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).eval()
    ids = torch.randint(4, 90, (12,))
    with torch.no_grad():
        packed = head_inputs(model, ids[None], None, torch.tensor([0, 5, 12]))[0]
        alone = [hf.head_inputs(model, ids[a:z]).hidden[0] for a, z in ((0, 5), (5, 12))]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5,
                               msg=model.config._attn_implementation)


def test_dropout_is_off_and_the_fingerprint_sees_a_rewritten_middle(tmp_path):
    """The policy trains without dropout (the reference pass has none); a weight file written
    again with one middle tensor changed (same size, same first and last MiB) is a new model to
    the reference cache."""
    import time
    from safetensors.torch import load_file, save_file
    from spot.model import disable_dropout, model_fingerprint
    model = build_model("llama", layers=1, attention_dropout=0.5).train()
    ids = torch.randint(4, 50, (1, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on by default
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
    big = build_model("qwen3", layers=6, hidden_size=128, intermediate_size=384)
    big.save_pretrained(tmp_path)
    before = model_fingerprint(tmp_path)
    path = tmp_path / "model.safetensors"
    assert path.stat().st_size > 4 << 20  # a middle beyond the hashed first and last MiB
    weights = load_file(path)
    weights["model.layers.2.mlp.down_proj.weight"] *= 5
    time.sleep(0.01)
    save_file(weights, path, metadata={"format": "pt"})
    assert model_fingerprint(tmp_path) != before


# families that keep a dropout rate as a float their forward hands to F.dropout, or read from
# the config there (not an nn.Dropout): (model_type, config overrides)
FLOAT_DROPOUTS = [
    ("opt", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                 word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3)),
    ("starcoder2", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, residual_dropout=0.3,
                        embedding_dropout=0.3, attention_dropout=0.3)),
    ("gpt_bigcode", dict(n_embd=32, n_layer=1, n_head=4, attn_pdrop=0.3, resid_pdrop=0.3,
                         embd_pdrop=0.3)),
    ("persimmon", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, attention_dropout=0.3, hidden_dropout=0.3)),
]


def _noisy_then_quiet(model):
    """Two train-mode forwards differ; after ``disable_dropout`` a train-mode forward is the
    eval-mode one."""
    from spot.model import disable_dropout
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # on before
        disable_dropout(model)
        train = model(ids).logits
        model.eval()
        assert torch.equal(train, model(ids).logits)


@pytest.mark.parametrize("arch,kw", FLOAT_DROPOUTS, ids=[a for a, _ in FLOAT_DROPOUTS])
def test_dropout_kept_as_a_float_is_off_too(arch, kw):
    """A train-mode forward after ``disable_dropout`` is the eval-mode one (the reference's), for
    families whose dropout is a float rate and not an ``nn.Dropout`` (it stayed on: nonzero
    rewards at step 0, a noisy policy)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=64, **kw))
    _noisy_then_quiet(model)


def test_every_dropout_module_and_router_jitter_is_off_and_the_saved_config_keeps_its_rates(
        tmp_path):
    """``Dropout1d``-style and alpha dropout modules (their rate is ``p``, no "drop" in the name)
    and a router's jitter noise (Mixtral's ``router_jitter_noise``) are off after
    ``disable_dropout`` too: a train-mode forward is the eval one. The config saved under
    ``config_as_loaded`` keeps the base's rates (the run's zeros would reach the next
    fine-tune), and the running model's stay 0."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from spot.model import config_as_loaded
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, router_jitter_noise=0.5, attention_dropout=0.2))
    extra = [torch.nn.Dropout1d(0.5), torch.nn.AlphaDropout(0.5)]
    model.extra = torch.nn.ModuleList(extra)
    _noisy_then_quiet(model)
    assert all(m.p == 0.0 for m in extra)
    assert model.config.router_jitter_noise == 0.0 and model.config.attention_dropout == 0.0
    del model.extra
    with config_as_loaded(model):
        model.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert (saved.router_jitter_noise, saved.attention_dropout) == (0.5, 0.2)
    assert model.config.router_jitter_noise == 0.0 and model.config.attention_dropout == 0.0


def test_a_package_the_models_own_code_lacks_is_not_blamed_on_the_attention(tmp_path):
    """A --trust-remote-code folder whose code imports a package that is not installed: "cannot
    load" with transformers' own words, for every --attn (not "use --attn eager"); and its code
    is part of the model's fingerprint (an edit there makes the reference cache miss)."""
    import json
    from spot.config import ConfigError
    from spot.model import load_model, model_fingerprint
    (tmp_path / "configuration_mylm.py").write_text(
        "from transformers import LlamaConfig\nclass MyLMConfig(LlamaConfig):\n"
        "    model_type = 'mylm'\n")
    (tmp_path / "modeling_mylm.py").write_text(
        "import some_missing_package_xyz\nfrom transformers import LlamaForCausalLM\n"
        "from .configuration_mylm import MyLMConfig\n"
        "class MyLMForCausalLM(LlamaForCausalLM):\n    config_class = MyLMConfig\n")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="mylm", architectures=["MyLMForCausalLM"], vocab_size=64, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        auto_map={"AutoConfig": "configuration_mylm.MyLMConfig",
                  "AutoModelForCausalLM": "modeling_mylm.MyLMForCausalLM"})))
    for attn in ("sdpa", "varlen", "auto", "eager"):
        with pytest.raises(ConfigError, match="^model: cannot load .*some_missing_package_xyz"):
            load_model(str(tmp_path), "cpu", trust_remote_code=True, attn=attn)
    before = model_fingerprint(tmp_path)
    (tmp_path / "modeling_mylm.py").write_text("# fixed\n" +
                                               (tmp_path / "modeling_mylm.py").read_text())
    assert model_fingerprint(tmp_path) != before


def test_tiny_tokenizer_is_one_token_per_character():
    tok = build_tokenizer()
    text = "a\n\nb \n c"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids and tok.decode(ids) == text
