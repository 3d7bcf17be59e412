"""One SPoT training step (forward + backward of a packed batch of pairs), two ways:

* ``fused``    the trainer's path: ``spot.model.Policy`` (body hidden states ->
               ``sk.token_logprobs`` on the response rows -> ``sk.sequence_logprobs``) then
               ``sk.bce_reward_loss``; the ``[tokens x vocab]`` logits never exist;
* ``unfused``  TRL-style: ``model(...).logits`` materialised, ``log_softmax`` in float32, gather,
               per-sequence sums, the same BCE loss.

Cases: the demo model (CPU and GPU), the same body with a 32k vocabulary (where the logits start
to matter); on a GPU a Qwen3-0.6B-shaped model (random weights,
hidden 1024, 28 layers, vocabulary 151,936) at 8192 tokens per batch under bf16 autocast,
with the attention kernel the trainer's ``--attn auto`` picks there (flash-attn, else torch's
varlen kernel, else SDPA; on a CPU one SDPA call per sequence), the same for both ways.
Reports tokens/s and the peak memory above the inputs (``_bench.PeakMemory``: CUDA's allocator
peak, or the process's peak RSS on a CPU) in ``extra_info`` and in the summary notes.
"""
from __future__ import annotations

import random
import statistics
import time

import pytest
import torch

import _bench
import spot_kernels as sk
from spot_kernels import hf
from spot import data as D
from spot.demo import MODEL
from spot import attention
from spot.model import Policy, attn_implementation
from spot.tiny import build_model

CUDA = torch.cuda.is_available()
CASES = {
    "demo": dict(arch=MODEL, tokens=2048, seq=128, gpu_only=False),
    "demo-v32k": dict(arch={**MODEL, "vocab_size": 32768}, tokens=2048, seq=128, gpu_only=False),
    "qwen3-0.6b": dict(arch=dict(hidden_size=1024, layers=28, heads=16, kv_heads=8,
                                 intermediate_size=3072, vocab_size=151936, head_dim=128),
                       tokens=8192, seq=1024, gpu_only=True),
}
_SEEN = {}
_MODELS = {}


def _model(name, case, device):
    """One model per case, shared by its two implementations (a 0.75B-parameter random init
    takes tens of seconds on a few CPU cores); only the newest case's model is kept."""
    if name not in _MODELS:
        _MODELS.clear()
        with torch.device(device):  # initialised where it runs: no host init and copy
            model = build_model("qwen3", **case["arch"])
        model.config.use_cache = False
        # the attention the trainer's --attn auto picks there, for both ways
        kind = attn_implementation(device, True, "auto")
        model.set_attn_implementation(attention.register() if kind == "varlen" else kind)
        _MODELS[name] = model
    return _MODELS[name]


def synthetic_batch(vocab, tokens, seq, seed=0):
    """Pairs of random sequences (a quarter prompt) packed up to ``tokens``."""
    rng = random.Random(seed)
    examples = []
    while sum(e.length for e in examples) + 2 * seq <= tokens:
        plen = seq // 4
        examples.append(D.Example([rng.randrange(vocab) for _ in range(seq)],
                                  [rng.randrange(vocab) for _ in range(seq)], plen, plen))
    return D.pack(examples, list(range(len(examples))))


def unfused_logps(model, batch):
    # a varlen attention gets the sequence bounds made once, as the fused path's hf.head_inputs
    # hands them (else it derives them from position_ids in every layer): the two ways differ
    # in their heads only
    kw = {}
    if hf._takes_varlen(model.config._attn_implementation):
        kw = hf._flash_varlen(hf._segment_ids(batch["position_ids"]))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False, **kw).logits[0]
    rows = batch["rows"]
    logp = torch.log_softmax(logits.index_select(0, rows).float(), -1)
    logp = logp.gather(-1, batch["targets"].index_select(0, rows)[:, None])[:, 0]
    return sk.sequence_logprobs(logp, batch["cu_rows"])


def _start(name, case, deadline):
    """``(device, model)`` of a case, or a skip with its reason."""
    if case["gpu_only"] and not CUDA:
        pytest.skip("a GPU case (Qwen3-0.6B shape)")
    if deadline is not None and _bench.time.monotonic() > deadline:
        pytest.skip("time budget (--budget-s) exhausted")
    device = "cuda" if CUDA else "cpu"
    return device, _model(name, case, device)


def _batch(model, case, device):
    """The case's packed batch on ``device`` and reference log-probs for its sequences."""
    batch = {k: v.to(device) for k, v in
             synthetic_batch(model.config.vocab_size, case["tokens"], case["seq"]).items()}
    return batch, torch.randn(batch["labels"].numel(), device=device) - 50.0


# on a GPU the Qwen3-0.6B step runs right after the main kernel points (see _bench.cases), so
# that a time budget keeps it; the demo-sized steps come last
PRIORITY = {"demo": 48, "demo-v32k": 48, "qwen3-0.6b": 2.5}


def _clocked(step, times):
    """``step`` with its wall-clock seconds appended to ``times`` (it ends synchronised): the
    figures do not depend on pytest-benchmark's statistics, absent under --benchmark-disable."""
    def run():
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return run


@pytest.mark.parametrize("impl", ["unfused", "fused"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.bench_priority(PRIORITY[n]))
                                  for n in CASES])
def test_trainer_step(benchmark, name, impl, request, record, deadline):
    case = CASES[name]
    device, model = _start(name, case, deadline)
    vocab = model.config.vocab_size
    batch, ref = _batch(model, case, device)
    policy = Policy(model)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=CUDA):
            pi = policy(batch) if impl == "fused" else unfused_logps(model, batch)
        loss, _ = sk.bce_reward_loss(pi, ref, batch["labels"], beta=0.1)
        loss.backward()
        _bench.sync(device)

    step()  # warm-up, outside the measured rounds: its one-off allocations are not a step's peak
    mem = _bench.PeakMemory(device)

    def setup():
        model.zero_grad(set_to_none=True)
        mem.start()

    rounds = request.config.getoption("--rounds") or (5 if CUDA else 2)
    benchmark.group = f"trainer step: {name}, {case['tokens']} tokens"
    times = []
    benchmark.pedantic(_clocked(step, times), setup=setup, rounds=rounds, iterations=1,
                       warmup_rounds=0)
    mem.stop()
    model.zero_grad(set_to_none=True)
    seconds = statistics.median(times)
    tokens = batch["input_ids"].numel()
    info = {"case": name, "impl": impl, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "attention": model.config._attn_implementation,
            "peak_mb": None if mem.peak is None else mem.peak / 2**20,
            "logits_mb_fp32": batch["rows"].numel() * vocab * 4 / 2**20}
    benchmark.extra_info.update(info)
    record({"mode": "train", "head": name, "n": tokens, "v": vocab,
            "dtype": "bf16-amp" if CUDA else "float32", "impl": impl, "ms": 1e3 * seconds,
            "tflops": None, "peak_mb": info["peak_mb"]})
    _SEEN[(name, impl)] = info
    other = _SEEN.get((name, "unfused"))
    if impl == "fused" and other:
        note = (f"trainer step {name} ({tokens} tokens, V={vocab}, {device}): fused "
                f"{info['tokens_per_s']:.0f} tok/s, {info['peak_mb'] or 0:.0f} MB peak; unfused "
                f"{other['tokens_per_s']:.0f} tok/s, {other['peak_mb'] or 0:.0f} MB peak; "
                f"attention {info['attention']}")
        request.config.__dict__.setdefault("_bench_notes", []).append(note)


ATTENTION_CASES = {"demo-4k": dict(arch=MODEL, tokens=4096, seq=128, gpu_only=False),
                   "qwen3-0.6b": CASES["qwen3-0.6b"]}


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.bench_priority(48))
                                  for n in ATTENTION_CASES])
def test_trainer_attention(benchmark, name, attn, request, deadline):
    """The fused step with SDPA's block mask over a packed row against ``varlen`` (each packed
    sequence alone: on a CPU one SDPA call per sequence, on a GPU torch's flash varlen
    kernel); last in a GPU run, so a time budget cuts it first."""
    case = ATTENTION_CASES[name]
    device, model = _start(name, case, deadline)
    auto = model.config._attn_implementation  # _model's choice, put back afterwards
    model.set_attn_implementation(attention.register() if attn == "varlen" else attn)
    if attn == "varlen" and not attention.supported(model):
        model.set_attn_implementation(auto)
        pytest.skip("varlen does not run this model")
    batch, ref = _batch(model, case, device)
    policy = Policy(model)
    timed = model.config._attn_implementation  # recorded before ``auto`` is put back

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=CUDA):
            loss, _ = sk.bce_reward_loss(policy(batch), ref, batch["labels"], beta=0.1)
        loss.backward()
        _bench.sync(device)

    try:
        step()  # warm-up
        rounds = request.config.getoption("--rounds") or (5 if CUDA else 2)
        benchmark.group = f"trainer attention: {name}, {case['tokens']} tokens"
        times = []
        benchmark.pedantic(_clocked(step, times), setup=lambda: model.zero_grad(set_to_none=True),
                           rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(auto)
    tokens_per_s = batch["input_ids"].numel() / statistics.median(times)
    benchmark.extra_info.update(case=name, attention=timed,
                                tokens=batch["input_ids"].numel(), tokens_per_s=tokens_per_s)
    _SEEN[(name, "attn", attn)] = tokens_per_s
    other = _SEEN.get((name, "attn", "sdpa"))
    if attn == "varlen" and other:
        request.config.__dict__.setdefault("_bench_notes", []).append(
            f"trainer attention {name} ({case['tokens']} tokens of {case['seq']}-token "
            f"sequences, {device}): varlen {tokens_per_s:.0f} tok/s, sdpa {other:.0f} tok/s "
            f"({tokens_per_s / other:.2f}x)")
