"""Exercise every CUDA kernel of ``spot_kernels._cuda`` once per code path on small shapes, for

    compute-sanitizer --tool memcheck python benchmarks/cuda_memcheck.py

Paths: float32 / float16 / bfloat16 logits; 16-byte and scalar loads (V a multiple of 8 or
not); a warp per row (V <= 2048) and a block per row; with and without bias, softcap, entropy;
ignored and out-of-shard targets; one and several token chunks in the backward; segment sums
with int32 / int64 ``cu_seqlens``; rows padded past V (raw ops), ``valid`` and empty sequences; the BCE with a number and a
device ``delta``; the backward in vocabulary blocks (``chunk_bytes``), in token chunks, and in
two sweeps (a ``chunk_bytes`` with no room for a float32 sum). Each result is checked loosely
against float64 torch on the CPU (outside the sanitizer), so a wrong answer fails too. Exit
code 0: all ran and matched; 1: a mismatch; 2: no GPU or no extension (nothing ran). ``main("cpu")`` runs the
same cases on CPU tensors when ``spot_kernels.cuda`` holds the host build of the kernels
(``tests/test_cuda_host.py`` does that, so this script stays tested without a GPU).
"""
from __future__ import annotations

import os
import sys

# each tensor its own cudaMalloc, so that the sanitizer sees a read past one
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def close(name, ours, truth, tol):
    err = (ours.double().cpu() - truth.double().cpu()).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    ok = err <= tol * scale
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max err {err:.2e} (tol {tol * scale:.1e})")
    return ok


DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def head_case(dtype, n, d, v, bias, softcap, temperature, **options):
    from spot_kernels import cuda
    g = torch.Generator().manual_seed(n * 7 + v)
    h = (torch.randn(n, d, generator=g) / d**0.25).to(dtype).to(DEV)
    w = (torch.randn(v, d, generator=g) / d**0.25).to(dtype).to(DEV)
    b = torch.randn(v, generator=g).to(dtype).to(DEV) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    t[1::7] = v + 3  # another vocabulary shard
    t = t.to(DEV)
    gout = torch.randn(n, generator=g).to(DEV)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=-100)
    logp, lse, ent = cuda.forward(h, w, t, b, return_entropy=True, **kw)
    dh, dw, db = cuda.backward(h, w, t, b, lse, logp, gout, **options, **kw)
    sync()
    # float64 truth on the CPU (outside the sanitizer's instrumented kernels): the reference
    # (shard contract for targets outside [0, V)) and autograd
    from spot_kernels import reference
    leaves = [x.double().cpu().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    t, gout = t.cpu(), gout.cpu()
    b64 = leaves[2] if b is not None else None
    lp64, ent64 = reference.token_logprobs(leaves[0], leaves[1], t, b64, return_entropy=True,
                                           compute_dtype=torch.float64, **kw)
    grads = torch.autograd.grad((lp64 * gout.double()).sum(), leaves)
    lse64 = torch.logsumexp(reference.logits(leaves[0], leaves[1], b64, temperature=temperature,
                                             softcap=softcap, compute_dtype=torch.float64), 1)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    tag = (f"{str(dtype)[6:]} n={n} d={d} v={v} bias={bias} softcap={softcap} "
           f"T={temperature} {options}")
    oks = [close(f"{tag} logp", logp, lp64.detach(), tol),
           close(f"{tag} lse", lse, lse64.detach(), tol),
           close(f"{tag} entropy", ent, ent64.detach(), tol), close(f"{tag} dh", dh, grads[0], tol),
           close(f"{tag} dW", dw, grads[1], tol)]
    if b is not None:
        oks.append(close(f"{tag} db", db, grads[2], tol))
    return all(oks)


def padded_case(dtype):
    """The raw ops on rows whose stride exceeds V (not a multiple of the vector width): 16-byte
    loads with a scalar tail per row; the padding must stay untouched."""
    from spot_kernels import cuda
    v, pad, rows = 1001, 7 if dtype == torch.float32 else 15, 5
    g = torch.Generator().manual_seed(3)
    full = torch.randn(rows, v + pad, generator=g).to(dtype).to(DEV)
    a = full[:, :v]
    t = torch.randint(0, v, (rows,), generator=g).to(DEV)
    grad = torch.randn(rows, generator=g).to(DEV)
    z = a.double().cpu()  # the truth on the CPU, before the epilogue overwrites a
    lse64 = torch.logsumexp(z, 1)
    logp, lse, _ = cuda._lse_forward_op(a, None, t, 0.0, 1.0, -100, False)
    before = full[:, v:].clone()
    cuda._backward_epilogue_op(a, None, t, *cuda.torch_backend.split_lse(lse),
                               cuda.torch_backend.target_complement(logp), grad, 0.0, 1.0, -100)
    sync()
    da = -torch.softmax(z, 1) * grad.double().cpu()[:, None]
    da[torch.arange(rows), t.cpu()] += grad.double().cpu()
    tag = f"padded rows {str(dtype)[6:]} v={v} stride={v + pad}"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    same = bool(torch.equal(full[:, v:], before))
    print(f"{'ok  ' if same else 'FAIL'} {tag} padding untouched")
    return close(f"{tag} lse", lse, lse64, tol) and close(f"{tag} dA", a, da, tol) and same


def segment_case(cu_dtype, average, with_valid):
    from spot_kernels import cuda
    lens = torch.tensor([3, 0, 300, 1, 17])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(cu_dtype)
    n = int(lens.sum())
    x = torch.randn(n, dtype=torch.float64)
    valid = (torch.rand(n) > 0.3) if with_valid else torch.ones(n, dtype=torch.bool)
    out, count = cuda.segment_sums(x.float().to(DEV), cu.to(DEV),
                                   valid.to(DEV) if with_valid else None, average)
    sync()
    truth, cnt = [], []
    for s in range(len(lens)):
        lo, hi = int(cu[s]), int(cu[s + 1])
        m = valid[lo:hi]
        tot, c = x[lo:hi][m].sum(), int(m.sum())
        truth.append(tot / c if average and c else (tot * 0 if average else tot))
        cnt.append(c)
    tag = f"segment_sum cu={str(cu_dtype)[6:]} average={average} valid={with_valid}"
    return (close(f"{tag} sums", out, torch.stack(truth), 1e-5)
            and close(f"{tag} counts", count, torch.tensor(cnt, dtype=torch.float64), 0))


def bce_case(device_delta):
    from spot_kernels import cuda
    s = 300
    pi = torch.randn(s, dtype=torch.float64) * 30 - 100
    rho = pi + torch.randn(s, dtype=torch.float64) * 20
    y = (torch.arange(s) < s // 2).double()
    beta, delta = 0.2, 0.1
    pr = pi.clone().requires_grad_()
    u = beta * (pr - rho) - delta
    loss64 = (y * F.softplus(-u) + (1 - y) * F.softplus(u)).sum() / (s / 2)
    (coef64,) = torch.autograd.grad(loss64, pr)
    d = torch.tensor(delta, device=DEV) if device_delta else delta
    loss, coef = cuda.bce_forward(pi.float().to(DEV), rho.float().to(DEV), y.float().to(DEV),
                                  beta=beta, delta=d, reduction="pairs")
    sync()
    tag = f"bce device_delta={device_delta}"
    return close(f"{tag} loss", loss, loss64.detach(), 1e-5) and close(f"{tag} coef", coef,
                                                                        coef64, 1e-5)


def main(device="cuda"):
    global DEV
    DEV = device
    if device == "cuda" and not torch.cuda.is_available():
        print("cuda_memcheck: no CUDA device; nothing ran")
        return 2
    from spot_kernels import cuda
    ok, why = cuda.available(torch.device(device))
    if not ok:
        print(f"cuda_memcheck: the cuda backend is unavailable: {why}")
        return 2
    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for v in (37, 256, 2051, 4096):  # scalar/vector loads x warp/block per row
            results.append(head_case(dtype, 19, 24, v, bias=v % 2 == 0, softcap=None,
                                     temperature=1.0, token_chunk=19))
        results.append(head_case(dtype, 23, 40, 3000, bias=True, softcap=5.0, temperature=0.8,
                                 token_chunk=6))
        results.append(head_case(dtype, 23, 40, 3000, bias=True, softcap=5.0, temperature=0.8,
                                 chunk_bytes=23 * 1000 * 4))  # vocabulary blocks
        results.append(head_case(dtype, 23, 40, 3000, bias=True, softcap=5.0, temperature=0.8,
                                 chunk_bytes=4 * 23 * 40))  # two sweeps: no room for a sum
        results.append(head_case(dtype, 1, 8, 9, bias=True, softcap=2.0, temperature=1.3,
                                 token_chunk=1))
        results.append(padded_case(dtype))
    for cu_dtype in (torch.int32, torch.int64):
        for average in (False, True):
            for with_valid in (False, True):
                results.append(segment_case(cu_dtype, average, with_valid))
    results += [bce_case(False), bce_case(True)]
    failed = results.count(False)
    print(f"cuda_memcheck: {len(results) - failed}/{len(results)} cases matched")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
