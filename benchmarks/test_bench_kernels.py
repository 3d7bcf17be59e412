"""Speed and memory of ``token_logprobs`` (forward; forward+backward) and ``spot_loss``
(forward+backward), every available backend of ours next to the peers a user would pick instead:
the naive materialised-logits reference, ``torch.compile`` of it, PyTorch's chunked
``F.linear_cross_entropy``, Liger-Kernel's and Apple's cut-cross-entropy fused linear cross
entropy. Each point is ``mode x head shape x dtype x implementation`` (see ``_bench.cases``);
what is measured and how is explained in ``_bench``'s docstring. Unavailable implementations are
skipped with the reason (``pytest -rs`` lists them).
"""
from __future__ import annotations

import _bench


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        mode = metafunc.function.__name__.removeprefix("test_")
        device = "cuda" if _bench.torch.cuda.is_available() else "cpu"
        full = metafunc.config.getoption("--full")
        cs = _bench.cases(mode, device, full)
        metafunc.parametrize("case", cs, ids=[c.id for c in cs])


def _run(benchmark, case, device, rounds, full, deadline, record):
    benchmark.group = case.group
    record(_bench.bench(benchmark, case, device, rounds=rounds, full=full, deadline=deadline))


def test_fwd(benchmark, case, device, rounds, full, deadline, record):
    _run(benchmark, case, device, rounds, full, deadline, record)


def test_fwd_bwd(benchmark, case, device, rounds, full, deadline, record):
    _run(benchmark, case, device, rounds, full, deadline, record)


def test_spot_loss(benchmark, case, device, rounds, full, deadline, record):
    _run(benchmark, case, device, rounds, full, deadline, record)
