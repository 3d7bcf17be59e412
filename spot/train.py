"""The SPoT training loop, top to bottom (``train(cfg)``).

1. Data: pairs -> chat-templated, truncated token sequences (``spot.data``).
2. Model: ``AutoModelForCausalLM`` wrapped in :class:`spot.model.Policy`, which returns sequence
   log-probs from the body's hidden states through the fused head (no logits). With ``torchrun``
   each decoder layer and then the wrapper are sharded with FSDP2 (``fully_shard``) over NCCL,
   or gloo on CPU.
3. Reference: the same weights at step 0, one ``no_grad`` pass over every sequence, cached on disk
   as ``ref-<fingerprint>.pt`` (fingerprint = model files (``model.model_fingerprint``),
   tokenizer, ``max_length``, backend, bf16 on a GPU, attention kernel and the token ids
   themselves; a torn cache file is computed again); no second model is kept in memory while
   training, and each checkpoint keeps the run's reference log-probs, so a resumed run scores
   against the reference it began with. Dropout is off in the policy
   (TRL's ``disable_dropout``), so the rewards start at 0.
4. Loss (README, "The math"): ``spot_kernels.spot_loss`` per packed micro-batch, with ``delta``
   passed as a callable, so it is updated with the batch-mean reward ``beta (pi - rho)`` (of all
   ranks) *before* the loss uses it, exactly as TRL's ``bco_pair`` did with ``RunningMoments``
   up to TRL 0.28. ``--delta zero`` is the paper's SPoT-BCE (and ``bco_pair`` from TRL 0.29),
   ``--delta ema`` an exponential average.
   ``--loss dpo`` uses ``-log sigmoid(beta ((pi_c - rho_c) - (pi_r - rho_r)))`` instead.
5. Step: AdamW (0.9, 0.95, weight decay on matrices only), cosine schedule with linear warmup,
   gradient accumulation (each micro-batch loss divided by ``grad_accum``; FSDP averages over
   ranks, so K ranks x A micro-batches equal one process with K*A), clipping, bf16 autocast on GPU.
6. Checkpoints ``OUTPUT/checkpoint-STEP``: ``save_pretrained`` (safetensors) + ``trainer_state.pt``
   (optimizer, scheduler, every rank's RNG states, ``delta``, step, data position, reference
   log-probs), written to ``.tmp-...``, synced and renamed into place, so an interrupted write
   never looks complete. Ctrl-C
   or SIGTERM stops the run after the step in progress with a checkpoint of it (a second
   Ctrl-C stops at once). ``--resume`` restarts from the newest one; the data order is a pure
   function of (seed, epoch), so resuming is exact on a CPU (on a GPU up to the atomics and
   attention kernels that do not add in a fixed order: Triton's default backward, SDPA's).
   Under torchrun the process group waits ``SPOT_DIST_TIMEOUT_S`` seconds (default 7200) for
   a rank, long enough for rank 0 to write a large model's checkpoint.

Data order: epoch ``e`` shuffles the pairs with seed ``seed + 7919 e`` and packs them greedily into
micro-batches of at most ``tokens_per_batch`` tokens; the list is padded by wrapping to a multiple
of ``world * grad_accum``; optimizer step ``s`` of the epoch gives rank ``r`` the micro-batches
``s W A + k W + r`` (``k < A``).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spot_kernels import hf
from spot_kernels._registry import resolve as resolve_backend

from . import data as D
from .config import RUN_DEFINING, ConfigError, TrainConfig
from .model import (Policy, attn_implementation, check_tokenizer, config_as_loaded,
                    decoder_layers, disable_dropout, enable_checkpointing, hf_progress_bars,
                    load_error, load_model, model_fingerprint, to_device)
from .rectify.jsonl import OutputLock, atomic_write, fsync_path, read_jsonl, rewrite


# ---------------------------------------------------------------- distributed helpers

class Dist:
    """Rank, world and the few collectives the loop needs (no-ops in one process)."""

    def __init__(self, device="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # SPOT_FSDP=1: the sharded path (FSDP2 and the collectives) in a world of one too, to
        # try it on one GPU (start under torchrun, which sets the rendezvous variables)
        self.on = self.world > 1 or os.environ.get("SPOT_FSDP", "") == "1"
        cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if cuda:
            count = torch.cuda.device_count()  # 0 without CUDA
            if not count:
                raise ConfigError("device: cuda, but torch sees no CUDA device here")
            if self.local_rank >= count:
                raise ConfigError(f"device: process {self.local_rank} of this machine has no GPU "
                                  f"of its own ({count} visible): start torchrun with "
                                  f"--nproc_per_node {count} or fewer, or use --device cpu")
        if cuda:  # before the process group, which then knows this rank's GPU
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.on and not dist.is_initialized():
            # rank 0 writes checkpoints (the whole model and optimizer state) while the others
            # wait in a barrier: NCCL's default 10 minutes can be too short for a large model
            raw = os.environ.get("SPOT_DIST_TIMEOUT_S", "7200")
            try:
                timeout = datetime.timedelta(seconds=float(raw))
            except (ValueError, OverflowError):
                raise ConfigError(f"SPOT_DIST_TIMEOUT_S must be a number of seconds, got "
                                  f"{raw!r}") from None
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                    **({"device_id": self.device} if cuda else {}))

    @property
    def main(self):
        return self.rank == 0

    def sum(self, x):
        """``x`` summed over ranks, on ``x``'s device (the collective runs on this rank's
        device: NCCL takes CUDA tensors only)."""
        if self.on:
            y = x.to(self.device)
            dist.all_reduce(y)
            return y.to(x.device)
        return x

    def max(self, x):
        """``x``'s elementwise maximum over ranks, on ``x``'s device."""
        if self.on:
            y = x.to(self.device)
            dist.all_reduce(y, op=dist.ReduceOp.MAX)
            return y.to(x.device)
        return x

    def barrier(self):
        if self.on:
            dist.barrier()

    def gather(self, obj):
        """Every rank's picklable ``obj`` in rank order on rank 0 (None on the others)."""
        if not self.on:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out


# ---------------------------------------------------------------- delta

class Delta:
    """The reward shift ``delta``.

    ``running``: TRL's ``RunningMoments`` mean: each micro-batch's mean reward ``m`` in turn
    (under ``torchrun`` the ranks' in rank order, each rank using the delta after its own),
    ``count += 1``, ``mean += (m - mean) / count``, starting
    from ``count = 1e-24`` as TRL does. ``ema``: ``delta = (1 - a) delta + a m`` (the first update
    sets it). ``zero``: always 0.

    The state is float64 tensors on the device of the batch means (the same arithmetic as
    Python floats), so an update reads nothing back: a training step reads the GPU for its
    metrics once its work is queued, not in the middle of each forward.
    """

    def __init__(self, kind="running", alpha=0.1):
        self.kind, self.alpha = kind, alpha
        self.mean = torch.zeros((), dtype=torch.float64)
        self.count = torch.full((), 1e-24, dtype=torch.float64)

    def update(self, batch_means, rank=0):
        """``batch_means``: the batch-mean rewards of the ranks' micro-batches, in rank order (a
        list of floats or a 1-D tensor), taken one after another, as one process taking those
        micro-batches in turn would; returns rank ``rank``'s ``delta``, the state after its own
        micro-batch (a 0-dim float64 tensor; ``0.0`` for ``zero``), and keeps the state after
        them all. So K processes follow one process with K times the accumulation, as the rest
        of a step does (one update of all K means for every rank, TRL's multi-GPU way, gave
        each rank another delta than the one process, and EMA a K times slower average)."""
        if self.kind == "zero":
            return 0.0
        xs = torch.as_tensor(batch_means, dtype=torch.float64).detach().reshape(-1)
        mean, count = self.mean.to(xs.device), self.count.to(xs.device)
        mine = mean
        for i in range(xs.numel()):
            if self.kind == "running":
                count = count + 1
                mean = mean + (xs[i] - mean) / count
            else:
                mean = torch.where(count < 1, xs[i], (1 - self.alpha) * mean + self.alpha * xs[i])
                count = count + 1
            if i == rank:
                mine = mean
        self.mean, self.count = mean, count
        return mine

    @property
    def value(self):
        return 0.0 if self.kind == "zero" else self.mean

    def state_dict(self):
        return {"kind": self.kind, "alpha": self.alpha, "mean": float(self.mean),
                "count": float(self.count)}

    def load_state_dict(self, state):
        self.mean = torch.tensor(float(state["mean"]), dtype=torch.float64)
        self.count = torch.tensor(float(state["count"]), dtype=torch.float64)


def dpo_loss(pi, ref, labels, beta):
    """Sigmoid DPO on pairs laid out chosen, rejected, chosen, ...: mean over pairs."""
    logits = beta * ((pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2]))
    return -F.logsigmoid(logits).mean()


def compute_loss(policy, batch, ref_logps, delta, cfg, dst=None):
    """Forward one packed micro-batch through the fused ``spot_loss``; ``delta`` is updated with
    this batch's mean reward (every rank's) before the loss uses it. Returns ``(loss, stats)``."""
    loss, scalars = _loss_and_scalars(policy, batch, ref_logps, delta, cfg, dst)
    # one device-to-host copy for all of them (each float() of a GPU tensor waits for the GPU)
    return loss, dict(zip(STAT_KEYS, scalars.tolist()))


STAT_KEYS = ("reward_mean", "rewards_chosen", "rewards_rejected", "accuracy", "margin",
             "logps_chosen", "logps_rejected", "saturated", "loss", "delta")


def _loss_and_scalars(policy, batch, ref_logps, delta, cfg, dst=None):
    """``compute_loss`` with its stats left on the device, as one float64 tensor in the order of
    ``STAT_KEYS``: the training loop reads them once per step, after the backward is queued."""
    device = batch["input_ids"].device
    ref = ref_logps.to(device)[batch["seq_ids"]]
    labels = batch["labels"].to(device)

    used = [delta.value]  # the delta this micro-batch's loss takes (logged)

    def update_delta(batch_mean):
        if cfg.delta == "zero":
            return 0.0  # nothing to read back
        m = batch_mean.reshape(1)
        if dst is not None and dst.on:
            ms = [torch.zeros_like(m) for _ in range(dst.world)]
            dist.all_gather(ms, m)
            used[0] = delta.update(torch.cat(ms), dst.rank)
        else:
            used[0] = delta.update(m)
        return used[0]

    out = policy(batch, ref, labels, beta=cfg.beta, delta=update_delta)
    loss = dpo_loss(out.policy_logps, ref, labels, cfg.beta) if cfg.loss == "dpo" else out.loss
    values = {**out.stats, "loss": loss.detach(),
              "delta": torch.as_tensor(used[0], dtype=torch.float64, device=device)}
    return loss, torch.stack([values[k].double().reshape(()) for k in STAT_KEYS])


# ---------------------------------------------------------------- data plan

def epoch_plan(examples, epoch, cfg, per_step):
    """Micro-batches (lists of pair indices) of ``epoch``, padded by wrapping to ``per_step``."""
    # modulo 2^64: torch's seeds wrap there (-1 is 2^64 - 1), and a seed near 2^64 plus the
    # epoch's offset would otherwise overflow
    g = torch.Generator().manual_seed((cfg.seed + 7919 * epoch) % 2**64)
    order = torch.randperm(len(examples), generator=g).tolist()
    plan = D.plan_batches(examples, order, cfg.tokens_per_batch)
    pad = (-len(plan)) % per_step
    return plan + [plan[i % len(plan)] for i in range(pad)]


def schedule_steps(examples, cfg, per_step):
    """``[(epoch, step_in_epoch)]`` for every optimizer step of the run, and the plans."""
    plans, steps, epoch = {}, [], 0
    target = cfg.max_steps
    while (target is None and epoch < cfg.epochs) or (target is not None and len(steps) < target):
        plans[epoch] = epoch_plan(examples, epoch, cfg, per_step)
        steps += [(epoch, s) for s in range(len(plans[epoch]) // per_step)]
        epoch += 1
    return (steps[:target] if target else steps), plans


def lr_lambda(total, warmup_ratio):
    warmup = math.ceil(warmup_ratio * total)

    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---------------------------------------------------------------- reference log-probs

@torch.no_grad()
def sequence_logps(policy, examples, cfg, device, dst=None, desc="reference"):
    """``pi`` of every sequence (index ``2 pair + 0/1``) under the current weights, float32
    (with a progress bar named ``desc`` on rank 0 when ``cfg.progress``).

    Under ``torchrun`` rank ``r`` scores micro-batches ``r, r + W, ...``; the list is padded so
    every rank runs as many forwards (FSDP's collectives), padding is not recorded, and a sum
    over ranks assembles the whole vector (each sequence was scored by exactly one rank)."""
    world, rank = (dst.world, dst.rank) if dst else (1, 0)
    plan = D.plan_batches(examples, range(len(examples)), cfg.tokens_per_batch)
    real = len(plan)
    plan += [plan[0]] * ((-real) % world)
    out = torch.zeros(2 * len(examples), dtype=torch.float32, device=device)
    was_training = policy.training
    policy.eval()
    from tqdm import tqdm
    for j in tqdm(range(rank, len(plan), world), desc=desc, unit="batch", dynamic_ncols=True,
                  file=sys.stderr, disable=not (cfg.progress and rank == 0)):
        batch = to_device(D.pack(examples, plan[j]), device)
        with autocast(cfg, device):
            pi = policy(batch)
        if j < real:
            out[batch["seq_ids"]] = pi.float()
    policy.train(was_training)
    if hasattr(policy, "reshard"):  # FSDP2 keeps the root gathered after a forward: free it
        policy.reshard()
    if dst is not None:
        out = dst.sum(out)
    return out.cpu()


def autocast(cfg, device):
    """bf16 autocast on a GPU, without autocast's cache of cast weights: it would keep a bf16
    copy of every weight alive until the forward ends, which undoes gradient checkpointing
    (and FSDP2's resharding: a whole bf16 model on every rank)."""
    dev = torch.device(device).type
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=cfg.bf16 and dev == "cuda",
                          cache_enabled=False)


def data_fingerprint(cfg, tokenizer, examples_fp, device):
    """The reference cache's key: model files, tokenizer, the encoded pairs
    (``data.examples_fingerprint``) and what the reference pass computes in."""
    h = hashlib.sha256()
    h.update(model_fingerprint(cfg.model).encode())
    h.update(D.tokenizer_fingerprint(tokenizer).encode())
    # what the reference pass computed in: bf16 autocast applies on a GPU only
    attn = attn_implementation(device, cfg.bf16, cfg.attn)
    backend = resolve_backend(cfg.backend, device)  # what "auto" runs here, not "auto"
    h.update(f"{cfg.max_length}|{backend}|{cfg.bf16 and device.type == 'cuda'}|{attn}|"
             f"{device.type}".encode())
    h.update(examples_fp.encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- checkpoints

def _fsync_tree(folder):
    """Every file under ``folder`` and the folder itself on disk, before it is renamed into
    place: a power loss after the rename must not leave a complete-looking folder of empty
    files (and the older checkpoints already pruned)."""
    for root, _, files in os.walk(folder):
        for f in files:
            fsync_path(os.path.join(root, f))
        fsync_path(root, folder=True)


def cached_reference(cache, n, log):
    """The reference log-probs cached at ``cache``: a float32 vector of the ``n`` sequences, or
    None (with a line saying why) when the file is missing, torn or holds something else; the
    caller computes them again and the cache is rewritten."""
    if not cache.exists():
        return None
    try:
        ref = torch.load(cache, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn file (power loss) or a foreign one
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"reference log-probs: cannot read {cache} ({why}); computing them again")
        return None
    if not (torch.is_tensor(ref) and ref.dtype == torch.float32 and ref.shape == (n,)):
        log(f"reference log-probs: {cache} does not hold {n} float32 values; computing them again")
        return None
    return ref


def full_state(policy, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts; collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(policy.model, options=opts),
            get_optimizer_state_dict(policy, optimizer, options=opts))


def rng_state(device):
    """This process's random number generators (CPU, Python, and its own GPU's)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(saved, dst, log):
    """Restore this rank's generators from a checkpoint's per-rank list (rank 0's for every
    rank when the world size changed, with a line saying so)."""
    if len(saved) != dst.world:
        log(f"resume: the checkpoint has random states of {len(saved)} ranks, this run has "
            f"{dst.world}: every rank takes rank 0's")
    mine = saved[dst.rank] if len(saved) == dst.world else saved[0]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if mine["cuda"] is not None and dst.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], dst.device)


def save_checkpoint(folder, policy, tokenizer, optimizer, scheduler, delta, step, pos, cfg, dst,
                    reference):
    """Writes ``folder`` atomically (``.tmp-NAME``, synced, then renamed); rank 0 writes. Every
    rank's random states are kept (a rank's dropout stream resumes where it was), and the run's
    ``reference`` (its log-probs and the model files' fingerprint they came from), so a resumed
    run scores against the very reference it began with."""
    msd, osd = full_state(policy, optimizer)
    rngs = dst.gather(rng_state(dst.device))
    if dst.main:
        folder = Path(folder)
        tmp = folder.parent / f".tmp-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        with config_as_loaded(policy.model):  # the base's dropout rates, not the run's zeros
            policy.model.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": osd, "scheduler": scheduler.state_dict(),
                    "delta": delta.state_dict(), "step": step, "data_position": pos,
                    "world": dst.world,
                    "rng": rngs,
                    "reference_logps": reference["logps"].cpu(),
                    "model_fingerprint": reference["model"],
                    "config": cfg.to_dict()}, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_path(folder.parent, folder=True)
    dst.barrier()


def checkpoints(output):
    """``[(step, folder)]`` of ``OUTPUT/checkpoint-STEP`` folders (complete ones: a write in
    progress is ``.tmp-...`` until it is renamed)."""
    found = [(int(m.group(1)), p) for p in Path(output).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
             and (p / "trainer_state.pt").is_file()]
    return sorted(found)


def latest_checkpoint(output):
    found = checkpoints(output)
    return found[-1][1] if found else None


def run_settings(config, world):
    """The values that define a run's trajectory (``config.RUN_DEFINING``), comparable across
    runs: paths resolved, ``epochs`` only where ``max_steps`` does not replace it, and the
    micro-batches of one step (``world * grad_accum``) rather than either factor."""
    out = {k: config.get(k) for k in RUN_DEFINING}
    for k in ("model", "data"):
        out[k] = str(Path(out[k]).resolve()) if out[k] else out[k]
    if out["max_steps"] is not None:
        out.pop("epochs")
    if world is not None:  # None: not recorded (a finished run's spot_config.json)
        out["micro-batches per step (processes x grad_accum)"] = world * config.get("grad_accum",
                                                                                  1)
    return out


def load_trainer_state(ckpt, cfg, world):
    """A checkpoint's ``trainer_state.pt``, refused (``ConfigError``) when it cannot be read or
    its run differs from ``cfg`` in a value that defines the run (``run_settings``)."""
    try:
        # mapped, not read: under torchrun every rank of a node loads this file, and the
        # optimizer's full state (8 bytes a parameter) would otherwise sit in RAM once a rank
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: one line, not a traceback
        raise ConfigError(f"resume: cannot read {ckpt / 'trainer_state.pt'} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete "
                          f"{ckpt} to resume from an earlier checkpoint") from None
    changed = changed_settings(state.get("config", {}), state.get("world", 1), cfg, world)
    if changed:
        raise ConfigError(f"resume: {ckpt} belongs to a run with other settings "
                          f"({', '.join(changed)}); resume with the same ones, or train into a "
                          f"new --output")
    return state


def changed_settings(saved_config, saved_world, cfg, world):
    """``["key old -> new", ...]`` for the run-defining values that differ."""
    saved = run_settings(saved_config, saved_world)
    now = run_settings(cfg.to_dict(), world)
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def finished(output, cfg):
    """Whether ``output`` holds the final model of this run (its ``spot_config.json`` is
    written last); a finished run with other settings is a ``ConfigError``. The number of
    processes is not recorded there, so it is not compared (the run is over either way)."""
    path = Path(output) / "spot_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    changed = changed_settings(saved, None, cfg, None)
    if changed:
        raise ConfigError(f"resume: {output} holds the final model of a run with other settings "
                          f"({', '.join(changed)}); train into a new --output")
    return True


def previous_run(output):
    """What a finished or interrupted run left in ``output`` (metrics, checkpoints), if any."""
    out = Path(output)
    found = checkpoints(out)
    names = [p.name for _, p in found]
    if len(names) > 3:
        names = [f"{len(names)} checkpoints ({names[0]} .. {names[-1]})"]
    return (["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []) + names


def prune_checkpoints(output, keep):
    """Deletes all but the newest ``keep`` complete checkpoints (0: keeps them all), and the
    ``.tmp-checkpoint-*`` folders of writes that never finished (called right after a save,
    when no write is in progress)."""
    for tmp in Path(output).glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for _, old in checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while the loop runs ask it to stop after the step in
    progress (it then saves a checkpoint); a Ctrl-C after a Ctrl-C raises
    ``KeyboardInterrupt`` at once (a repeated SIGTERM, as schedulers send to a job's processes,
    does not). A signal that was ignored when the loop started stays ignored. Outside the main
    thread (no signal handlers there) it does nothing; ``enabled=False`` too (the demo)."""

    def __init__(self, announce=True, enabled=True):
        self.requested = None  # the first signal's number
        self.announce = announce  # one line on stderr (rank 0's, under torchrun)
        self.enabled = enabled
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested == signal.SIGINT == signum:
            raise KeyboardInterrupt
        first = self.requested is None
        self.requested = self.requested or signum
        if first and self.announce:  # os.write: print could re-enter a blocked stderr write
            os.write(2, f"\nspot: {signal.Signals(signum).name}: stopping after the step in "
                        f"progress, with a checkpoint unless it is the last (Ctrl-C again to "
                        f"stop at once)\n".encode())

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) != signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: set from C
        return False


def keep_metrics_up_to(path, step):
    """Drops the rows of ``metrics.jsonl`` after ``step`` (written past the checkpoint that a
    resumed run restarts from, or by a run that restarts at 0), atomically."""
    if path.exists():  # a row torn by a crash mid-write is dropped too
        rewrite(path, [r for r in read_jsonl(path, strict=False) if r.get("step", 0) <= step])


def save_final(output, policy, tokenizer, dst):
    """The final model into ``output`` itself (each file renamed into place)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    msd = get_model_state_dict(policy.model,
                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dst.main:
        tmp = Path(output) / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        with config_as_loaded(policy.model):
            policy.model.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        for f in tmp.iterdir():
            os.replace(f, Path(output) / f.name)
        tmp.rmdir()
        fsync_path(output, folder=True)
    dst.barrier()


# ---------------------------------------------------------------- the run

def shard(policy, dst):
    """FSDP2: each decoder layer, then the wrapper (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(dst.device.type, (dst.world,))
    for layer in decoder_layers(policy.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def build_policy(path, cfg, dst, probe=None):
    """The model wrapped in ``Policy`` (sharded under torchrun). ``probe``: token ids on which
    the fused head must reproduce the model's own logits (a family that transforms its logits in
    a way ``spot_kernels.hf`` does not know is an error, not a silently wrong run)."""
    model = load_model(path, dst.device, cfg.trust_remote_code, bf16=cfg.bf16, attn=cfg.attn)
    disable_dropout(model)  # as TRL: the reference pass has none, so step 0's rewards are 0
    model.config.use_cache = False
    if probe is not None:
        try:
            with autocast(cfg, dst.device):  # as the passes run (flash-attn needs half)
                hf.check_logits(model.eval(), torch.tensor([probe], device=dst.device))
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    policy = Policy(model, cfg.backend)
    return shard(policy, dst) if dst.on else policy


def plural(n, one, many=None):
    return f"{n} {one if n == 1 else many or one + 's'}"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pretrained(auto, what, cfg):
    """``auto.from_pretrained(cfg.model)``, or a one-line ``ConfigError`` naming ``what``."""
    try:
        return auto.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a package its files need
        raise ConfigError(f"model: cannot load {what} from {cfg.model}: "
                          f"{load_error(e, cfg.trust_remote_code)}") from None


def train(cfg: TrainConfig, log=None, handle_signals=True):
    """Runs ``cfg``; returns ``{"steps", "metrics" (last step), "output", "ref_logps", ...}``
    with ``"interrupted": STEP`` when a signal stopped it after that step (``StopRequest``;
    ``handle_signals=False`` leaves signals to the caller: Ctrl-C is a ``KeyboardInterrupt``).
    ``--resume`` of a finished run returns ``{"steps": 0, "metrics": None, "output",
    "finished": True}`` at once."""
    cfg.validate()
    # transformers' own bars (loading, writing shards) too; the output's lock until the end
    with hf_progress_bars(cfg.progress), contextlib.ExitStack() as stack:
        return _train(cfg, log, handle_signals, stack)


def lock_output(out, dst, stack):
    """Rank 0 creates ``out`` and holds ``out/.train.lock`` (``flock``) until ``stack`` closes:
    one run writes an output at a time. Every rank learns whether it could (one all-reduce),
    so all of them stop together."""
    why = ""
    if dst.main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(OutputLock(out, lock=out / ".train.lock"))
        except ValueError as e:
            why = str(e)
    if dst.max(torch.tensor(float(bool(why)))).item():
        raise ConfigError(why or f"output: {out} is being written by another process")


def _train(cfg, log, handle_signals, stack):
    dst = Dist(cfg.device)
    log = log or (lambda msg: print(msg, file=sys.stderr) if dst.main else None)
    if cfg.backend != "auto":
        from spot_kernels._registry import availability
        ok, why = availability(cfg.backend, dst.device)
        if not ok:
            raise ConfigError(f"backend: {cfg.backend} does not run on {dst.device}: {why}")
    if not Path(cfg.model).is_dir():
        what = (f"{cfg.model} is a file, not a folder" if Path(cfg.model).exists()
                else f"no such folder {cfg.model}")
        raise ConfigError(f"model: {what} (a local transformers model: config.json, weights "
                          f"and tokenizer files)")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.output)
    if out.resolve() == Path(cfg.model).resolve():
        raise ConfigError(f"output: {out} is the --model folder: the trained model would "
                          f"overwrite the one it starts from; choose another --output")
    spot_made = any((out / f).exists() for f in ("spot_config.json", "metrics.jsonl",
                                                 ".train.lock"))
    if (out / "config.json").exists() and not spot_made:
        raise ConfigError(f"output: {out} holds a model that no spot run wrote (config.json); "
                          f"the trained model would overwrite it: choose a new --output")
    # one run writes an output at a time: a folder that exists is locked before anything here
    # reads it (a live run may be pruning its checkpoints), a new one once the model has loaded
    # (a bad --model leaves no folder behind)
    locked = bool(dst.max(torch.tensor(float(out.is_dir()))).item())
    if locked:
        lock_output(out, dst, stack)
    if cfg.resume and finished(out, cfg):
        log(f"resume: {out} already holds the final model of this run; nothing to do")
        return {"steps": 0, "metrics": None, "output": str(out), "finished": True}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    left = [] if cfg.resume else previous_run(out)
    if left:
        raise ConfigError(f"output: {out} already holds a run ({', '.join(left)}); "
                          f"pass --resume to continue it, or choose a new --output")
    state = load_trainer_state(ckpt, cfg, dst.world) if ckpt is not None else None
    if cfg.resume and ckpt is None:
        log(f"resume: no complete checkpoint in {out}; starting at step 0")
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = check_tokenizer(pretrained(AutoTokenizer, "a tokenizer", cfg), cfg.model)
    model_config = pretrained(AutoConfig, "a model config", cfg)  # before the long data pass

    bad = []
    pairs, skipped = D.read_pairs(cfg.data, cfg.skip_bad, errors=bad)
    examples, cut = D.encode_pairs(tokenizer, pairs, cfg.max_length, cfg.skip_bad, errors=bad,
                                   progress=cfg.progress and dst.main)
    skipped += cut["bad"]
    if not examples:
        raise D.DataError(f"{cfg.data}: no usable pairs ({skipped} bad skipped; the first: "
                          f"{bad[0]})")
    for line in bad[:3]:
        log(f"data: skipped {line}")
    if len(bad) > 3:
        log(f"data: ... and {len(bad) - 3} more skipped")
    log(f"data: {len(examples)} pairs from {cfg.data}" + (f", {skipped} bad skipped" if skipped else "")
        + f"; truncated: {cut['prompt_truncated']} of {len(examples)} prompts (left), "
          f"{cut['response_truncated']} of {2 * len(examples)} responses (right) at max_length "
          f"{cfg.max_length}")
    for line in D.data_warnings(tokenizer, examples, cut, cfg.tokens_per_batch):
        log(f"data: {line}")
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    top = max((max(ex.chosen + ex.rejected) for ex in examples), default=-1)
    if isinstance(vocab, int) and top >= vocab:  # an index error in the embedding (a device
        # assert on a GPU) otherwise
        raise ConfigError(f"data: token id {top} ({tokenizer.convert_ids_to_tokens(top)!r}) is "
                          f"past the model's vocabulary of {vocab}: the tokenizer has tokens its "
                          f"embeddings lack (added tokens without resize_token_embeddings?)")
    data_fp = D.examples_fingerprint(examples)
    saved_fp = (state or {}).get("data_position", {}).get("data")
    if saved_fp is not None and saved_fp != data_fp:
        raise ConfigError(f"resume: the training pairs differ from those of {ckpt} (the data file's "
                          f"records, --skip-bad, the tokenizer or its chat template changed); "
                          f"resume with the same data, or train into a new --output")

    fingerprint = data_fingerprint(cfg, tokenizer, data_fp, dst.device)
    cache = Path(cfg.cache_dir or out / ".cache") / f"ref-{fingerprint}.pt"
    model_fp = model_fingerprint(cfg.model)
    ref = None
    if state is not None and state.get("reference_logps") is not None:
        # a resumed run scores against the reference it began with, whatever --model holds now
        ref = state["reference_logps"].clone()
        if state.get("model_fingerprint") != model_fp:
            log(f"resume: the files of {cfg.model} changed since this run began; it goes on "
                f"with the reference log-probs of its start, kept in {ckpt.name}")
        else:
            log(f"reference log-probs: kept in {ckpt}")
        model_fp = state.get("model_fingerprint", model_fp)
    else:
        ref = cached_reference(cache, 2 * len(examples), log)
        # every rank computes them when any must (the pass is collective under torchrun)
        if dst.max(torch.tensor(float(ref is None))).item():
            ref = None
        elif ref is not None:
            log(f"reference log-probs: cached {cache}")
    policy = None
    probe = examples[0].chosen[:64]  # build_policy checks the head on it
    if ref is None:
        policy = build_policy(cfg.model, cfg, dst, probe)
        t0 = time.perf_counter()
        ref = sequence_logps(policy, examples, cfg, dst.device, dst)
        log(f"reference log-probs: {ref.numel()} sequences in {time.perf_counter() - t0:.1f}s "
            f"-> {cache}")
        if dst.main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda f: torch.save(ref, f))
        if ckpt is not None:
            del policy
            policy = None
    reference = {"logps": ref, "model": model_fp}  # what each checkpoint keeps of it
    if policy is None:
        policy = build_policy(str(ckpt) if ckpt else cfg.model, cfg, dst, probe)
    policy.train()
    if not locked:  # only once the model has loaded: a bad --model leaves no empty folder
        lock_output(out, dst, stack)

    per_step = dst.world * cfg.grad_accum
    steps, plans = schedule_steps(examples, cfg, per_step)
    total = len(steps)
    log(f"run: {plural(total, 'step')} of {plural(per_step, 'micro-batch', 'micro-batches')} "
        f"on {dst.device}"
        + (f" x {dst.world} processes" if dst.on else "")
        + f", backend {resolve_backend(cfg.backend, dst.device)}, attention "
          f"{getattr(policy.model.config, '_attn_implementation', '?')}, checkpoints "
        + (f"every {cfg.save_every} steps" if cfg.save_every else "only when interrupted"))
    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg.warmup_ratio))
    delta = Delta(cfg.delta, cfg.ema_alpha)
    start = 0
    if ckpt is not None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(policy, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        delta.load_state_dict(state["delta"])
        set_rng_state(state["rng"], dst, log)
        start = state["step"]
        log(f"resumed from {ckpt} at step {start}")

    ref = ref.to(dst.device)  # once, not per micro-batch
    metrics_file = None
    if dst.main:  # one row a step: none from an earlier attempt past where this one starts
        keep_metrics_up_to(out / "metrics.jsonl", start)
        metrics_file = open(out / "metrics.jsonl", "a")
    bar = None
    if dst.main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="spot", dynamic_ncols=True, file=sys.stderr)
    last, stopped = {}, None
    with StopRequest(announce=dst.main, enabled=handle_signals) as stop:
        for step in range(start, total):
            epoch, s = steps[step]
            t0 = time.perf_counter()
            if dst.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dst.device)  # the metric is this step's peak
            tokens, step_sums = 0, None
            for k in range(cfg.grad_accum):
                micro = plans[epoch][s * per_step + k * dst.world + dst.rank]
                batch = to_device(D.pack(examples, micro), dst.device)
                tokens += batch["input_ids"].numel()
                with autocast(cfg, dst.device):
                    loss, scalars = _loss_and_scalars(policy, batch, ref, delta, cfg, dst)
                (loss / cfg.grad_accum).backward()
                step_sums = scalars if step_sums is None else step_sums + scalars
            # the stats of the step's micro-batches, read once with the backward already queued
            sums = dict(zip(STAT_KEYS, (step_sums / cfg.grad_accum).tolist()))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # metrics: mean over ranks (tokens summed; delta: the one each micro-batch's loss
            # took, as one process taking them all in turn would log it)
            keys = sorted(sums)
            # and whether any rank was asked to stop (a signal reaches each process on its own)
            *means, tokens, votes = dst.sum(torch.tensor(
                [sums[k] for k in keys] + [float(tokens), float(bool(stop.requested))],
                dtype=torch.float64)).tolist()
            stopping = votes > 0 and step + 1 < total
            row = {k: v / dst.world for k, v in zip(keys, means)}
            if dst.device.type == "cuda":  # one process has synchronised nothing: the step's
                torch.cuda.synchronize(dst.device)  # backward and optimizer step may still run
            elapsed = time.perf_counter() - t0
            row.update(step=step + 1, epoch=epoch, lr=lr,
                       grad_norm=float(grad_norm), tokens=int(tokens),
                       tokens_per_s=tokens / max(elapsed, 1e-9),
                       peak_memory_mb=float(dst.max(torch.tensor(peak_memory_mb(dst.device)))))
            last = row
            if dst.main:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
                if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                    shown = f" delta {row['delta']:+.4f}" if cfg.loss == "spot" else ""  # DPO: none
                    line = (f"step {step + 1}/{total} loss {row['loss']:.4f} "
                            f"rewards chosen {row['rewards_chosen']:+.4f} rejected "
                            f"{row['rewards_rejected']:+.4f} acc {row['accuracy']:.3f} margin "
                            f"{row['margin']:+.4f}{shown} logps "
                            f"{row['logps_chosen']:.2f}/{row['logps_rejected']:.2f} sat "
                            f"{row['saturated']:.2f} {row['tokens_per_s']:.0f} tok/s "
                            f"mem {row['peak_memory_mb']:.0f} MB")
                    (bar.write if bar is not None else log)(line)
            if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0
                            and step + 1 < total):
                pos = {"epoch": epoch, "micro_batch": (s + 1) * per_step, "data": data_fp}
                save_checkpoint(out / f"checkpoint-{step + 1}", policy, tokenizer, optimizer,
                                scheduler, delta, step + 1, pos, cfg, dst, reference)
                if dst.main:
                    prune_checkpoints(out, cfg.keep_checkpoints)
            if stopping:
                stopped = step + 1
                break
    if bar is not None:
        bar.close()
    if metrics_file is not None:
        metrics_file.close()
    result = {"steps": total, "metrics": last, "output": str(out), "ref_logps": ref,
              "policy": policy, "tokenizer": tokenizer, "examples": examples}
    if stopped is not None:
        log(f"stopped after step {stopped} of {total}: saved {out / f'checkpoint-{stopped}'}; "
            f"continue with --resume")
        return dict(result, steps=stopped, interrupted=stopped)
    save_final(out, policy, tokenizer, dst)
    if dst.main:
        tmp = out / ".spot_config.json.tmp"  # whole or absent: it marks the run finished
        tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
        os.replace(tmp, out / "spot_config.json")
    log(f"saved the final model to {out}")
    return result


__all__ = ["train", "compute_loss", "Delta", "dpo_loss", "sequence_logps", "ConfigError"]
