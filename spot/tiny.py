"""Download-free building blocks for the demo and the tests: a character-level tokenizer with a
Qwen-style chat template, and tiny random-weight models of real ``transformers`` architectures.
"""
from __future__ import annotations

import string

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n\t"

# Qwen's ChatML layout; `enable_thinking` is accepted and ignored (there is no thinking mode).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: one token per character, ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character, newlines included ("." would leave a run of them one <unk> piece)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, additional_special_tokens=SPECIAL[:3])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch="qwen3", vocab_size=None, hidden_size=64, layers=2, heads=4, kv_heads=2,
                intermediate_size=128, seed=0, **overrides):
    """A tiny causal LM of a real architecture (``qwen3``, ``llama`` or ``gemma2``), random init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_size = vocab_size or len(SPECIAL) + len(CHARS)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=2048,
                  head_dim=hidden_size // heads, tie_word_embeddings=False,
                  pad_token_id=0, eos_token_id=2, bos_token_id=None)
    if arch == "gemma2":
        kwargs.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                      query_pre_attn_scalar=hidden_size // heads, sliding_window=512)
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    attn = "eager" if arch == "gemma2" else "sdpa"  # some transformers give Gemma-2 no SDPA path
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)
