"""spot-kernels: fused log-probs and SPoT's reward BCE loss from hidden states and the LM head,
never materialising the ``[tokens x vocab]`` logits.

    import spot_kernels as sk
    logp = sk.token_logprobs(hidden, lm_head.weight, targets)             # [N] float32
    out = sk.spot_loss(hidden, lm_head.weight, targets, cu_seqlens, ref_logps, labels)
    out.loss.backward()

Importing this package touches neither CUDA nor Triton; backends load on first use.
"""
from . import hf, nn
from ._checks import value_checks
from ._registry import available_backends
from .functional import (SpotLossOutput, bce_reward_loss, sequence_logprobs, spot_loss,
                         token_logprobs)

__version__ = "0.1.0"

__all__ = ["token_logprobs", "sequence_logprobs", "bce_reward_loss", "spot_loss",
           "available_backends", "value_checks", "SpotLossOutput", "nn", "hf", "__version__"]
