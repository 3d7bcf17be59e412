"""Launch configurations: a small table per (D, V, dtype) and device, no autotuning.

Each entry gives ``block_m`` (tokens per tile), ``block_v`` (vocabulary rows per tile),
``block_d`` (the D chunk of each ``tl.dot``), ``num_warps`` and ``num_stages``; the default
backward also takes ``group_m`` (token tiles per group of its program order, ``bwd.py``;
``GROUP_M`` = 16 everywhere: 16 tiles of 64 tokens keep ``h`` and the float32 ``dh`` of a group,
24 MB at D = 4096, within the 50 MB L2 of an H100 and the 60 MB of an H200; a larger
``group_m`` than there are token tiles means token-major order and is clipped to that).

The rule that picked them: the largest tiles that compile without spilling registers (a stack
frame of at most 64 bytes a thread, a few values; Triton versions differ by that much), checked
for sm_90a with Triton 3.6 (the version of the GPU machine) and 3.9, as real sizes specialise
the kernels (N, V, D and row strides multiples of 16, which turns on software pipelining) and as
ragged ones do (any N and V with a model's D and row strides: packed batches, vocabulary
shards), with the stack frame read from the cubin (``cuobjdump --dump-resource-usage``). Where
nothing is a multiple of 16 (test shapes, never a real head) they spill, up to about 700 bytes
a thread in the deterministic ``dW`` pass: slower, still correct. Half-precision forward: 128 x 128 x 64 with 8 warps and 3 stages, the wgmma
(``HGMMA``) main loop taking a 64-wide D chunk per stage as Hopper matmuls usually do (128 x
256 tiles spill; 32-wide chunks halve the work between the loop's barriers). Backward kernels
(default with and without the ``hi + lo`` split, both deterministic passes): 64 x 128 x 64 with
8 warps (128 x 128 tiles spill in the deterministic ``dW`` pass). Float32 (IEEE dots, no TF32,
operands in registers): 64 x 64 x 16 with 8 warps (4 warps or a 32-wide D chunk spill). Other
CUDA devices (checked for sm_80): 64 x 64 x 32 for half inputs (4 warps forward; 8 backward,
where the deterministic passes spill a little with 4) and 64 x 64 x 16 with 8 warps and no
pipelining for float32. ``tests/test_triton_compile.py`` keeps every entry that way with the
installed Triton and with 3.6 (installed apart), and also compiles every entry with Triton 3.3,
the oldest supported release, where spills are printed, not failed. The interpreter (CPU) gets 32 x 64 x 64 tiles; tests that need several tiles with
tiny shapes set smaller ones. Every block is clipped to the problem (never below 16, ``tl.dot``'s
minimum) and any field can be overridden with ``backend_options``.

Speed was not measured: no GPU was available when these were chosen. ``benchmarks/tune_triton.py``
(``benchmarks/gpu_suite.sh --tune``) times the candidates on a GPU and prints the fastest.
"""
from __future__ import annotations

import functools

import torch
import triton

FIELDS = ("block_m", "block_v", "block_d", "num_warps", "num_stages")

# the interpreter's cost grows with the number of programs and loop trips, not the tile size
_INTERPRETER = dict(block_m=32, block_v=64, block_d=64, num_warps=1, num_stages=1)
_DEFAULT = {  # (kernel, dtype class) -> config on other CUDA devices
    ("forward", "half"): dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
    ("backward", "half"): dict(block_m=64, block_v=64, block_d=32, num_warps=8, num_stages=2),
    ("forward", "fp32"): dict(block_m=64, block_v=64, block_d=16, num_warps=8, num_stages=1),
    ("backward", "fp32"): dict(block_m=64, block_v=64, block_d=16, num_warps=8, num_stages=1),
}
# (kernel, dtype class, D > 2048) -> config on sm_90 (one entry per D class so that D-specific
# tuning has a place; measured values should replace these starting points)
_HOPPER = {  # (block_m, block_v, block_d, num_warps, num_stages)
    ("forward", "half", False): (128, 128, 64, 8, 3),
    ("forward", "half", True): (128, 128, 64, 8, 3),
    ("forward", "fp32", False): (64, 64, 16, 8, 3),
    ("forward", "fp32", True): (64, 64, 16, 8, 3),
    ("backward", "half", False): (64, 128, 64, 8, 2),
    ("backward", "half", True): (64, 128, 64, 8, 2),
    ("backward", "fp32", False): (64, 64, 16, 8, 2),
    ("backward", "fp32", True): (64, 64, 16, 8, 2),
}
GROUP_M = 16
# Multiply-adds fused (one rounding, fewer instructions), as in every Triton release the kernels
# were tested with; Triton 3.9 warns that 3.10 turns this off by default, so every launch says it
FP_FUSION = dict(enable_fp_fusion=True)
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


def launch_options(cfg):
    """The compile options of a launch with ``cfg``: warps, pipeline stages, FMA fusion."""
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **FP_FUSION)


@functools.lru_cache(maxsize=None)
def l2_bytes(device):
    """The device's L2 cache in bytes (60 MB on an H200); unbounded for CPU tensors."""
    device = torch.device(device)
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.get_device_properties(device).L2_cache_size


def _clip(block, size):
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def pick(kernel, n, d, v, dtype, device, interpreted, overrides):
    """The config for ``kernel`` ("forward" or "backward") on this problem."""
    if interpreted:
        cfg = dict(_INTERPRETER)
    else:
        capability, _ = device_info(device)
        kind = "fp32" if dtype == torch.float32 else "half"
        if capability == (9, 0):
            cfg = dict(zip(FIELDS, _HOPPER[(kernel, kind, d > 2048)]))
        else:
            cfg = dict(_DEFAULT[(kernel, kind)])
        if v <= _SMALL_V:
            cfg["block_v"] = min(cfg["block_v"], 64)
    cfg["block_m"] = _clip(cfg["block_m"], n)
    cfg["block_v"] = _clip(cfg["block_v"], v)
    cfg["block_d"] = _clip(cfg["block_d"], d)
    if kernel == "backward":
        cfg["group_m"] = GROUP_M
    cfg.update({k: overrides[k] for k in FIELDS + ("group_m",) if k in overrides})
    return cfg
