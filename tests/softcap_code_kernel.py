"""A Triton kernel that runs ``tiles.softcap_code``/``softcap_decode`` and ``tiles.tanh`` on a
vector (test_triton.py), in a module of its own: ``@triton.jit`` resolves names in its module's
globals, and the tests import Triton only where it is installed."""
import triton
import triton.language as tl

from spot_kernels.triton.tiles import softcap_code, softcap_decode, tanh


@triton.jit
def kernel(X, T, S, F, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < n, other=0.0)
    t, s = softcap_decode(softcap_code(x))
    tl.store(T + i, t, mask=i < n)
    tl.store(S + i, s, mask=i < n)
    tl.store(F + i, tanh(x), mask=i < n)
