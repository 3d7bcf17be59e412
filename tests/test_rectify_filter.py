"""``spot rectify filter``: change ratios against a brute-force LCS on the real tokenizer's ids,
gamma, the trainer's format, masks, and the command line with ``--tokenizer PATH``."""
import argparse
import json
import random

import pytest

from spot.rectify import filter as F
from spot.rectify.cli import add_parser
from spot.rectify.jsonl import read_jsonl
from spot.tiny import build_model, build_tokenizer
from test_rectify_lcs import brute_lcs


def corrected_records(n, seed=0):
    """Wrong answers and corrections with a spread of edit sizes, plus unverified ones."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([1, 2, 11])
        steps = " ".join(f"step {k}: carry the {rng.choice('abcdef')}." for k in range(rng.randint(0, 6)))
        y_minus = f"We add {a} and {b}. {steps} So {a} + {b} = {wrong}. \\boxed{{{wrong}}}"
        if i % 3 == 0:  # a heavy rewrite
            y_plus = f"Zzz, quixotic jazz: {a + b}; jinx! \\boxed{{{a + b}}}"
        else:
            y_plus = y_minus.replace(str(wrong), str(a + b))
        status = "verified" if i % 5 else rng.choice(["wrong_answer", "no_markers", "api_error"])
        recs.append({"id": f"p{i}:0", "question": f"What is {a} + {b}?", "ground_truth": str(a + b),
                     "original_answer": y_minus, "corrected_answer": y_plus if status != "no_markers" else None,
                     "status": status, "verified": status == "verified", "oracle_model": "m",
                     "problem_id": f"p{i}", "sample": 0})
    return recs


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.55, 1.0])
def test_filter_pairs_against_brute_force(gamma):
    tok = build_tokenizer()
    recs = corrected_records(30, seed=int(gamma * 10))
    pairs, stats = F.filter_pairs(recs, tok, gamma=gamma, masks=True)
    expected = {}
    for r in recs:
        if r["status"] != "verified":
            continue
        ym = tok(r["original_answer"], add_special_tokens=False)["input_ids"]
        yp = tok(r["corrected_answer"], add_special_tokens=False)["input_ids"]
        lcs = brute_lcs(ym, yp)
        ratio = 1 - lcs / len(yp)
        if ratio <= gamma:
            expected[r["id"]] = (r, ratio, lcs, ym, yp)
    assert stats["verified"] == sum(r["status"] == "verified" for r in recs)
    assert stats["kept"] == len(pairs) == len(expected)
    assert stats["over_gamma"] == stats["verified"] - stats["kept"]
    for p in pairs:
        r, ratio, lcs, ym, yp = expected[p["id"]]
        assert p["prompt"] == r["question"] and p["chosen"] == r["corrected_answer"]
        assert p["rejected"] == r["original_answer"]
        assert p["change_ratio"] == pytest.approx(ratio, abs=1e-6) and p["lcs"] == lcs
        assert p["oracle_model"] == "m" and p["problem_id"] == r["problem_id"]
        changed = p["chosen_changed"]
        assert len(changed) == len(yp) - lcs
        kept = [t for j, t in enumerate(yp) if j not in set(changed)]
        assert brute_lcs(kept, ym) == len(kept)  # the unchanged tokens are a subsequence of y-
    if gamma == 1.0:
        assert len(pairs) == stats["verified"]
    if 0 < gamma < 1:  # the table has pairs on both sides of these thresholds
        assert 0 < len(pairs) < stats["verified"]


def test_filter_cli_with_tokenizer_path(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(str(tok_dir))
    src, out = tmp_path / "corrected.jsonl", tmp_path / "pairs.jsonl"
    recs = corrected_records(12, seed=7)
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rectify", "filter", "--input", str(src), "--output", str(out),
                              "--tokenizer", str(tok_dir), "--gamma", "0.5"])
    assert args.func(args) == 0
    pairs = read_jsonl(str(out))
    text = capsys.readouterr().out
    _, stats = F.filter_pairs(recs, build_tokenizer(), gamma=0.5)
    assert f"kept {len(pairs)} of {stats['verified']} verified" in text and "median" in text
    assert len(pairs) == stats["kept"] and all("chosen_changed" not in p for p in pairs)
    assert all(p["change_ratio"] <= 0.5 for p in pairs)
    with pytest.raises(ValueError, match="gamma"):
        F.filter_pairs(recs, build_tokenizer(), gamma=1.5)
    args = parser.parse_args(["rectify", "filter", "--input", str(src), "--output", str(out),
                              "--tokenizer", str(tmp_path / "no-such-tokenizer")])
    assert args.func(args) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spot rectify: error:"), err


def test_filter_keeps_the_system_message():
    recs = [dict(r, system="Reason step by step.") for r in corrected_records(6, seed=1)]
    pairs, _ = F.filter_pairs(recs, build_tokenizer(), gamma=1.0)
    assert pairs and all(p["prompt"] == [{"role": "system", "content": "Reason step by step."},
                                         {"role": "user", "content": p["prompt"][1]["content"]}]
                         and p["prompt"][1]["content"].startswith("What is") for p in pairs)


@pytest.mark.parametrize("key", ["original_answer", "question"])
def test_verified_record_without_a_key_is_a_value_error(tmp_path, capsys, key):
    recs = corrected_records(6, seed=3)
    k = next(i for i, r in enumerate(recs) if r["status"] == "verified" and i > 0)
    del recs[k][key]
    src, out = tmp_path / "corrected.jsonl", tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match=f"^{src}: record {k + 1} \\(id 'p{k}:0'\\): verified "
                                         f"but missing key '{key}'$"):
        F.filter_file(str(src), str(out), build_tokenizer())
    tok_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(str(tok_dir))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rectify", "filter", "--input", str(src), "--output", str(out),
                              "--tokenizer", str(tok_dir)])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"missing key '{key}'" in err[0] and str(src) in err[0], err
    assert not out.exists()


def test_a_corrupt_line_or_the_wrong_file_is_an_error_a_torn_tail_is_not(tmp_path):
    """A line in the middle that is not JSON names the file and line; a last line cut short
    without its newline (a killed run) is skipped; a file without any 'status' (elicit's
    errors.jsonl given by mistake) is refused instead of giving 'kept 0 of 0'."""
    recs = corrected_records(6, seed=4)
    lines = [json.dumps(r) for r in recs]
    src, out = tmp_path / "corrected.jsonl", tmp_path / "pairs.jsonl"
    src.write_text("\n".join(lines[:3] + ['{"id": "p3:0", "sta'] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=f"{src}:4: not valid JSON"):
        F.filter_file(str(src), str(out), build_tokenizer())
    src.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # torn, no newline
    pairs, stats = F.filter_file(str(src), str(out), build_tokenizer(), gamma=1.0)
    assert stats["input"] == 5
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "status"}) + "\n"
                           for r in recs))
    with pytest.raises(ValueError, match="no records of `spot rectify correct`"):
        F.filter_file(str(src), str(out), build_tokenizer())


def test_tokenizer_and_output_paths_are_checked_first(tmp_path, capsys, monkeypatch):
    """A --tokenizer path that is no folder and an --output that is a folder are one line each
    naming the option (not transformers' "Repo id ..." or a temporary file's name), the output
    before the tokenizer loads, and nothing is written; a tokenizer under ~ loads."""
    src, out = tmp_path / "corrected.jsonl", tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in corrected_records(6, seed=5)))
    (tmp_path / "a-file").write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    build_tokenizer().save_pretrained(str(tmp_path / "tok"))
    build_model("qwen3").config.save_pretrained(tmp_path / "config-only")  # no tokenizer files
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(["rectify", "filter", "--input", str(src), *argv])
        return args.func(args)
    for argv, msg in (
            (["--output", str(out), "--tokenizer", "/nonexistent/tok"],
             "tokenizer: no such folder /nonexistent/tok"),
            (["--output", str(out), "--tokenizer", str(tmp_path / "a-file")],
             f"tokenizer: {tmp_path / 'a-file'} is a file, not a folder"),
            # transformers 5 builds a tokenizer that encodes nothing, 4.x refuses the folder
            (["--output", str(out), "--tokenizer", str(tmp_path / "config-only")],
             (f"tokenizer: {tmp_path / 'config-only'} has no usable tokenizer",
              f"tokenizer: cannot load {tmp_path / 'config-only'}: ")),
            (["--output", str(folder), "--tokenizer", "/nonexistent/tok"],
             f"output: {folder} is a folder, not a file"),
            (["--output", str(folder), "--tokenizer", str(tmp_path / "tok")],
             f"output: {folder} is a folder, not a file")):
        assert run(*argv) == 2
        err = capsys.readouterr().err
        msgs = (msg,) if isinstance(msg, str) else msg
        assert err.startswith(tuple(f"spot rectify: error: {m}" for m in msgs)), err
        assert err.count("\n") == 1, err
    assert not out.exists() and list(folder.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert run("--output", str(out), "--tokenizer", "~/tok", "--no-progress") == 0
    assert "kept" in capsys.readouterr().out and out.exists()
