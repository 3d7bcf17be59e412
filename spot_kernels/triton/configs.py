"""Launch configurations: a small table per (D, V, dtype) and device, no autotuning.

Each entry gives ``block_m`` (tokens per tile), ``block_v`` (vocabulary rows per tile),
``block_d`` (the D chunk of each ``tl.dot``), ``num_warps`` and ``num_stages``. The Hopper
(sm_90) rows use 128 x 128 half-precision tiles with 8 warps and a 3-deep software pipeline
(3 x 32 KB of shared memory for the ``h``/``W`` chunks); float32 (IEEE dots, no TF32) halves the
tiles. Other CUDA devices get a conservative 64 x 64 tile that fits every architecture since
Volta. The interpreter (CPU) gets 16 x 32 x 16 tiles so tests reach several tiles with tiny
shapes. Every block is clipped to the problem (never below 16, ``tl.dot``'s minimum) and any
field can be overridden with ``backend_options``.

These numbers are starting points chosen from the tile arithmetic above, not measured ones:
no GPU was available when they were written (see the package docstring).
"""
from __future__ import annotations

import functools

import torch
import triton

FIELDS = ("block_m", "block_v", "block_d", "num_warps", "num_stages")

_INTERPRETER = dict(block_m=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
_DEFAULT = dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
# (kernel, dtype class, D > 2048) -> config on sm_90
_HOPPER = {
    ("forward", "half", False): dict(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    ("forward", "half", True): dict(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=4),
    ("forward", "fp32", False): dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=3),
    ("forward", "fp32", True): dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=3),
    ("backward", "half", False): dict(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=2),
    ("backward", "half", True): dict(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=2),
    ("backward", "fp32", False): dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
    ("backward", "fp32", True): dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
# Small vocabularies: a narrower vocabulary tile wastes less on the ragged last tile.
_SMALL_V = 4096


@functools.lru_cache(maxsize=None)
def device_info(device):
    """``(compute capability, SM count)``; ``((0, 0), 1)`` for the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return (0, 0), 1
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def _clip(block, size):
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def pick(kernel, n, d, v, dtype, device, interpreted, overrides):
    """The config for ``kernel`` ("forward" or "backward") on this problem."""
    if interpreted:
        cfg = dict(_INTERPRETER)
    else:
        capability, _ = device_info(device)
        kind = "fp32" if dtype == torch.float32 else "half"
        cfg = dict(_HOPPER[(kernel, kind, d > 2048)] if capability == (9, 0) else _DEFAULT)
        if v <= _SMALL_V:
            cfg["block_v"] = min(cfg["block_v"], 64)
    cfg["block_m"] = _clip(cfg["block_m"], n)
    cfg["block_v"] = _clip(cfg["block_v"], v)
    cfg["block_d"] = _clip(cfg["block_d"], d)
    cfg.update({k: overrides[k] for k in FIELDS if k in overrides})
    return cfg
