"""Every kernel of the host build on buffers that touch an inaccessible page: one byte read or
written past the end (or before the start) of any argument is a segmentation fault. The build is
the undefined-behaviour sanitizer's (``cuda_host.build(ubsan=True)``), so signed overflow in the
index math and misaligned vector loads abort too. A crash is the signal, so
``tests/test_cuda_host.py`` runs this in a subprocess:

    python -m cuda_host.bounds        (from tests/; exit 0 when every launch stayed inside)

It covers each kernel's paths: float32 / float16 / bfloat16 logits, a warp per row (V <= 2048)
and a block per row, 16-byte and scalar loads, bias, softcap and entropy or not, one and
several rows; segment sums over int32 and int64 ``cu_seqlens`` with and without ``valid``; the
BCE with and without a device ``delta``; each buffer flush against the guard at its end, then
at its start.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def guarded(t, at):
    """A copy of ``t`` whose bytes end right before an inaccessible page (``at="end"``) or start
    right after one (``at="start"``)."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE)
    mm = mmap.mmap(-1, (pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    for page in (0, pages + 1):
        if _libc.mprotect(base + page * PAGE, PAGE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = PAGE if at == "start" else (pages + 1) * PAGE - nbytes
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    out.copy_(t)
    return out


def run(ext):
    g = torch.Generator().manual_seed(0)
    launches = 0
    for at in ("end", "start"):
        def G(t):
            return guarded(t, at)

        for dtype, code in DTYPES.items():
            for v in (37, 1000, 2053, 4096):
                for rows in (1, 9):
                    t = torch.randint(0, v, (rows,), generator=g)
                    t[-1] = v - 1  # the last column of the last row
                    t[0] = -100 if rows > 1 else t[0]
                    t = G(t)
                    biases = (None, G(torch.randn(v, generator=g).to(dtype)))
                    # (bias, softcap, entropy): each kernel's capped and plain paths
                    for bias, cap, with_ent in zip(biases + biases, (2.0, 0.0, 0.0, 2.0),
                                                   (True, False, True, False)):
                        a = G((torch.randn(rows, v, generator=g) * 3).to(dtype))
                        logp, ent = (G(torch.empty(rows)) for _ in range(2))
                        lse = G(torch.empty(rows, dtype=torch.float64))
                        ext.lse_forward(code, a.data_ptr(), rows, v, v,
                                        0 if bias is None else bias.data_ptr(), t.data_ptr(),
                                        cap, 0.9, -100, logp.data_ptr(), lse.data_ptr(),
                                        ent.data_ptr() if with_ent else 0, 0)
                        grad = G(torch.randn(rows, generator=g))
                        hi = G(lse.float())
                        scale = G(torch.exp(-(lse - hi.double())).float())
                        q = G(torch.special.expm1(logp).neg())
                        ext.backward_epilogue(code, a.data_ptr(), rows, v, v,
                                              0 if bias is None else bias.data_ptr(),
                                              t.data_ptr(), hi.data_ptr(), scale.data_ptr(),
                                              q.data_ptr(), grad.data_ptr(), cap, 0.9, -100, 0)
                        launches += 2
                        if not (torch.isfinite(lse).all() and torch.isfinite(a.float()).all()):
                            raise AssertionError(f"non-finite output: {dtype} V={v} rows={rows}")
        for lens in ([3], [0, 5, 1], [700, 0, 33, 260, 1]):
            cu64 = torch.tensor([0] + lens).cumsum(0)
            n = int(cu64[-1])
            x = G(torch.randn(max(n, 1), generator=g))
            valid = G(torch.rand(max(n, 1), generator=g) > 0.3)
            for cu in (G(cu64), G(cu64.int())):
                for vptr in (0, valid.data_ptr()):
                    out, count = G(torch.empty(len(lens))), G(torch.empty(len(lens)))
                    ext.segment_sum(x.data_ptr(), vptr, cu.data_ptr(),
                                    int(cu.dtype == torch.int64), len(lens), 1, out.data_ptr(),
                                    count.data_ptr(), 0)
                    launches += 1
        for s in (1, 3, 600):
            pi, rho = (G(torch.randn(s, generator=g) * 10) for _ in range(2))
            y = G(torch.rand(s, generator=g))
            loss, delta, coef = G(torch.empty(1)), G(torch.full((1,), 0.3)), G(torch.empty(s))
            for dptr in (0, delta.data_ptr()):
                ext.bce_forward(pi.data_ptr(), rho.data_ptr(), y.data_ptr(), s, 0.1, 0.2, dptr,
                                2.0 / s, loss.data_ptr(), coef.data_ptr(), 0)
                launches += 1
    return launches


if __name__ == "__main__":
    import cuda_host

    print(f"{run(cuda_host.build(ubsan=True))} launches stayed inside their buffers")
    sys.exit(0)
