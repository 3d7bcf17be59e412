"""`spot demo`, shortened: trains end to end, prints the table, writes the plot; held-out reward
accuracy rises from its step-0 value (0: the policy is the reference, every reward is 0)."""
from __future__ import annotations

import json

import pytest
import torch

from spot.cli import build_parser
from spot.demo import make_pairs, run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP barriers collapse."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = build_parser().parse_args(["demo", "--output", str(out), "--steps", "12",
                                      "--no-progress"])
    assert (args.output, args.steps, args.progress) == (str(out), 12, False)
    run(args.output, steps=args.steps, progress=args.progress, n_train=48, n_heldout=32)
    text = capsys.readouterr().out
    assert "held-out pairs" in text and "reward accuracy" in text
    row = next(line for line in text.splitlines() if line.startswith("reward accuracy"))
    before, after = map(float, row.split()[-2:])
    assert before == 0.0 and after > before, row
    assert (out / "demo.png").stat().st_size > 1000
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (out / "model.safetensors").exists()


def test_generator_pairs_differ_by_one_step():
    for p in make_pairs(200, seed=7):
        good, bad = p["gemini_corrected_answer"], p["original_answer"]
        assert good != bad
        g, b = good.split(". "), bad.split(". ")
        assert len(g) == len(b) == 3
        first = next(i for i in range(3) if g[i] != b[i])  # one wrong step, carried forward
        assert g[:first] == b[:first]
        # the corrected answer is right: a+b=s1, s1-c=s2, Answer: s2
        (ab, s1), (s1c, s2) = g[0].split("="), g[1].split("=")
        a, b_ = map(int, ab.split("+"))
        assert int(s1) == a + b_ and int(s1c.split("-")[0]) - int(s1c.split("-")[1]) == int(s2)
        assert g[2] == f"Answer: {s2}"
