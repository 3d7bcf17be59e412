"""The trainer's GPU path (run by ``benchmarks/gpu_suite.sh``; skipped without CUDA): one packed
micro-batch under bf16 autocast on the GPU against the float32 CPU computation, through every
backend available there, and a short ``train`` run on the device."""
import json

import pytest
import torch

import spot_kernels as sk
from spot import data as D
from spot.config import TrainConfig
from spot.demo import make_pairs
from spot.model import Policy, to_device
from spot.tiny import build_model, build_tokenizer
from spot.train import Delta, autocast, compute_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_bf16_autocast_step_matches_float32_cpu(backend):
    if backend not in sk.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    tok = build_tokenizer()
    ex, _ = D.encode_pairs(tok, [D.to_pair(r, "x") for r in make_pairs(8, 3)], 128)
    batch = D.pack(ex, list(range(8)))
    cfg = TrainConfig(model="m", data="d", output="o", beta=0.1, bf16=True, backend=backend)
    ref = torch.randn(16) - 40
    results = {}
    for device in ("cpu", "cuda"):
        model = build_model("qwen3", seed=5).to(device)
        policy = Policy(model, backend="torch" if device == "cpu" else backend)
        with autocast(cfg, device):
            loss, stats = compute_loss(policy, to_device(batch, device), ref, Delta("zero"), cfg)
        loss.backward()
        grad = model.get_output_embeddings().weight.grad.float().cpu()
        results[device] = (loss.item(), stats["logps_chosen"], grad)
    (l_cpu, lp_cpu, g_cpu), (l_gpu, lp_gpu, g_gpu) = results["cpu"], results["cuda"]
    assert abs(l_gpu - l_cpu) < 0.02 * max(1.0, abs(l_cpu)), (l_gpu, l_cpu)
    assert abs(lp_gpu - lp_cpu) < 0.02 * abs(lp_cpu), (lp_gpu, lp_cpu)  # bf16 body
    rel = (g_gpu - g_cpu).norm() / g_cpu.norm()
    assert rel < 0.05, rel


def test_train_runs_on_gpu(tmp_path):
    from spot.tiny import build_model as bm
    tok = build_tokenizer()
    base = tmp_path / "base"
    bm("qwen3", seed=1).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(32, 7)))
    from spot.train import train
    cfg = TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "out"), max_steps=4,
                      lr=1e-4, tokens_per_batch=2048, bf16=True, progress=False,
                      gradient_checkpointing=True)
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["peak_memory_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    # step 1 starts at the reference: rewards 0 up to bf16 rounding (batches pack differently)
    assert abs(rows[0]["rewards_chosen"]) < 0.25 and abs(rows[0]["rewards_rejected"]) < 0.25
    try:  # what --attn auto picks on a GPU under bf16
        import flash_attn  # noqa: F401
        want = "flash_attention_2"
    except Exception:
        from spot import attention
        want = attention.NAME if attention.kernel_runs() else "sdpa"
    assert result["policy"].model.config._attn_implementation == want
    assert (tmp_path / "out" / "config.json").exists()


def test_fsdp2_over_nccl_in_one_process(tmp_path):
    """The torchrun path on one GPU (SPOT_FSDP=1: FSDP2 and NCCL in a world of one, the process
    group set up by the trainer), with bf16 autocast, gradient checkpointing, the running
    delta's all_gather, a checkpoint and the final save; its losses follow a plain run's."""
    import os
    import subprocess
    import sys
    from spot.train import train
    build_model("qwen3", seed=1).save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs(32, 7)))
    args = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "pairs.jsonl"),
            "--max-steps", "3", "--lr", "1e-4", "--tokens-per-batch", "2048", "--no-progress",
            "--gradient-checkpointing", "--save-every", "2", "--delta", "running"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SPOT_FSDP="1", TMPDIR=str(tmp_path),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--standalone", "-m", "spot", "train", *args, "--output",
                           str(tmp_path / "fsdp")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 processes" in proc.stderr + proc.stdout  # the sharded path's log line
    assert (tmp_path / "fsdp" / "checkpoint-2" / "trainer_state.pt").exists()
    assert (tmp_path / "fsdp" / "model.safetensors").exists()
    train(TrainConfig(model=str(tmp_path / "base"), data=str(tmp_path / "pairs.jsonl"),
                      output=str(tmp_path / "plain"), max_steps=3, lr=1e-4, tokens_per_batch=2048,
                      bf16=True, progress=False, gradient_checkpointing=True, save_every=2,
                      delta="running"), handle_signals=False)
    rows = [[json.loads(x)["loss"] for x in open(tmp_path / d / "metrics.jsonl")]
            for d in ("fsdp", "plain")]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):  # bf16 and atomics: close, not equal
        assert abs(a - b) < 0.02 * max(1.0, abs(b)), rows
