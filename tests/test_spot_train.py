"""spot.train: one step against a plain unfused TRL ``bco_pair`` (and DPO), delta semantics,
exact resume after an interruption, and a 2-process torchrun (gloo, FSDP2) against one process."""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import spot_kernels as sk
from spot import data as D
from spot.config import TrainConfig
from spot.demo import make_pairs
from spot.model import Policy
from spot.tiny import build_model, build_tokenizer
from spot.train import Delta, compute_loss, train

from conftest import dispatched

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


class TRLRunningMoments:
    """TRL's RunningMoments update (mean/var/count), written out independently for the test."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs = torch.as_tensor(xs, dtype=torch.float64)
        n = xs.numel()
        var, mean = torch.var_mean(xs, unbiased=False)
        d = float(mean) - self.mean
        tot = self.count + n
        self.var = (self.var * self.count + d * d * self.count * n / tot + float(var) * n) / tot
        self.mean += d * n / tot
        self.count = tot


def unfused_logps(model, ex):
    """Each sequence alone through the full model; logits materialised."""
    out = []
    for seq, plen in ((ex.chosen, ex.chosen_prompt), (ex.rejected, ex.rejected_prompt)):
        ids = torch.tensor(seq)[None]
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logp[plen - 1:].sum())
    return out


@pytest.mark.parametrize("loss_kind", ["spot", "dpo"])
def test_one_step_equals_unfused_trl(loss_kind):
    seed = random.randrange(1 << 30)
    tok = build_tokenizer()
    pairs = [D.to_pair(r, "x") for r in make_pairs(4, seed)]
    ex, _ = D.encode_pairs(tok, pairs, 128)
    policy_model = build_model("qwen3", seed=seed % 997)
    ref_model = build_model("qwen3", seed=seed % 997 + 1)  # a different reference: rewards != 0
    truth_model = copy.deepcopy(policy_model)
    with torch.no_grad():
        ref = torch.stack([x for e in ex for x in unfused_logps(ref_model, e)])
    beta = 0.1
    prior = [random.uniform(-0.5, 0.5) for _ in range(3)]  # delta has a history
    delta, moments = Delta("running"), TRLRunningMoments()
    for x in prior:
        delta.update([x])
        moments.update([x])
    cfg = TrainConfig(model="m", data="d", output="o", beta=beta, loss=loss_kind)
    batch = D.pack(ex, [0, 1, 2, 3])
    loss, stats = compute_loss(Policy(policy_model, backend="torch"), batch, ref, delta, cfg)
    loss.backward()

    # TRL bco_pair (and DPO), unfused
    logps = [unfused_logps(truth_model, e) for e in ex]
    pc = torch.stack([c for c, _ in logps])
    pr = torch.stack([r for _, r in logps])
    rc = beta * (pc - ref[0::2])
    rr = beta * (pr - ref[1::2])
    moments.update(torch.cat([rc, rr]).mean().detach().reshape(1))
    if loss_kind == "spot":
        want = (-F.logsigmoid(rc - moments.mean) - F.logsigmoid(-(rr - moments.mean))).mean()
    else:
        want = -F.logsigmoid(rc - rr).mean()
    want.backward()
    assert abs(stats["delta"] - moments.mean) < 1e-6
    # every stat of the loss is logged (the trainer lists them in STAT_KEYS)
    _, every = sk.bce_reward_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]))
    assert set(stats) == set(every) - {"rewards"} | {"loss", "delta"}
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert abs(stats["accuracy"] - float((rc > rr).float().mean())) < 1e-6
    named = dict(truth_model.named_parameters())
    for name, p in policy_model.named_parameters():
        g, t = p.grad, named[name].grad
        assert t.abs().max() > 0, name
        torch.testing.assert_close(g, t, rtol=1e-3, atol=1e-5 * t.abs().max().item(),
                                   msg=f"{name} (seed {seed})")


def test_delta_running_and_ema_semantics():
    rng = random.Random()
    d, m = Delta("running"), TRLRunningMoments()
    for _ in range(6):  # updates merged over a random number of ranks
        xs = [rng.uniform(-1, 1) for _ in range(rng.randint(1, 4))]
        d.update(xs)
        m.update(xs)
        assert abs(d.value - m.mean) < 1e-12 and abs(d.count - m.count) < 1e-9
    e = Delta("ema", alpha=0.25)
    xs = [rng.uniform(-1, 1) for _ in range(4)]
    want = xs[0]
    e.update([xs[0]])
    for x in xs[1:]:
        want = 0.75 * want + 0.25 * x
        e.update([x])
    assert abs(e.value - want) < 1e-12
    z = Delta("zero")
    assert z.update([1.0]) == 0.0 and z.value == 0.0
    r = Delta("running")
    r.load_state_dict(d.state_dict())
    assert (r.mean, r.count) == (d.mean, d.count)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny saved model + tokenizer and a JSONL of pairs."""
    d = tmp_path_factory.mktemp("spot")
    build_model("qwen3", seed=11).save_pretrained(d / "model")
    build_tokenizer().save_pretrained(d / "model")
    with open(d / "pairs.jsonl", "w") as fh:
        for r in make_pairs(12, random.randrange(1 << 30)):
            fh.write(json.dumps(r) + "\n")
    return d


def _cfg(workdir, out, **kw):
    base = dict(model=str(workdir / "model"), data=str(workdir / "pairs.jsonl"), output=str(out),
                lr=1e-3, max_steps=4, tokens_per_batch=300, progress=False, backend="torch",
                device="cpu")  # the CPU's numbers on a GPU machine too
    return TrainConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


def test_varlen_attention_trains_as_sdpa_does(workdir, tmp_path):
    """``--attn varlen`` (each packed sequence alone, no N x N mask) and SDPA (the block mask)
    give the same losses and rewards step by step."""
    rows = {}
    for attn in ("sdpa", "varlen"):
        train(_cfg(workdir, tmp_path / attn, attn=attn, max_steps=3), log=lambda m: None)
        rows[attn] = [json.loads(x) for x in open(tmp_path / attn / "metrics.jsonl")]
    assert len(rows["varlen"]) == 3
    for a, b in zip(rows["sdpa"], rows["varlen"]):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "delta"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_resume_after_interruption_is_exact(workdir, tmp_path):
    full = train(_cfg(workdir, tmp_path / "full", save_every=2), log=lambda m: None)
    assert full["steps"] == 4

    def crash(msg):  # dies right after step 3: checkpoint-2 is the newest
        if msg.startswith("step 3/"):
            raise Interrupt

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(_cfg(workdir, out, save_every=2), log=crash)
    (out / ".tmp-checkpoint-4").mkdir()  # a half-written checkpoint must be ignored
    resumed = train(_cfg(workdir, out, save_every=2, resume=True), log=lambda m: None)
    assert resumed["steps"] == 4
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    init = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(out / "metrics.jsonl")]
    # step 3 ran twice (before the crash and after the resume from step 2): logged once
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for r, rb in zip(rows_a, rows_b):
        assert r["loss"] == rb["loss"] and r["delta"] == rb["delta"]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen3"


def test_resume_keeps_the_runs_reference_when_the_model_files_change(workdir, tmp_path):
    """A checkpoint keeps the reference log-probs of the run's start: resumed after the
    ``--model`` folder got other weights (a new revision at the same path), the run scores
    against its own reference and ends as the uninterrupted run did, saying the files changed
    (the reference was computed again from the new weights before, and the run went elsewhere)."""
    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    full = train(_cfg(workdir, tmp_path / "full", model=str(model), save_every=2),
                 log=lambda m: None)

    def crash(msg):
        if msg.startswith("step 3/"):
            raise Interrupt

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(_cfg(workdir, out, model=str(model), save_every=2), log=crash)
    build_model("qwen3", seed=999).save_pretrained(model)
    lines = []
    resumed = train(_cfg(workdir, out, model=str(model), save_every=2, resume=True),
                    log=lines.append)
    assert any("files of" in line and "changed since this run began" in line for line in lines)
    assert not any(line.startswith("reference log-probs: ") and "sequences in" in line
                   for line in lines)  # no reference pass
    assert torch.equal(resumed["ref_logps"].cpu(), full["ref_logps"].cpu())
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_and_the_final_model_keep_the_base_models_dropout(workdir, tmp_path):
    """The run trains without dropout (its config's rates zeroed, as the reference pass has
    none), but what it saves is the base's config: a later fine-tune of the output gets the
    base's dropout back, not the run's zeros."""
    import json
    model = tmp_path / "base"
    build_model("qwen3", seed=11, attention_dropout=0.3).save_pretrained(model)
    shutil.copytree(workdir / "model", model, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    out = tmp_path / "out"
    train(_cfg(workdir, out, model=str(model), max_steps=2, save_every=1), log=lambda m: None)
    for folder in (out, out / "checkpoint-1"):
        assert json.loads((folder / "config.json").read_text())["attention_dropout"] == 0.3


def test_a_torn_reference_cache_is_computed_again(workdir, tmp_path):
    """A cache file cut short (a power loss) or holding something else is not a traceback on
    every later run: a line says so, the reference is computed again, the cache rewritten."""
    first = train(_cfg(workdir, tmp_path / "a", max_steps=1), log=lambda m: None)
    cache = next((tmp_path / "a" / ".cache").glob("ref-*.pt"))
    for damage in (lambda f: f.write_bytes(f.read_bytes()[:100]),
                   lambda f: torch.save(torch.zeros(3), f)):
        damage(cache)
        lines = []
        again = train(_cfg(workdir, tmp_path / "b", max_steps=1, cache_dir=str(cache.parent)),
                      log=lines.append)
        assert any("computing them again" in line for line in lines), lines
        assert torch.equal(again["ref_logps"].cpu(), first["ref_logps"].cpu())
        assert torch.equal(torch.load(cache), first["ref_logps"].cpu())
        assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary left
        shutil.rmtree(tmp_path / "b")


def test_the_optimizer_sees_the_schedule_the_clip_and_the_decay_groups(workdir, tmp_path,
                                                                     monkeypatch):
    """What AdamW gets, step by step: the learning rate of the cosine schedule with warmup (the
    one metrics.jsonl logs for that step), gradients clipped to --max-grad-norm (the logged
    grad_norm is the norm before clipping), and weight decay on matrices only; with --delta ema
    the shift follows --ema-alpha."""
    from spot.train import lr_lambda
    seen, groups = [], []
    init, step = torch.optim.AdamW.__init__, torch.optim.AdamW.step

    def record_init(self, params, *a, **k):
        groups.extend(params)
        init(self, params, *a, **k)

    def record_step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"],
                     torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                           for g in grads])).item()))
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "__init__", record_init)
    monkeypatch.setattr(torch.optim.AdamW, "step", record_step)
    cfg = _cfg(workdir, tmp_path / "o", max_steps=4, warmup_ratio=0.5, max_grad_norm=1e-3,
               weight_decay=0.05, delta="ema", ema_alpha=0.5)
    result = train(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    f = lr_lambda(4, 0.5)
    assert [f(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5])
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * f(s) for s in range(4)])
    assert [lr for lr, _ in seen] == pytest.approx([r["lr"] for r in rows])  # used as logged
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, norm in seen), seen
    assert all(r["grad_norm"] > 1e-3 for r in rows)
    decay, plain = groups
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in plain["params"])
    params = list(result["policy"].parameters())
    assert len(decay["params"]) + len(plain["params"]) == len(params)
    assert rows[0]["delta"] == pytest.approx(rows[0]["reward_mean"], abs=1e-9)
    for prev, row in zip(rows, rows[1:]):
        assert row["delta"] == pytest.approx(0.5 * prev["delta"] + 0.5 * row["reward_mean"],
                                             rel=1e-6, abs=1e-9)


def test_each_epoch_shuffles_anew_and_keeps_every_pair():
    """Epoch e's order is its own permutation (seed + 7919 e), and an epoch whose micro-batches
    do not fill the last step is padded by wrapping, so no pair of it is left out."""
    from types import SimpleNamespace
    from spot.train import epoch_plan, schedule_steps
    examples = [D.Example([1] * (3 + i % 4), [2] * (2 + i % 3), 1, 1) for i in range(21)]
    cfg = SimpleNamespace(seed=3, tokens_per_batch=30, epochs=2, max_steps=None)
    for e in range(2):
        order = torch.randperm(21, generator=torch.Generator().manual_seed(3 + 7919 * e)).tolist()
        assert [i for mb in epoch_plan(examples, e, cfg, 1) for i in mb] == order
    assert epoch_plan(examples, 0, cfg, 1) != epoch_plan(examples, 1, cfg, 1)
    plain = epoch_plan(examples, 0, cfg, 1)
    assert len(plain) % 4  # the case: the micro-batches do not fill steps of 4
    steps, plans = schedule_steps(examples, cfg, 4)
    for e in range(2):
        used = [plans[e][s * 4 + k] for ee, s in steps if ee == e for k in range(4)]
        assert {i for mb in used for i in mb} == set(range(21))


def test_a_seed_near_2_to_the_64_plans_every_epoch():
    """Every seed ``--seed`` accepts plans its epochs (``seed + 7919 e`` wraps at 2^64, where
    torch's seeds wrap: -1 and 2^64 - 1 give the same order)."""
    from types import SimpleNamespace
    from spot.train import epoch_plan
    examples = [D.Example([1, 2, 3], [1, 2, 4], 1, 1) for _ in range(6)]
    plans = {}
    for seed in (2**64 - 1, -1):
        cfg = SimpleNamespace(seed=seed, tokens_per_batch=16)
        plans[seed] = [epoch_plan(examples, e, cfg, 1) for e in range(3)]
    assert plans[2**64 - 1] == plans[-1]


def test_a_signal_stops_after_the_step_with_a_checkpoint(workdir, tmp_path):
    """SIGTERM (or a first Ctrl-C) mid-run: the step in progress finishes, a checkpoint of it is
    written (no --save-every needed), no final model; --resume then ends where an uninterrupted
    run ends. A second Ctrl-C stops at once. The handlers are restored afterwards, and
    transformers' own progress bars are off while a run without progress bars runs."""
    import signal
    from spot.train import checkpoints
    from transformers.utils import logging as hf_logging
    train(_cfg(workdir, tmp_path / "full"), log=lambda m: None)
    bars = []

    def on_log(msg):
        bars.append(hf_logging.is_progress_bar_enabled())
        if msg.startswith("step 2/"):  # step 2 is done and logged: step 3 sees the request
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    hf_logging.enable_progress_bar()
    out = tmp_path / "cut"
    cut = train(_cfg(workdir, out), log=on_log)
    assert cut["interrupted"] == 3 and cut["steps"] == 3
    assert [p.name for _, p in checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert bars and not any(bars) and hf_logging.is_progress_bar_enabled()
    resumed = train(_cfg(workdir, out, resume=True), log=lambda m: None)
    assert resumed["steps"] == 4 and "interrupted" not in resumed
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def twice(msg):
        if msg.startswith("step 1/"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(workdir, tmp_path / "at-once"), log=twice)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not checkpoints(tmp_path / "at-once")


def test_spot_train_exits_130_after_a_signal(workdir, tmp_path, capsys):
    """The command line: SIGTERM mid-run (sent by another thread once steps are logged) ends
    with the checkpoint, the line saying how to continue, and exit status 130."""
    import signal
    from conftest import signal_once_logged
    from spot.cli import main
    out = tmp_path / "cli"
    signal_once_logged(out / "metrics.jsonl", signal.SIGTERM)
    code = main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
                 "--output", str(out), "--max-steps", "100000", "--lr", "1e-3",
                 "--tokens-per-batch", "300", "--backend", "torch", "--no-progress",
                 "--device", "cpu",
                 "--log-every", "100000"])
    err = capsys.readouterr().err
    assert code == 130 and "continue with --resume" in err, err[-2000:]
    from spot.train import checkpoints
    assert len(checkpoints(out)) == 1 and not (out / "model.safetensors").exists()


def test_keep_checkpoints_and_a_short_refusal(workdir, tmp_path):
    from spot.config import ConfigError
    from spot.train import checkpoints
    train(_cfg(workdir, tmp_path / "all", max_steps=5, save_every=1, keep_checkpoints=0),
          log=lambda m: None)
    assert [s for s, _ in checkpoints(tmp_path / "all")] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"4 checkpoints \(checkpoint-1 \.\. checkpoint-4\)"):
        train(_cfg(workdir, tmp_path / "all", max_steps=5, save_every=1), log=lambda m: None)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / ".tmp-checkpoint-9").mkdir()  # a write that never finished
    train(_cfg(workdir, tmp_path / "two", max_steps=5, save_every=1), log=lambda m: None)
    assert [s for s, _ in checkpoints(tmp_path / "two")] == [3, 4]  # the default keeps 2
    assert not list((tmp_path / "two").glob(".tmp-*"))
    cfg = _cfg(workdir, tmp_path / "x", save_every=None, keep_checkpoints=None).validate()
    assert cfg.save_every == cfg.keep_checkpoints == 0  # a YAML null: never / all


def test_torchrun_two_processes_agree_with_one(workdir, tmp_path):
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "spot", "train",
           "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
           "--output", str(out2), "--max-steps", "3", "--lr", "1e-3", "--delta", "running",
           "--tokens-per-batch", "300", "--backend", "torch", "--no-progress", "--device", "cpu",
           "--save-every", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun leaves its folder there
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(_cfg(workdir, tmp_path / "one", max_steps=3, delta="running", grad_accum=2),
                log=lambda m: None)
    a, b = load_file(out2 / "model.safetensors"), load_file(Path(one["output"]) / "model.safetensors")
    init = load_file(workdir / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any((a[k] - init[k]).abs().max() > 1e-4 for k in a)
    state = torch.load(out2 / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and all(set(r) == {"torch", "python", "cuda"}
                                          for r in state["rng"])  # each rank's generators
    rows2 = [json.loads(x) for x in open(out2 / "metrics.jsonl")]
    rows1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    for r2, r1 in zip(rows2, rows1, strict=True):
        for key in ("loss", "accuracy", "rewards_chosen", "grad_norm", "delta"):
            assert abs(r2[key] - r1[key]) < 1e-4 * max(1, abs(r1[key])), (key, r2, r1)
        assert r2["tokens"] == r1["tokens"]
    assert any(abs(r["delta"]) > 1e-3 for r in rows1)  # the running delta moved


@pytest.mark.parametrize("kind", ["running", "ema"])
def test_ranks_take_the_delta_one_process_would(kind):
    """Under torchrun each update gets every rank's micro-batch mean: rank r's delta is the one
    a single process taking those micro-batches in turn would use for micro-batch r, and the
    state after the update is the one after them all (one update of all means for every rank
    gave other deltas, and EMA a K times slower average)."""
    from spot.train import Delta
    means = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    one, used_one = Delta(kind, alpha=0.3), []
    for m in means:
        used_one.append(float(one.update(m.reshape(1))))
    for world in (2, 3, 4):
        ranks = [Delta(kind, alpha=0.3) for _ in range(world)]
        used = []
        for k in range(0, 12, world):
            used += [float(d.update(means[k:k + world], r)) for r, d in enumerate(ranks)]
        assert used == pytest.approx(used_one, rel=1e-12, abs=1e-15), world
        assert all(float(d.value) == pytest.approx(float(one.value), rel=1e-12) for d in ranks)


def test_spot_fsdp_shards_a_single_process(workdir, tmp_path):
    """SPOT_FSDP=1 under torchrun with one process: the trainer sets up the process group and
    runs the sharded path (FSDP2, the collectives) in a world of one, to the same weights as
    a plain run."""
    out = tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--standalone", "-m", "spot", "train",
           "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
           "--output", str(out), "--max-steps", "2", "--lr", "1e-3", "--delta", "running",
           "--tokens-per-batch", "300", "--backend", "torch", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), SPOT_FSDP="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 processes" in proc.stderr + proc.stdout
    plain = train(_cfg(workdir, tmp_path / "plain", max_steps=2, delta="running"),
                  log=lambda m: None)
    a = load_file(out / "model.safetensors")
    b = load_file(Path(plain["output"]) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    bad = dict(env, SPOT_DIST_TIMEOUT_S="soon")
    proc = subprocess.run(cmd[:-1] + ["cpu", "--output", str(tmp_path / "bad")], env=bad,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0 and "SPOT_DIST_TIMEOUT_S must be a number of seconds, got 'soon'" \
        in proc.stderr


def test_torchrun_stops_every_rank_when_one_is_signalled(workdir, tmp_path):
    """SIGTERM to one worker only (a preempted node): the ranks agree through the step's
    all-reduce, so both stop after the same step and the checkpoint of that step is written."""
    import shutil
    import signal
    import time
    if shutil.which("pgrep") is None:
        pytest.skip("needs pgrep to find the workers")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "spot", "train",
           "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
           "--output", str(out), "--max-steps", "100000", "--lr", "1e-3",
           "--tokens-per-batch", "300", "--backend", "torch", "--no-progress", "--device", "cpu",
           "--log-every", "100000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun leaves its folder there
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists()
                   and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGTERM)
        log = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    from spot.train import checkpoints
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s for s, _ in checkpoints(out)] == [len(rows)], log[-3000:]
    assert "stopped after step" in log and not (out / "model.safetensors").exists(), log[-3000:]


def test_a_used_output_is_resumed_or_refused(workdir, tmp_path):
    """A second run into the same folder must say --resume (no mixed metrics or checkpoints);
    --resume refuses a checkpoint of other settings, ignores look-alike and torn folders with a
    clear error, and restarts cleanly at step 0 when there is no checkpoint."""
    from spot.config import ConfigError
    out = tmp_path / "run"
    train(_cfg(workdir, out, max_steps=3, save_every=2), log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds a run .*checkpoint-2.*--resume"):
        train(_cfg(workdir, out, max_steps=3, save_every=2), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"final model of a run with other settings "
                                          r"\(lr 0.001 -> 0.5, seed 0 -> 9\)"):
        train(_cfg(workdir, out, max_steps=3, save_every=2, lr=0.5, seed=9, resume=True))
    weights = (out / "model.safetensors").stat().st_mtime_ns
    lines = []  # finished: nothing to redo
    res = train(_cfg(workdir, out, max_steps=3, save_every=2, resume=True), log=lines.append)
    assert res["finished"] and any("nothing to do" in ln for ln in lines), lines
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    (out / "spot_config.json").unlink()  # as if killed while writing the final model
    with pytest.raises(ConfigError, match=r"checkpoint-2 belongs to a run with other settings "
                                          r"\(lr 0.001 -> 0.5, seed 0 -> 9\)"):
        train(_cfg(workdir, out, max_steps=3, save_every=2, lr=0.5, seed=9, resume=True))
    (out / "checkpoint-7-backup").mkdir()  # not a checkpoint name: ignored
    (out / "checkpoint-7-backup" / "trainer_state.pt").write_bytes(b"")
    lines = []
    train(_cfg(workdir, out, max_steps=3, save_every=2, resume=True), log=lines.append)
    assert any("resumed from" in ln and "checkpoint-2 at step 2" in ln for ln in lines), lines
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3]
    (out / "spot_config.json").unlink()
    (out / "checkpoint-9").mkdir()  # a foreign or torn folder that looks complete
    (out / "checkpoint-9" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="cannot read .*checkpoint-9.*delete"):
        train(_cfg(workdir, out, max_steps=3, save_every=2, resume=True))
    fresh = tmp_path / "fresh"  # killed before its first checkpoint: --resume starts over
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "lo')  # torn
    lines = []
    train(_cfg(workdir, fresh, max_steps=2, resume=True), log=lines.append)
    assert any("no complete checkpoint" in ln for ln in lines), lines
    rows = [json.loads(x) for x in open(fresh / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9


def test_the_output_is_not_a_model_and_one_run_writes_it(workdir, tmp_path):
    """``--output`` equal to ``--model``, or a folder holding a model that no spot run finished
    there (``config.json`` without ``spot_config.json``), would have its model overwritten:
    refused, ``--resume`` or not, the model untouched. While a run writes its output (it holds
    ``OUTPUT/.train.lock``), another run into it (a job relaunched with ``--resume`` while the
    first still runs) is refused; the lock goes with the run."""
    import shutil
    from spot.config import ConfigError
    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    weights = (model / "model.safetensors").read_bytes()
    for resume in (False, True):
        with pytest.raises(ConfigError, match="is the --model folder"):
            train(_cfg(workdir, model, model=str(model), resume=resume))
        with pytest.raises(ConfigError, match="holds a model that no spot run wrote"):
            train(_cfg(workdir, model, resume=resume))
    assert (model / "model.safetensors").read_bytes() == weights
    assert not (model / ".train.lock").exists()  # refused before anything was written there
    killed = tmp_path / "killed"  # killed while writing its final model, before any checkpoint
    train(_cfg(workdir, killed, max_steps=1), log=lambda m: None)
    (killed / "spot_config.json").unlink()
    lines = []
    train(_cfg(workdir, killed, max_steps=1, resume=True), log=lines.append)
    assert any("starting at step 0" in ln for ln in lines), lines
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", hold, str(out / ".train.lock")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another process"):
            train(_cfg(workdir, out, max_steps=1, resume=True), log=lambda m: None)
    finally:
        other.kill()
        other.wait()
    train(_cfg(workdir, out, max_steps=1, resume=True), log=lambda m: None)
    free = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    assert subprocess.run([sys.executable, "-c", free, str(out / ".train.lock")]).returncode == 0


def test_resume_refuses_other_training_pairs(workdir, tmp_path):
    """The data file is compared by what it encodes to, not by its path: another file under the
    same name (or records edited in place) would resume onto other pairs and another schedule."""
    from spot.config import ConfigError
    data = tmp_path / "pairs.jsonl"
    lines = (workdir / "pairs.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    out = tmp_path / "run"
    train(_cfg(workdir, out, data=str(data), max_steps=3, save_every=2), log=lambda m: None)
    (out / "spot_config.json").unlink()  # as if stopped before the end
    rec = json.loads(lines[0])
    rec = {k: (v + " (edited)" if isinstance(v, str) and k != "prompt" else v) for k, v in rec.items()}
    data.write_text(json.dumps(rec) + "\n" + "".join(lines[1:]))
    with pytest.raises(ConfigError, match="training pairs differ from those of .*checkpoint-2"):
        train(_cfg(workdir, out, data=str(data), max_steps=3, save_every=2, resume=True),
              log=lambda m: None)
    data.write_text("".join(lines))  # the same pairs again: resumes
    msgs = []
    train(_cfg(workdir, out, data=str(data), max_steps=3, save_every=2, resume=True),
          log=msgs.append)
    assert any("resumed from" in m for m in msgs), msgs


def test_a_token_past_the_models_vocabulary_is_a_one_line_error(workdir, tmp_path):
    """A tokenizer with tokens its model's embeddings lack (added without resizing them) would
    fail deep in the embedding (a device assert on a GPU): refused before any model loads."""
    from spot.config import ConfigError
    model = tmp_path / "model"
    build_model("qwen3", seed=11).save_pretrained(model)
    tok = build_tokenizer()
    tok.add_tokens(["<tool>"])
    tok.save_pretrained(model)
    rec = make_pairs(1, 3)[0]
    rec = {k: (v + " <tool>" if isinstance(v, str) and k != "id" else v) for k, v in rec.items()}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ConfigError, match=r"token id 101 \('<tool>'\) is past the model's "
                                          r"vocabulary of 101"):
        train(_cfg(workdir, tmp_path / "out", model=str(model),
                   data=str(tmp_path / "pairs.jsonl")), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_resume_compares_micro_batches_per_step_not_grad_accum(tmp_path):
    """A step is world x grad_accum micro-batches: a 2-process checkpoint with grad_accum 1
    resumes in one process with grad_accum 2 (the same trajectory), not with grad_accum 1."""
    from spot.config import ConfigError
    from spot.train import load_trainer_state
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    cfg = TrainConfig(model="m", data="d.jsonl", output=str(tmp_path), max_steps=4, grad_accum=1)
    torch.save({"config": cfg.to_dict(), "world": 2, "step": 2}, ckpt / "trainer_state.pt")
    same = TrainConfig(**{**cfg.to_dict(), "grad_accum": 2, "epochs": 5})  # epochs: max_steps rules
    assert load_trainer_state(ckpt, same, world=1)["step"] == 2
    with pytest.raises(ConfigError, match=r"micro-batches per step .* 2 -> 1"):
        load_trainer_state(ckpt, cfg, world=1)


def test_bad_settings_are_one_line_errors(workdir, tmp_path, capsys):
    from spot.cli import main
    base = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
            "--output", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "c.yaml").write_text("output: 5\n")
    (tmp_path / "b.yaml").write_text("max-steps: true\n")
    (tmp_path / "latin1.yaml").write_bytes("beta: 0.1  # \u00e9t\u00e9\n".encode("latin-1"))
    build_tokenizer().save_pretrained(tmp_path / "tokonly")  # no config, no weights
    build_tokenizer().save_pretrained(tmp_path / "noweights")
    build_model("qwen3").config.save_pretrained(tmp_path / "noweights")
    build_model("qwen3").save_pretrained(tmp_path / "notok")  # config and weights only
    (tmp_path / "empty").mkdir()
    cases = [(["--model", str(tmp_path / "nosuch")], "model: no such folder"),
             (["--model", str(tmp_path / "file")], f"model: {tmp_path / 'file'} is a file"),
             # transformers 5 builds a tokenizer that encodes nothing, 4.x refuses the folder
             (["--model", str(tmp_path / "notok")],
              ("notok has no usable tokenizer", "model: cannot load a tokenizer")),
             # transformers refuses an empty folder (its error varies) or loads a blank tokenizer
             (["--model", str(tmp_path / "empty")],
              ("model: cannot load a tokenizer", "empty has no usable tokenizer")),
             (["--model", str(tmp_path / "tokonly")], "model: cannot load"),
             (["--model", str(tmp_path / "noweights")], "model: cannot load"),
             (["--keep-checkpoints", "-1"], "--keep-checkpoints: must be >= 0"),
             (["--save-every", "-1"], "--save-every: must be >= 0"),
             (["--backend", "bogus"], "backend: must be"),
             (["--backend", "cuda"], "backend: cuda does not run on cpu"),
             (["--device", "gpu"], "--device: must be auto|cpu|cuda"),
             (["--beta", "inf"], "--beta: must be a finite number"),
             (["--lr", "inf"], "--lr: must be a finite number"),
             (["--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0"),
             (["--warmup-ratio", "1"], "--warmup-ratio: must be in [0, 1)"),
             (["--seed", str(2**70)], "seed: must be in"),
             (["--output", str(tmp_path / "file")], "is a file, not a folder"),
             (["--cache-dir", str(tmp_path / "file")], "cache_dir: "),  # before the ref pass
             (["--config", str(tmp_path / "latin1.yaml")], "latin1.yaml is not UTF-8 text"),
             (["--config", str(tmp_path / "c.yaml")], "--output: expected str"),
             (["--config", str(tmp_path / "b.yaml")], "--max-steps: expected int, got True")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device: cuda, but torch sees no CUDA device"))
    capsys.readouterr()  # the bars of save_pretrained above
    for extra, fragment in cases:
        # a config file's value is checked without flags (which would win over it)
        argv = (base[:5] if extra[0] == "--config" else base) + extra
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        if "noweights" in extra[-1]:  # found when the model loads, after the data's log line
            err = [line for line in err if not line.startswith("data: ")]
        fragments = (fragment,) if isinstance(fragment, str) else fragment
        assert code == 2 and len(err) == 1 and any(f in err[0] for f in fragments), \
            (extra, code, err)
        assert not err[0].endswith(":"), err  # a transformers message cut at "one of:"
    assert not (tmp_path / "o").exists()  # nothing made for a run that never started


def test_progress_bars_for_the_reference_pass_and_the_steps(workdir, tmp_path, capfd):
    train(_cfg(workdir, tmp_path / "bars", max_steps=1, progress=True), log=lambda m: None)
    err = capfd.readouterr().err
    assert "reference: 100%" in err and "spot: 100%" in err, err[-2000:]


def test_each_rank_resumes_its_own_random_state():
    from spot.train import rng_state, set_rng_state

    class Rank1:
        world, rank, device = 2, 1, torch.device("cpu")

    draws = []
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state(Rank1.device))
        draws.append(torch.rand(3))
    torch.manual_seed(3)
    set_rng_state(states, Rank1, log=lambda m: None)
    assert torch.equal(torch.rand(3), draws[1])
    lines = []
    Rank1.world = 3  # resumed on another world size: rank 0's states, and a line saying so
    set_rng_state(states, Rank1, log=lines.append)
    assert torch.equal(torch.rand(3), draws[0]) and "every rank takes rank 0's" in lines[0]


def test_autocast_keeps_no_cast_weights():
    """The trainer's autocast caches no bf16 weight copies: cached, every weight's copy would
    live until the forward ends (undoing gradient checkpointing and FSDP2's resharding)."""
    from spot.train import autocast
    cfg = TrainConfig(model="m", data="d", output="o")
    assert torch.is_autocast_cache_enabled()  # torch's default, which the trainer turns off
    with autocast(cfg, torch.device("cpu")):
        assert not torch.is_autocast_cache_enabled()


def test_device_setting_picks_cpu_or_refuses_a_process_without_a_gpu(monkeypatch):
    """--device cpu keeps a GPU machine's run on the CPU (gloo under torchrun); a torchrun
    process whose LOCAL_RANK has no GPU of its own is a one-line error naming the fix."""
    from spot.config import ConfigError
    from spot.train import Dist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    assert Dist("cpu").device == torch.device("cpu")
    assert Dist("auto").device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Dist("cpu").device == torch.device("cpu")
    for device in ("auto", "cuda"):
        with pytest.raises(ConfigError, match="process 1 of this machine has no GPU of its own "
                                              r"\(1 visible\).*--nproc_per_node 1"):
            Dist(device)


def test_a_model_whose_logits_the_fused_head_misses_is_refused(workdir, tmp_path, monkeypatch):
    """Before the reference pass the fused head is checked against the model's own logits on
    the first pair: a family whose logit transform spot_kernels.hf gets wrong (here HyperCLOVAX's
    multiplying logits_scaling, with hf made to divide as for Granite) stops the run with one
    line, before any output is written; the same model trains when hf knows it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from spot.config import ConfigError
    from spot_kernels import hf
    if "hyperclovax" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no HyperCLOVAX")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "hyperclovax", vocab_size=len(build_tokenizer()), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0))
    model.save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    cfg = dict(model=str(tmp_path / "model"), max_steps=1, cache_dir=str(tmp_path / "cache"))
    wrong = "HyperCLOVAXForCausalLM's own log-probs and the fused head's differ by up to"
    monkeypatch.setattr(hf, "_MULTIPLY_SCALING", set())
    with pytest.raises(ConfigError, match=wrong):
        train(_cfg(workdir, tmp_path / "o", **cfg), log=lambda m: None)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    assert train(_cfg(workdir, tmp_path / "o", **cfg), log=lambda m: None)["steps"] == 1
    assert list((tmp_path / "cache").glob("ref-*.pt"))
    monkeypatch.setattr(hf, "_MULTIPLY_SCALING", set())  # checked with the reference cached too
    with pytest.raises(ConfigError, match=wrong):
        train(_cfg(workdir, tmp_path / "p", **cfg), log=lambda m: None)


def test_a_model_that_is_not_causal_is_refused_in_one_line(workdir, tmp_path, monkeypatch):
    """transformers' CPM-Ant attends to the whole row: the trainer stops before any output with
    one line naming it (its log-probs would have seen their own targets); without the probe the
    same run trains (the refusal is the probe's doing)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from spot.config import ConfigError
    from spot_kernels import hf
    if "cpmant" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no CPM-Ant")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "cpmant", vocab_size=len(build_tokenizer()), hidden_size=32, dim_head=8, dim_ff=64,
        num_hidden_layers=1, num_attention_heads=4))
    model.save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    cfg = dict(model=str(tmp_path / "model"), max_steps=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError,
                       match=r"CpmAntForCausalLM is not causal: .* \(under eager attention\)"):
        train(_cfg(workdir, tmp_path / "o", **cfg), log=lambda m: None)
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(hf, "sees_ahead", lambda model: False)
    assert train(_cfg(workdir, tmp_path / "o", **cfg), log=lambda m: None)["steps"] == 1


@pytest.mark.parametrize("delta_kind", ["running", "zero"])
def test_a_training_micro_step_waits_for_the_device_only_where_it_must(delta_kind):
    """On a GPU every read of a device value makes the host wait. A micro-step (forward, loss,
    backward) as the trainer runs it there (``Policy`` skips the value checks) with SDPA
    attention may read only in transformers' packing detection (its own, once per forward): the
    running ``delta`` is updated on the device, and the stats are read once per step, after it.
    Recorded on the CPU through the dispatcher, which sees the same ops. (The varlen attention
    paths also read the bounds once per forward, and before transformers 5.2 a packed batch runs
    padded, which reads its layout: not covered here.)"""
    import traceback

    from spot_kernels import hf
    if hf._legacy_masks():
        pytest.skip("transformers < 5.2: packed batches run padded (their layout is read)")

    from spot.train import _loss_and_scalars

    def read_outside_transformers(name, args, kwargs):
        sized = name == "repeat_interleave" and kwargs.get("output_size") is not None
        if name not in ("_local_scalar_dense", "nonzero", "masked_select", "unique",
                        "repeat_interleave") or sized:
            return None
        stack = traceback.extract_stack()[:-2]  # not this function, not the recorder
        if any(f.filename.endswith("masking_utils.py") for f in stack):
            return None
        return f"{name} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                           for f in reversed(stack[-11:]))

    tok = build_tokenizer()
    ex, _ = D.encode_pairs(tok, [D.to_pair(r, "x") for r in make_pairs(4, 2)], 128)
    policy = Policy(build_model("qwen3", seed=4, attn_implementation="sdpa"), backend="torch")
    ref = torch.randn(8) - 50
    cfg = TrainConfig(model="m", data="d", output="o", delta=delta_kind)
    delta = Delta(delta_kind)
    batch = D.pack(ex, [0, 1, 2, 3])
    with sk.value_checks(False):  # what Policy does on a GPU
        _loss_and_scalars(policy, batch, ref, delta, cfg)[0].backward()  # the probes, once
        def step():
            _loss_and_scalars(policy, batch, ref, delta, cfg)[0].backward()

        _, reads = dispatched(step, read_outside_transformers)
    assert reads == []
