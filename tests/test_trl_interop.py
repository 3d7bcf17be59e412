"""Our fused loss against the real TRL (``trl.DPOTrainer``), not a re-implementation of it.

A tiny random-weight Qwen3 (``spot.tiny``), float32 on the CPU, and a three-pair conversational
preference dataset go through TRL's own ``DPOTrainer``: its dataset preparation (chat template,
prompt/completion split, EOS), its collator (one right-padded ``[2B, L]`` batch, the B chosen rows
then the B rejected ones, with ``attention_mask`` and ``completion_mask``) and its
``compute_loss`` (in TRL 1.16 through its fused LM head, ``add_fused_lm_head``), against a
reference model of our making (the policy is a perturbed copy of it, so the rewards are not 0).
From the same batch and the same weights this module computes the loss with our API only, once on
TRL's padded batch as it is (README's ``concatenated_logps``, then ``sk.bce_reward_loss``) and
once packed into one row, pairs interleaved as ``spot train`` packs them (``hf.head_inputs`` with
``cu_seqlens``, ``hf.next_token_targets``, ``sk.spot_loss``), and checks the loss and the gradient
of every parameter. The reference's log-probs go through ``sk.token_logprobs`` too.

* ``loss_type="bco_pair"``: TRL (0.29 and later) computes, per pair,
  ``-logsigmoid(beta (pi_c - rho_c)) - logsigmoid(-beta (pi_r - rho_r))`` averaged over pairs,
  with no running ``delta`` (TRL 0.28 and earlier subtracted a ``RunningMoments`` mean of the
  rewards from both): our reward BCE with ``delta=0.0, reduction="pairs"``.
* ``loss_type="sigmoid"`` (DPO): ``spot.train.dpo_loss`` on our sequence log-probs, as
  ``spot train --loss dpo`` does.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import spot_kernels as sk
from spot.tiny import build_model, build_tokenizer
from spot.train import dpo_loss
from spot_kernels import hf

pytest.importorskip("accelerate", reason="TRL's trainers need accelerate (pip install -e '.[dev]')")
trl = pytest.importorskip("trl", minversion="1.0",
                          reason="trl>=1.0 is not installed (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets")

BETA = 0.1
RTOL = 1e-5   # relative, per element
ATOL = 1e-5   # times the largest |value| of the tensor compared
# prompts and completions of different lengths, so that the batch has padding on both halves
PAIRS = [
    ("What is 2 + 3?", "2 + 3 = 5.", "It is 6"),
    ("Name a primary colour.", "Red", "Green, which is a primary colour of paint."),
    ("Spell 'cat' backwards.", "tac", "The word backwards is: tca"),
]


def _dataset():
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}],
         "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS])


def _trainer(loss_type, tmp_path, monkeypatch, beta=BETA):
    """TRL's DPOTrainer on the tiny model; returns ``(trainer, ref_model, batch)`` with one batch
    of all the pairs as TRL's dataloader and ``_prepare_inputs`` hand it to ``compute_loss``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    # the reference a random Qwen3 whose logits are not near uniform (init 0.1, not 0.02), the
    # policy a perturbed copy of it: rewards beta (pi - rho) from about -0.3 to -1.4, not all 0
    ref_model = build_model("qwen3", layers=2, seed=0, initializer_range=0.1)
    model = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    # TRL defaults to bf16 and checkpointing; transformers 5.x renames gradient_checkpointing
    fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    no_checkpointing = {("activation_checkpointing" if "activation_checkpointing" in fields
                         else "gradient_checkpointing"): False}
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=len(PAIRS), loss_type=[loss_type], beta=beta, max_length=None,
        seed=0, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0,
        **no_checkpointing)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=_dataset(), processing_class=build_tokenizer())
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, ref_model, batch


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(name, ours, theirs):
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = max(theirs.abs().max().item(), 1e-30)
    err = (ours - theirs).abs()
    bound = RTOL * theirs.abs() + ATOL * scale
    i = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{name}: |ours - TRL| = {err.flatten()[i]:.3e} > bound "
                                        f"{bound.flatten()[i]:.3e} (max err {err.max():.3e}, "
                                        f"scale {scale:.3e})")


def _pairs_interleaved(chosen, rejected):
    """``[B]``, ``[B]`` -> ``[2B]``: chosen 0, rejected 0, chosen 1, ... (``spot train``'s layout,
    which ``dpo_loss`` takes)."""
    return torch.stack([chosen, rejected], 1).flatten()


def _concatenated_logps(model, batch, grad=True):
    """README "Use it in your trainer": TRL's padded ``[2B, L]`` batch as it is, through
    ``hf.head_inputs`` and ``sk.token_logprobs``; returns ``(chosen [B], rejected [B])``."""
    ids, mask, completion = (batch[k] for k in ("input_ids", "attention_mask", "completion_mask"))
    with torch.set_grad_enabled(grad):
        hi = hf.head_inputs(model, ids, attention_mask=mask)
        targets = hf.next_token_targets(ids, attention_mask=mask, completion_mask=completion)
        logp = sk.token_logprobs(hi.hidden, hi.weight, targets, **hi.head_kwargs())
    return logp.sum(-1).chunk(2)


def _packed(batch):
    """The batch's sequences without padding, packed into one row in ``spot train``'s layout:
    ``(ids [N], cu_seqlens [S + 1], completion_mask [N])``."""
    b = batch["input_ids"].shape[0] // 2
    rows = _pairs_interleaved(torch.arange(b), torch.arange(b) + b).tolist()
    keep = [batch["attention_mask"][r].bool() for r in rows]
    ids = torch.cat([batch["input_ids"][r][k] for r, k in zip(rows, keep)])
    completion = torch.cat([batch["completion_mask"][r][k] for r, k in zip(rows, keep)])
    cu = torch.nn.functional.pad(torch.tensor([int(k.sum()) for k in keep]).cumsum(0), (1, 0))
    return ids, cu, completion


def _our_loss(model, ref_model, batch, loss_type, layout, beta=BETA, delta=0.0):
    """The loss from our API only, on the batch's token ids and masks.

    ``padded``: TRL's batch as it is, README's ``concatenated_logps`` then ``sk.bce_reward_loss``.
    ``packed``: one packed row, ``sk.spot_loss`` (the reference through ``sk.token_logprobs``)."""
    if layout == "padded":
        pc, pr = _concatenated_logps(model, batch)
        rc, rr = _concatenated_logps(ref_model, batch, grad=False)
        ones, zeros = torch.ones(len(pc)), torch.zeros(len(pr))
        if loss_type == "bco_pair":
            return sk.bce_reward_loss(torch.cat([pc, pr]), torch.cat([rc, rr]),
                                      labels=torch.cat([ones, zeros]), beta=beta, delta=delta)[0]
        return dpo_loss(_pairs_interleaved(pc, pr), _pairs_interleaved(rc, rr),
                        _pairs_interleaved(ones, zeros), beta)
    ids, cu, completion = _packed(batch)
    targets = hf.next_token_targets(ids, cu_seqlens=cu, completion_mask=completion)
    with torch.no_grad():
        ref = hf.head_inputs(ref_model, ids, cu_seqlens=cu)
        ref_logps = sk.sequence_logprobs(
            sk.token_logprobs(ref.hidden[0], ref.weight, targets, **ref.head_kwargs()), cu)
    hi = hf.head_inputs(model, ids, cu_seqlens=cu)
    labels = torch.tensor([1.0, 0.0] * (cu.numel() // 2))
    out = sk.spot_loss(hi.hidden[0], hi.weight, targets, cu, ref_logps, labels, beta=beta,
                       delta=delta, reduction="pairs", **hi.head_kwargs())
    if loss_type == "bco_pair":
        return out.loss
    return dpo_loss(out.policy_logps, ref_logps, labels, beta)


# TRL 1.16 reads transformers' deprecated alias (harmless; transformers 5.x warns)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("loss_type", ["bco_pair", "sigmoid"])
def test_loss_and_grads_match_trl(loss_type, tmp_path, monkeypatch, one_thread):
    trainer, ref_model, batch = _trainer(loss_type, tmp_path, monkeypatch)
    model = trainer.model
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    assert not bool(batch["attention_mask"].all()), "the batch should hold some padding"
    model.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    trl_grads = _grads(model)
    assert len(trl_grads) == len(list(model.parameters()))
    for layout in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        ours = _our_loss(model, ref_model, batch, loss_type, layout)
        ours.backward()
        our_grads = _grads(model)
        _close(f"{layout} loss", ours, theirs)
        assert our_grads.keys() == trl_grads.keys()
        for name, g in trl_grads.items():
            _close(f"{layout} grad {name}", our_grads[name], g)
    # the comparison can fail: another beta, or a delta (TRL <= 0.28's RunningMoments), is not
    # TRL's loss
    with torch.no_grad():
        wrong = [_our_loss(model, ref_model, batch, loss_type, "padded", beta=1.1 * BETA)]
        if loss_type == "bco_pair":
            wrong.append(_our_loss(model, ref_model, batch, loss_type, "padded", delta=0.1))
    for loss in wrong:
        with pytest.raises(AssertionError):
            _close("loss", loss, theirs)


def test_token_logprobs_match_trl_fused_head(tmp_path, monkeypatch, one_thread):
    """TRL's fused head (``fused_lm_head=True``) and ours give the same per-token log-probs,
    ``[2B, L - 1]`` (position i scores token i + 1; 0 where it is not a completion token)."""
    from trl.trainer import utils
    if not hasattr(utils, "add_fused_lm_head"):
        pytest.skip(f"trl {trl.__version__} has no fused LM head (add_fused_lm_head)")
    trainer, _, batch = _trainer("bco_pair", tmp_path, monkeypatch)
    model = trainer.model  # the trainer has added its fused head to it
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        labels = ids.masked_fill(completion == 0, -100)
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels,
                       fused_lm_head=True).log_probs
        hi = hf.head_inputs(model, ids, attention_mask=mask)
        targets = hf.next_token_targets(ids, attention_mask=mask, completion_mask=completion)
        ours = sk.token_logprobs(hi.hidden, hi.weight, targets, **hi.head_kwargs())
    assert theirs.shape == (ids.shape[0], ids.shape[1] - 1)
    assert bool((ours[:, -1] == 0).all())
    assert bool((theirs != 0).sum() == (targets != -100).sum())
    _close("token log-probs", ours[:, :-1], theirs)
