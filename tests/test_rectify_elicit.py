"""``spot rectify elicit`` against a tiny random ``transformers`` model (its answers are wrong,
which is what the test needs), resumption, and ``spot rectify run`` end to end with the HTTP
Oracle of test_rectify_correct."""
import argparse
import json
import os
from pathlib import Path

import pytest

from spot.rectify import elicit as E
from spot.rectify.answers import check_answer
from spot.rectify.cli import add_parser
from spot.rectify.jsonl import read_jsonl
from spot.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_model(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64).save_pretrained(str(d))
    build_tokenizer().save_pretrained(str(d))
    return str(d)


def write_problems(path, n, keys=("question", "answer")):
    with open(path, "w") as f:
        for i in range(n):
            qk = keys[0] if i % 2 else "prompt"
            ak = keys[1] if i % 3 else ("solution" if i % 2 else "ground_truth")
            gt = f"... so \\boxed{{{i + 7}}}" if ak == "solution" else str(i + 7)
            f.write(json.dumps({"id": f"p{i}", qk: f"Q{i}: What is {i} + 7?", ak: gt}) + "\n")


def cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rectify", *argv])
    return args.func(args)


def test_load_problems_keys_and_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    write_problems(p, 6)
    probs = E.load_problems(str(p))
    assert [x["id"] for x in probs] == [f"p{i}" for i in range(6)]
    assert [x["ground_truth"] for x in probs] == [str(i + 7) for i in range(6)]
    assert all(x["question"].startswith(f"Q{i}:") for i, x in enumerate(probs))
    assert len(E.load_problems(str(p), limit=2)) == 2
    p.write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="ground truth"):
        E.load_problems(str(p))
    with pytest.raises(ValueError, match="data"):
        E.load_problems(str(tmp_path / "missing.jsonl"))
    # a blank answer is no ground truth (every sample would be judged wrong): the next key's
    # is taken, and one with none is refused, as is an empty \boxed{}
    p.write_text(json.dumps({"question": "2+3?", "answer": "", "solution": r"so \boxed{5}"}))
    assert E.load_problems(str(p))[0]["ground_truth"] == "5"
    for gt, msg in (("  ", "no ground truth under any of"), (r"so \boxed{ }", "has no answer")):
        p.write_text(json.dumps({"question": "2+3?", "answer": gt}))
        with pytest.raises(ValueError, match=msg):
            E.load_problems(str(p))


def test_vllm_engine_needs_vllm():
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="vllm"):
        E.VLLMGenerator("some/model", build_tokenizer())


def test_elicit_split_with_scripted_generator(tmp_path):
    """The correct/wrong split and the two files, with answers we choose."""
    tok = build_tokenizer()
    probs = [{"id": f"p{i}", "question": f"Q{i}: What is {i} + 7?", "ground_truth": str(i + 7)}
             for i in range(5)]

    def gen(prompts, **kw):
        outs = []
        for p in prompts:
            i = int(p.split("Q")[1].split(":")[0])
            ans = i + 7 if i % 2 == 0 else i + 8
            outs.append((f"<think>\n\n</think>\n\n{i} + 7 = {ans}, \\boxed{{{ans}}}", "stop"))
        return outs
    stats = E.elicit(probs, gen, tok, str(tmp_path), samples=2, batch_size=3, progress=False)
    assert stats == {"done": 10, "new": 10, "correct": 6, "wrong": 4, "skipped": 0}
    rows = read_jsonl(str(tmp_path / "all.jsonl"))
    errs = read_jsonl(str(tmp_path / "errors.jsonl"))
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}:{k}" for i in range(5) for k in range(2))
    assert sorted(r["id"] for r in errs) == sorted(f"p{i}:{k}" for i in (1, 3) for k in range(2))
    assert all(not r["response"].startswith("<think>") for r in rows)
    assert all((r["temperature"], r["top_p"], r["system"]) == (0.7, 0.8, None) for r in rows)
    # resuming with other sampling settings would mix two kinds of answers in one file
    for kw, what in (({"temperature": 1.0}, "temperature 0.7 -> 1.0"),
                     ({"system": "Be brief."}, "system None -> 'Be brief.'")):
        with pytest.raises(ValueError, match=f"other settings \\({what}\\)"):
            E.elicit(probs, gen, tok, str(tmp_path), samples=3, progress=False, **kw)
    stats = E.elicit(probs, gen, tok, str(tmp_path), samples=3, batch_size=3, progress=False)
    assert stats["new"] == 5 and stats["done"] == 15
    # y- must be one model's own errors: another model does not resume into the folder
    other = tmp_path / "by_model"
    E.elicit(probs[:2], gen, tok, str(other), model_name="models/a", progress=False)
    with pytest.raises(ValueError, match="other settings \\(model 'models/a' -> 'models/b'\\)"):
        E.elicit(probs, gen, tok, str(other), model_name="models/b", progress=False)
    stats = E.elicit(probs, gen, tok, str(other), model_name="models/./a", progress=False)
    assert stats["new"] == 3 and stats["done"] == 5
    # answers written as typed (older versions): the same path with a trailing "/" resumes
    older = tmp_path / "older"
    E.elicit(probs[:2], gen, tok, str(older), model_name="x", progress=False)
    rows = read_jsonl(str(older / "all.jsonl"))
    (older / "all.jsonl").write_text("".join(json.dumps(dict(r, model="./ckpt/")) + "\n"
                                             for r in rows))
    assert E.elicit(probs, gen, tok, str(older), model_name="ckpt", progress=False)["new"] == 3


def test_elicit_tiny_model_resumes_without_duplicates(tmp_path, tiny_dir, capsys):
    data, out = tmp_path / "problems.jsonl", tmp_path / "out"
    write_problems(data, 4)
    base = ["elicit", "--model", tiny_dir, "--data", str(data), "--output", str(out),
            "--samples", "2", "--max-new-tokens", "8", "--batch-size", "3", "--device", "cpu"]
    assert cli(base + ["--limit", "2"]) == 0
    first = (out / "all.jsonl").read_bytes()
    assert len(read_jsonl(str(out / "all.jsonl"))) == 4
    # a kill between the two appends: the last wrong answer is missing from errors.jsonl
    errs = (out / "errors.jsonl").read_text().splitlines(keepends=True)
    (out / "errors.jsonl").write_text("".join(errs[:-1]))
    assert cli(base) == 0
    assert (out / "all.jsonl").read_bytes().startswith(first)  # resumed, not redone
    rows = read_jsonl(str(out / "all.jsonl"))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8
    assert set(ids) == {f"p{i}:{k}" for i in range(4) for k in range(2)}
    for r in rows:  # the flags are the checker's verdicts on the recorded responses
        assert r["correct"] == check_answer(r["response"], r["ground_truth"])
        assert r["finish_reason"] in ("stop", "length") and r["model"] == tiny_dir
    errs = read_jsonl(str(out / "errors.jsonl"))
    assert sorted(r["id"] for r in errs) == sorted(r["id"] for r in rows if not r["correct"])
    assert len(errs) >= 6  # a random model is (nearly) always wrong
    assert "8 answers (4 new, 4 resumed)" in capsys.readouterr().out
    assert cli(base) == 0  # nothing left to do
    assert len(read_jsonl(str(out / "all.jsonl"))) == 8
    # the model's weights gone (the tokenizer, loaded first, stays): nothing is left to
    # sample, so no model loads: a rerun of `run` skips straight on
    weights = next(Path(tiny_dir).glob("*.safetensors"))
    hidden = weights.with_name(weights.name + ".away")
    weights.rename(hidden)
    try:
        assert cli(base) == 0
    finally:
        hidden.rename(weights)
    assert "8 answers (0 new, 8 resumed)" in capsys.readouterr().out
    # another model does not resume into the folder: y- must be one model's own errors
    build_tokenizer().save_pretrained(str(tmp_path / "other-model"))
    assert cli([a if a != tiny_dir else str(tmp_path / "other-model") for a in base]) == 2
    assert "other settings (model" in capsys.readouterr().err


def test_elicit_takes_a_tokenizer_that_adds_token_type_ids(tmp_path):
    """Some tokenizers also return token_type_ids, which a causal LM's generate refuses."""
    from transformers import AutoTokenizer
    d = tmp_path / "tiny"
    build_model(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64).save_pretrained(str(d))
    build_tokenizer().save_pretrained(str(d))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "token_type_ids" in AutoTokenizer.from_pretrained(str(d))(["a b"])  # the case at hand
    data, out = tmp_path / "problems.jsonl", tmp_path / "out"
    write_problems(data, 2)
    assert cli(["elicit", "--model", str(d), "--data", str(data), "--output", str(out),
                "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]) == 0
    assert len(read_jsonl(str(out / "all.jsonl"))) == 2


def test_run_end_to_end(tmp_path, tiny_dir, capsys):
    pytest.importorskip("openai")  # the correct step's client
    from test_rectify_correct import OracleServer
    from test_rectify_filter import brute_lcs
    data, out = tmp_path / "problems.jsonl", tmp_path / "run"
    write_problems(data, 3)
    server = OracleServer()
    try:
        rc = cli(["run", "--model", tiny_dir, "--data", str(data), "--output", str(out),
                  "--max-new-tokens", "40", "--batch-size", "3", "--device", "cpu",
                  "--oracle-url", server.url, "--oracle-model", "rule", "--backoff", "0.01",
                  "--workers", "2", "--masks", "--no-progress"])
    finally:
        server.close()
    assert rc == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "%|" not in cap.err and "Loading weights" not in cap.err, cap.err  # no bars
    for name in ("all", "errors", "corrected", "pairs"):
        assert os.path.exists(out / f"{name}.jsonl")
    corrected = read_jsonl(str(out / "corrected.jsonl"))
    errors = read_jsonl(str(out / "errors.jsonl"))
    assert sorted(r["id"] for r in corrected) == sorted(r["id"] for r in errors)
    assert all(r["status"] == "verified" for r in corrected)
    tok = build_tokenizer()
    expected = set()
    for r in corrected:
        ym = tok(r["original_answer"], add_special_tokens=False)["input_ids"]
        yp = tok(r["corrected_answer"], add_special_tokens=False)["input_ids"]
        if 1 - brute_lcs(ym, yp) / len(yp) <= 0.6:
            expected.add(r["id"])
    pairs = read_jsonl(str(out / "pairs.jsonl"))
    assert {p["id"] for p in pairs} == expected and pairs
    assert all(set(p) >= {"prompt", "chosen", "rejected", "chosen_changed"} for p in pairs)
    assert f"kept {len(pairs)} of {len(corrected)} verified" in text
    try:  # the trainer's loader reads the pairs as they are
        from spot.data import to_pair
    except ImportError:
        return
    for k, p in enumerate(pairs):
        pair = to_pair(p, f"pairs.jsonl:{k + 1}")
        assert pair.chosen[-1]["content"] == p["chosen"] and pair.rejected[-1]["content"] == p["rejected"]


def test_bad_problems_and_limit_are_one_line_errors(tmp_path, capsys):
    """A ground truth that is not a string or number, a lone surrogate and a negative --limit end
    with one line naming the file and line (exit 2), before any model loads."""
    p = tmp_path / "p.jsonl"
    base = ["elicit", "--model", str(tmp_path / "no-model"), "--data", str(p),
            "--output", str(tmp_path / "out")]
    good = json.dumps({"question": "q", "answer": "1"})
    for bad, msg in (({"question": "q", "answer": [1, 2]}, "must be a string or a number, got list"),
                     ({"question": "q", "answer": True}, "got bool"),
                     ({"question": "q \ud83d", "answer": "1"}, "lone surrogate")):
        p.write_text(good + "\n\n" + json.dumps(bad) + "\n")  # line 3: blank lines count
        assert cli(base) == 2
        err = capsys.readouterr().err
        assert f"{p}:3:" in err and msg in err and len(err.splitlines()) == 1, err
    p.write_text(good + "\n")
    assert cli(base + ["--limit", "-1"]) == 2
    err = capsys.readouterr().err
    assert "limit must be an integer >= 0" in err and len(err.splitlines()) == 1
    assert E.load_problems(str(p), limit=0) == []
    assert not (tmp_path / "out").exists()


def test_run_checks_oracle_options_before_the_model_loads(tmp_path, capsys):
    pytest.importorskip("openai")
    data, out = tmp_path / "problems.jsonl", tmp_path / "run"
    write_problems(data, 2)
    gt = tmp_path / "gt.txt"
    gt.write_text("{question} {answer} {ground_truth} {start} {end}")
    base = ["run", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(out),
            "--oracle-url", "http://127.0.0.1:9/v1", "--oracle-model", "m"]
    (tmp_path / "a-file").write_text("x")
    for extra, msg in ((["--workers", "0"], "--workers must be an integer >= 1, got 0"),
                       (["--max-retries", "-1"], "--max-retries must be an integer >= 0, got -1"),
                       (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
                       (["--prompt-template", str(gt)], "--with-ground-truth"),
                       (["--prompt-template", str(tmp_path / "missing.txt")],
                        f"--prompt-template: cannot read {tmp_path / 'missing.txt'} (No such "
                        f"file or directory)"),
                       (["--gamma", "1.5"], "--gamma must be a number in [0, 1], got 1.5"),
                       (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
                       (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
                       (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
                       (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
                       (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, "
                                                   "got 0"),
                       (["--limit", "-1"], "--limit must be an integer >= 0, got -1"),
                       (["--device", "gpu"], "--device 'gpu' is not a torch device"),
                       (["--device", "cuda:7"], "--device 'cuda:7'"),
                       (["--output", str(tmp_path / "a-file")], "is a file, not a folder")):
        assert cli(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.splitlines()) == 1, err  # not the model's load error
    assert not out.exists()


def test_run_retry_failed_checks_the_resume_as_correct_does(tmp_path, capsys):
    """``run --retry-failed`` with another Oracle over a ``corrected.jsonl`` holding only the old
    Oracle's failed rows: ``correct`` drops and redoes them, so ``run`` must not refuse the
    resume up front (it goes on to the next check, here the model); without --retry-failed
    the rows stay and the other Oracle is refused."""
    pytest.importorskip("openai")
    data, out = tmp_path / "problems.jsonl", tmp_path / "run"
    write_problems(data, 2)
    out.mkdir()
    row = {"id": "p0:0", "question": "Q0: 2+3?", "original_answer": r"\boxed{6}",
           "ground_truth": "5", "status": "wrong_answer", "oracle_model": "A",
           "with_ground_truth": False, "oracle_temperature": 0.0, "oracle_max_tokens": None,
           "prompt_template": None}
    (out / "corrected.jsonl").write_text(json.dumps(row) + "\n")
    base = ["run", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output",
            str(out), "--oracle-url", "http://127.0.0.1:9/v1", "--oracle-model", "B"]
    assert cli(base) == 2
    assert "oracle_model 'A' -> 'B'" in capsys.readouterr().err
    assert cli(base + ["--retry-failed"]) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "other settings" not in err, err
    (out / "pairs.jsonl").mkdir()  # the filter's output: refused before anything runs
    assert cli(base + ["--retry-failed"]) == 2
    assert "pairs.jsonl is a folder, not a file" in capsys.readouterr().err


def test_run_loads_the_filter_tokenizer_before_sampling_or_asking(tmp_path, tiny_dir, capsys,
                                                                  monkeypatch):
    """A --tokenizer that does not load (no such folder, a folder without one, a Hub name with
    no network) ends `run` with one line before any answer is sampled or any request sent."""
    pytest.importorskip("openai")
    import huggingface_hub.constants
    from test_rectify_correct import OracleServer
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with no network
    data, out = tmp_path / "problems.jsonl", tmp_path / "run"
    write_problems(data, 2)
    (tmp_path / "empty").mkdir()
    server = OracleServer()
    try:
        base = ["run", "--model", tiny_dir, "--data", str(data), "--output", str(out),
                "--max-new-tokens", "4", "--device", "cpu", "--oracle-url", server.url,
                "--oracle-model", "rule", "--no-progress"]
        for tok, msg in ((str(tmp_path / "no-tok"),
                          f"tokenizer: no such folder {tmp_path / 'no-tok'}"),
                         (str(tmp_path / "empty"),  # or, where transformers loads a blank one
                          (f"tokenizer: cannot load {tmp_path / 'empty'}: ",
                           f"tokenizer: {tmp_path / 'empty'} has no usable tokenizer")),
                         ("no-such-org/no-such-tokenizer",
                          "tokenizer: cannot load no-such-org/no-such-tokenizer: ")):
            assert cli(base + ["--tokenizer", tok]) == 2
            err = capsys.readouterr().err
            msgs = (msg,) if isinstance(msg, str) else msg
            assert any(err.startswith(f"spot rectify: error: {m}") for m in msgs), err
            assert len(err.splitlines()) == 1, err
    finally:
        server.close()
    assert server.counts == {} and not out.exists()


def test_a_model_path_that_is_no_folder_is_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    """A model name that can only be a path (absolute, ./, ../, ~, two or more /) and is no
    folder: one line naming --model (not transformers' "Repo id must be in the form ..."),
    before the output folder is made; a folder under ~ loads."""
    data, out = tmp_path / "problems.jsonl", tmp_path / "out"
    write_problems(data, 1)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    oracle = ["--oracle-url", "http://127.0.0.1:9/v1", "--oracle-model", "m"]
    commands = [("elicit", [])] + ([("run", oracle)] if _has("openai") else [])
    for cmd, extra in commands:
        for model, msg in (("/nonexistent/model", "no such folder /nonexistent/model"),
                           ("./no-model", "no such folder ./no-model"),
                           ("../no-model", "no such folder ../no-model"),
                           ("~/no-model", "no such folder ~/no-model"),
                           ("runs/last/model", "no such folder runs/last/model"),
                           ("a-file", "a-file is a file, not a folder"),
                           (str(tmp_path / "a-file"), f"{tmp_path / 'a-file'} is a file, not a "
                                                      f"folder")):
            argv = [cmd, "--model", model, "--data", str(data), "--output", str(out), *extra]
            assert cli(argv) == 2
            assert capsys.readouterr().err == f"spot rectify: error: model: {msg}\n"
    assert not out.exists()
    os.symlink(tiny_dir, tmp_path / "tiny")
    assert cli(["elicit", "--model", "~/tiny", "--data", str(data), "--output", str(out),
                "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]) == 0
    assert [r["model"] for r in read_jsonl(str(out / "all.jsonl"))] == ["~/tiny"]


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_no_problems_is_an_error(tmp_path, tiny_dir, capsys):
    """An empty problems file (or blank lines only) is one line and exit 2, not "0 answers"."""
    p, out = tmp_path / "p.jsonl", tmp_path / "out"
    for text in ("", "\n\n"):
        p.write_text(text)
        assert cli(["elicit", "--model", tiny_dir, "--data", str(p), "--output", str(out)]) == 2
        assert capsys.readouterr().err == f"spot rectify: error: data: no problems in {p}\n"
    assert not out.exists()


def test_options_checked_at_load_leave_no_output_folder(tmp_path, tiny_dir, capsys,
                                                         monkeypatch):
    """--dtype, --engine vllm without vllm and a missing --model are refused before the
    output folder (and its lock file, an empty errors.jsonl) is made."""
    data, out = tmp_path / "problems.jsonl", tmp_path / "out"
    write_problems(data, 1)
    base = ["elicit", "--data", str(data), "--output", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli(base + ["--model", tiny_dir, "--dtype", "float8"])
    assert e.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^--dtype must be one of auto, bfloat16, float16, "
                                         r"float32, got 'float8'$"):
        E.load_model(tiny_dir, device="cpu", dtype="float8")
    if not _has("vllm"):
        assert cli(base + ["--model", tiny_dir, "--engine", "vllm"]) == 2
        assert capsys.readouterr().err == f"spot rectify: error: {E.NO_VLLM}\n"
    assert cli(base + ["--model", str(tmp_path / "no-model")]) == 2
    assert "model: no such folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # a mistyped relative folder reads as a Hub id (offline here)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert cli(base + ["--model", "models/nosuch"]) == 2
    assert "model: cannot load models/nosuch" in capsys.readouterr().err
    assert not out.exists()


def test_no_progress_hides_every_bar(tmp_path, tiny_dir, capsys):
    """--no-progress: neither elicit's bar nor transformers' weight-loading one; transformers'
    bars are as they were afterwards."""
    import transformers
    from transformers.utils import logging as hf_logging
    data = tmp_path / "problems.jsonl"
    write_problems(data, 2)
    base = ["elicit", "--model", tiny_dir, "--data", str(data), "--max-new-tokens", "2",
            "--device", "cpu"]
    assert cli(base + ["--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "elicit: 100%" in err, err  # what the test would see
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x: no bar for one weight file
        assert "Loading weights" in err, err
    assert cli(base + ["--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()
