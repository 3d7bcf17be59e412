"""``acc += x @ y`` into a float32 accumulator, shared by the backends whose gradient GEMMs run
through cuBLAS (``cuda``, and ``triton`` with ``da_bytes``)."""
from __future__ import annotations

import torch

_fp32_out_mm = [True]  # cleared if this torch has no float32-output GEMM for half inputs


def accumulate(acc, x, y):
    """``acc += x @ y`` with ``acc`` float32: for half ``x``, ``y`` one GEMM with a float32
    output when torch offers it (``addmm(..., out_dtype=torch.float32)``), else each product
    rounded once to the inputs' dtype and summed in float32 (on CPU: float32 operands)."""
    if x.dtype == torch.float32:
        acc.addmm_(x, y)
        return
    if x.device.type != "cuda":  # tests on CPU: products of half values are exact in float32
        acc.addmm_(x.float(), y.float())
        return
    if _fp32_out_mm[0]:
        try:
            torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _fp32_out_mm[0] = False
    acc.add_(torch.mm(x, y))
