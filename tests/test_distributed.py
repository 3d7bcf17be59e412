"""Sharded heads on CPU over gloo, in spawned processes, against the single-process float64
reference: vocab-parallel rows (equal and uneven splits, 2 and 3 ranks) and an FSDP2
``fully_shard`` LM head and model (2 ranks), and FSDP1 ``FullyShardedDataParallel`` models
(``use_orig_params`` True and False, 2 ranks) through ``hf.head_inputs``. Forward values and
gradients are both checked.

Spawning is the slow part (seconds per process), so one spawn of 3 processes runs every check
(the 2-rank ones on a subgroup); a failing check raises in a worker and fails the test.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close, make_head, references

import spot_kernels as sk
from spot_kernels import reference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

SPLITS = {2: [19, 19], 3: [10, 20, 7]}  # rows of W per rank: equal and uneven


def _vocab_parallel(group, backend="torch", first_only=False):
    """``first_only``: the first check (values, entropy and gradients with bias and softcap),
    for another backend than torch."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SPLITS[world]
    v = sum(sizes)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    kw = dict(temperature=0.8, softcap=4.0)
    h, w, b, t = make_head(45, 16, v, torch.float32, "cpu", bias=True, seed=7)  # same on all ranks
    bounds = torch.tensor(sizes).cumsum(0)  # every rank's first and last rows as targets
    t[:2 * world] = torch.stack([bounds - torch.tensor(sizes), bounds - 1], 1).flatten()
    t[2 * world] = -100
    hh = h.clone().requires_grad_()
    ws = w[start:stop].clone().requires_grad_()
    bs = b[start:stop].clone().requires_grad_()
    logp, ent = sk.token_logprobs(hh, ws, t, bias=bs, process_group=group,
                                  return_entropy=True, backend=backend, **kw)
    truth, same, gout = references(h, w, t, b, **kw)
    assert_close(logp, same[0], truth[0], torch.float32, "logp")
    _, ent64 = reference.token_logprobs(h.double(), w.double(), t, b.double(),
                                        compute_dtype=torch.float64, return_entropy=True, **kw)
    _, ent32 = reference.token_logprobs(h, w, t, b, return_entropy=True, **kw)
    assert_close(ent, ent32, ent64, torch.float32, "entropy")
    dh, dw, db = torch.autograd.grad((logp.double() * gout).sum(), (hh, ws, bs))
    assert_close(dh, same[1][0], truth[1][0], torch.float32, "dh")
    assert_close(dw, same[1][1][start:stop], truth[1][1][start:stop], torch.float32, "dW shard")
    assert_close(db, same[1][2][start:stop], truth[1][2][start:stop], torch.float32, "db shard")
    if first_only:
        return

    # an ignore_index inside the vocabulary: a local row equal to it must still count
    starts = (bounds - torch.tensor(sizes)).tolist()
    t2 = torch.where(t == -100, 3, t)
    t2[-world:] = torch.tensor([st + 3 for st in starts])
    t2[-world - 2:-world] = 3
    hh = h.clone().requires_grad_()
    logp = sk.token_logprobs(hh, w[start:stop], t2, process_group=group, ignore_index=3)
    truth, same, gout = references(h, w, t2, ignore_index=3)
    assert_close(logp, same[0], truth[0], torch.float32, "logp, ignore_index=3")
    (dh,) = torch.autograd.grad((logp.double() * gout).sum(), (hh,))
    assert_close(dh, same[1][0], truth[1][0], torch.float32, "dh, ignore_index=3")

    # a dominant target on rank 0 and the runner-up on the last rank (D = 1: exact logits;
    # logp = -1.2e-4 at |z| ~ 300): the merge forms every term relative to the max, where
    # (logp_r + lse_r) - lse lost ulp(300), a quarter of that logp
    w1 = torch.full((v, 1), -50.0)
    w1[0], w1[-1] = 300.7, 291.7
    one, t1 = torch.ones(1, 1), torch.tensor([0])
    logp, ent = sk.token_logprobs(one, w1[start:stop], t1, process_group=group,
                                  return_entropy=True)
    truth, te = reference.token_logprobs(one.double(), w1.double(), t1,
                                         compute_dtype=torch.float64, return_entropy=True)
    assert abs(logp.item() - truth.item()) <= 1e-6, (logp, truth)  # off by ~ulp(300) before
    assert abs(ent.item() - te.item()) <= 1e-6, (ent, te)

    # spot_loss: the same loss on every rank as one process with the whole head
    cu = torch.tensor([0, 10, 22, 30, 45])
    ref = torch.randn(4, generator=torch.Generator().manual_seed(1)) - 30
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    hh = h.clone().requires_grad_()
    ws = w[start:stop].clone().requires_grad_()
    out = sk.spot_loss(hh, ws, t, cu, ref, labels, process_group=group, **kw)
    out.loss.backward()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    one = sk.spot_loss(h1, w1, t, cu, ref, labels, backend="torch", **kw)
    one.loss.backward()
    torch.testing.assert_close(out.loss, one.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hh.grad, h1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ws.grad, w1.grad[start:stop], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="targets"):
        sk.token_logprobs(h, w[start:stop], torch.full((45,), v), process_group=group)

    # rank 0's whole shard masked by a -inf bias: its partial lse is -inf, its entropy NaN
    bm = b.clone()
    bm[:sizes[0]] = float("-inf")
    tm = torch.where(t < sizes[0], sizes[0], t)  # targets on the unmasked rows (or ignored)
    logp, ent = sk.token_logprobs(h, w[start:stop], tm, bias=bm[start:stop], process_group=group,
                                  return_entropy=True, backend="torch")
    truth, same, _ = references(h, w, tm, bm)
    assert_close(logp, same[0], truth[0], torch.float32, "logp, masked shard")
    _, ent64 = reference.token_logprobs(h.double(), w.double(), tm, bm.double(),
                                        compute_dtype=torch.float64, return_entropy=True)
    _, ent32 = reference.token_logprobs(h, w, tm, bm, return_entropy=True)
    assert_close(ent, ent32, ent64, torch.float32, "entropy, masked shard")
    # and targets on its masked rows: logp -inf there (its own NaN before), gradients finite
    tm[:3] = torch.tensor([0, sizes[0] - 1, sizes[0] // 2])
    hh, bs = h.clone().requires_grad_(), bm[start:stop].clone().requires_grad_()
    logp = sk.token_logprobs(hh, w[start:stop], tm, bias=bs, process_group=group,
                             backend="torch")
    assert torch.equal(logp[:3], torch.full((3,), -math.inf))
    truth, same, gout = references(h, w, tm, bm)
    assert_close(logp[3:], same[0][3:], truth[0][3:], torch.float32, "logp beside -inf targets")
    dh, db = torch.autograd.grad(logp, (hh, bs), grad_outputs=gout.float())
    ref = [x.detach().double().requires_grad_() for x in (h, bm)]
    lp64 = reference.token_logprobs(ref[0], w.double(), tm, ref[1], compute_dtype=torch.float64)
    dh64, db64 = torch.autograd.grad(lp64, ref, grad_outputs=gout)
    assert_close(dh, dh64, dh64, torch.float32, "dh, -inf targets")
    assert_close(db, db64[start:stop], db64[start:stop], torch.float32, "db, -inf targets")


def _half_ulps(x, truth):
    """``|x - truth|`` in units of the spacing of ``x``'s dtype at ``truth`` (float64)."""
    bits = {torch.float16: (10, -24), torch.bfloat16: (7, -133)}[x.dtype]
    expo = torch.floor(torch.log2(truth.abs().clamp_min(2.0 ** bits[1])))
    ulp = torch.exp2(torch.clamp(expo - bits[0], min=bits[1]))
    return ((x.double() - truth).abs() / ulp).max().item()


def _vocab_parallel_half(group):
    """Half-precision inputs: ``dh`` is summed over ranks in float32 and rounded once, so it is
    within half an ulp of the float64 truth (with float32's noise), as one process's is. A
    half all-reduce rounds each rank's part and the sum: up to 1.5 ulp, more where parts cancel."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    for dtype in (torch.float16, torch.bfloat16):
        h, w, b, t = make_head(45, 16, sum(sizes), dtype, "cpu", bias=True, seed=8, scale=2.0)
        hh = h.clone().requires_grad_()
        logp = sk.token_logprobs(hh, w[start:start + sizes[rank]], t, process_group=group,
                                 bias=b[start:start + sizes[rank]], softcap=4.0, backend="torch")
        truth, _, gout = references(h, w, t, b, softcap=4.0)
        (dh,) = torch.autograd.grad((logp.double() * gout).sum(), (hh,))
        assert dh.dtype == dtype
        err = _half_ulps(dh, truth[1][0])
        assert err <= 0.5 + 1e-3, (dtype, world, err)


def _fsdp2(group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(group), dist.get_world_size(group)

    v, d = 37, 16  # 37 rows: an uneven FSDP split
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(make_head(1, d, v, torch.float32, "cpu", seed=11)[1])
    full_w = head.weight.detach().clone()
    fully_shard(head, mesh=DeviceMesh.from_group(group, "cpu"))
    assert isinstance(head.weight, DTensor)
    data = [make_head(21, d, v, torch.float32, "cpu", seed=100 + r)  # each rank's own batch
            for r in range(world)]
    h, _, _, t = data[rank]
    hh = h.clone().requires_grad_()
    logp = sk.token_logprobs(hh, head.weight, t, softcap=3.0)
    gout = torch.randn(t.shape, generator=torch.Generator().manual_seed(rank))
    (logp * gout).sum().backward()
    grad = head.weight.grad
    assert isinstance(grad, DTensor) and grad.placements == head.weight.placements
    # truth: this rank's log-probs and dh; dW is the mean of every rank's dW (FSDP2's reduction)
    dws = []
    for r, (hr, _, _, tr) in enumerate(data):
        h64 = hr.double().requires_grad_()
        w64 = full_w.double().requires_grad_()
        lp = reference.token_logprobs(h64, w64, tr, softcap=3.0, compute_dtype=torch.float64)
        g = torch.randn(tr.shape, generator=torch.Generator().manual_seed(r)).double()
        dhr, dwr = torch.autograd.grad((lp * g).sum(), (h64, w64))
        dws.append(dwr)
        if r == rank:
            torch.testing.assert_close(logp.double(), lp.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hh.grad.double(), dhr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.full_tensor().double(), sum(dws) / world, atol=1e-5, rtol=1e-4)


def _fsdp2_hf(group):
    """A fully_shard'ed tiny Llama through hf.completion_logprobs: each rank's sequence log-probs
    equal the unsharded model's, and every parameter's gradient is the mean of the per-rank ones."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from spot.tiny import build_model
    from spot_kernels import hf

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mesh = DeviceMesh.from_group(group, "cpu")
    plain, model = build_model("llama", layers=1), build_model("llama", layers=1)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    grads, values = [], []
    for r in range(world):
        g = torch.Generator().manual_seed(200 + r)
        lens = [6 + r, 9, 5]
        ids = torch.randint(4, plain.config.vocab_size, (sum(lens),), generator=g)
        cu = torch.tensor([0] + lens).cumsum(0)
        cm = torch.cat([torch.arange(n) >= 2 for n in lens])
        plain.zero_grad()
        lp = hf.completion_logprobs(plain, ids, cu_seqlens=cu, completion_mask=cm)
        lp.sum().backward()
        values.append(lp.detach())
        params = dict(plain.named_parameters())
        grads.append([params[n].grad.clone() for n in names])
        if r == rank:
            mine = (ids, cu, cm)
    ids, cu, cm = mine
    lp = hf.completion_logprobs(model, ids, cu_seqlens=cu, completion_mask=cm)
    lp.sum().backward()
    torch.testing.assert_close(lp.detach(), values[rank], atol=1e-5, rtol=1e-5)
    params = dict(model.named_parameters())
    for i, n in enumerate(names):
        truth = sum(gr[i] for gr in grads) / world
        torch.testing.assert_close(params[n].grad.full_tensor(), truth, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


def _fsdp1_flat_grads(fm):
    """FSDP1 ``use_orig_params=False``: every flat parameter's gradient all-gathered and split
    back into the wrapped model's parameter names (FSDP1 pads the flat parameter to equal
    shards; the padding is at the end)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = {id(m): n for n, m in fm.named_modules()}
    out = {}
    for unit in FSDP.fsdp_modules(fm):
        flat = unit._handle.flat_param
        parts = [torch.empty_like(flat.grad) for _ in range(unit.world_size)]
        dist.all_gather(parts, flat.grad, group=unit.process_group)
        full = torch.cat(parts)
        prefix = names[id(unit)].replace("_fsdp_wrapped_module.", "").replace(
            "_fsdp_wrapped_module", "")
        prefix = prefix + "." if prefix else ""
        for fqn, shape, piece in zip(flat._fqns, flat._shapes,
                                     full[:sum(flat._numels)].split(list(flat._numels))):
            out[prefix + fqn] = piece.view(shape)
    return out


def _fsdp1(group, use_orig_params):
    """FSDP1 (FullyShardedDataParallel) over a tiny Llama, decoder layers in their own units and
    the LM head in the root: spot_loss through hf.head_inputs equals the unsharded model's loss
    and every parameter's gradient is the mean of the per-rank ones (FSDP1's reduction)."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from spot.tiny import build_model
    from spot_kernels import hf

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # FSDP1 looks for an accelerator unless given device_id; on CPU it must be told "cpu"
    wrap = functools.partial(FSDP, process_group=group, device_id=torch.device("cpu"),
                             use_orig_params=use_orig_params)
    plain, model = build_model("llama", layers=1), build_model("llama", layers=1)
    fm = wrap(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}))
    kw = dict(beta=0.1)
    grads, losses = [], []
    for r in range(world):
        g = torch.Generator().manual_seed(300 + r + 10 * use_orig_params)
        lens = [7 + r, 9, 6, 8]
        ids = torch.randint(4, plain.config.vocab_size, (sum(lens),), generator=g)
        cu = torch.tensor([0] + lens).cumsum(0)
        cm = torch.cat([torch.arange(n) >= 3 for n in lens])
        ref = torch.randn(4, generator=g) - 25
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
        batch = (ids, cu, cm, ref, labels)
        plain.zero_grad()
        hi = hf.head_inputs(plain, ids, cu_seqlens=cu)
        t = hf.next_token_targets(ids, cu_seqlens=cu, completion_mask=cm)
        out = sk.spot_loss(hi.hidden[0], hi.weight, t, cu, ref, labels, **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in plain.named_parameters()})
        if r == rank:
            mine = batch
    ids, cu, cm, ref, labels = mine
    hi = hf.head_inputs(fm, ids, cu_seqlens=cu)
    assert hi.weight.shape == (plain.config.vocab_size, plain.config.hidden_size)
    t = hf.next_token_targets(ids, cu_seqlens=cu, completion_mask=cm)
    out = sk.spot_loss(hi.hidden[0], hi.weight, t, cu, ref, labels, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), losses[rank], atol=1e-6, rtol=1e-5)
    if use_orig_params:
        with FSDP.summon_full_params(fm, with_grads=True):
            got = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                   for n, p in fm.named_parameters()}
    else:
        got = _fsdp1_flat_grads(fm)
    assert set(got) == set(grads[0]), sorted(set(got) ^ set(grads[0]))
    for n, value in got.items():
        truth = sum(gr[n] for gr in grads) / world
        torch.testing.assert_close(value, truth, atol=1e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")
    if use_orig_params:
        # outside the forward the head's weight is this rank's flat slice: rejected, naming it
        shard = fm.module.lm_head.weight
        assert shard.dim() == 1
        with pytest.raises(ValueError, match="weight"):
            sk.token_logprobs(hi.hidden[0].detach(), shard, t)
        # a head in its own FSDP1 unit is freed after its forward: head_inputs refuses it
        other = build_model("llama", layers=1)
        other.lm_head = wrap(other.lm_head)
        with pytest.raises(ValueError, match="weight"):
            hf.head_inputs(wrap(other), ids, cu_seqlens=cu)


def _a_rank_without_rows(group):
    """A split that leaves a rank no rows is refused on every rank alike (on that rank alone,
    the others would wait in the collective for ever), and the group goes on in step."""
    sizes = [5, 0, 3]
    rank = dist.get_rank(group)
    h, w, _, t = make_head(6, 16, 8, torch.float32, "cpu", seed=8)
    start = sum(sizes[:rank])
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of the process group hold no rows"):
        sk.token_logprobs(h, w[start:start + sizes[rank]], t, process_group=group)


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pair = dist.new_group([0, 1])  # every rank must take part in creating it
        if rank < 2:
            _vocab_parallel(pair)          # 2 ranks, equal split
            _vocab_parallel_half(pair)
            if "triton" in sk.available_backends("cpu"):  # under TRITON_INTERPRET=1
                _vocab_parallel(pair, "triton", first_only=True)
            _fsdp2(pair)                   # fully_shard over 2 ranks
            _fsdp2_hf(pair)                # a fully_shard'ed transformers model through hf
            _fsdp1(pair, use_orig_params=True)   # FSDP1 FullyShardedDataParallel
            _fsdp1(pair, use_orig_params=False)
        _vocab_parallel(dist.group.WORLD)  # 3 ranks, uneven split
        _vocab_parallel_half(dist.group.WORLD)
        _a_rank_without_rows(dist.group.WORLD)
        _vocab_parallel(dist.group.WORLD, first_only=True)  # still in step
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_heads(tmp_path):
    """One spawn of 3 processes runs the 2-rank checks on a subgroup and the 3-rank ones on all."""
    ctx = mp.start_processes(_worker, args=(3, str(tmp_path / "init")), nprocs=3,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 600  # a hung collective must not hang the test run
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("distributed workers did not finish within 600 s")
