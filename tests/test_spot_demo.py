"""`spot demo`, shortened: trains end to end on the bundled pairs, prints the table, writes the
plot, and the held-out numbers move the right way. Before training the policy is the reference
(every reward 0, so the strict reward accuracy is 0, and "prefers y+" is the random model's own
preference); a shortened run must lift both above where they start on pairs it never trained on.
A loss with the wrong sign or swapped labels fails this (it drives both down)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from spot.cli import build_parser
from spot.demo import SUMS, make_pairs, run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP barriers collapse."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_learns_on_heldout(tmp_path, capsys):
    out = tmp_path / "demo"
    args = build_parser().parse_args(["demo", "--output", str(out), "--steps", "150",
                                      "--threads", "1", "--no-progress"])
    assert (args.output, args.steps, args.threads, args.progress) == (str(out), 150, 1, False)
    result = run(args.output, steps=args.steps, progress=args.progress, threads=args.threads)
    text = capsys.readouterr().out
    assert "held-out pairs" in text and "reward accuracy" in text
    row = next(line for line in text.splitlines() if line.startswith("reward accuracy"))
    assert list(map(float, row.split()[-2:])) == pytest.approx(
        [result["before"]["reward accuracy"], result["after"]["reward accuracy"]], abs=1e-3)
    before, after = result["before"], result["after"]
    assert before["reward accuracy"] == 0.0 and before["margin"] == 0.0
    # 150 of the demo's 600 steps (0.69 here; the full run reaches about 0.8); chance is 0.5
    assert after["reward accuracy"] >= 0.6, after
    assert after["prefers y+"] >= before["prefers y+"] + 0.05, (before, after)
    assert after["margin"] > 0.15 and after["reward chosen"] > after["reward rejected"], after
    assert (out / "demo.png").stat().st_size > 1000
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert (out / "model.safetensors").exists()
    seen = []
    real = torch.set_num_threads
    with pytest.MonkeyPatch.context() as mp:  # the run's threads, and the caller's put back
        mp.setattr(torch, "set_num_threads", lambda k: (seen.append(k), real(k)))
        run(str(out), steps=2, progress=False, threads=2)  # a rerun replaces, not appends
    assert seen == [2, 1] and torch.get_num_threads() == 1, seen
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match="steps"):
        run(str(out), steps=0)
    with pytest.raises(ValueError, match="threads"):
        run(str(out), threads=0)


def test_the_demo_runs_on_the_cpu_where_torch_sees_a_gpu(tmp_path, monkeypatch, capsys):
    """The demo is the CPU demo (its held-out scoring runs there too): with CUDA reported
    present it still trains on the CPU (training on the GPU, ``--device auto``'s choice, would
    put the model there and fail here, where there is none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = run(str(tmp_path / "demo"), steps=2, progress=False, threads=1)
    assert result["metrics"]["step"] == 2 and (tmp_path / "demo" / "model.safetensors").exists()


def test_generator_pairs_differ_by_one_false_fact():
    for p in make_pairs(300, seed=7):
        good, bad = p["gemini_corrected_answer"], p["original_answer"]
        g, b = good.split(". "), bad.split(". ")
        assert len(g) == len(b) == 3
        # y+ is right: a+b=s1, s1-c=s2, Answer: s2, single digits
        (ab, s1), (s1c, s2) = g[0].split("="), g[1].split("=")
        a, b_ = map(int, ab.split("+"))
        x, c = map(int, s1c.split("-"))
        assert (a, b_) in SUMS and int(s1) == a + b_ == x and int(s2) == x - c >= 0
        assert g[2] == f"Answer: {s2}"
        # y- differs in one step's result, off by 1 or 2 (a slip in the last step reaches the answer)
        diff = [i for i in range(2) if g[i] != b[i]]
        assert len(diff) == 1 and b[:diff[0]] == g[:diff[0]], (good, bad)
        i = diff[0]
        lhs, wrong = b[i].split("=")
        assert lhs == g[i].split("=")[0] and 1 <= abs(int(wrong) - int(g[i].split("=")[1])) <= 2
        assert 0 <= int(wrong) <= 9
        assert b[2] == (g[2] if i == 0 else f"Answer: {wrong}")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """`spot demo --output DIR` replaces its own earlier run there, never anything else."""
    from spot.cli import main
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-2").mkdir()
    assert main(["demo", "--output", str(tmp_path / "run"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a spot demo folder" in err[0], err
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_demo_takes_its_older_folders_and_stops_at_once_on_ctrl_c(tmp_path, capsys):
    """A folder from before the marker (base-model/ and demo.png) is the demo's own; Ctrl-C in
    the demo stops it at once ("spot: interrupted", 130), without the trainer's checkpoint."""
    import signal
    from conftest import signal_once_logged
    from spot.cli import main
    out = tmp_path / "old"
    (out / "base-model").mkdir(parents=True)
    (out / "demo.png").write_bytes(b"png")
    signal_once_logged(out / "metrics.jsonl", signal.SIGINT)
    assert main(["demo", "--output", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "spot: interrupted" in err and "--resume" not in err, err[-2000:]
    assert not list(out.glob("checkpoint-*")) and (out / ".spot-demo").exists()


@pytest.mark.parametrize("blocked,argv", [
    ("matplotlib", ["demo", "--output", "{tmp}/demo"]),
    ("transformers", ["train", "--model", "{tmp}/m", "--data", "{tmp}/d.jsonl", "--output",
                      "{tmp}/o"]),
])
def test_a_missing_extra_is_one_line_before_any_work(tmp_path, blocked, argv):
    """Without the [train] extras (here one made unimportable) the commands end in one line
    naming the package and the extras, exit 2, before training (the demo's plot comes last)."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from spot.cli import main; sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0] == (f"spot: error: {blocked} is not installed: pip install "
                      f"'spot-kernels[train]' (the trainer's extras)")
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()


def test_a_missing_part_of_an_installed_extra_keeps_its_traceback(monkeypatch):
    """Only a package that is not installed is reported as a missing extra: an installed
    transformers without some submodule (a remote-code model's import) is a real error."""
    import spot.cli

    def run_train(args):
        import transformers.models.not_a_model_of_any_release  # noqa: F401
    monkeypatch.setattr(spot.cli, "run_train", run_train)
    with pytest.raises(ModuleNotFoundError, match="not_a_model_of_any_release"):
        spot.cli.main(["train", "--model", "m", "--data", "d", "--output", "o"])
