"""spot.data and the CLI's handling of bad input: formats, keys, truncation, packing."""
from __future__ import annotations

import gzip
import json
import os
import random
import re

import pytest
import torch

from spot import data as D
from spot.cli import build_parser, main
from spot.config import ConfigError, load_file, make_config
from spot.tiny import build_tokenizer


def _spot_records(n, seed):
    rng = random.Random(seed)
    return [{"question": f"q{rng.randint(0, 999)} {'x' * rng.randint(1, 20)}?",
             "gemini_corrected_answer": f"right {rng.randint(0, 99)}",
             "original_answer": f"wrong {rng.randint(0, 99)}"} for _ in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(d)
    from spot.tiny import build_model
    build_model("qwen3").config.save_pretrained(d)  # a model folder up to its weights
    return d


def test_formats_and_key_sets_give_the_same_pairs(tmp_path):
    rows = _spot_records(5, seed=random.randrange(1 << 30))
    want = [(r["question"], r["gemini_corrected_answer"], r["original_answer"]) for r in rows]

    def got(path):
        pairs, skipped = D.read_pairs(path)
        assert skipped == 0
        return [(p.prompt[-1]["content"], p.chosen[-1]["content"], p.rejected[-1]["content"])
                for p in pairs]

    assert got(_write_jsonl(tmp_path / "a.jsonl", rows)) == want
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert got(tmp_path / "a.json") == want
    trl = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in want]
    assert got(_write_jsonl(tmp_path / "trl.jsonl", trl)) == want
    msgs = [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
             "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
            for q, c, r in want]  # TRL's implicit prompt
    assert got(_write_jsonl(tmp_path / "msgs.jsonl", msgs)) == want
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(trl), tmp_path / "a.parquet")
    assert got(tmp_path / "a.parquet") == want
    datasets = pytest.importorskip("datasets")  # optional: the other formats are checked above
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "ds")
    assert got(tmp_path / "ds") == want


BAD = [  # (line content, expected fragment of the one-line error)
    ({"question": "q", "original_answer": "w"}, "missing key 'gemini_corrected_answer'"),
    ({"question": "q", "gemini_corrected_answer": " ", "original_answer": "w"},
     "empty key 'gemini_corrected_answer'"),
    ({"gemini_corrected_answer": "c", "original_answer": "w"}, "missing key 'question'"),
    ({"prompt": "q", "chosen": "c"}, "missing key 'rejected'"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "empty key 'prompt'"),
    ({"chosen": "c", "rejected": "r"}, "missing key 'prompt'"),
    ({"prompt": "q", "chosen": 3, "rejected": "r"}, "key 'chosen' must be a string"),
    ({"text": "q"}, "missing key 'chosen'"),
    ("not json {", "invalid JSON"),
    ([1, 2], "must be a JSON object"),
    # roles: the explicit prompt must not be repeated in the response ("Qa<eos>" was trained)
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "Q"},
                                {"role": "assistant", "content": "a"}], "rejected": "b"},
     "key 'chosen' has a 'user' turn; with a 'prompt' key it must hold only the assistant"),
    ({"prompt": "Q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "key 'rejected' has a 'user' turn"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"},
     "key 'prompt' must end with a 'user' (or 'tool') turn, not 'assistant'"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "call f()"},
                                {"role": "tool", "content": "42"}], "rejected": "b"},
     "key 'chosen' must start and end with an 'assistant' turn, not 'tool'"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]},
     "keys 'chosen' and 'rejected' start with different turns"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "user", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]},
     "key 'chosen' has a 'user' turn; after the shared prompt it must hold only the assistant"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "user", "content": "b"}]},
     "key 'rejected' has a 'user' turn; after the shared prompt"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "a"}]},
     "key 'chosen' has no response after the turns it shares with the other"),
    ({"chosen": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "the prompt (the turns of 'chosen' before its last) must end with a 'user'"),
    ({"question": "q", "gemini_corrected_answer": [{"role": "user", "content": "c"}],
      "original_answer": "w"}, "key 'gemini_corrected_answer' has a 'user' turn"),
]


@pytest.mark.parametrize("bad,fragment", BAD)
def test_bad_record_is_one_line_naming_file_line_key(tmp_path, tok_dir, capsys, bad, fragment):
    good = _spot_records(3, seed=1)
    line = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:2]) + line + "\n"
                    + json.dumps(good[2]) + "\n")
    code = main(["train", "--model", str(tok_dir), "--data", str(path), "--output",
                 str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{path}:3:" in err[0] and fragment in err[0], err[0]
    pairs, skipped = D.read_pairs(path, skip_bad=True)
    assert (len(pairs), skipped) == (3, 1)


def test_columnar_files_with_columns_other_rows_use_give_the_jsonl_pairs(tmp_path):
    """Parquet and ``datasets`` fill a key a row lacks with None: absent, as in the JSONL."""
    spot = _spot_records(4, seed=random.randrange(1 << 30))
    for r in spot[1::2]:  # half the rows name the prompt 'prompt'
        r["prompt"] = r.pop("question")
    u, a, r = ({"role": k, "content": c} for k, c in
               (("user", "Q"), ("assistant", "c1"), ("assistant", "r1")))
    trl = [{"prompt": [u], "chosen": [a], "rejected": [r]},  # explicit and implicit prompts
           {"chosen": [u, a], "rejected": [u, r]}]
    strings = [{"prompt": "q0", "chosen": "c0", "rejected": "r0"}]  # a column holds one type
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name, rows in (("spot", spot), ("trl", trl), ("mixed", spot + strings)):
        keys = {k: None for row in rows for k in row}  # every column, None where a row lacks it
        want, _ = D.read_pairs(_write_jsonl(tmp_path / f"{name}.jsonl", rows))
        pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]),
                       tmp_path / f"{name}.parquet")
        assert D.read_pairs(tmp_path / f"{name}.parquet") == (want, 0), name
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in spot + strings]
                               ).save_to_disk(tmp_path / "ds")
    assert D.read_pairs(tmp_path / "ds")[0] == D.read_pairs(tmp_path / "mixed.jsonl")[0]


def test_implicit_prompt_is_the_shared_leading_turns_like_trl(tmp_path):
    """Responses of different turn counts (a tool call in one) split where they diverge, cut
    back so that each response opens with an assistant turn."""
    u, call, tool = ({"role": r, "content": c} for r, c in
                     (("user", "Q"), ("assistant", "call f()"), ("tool", "42")))
    rows = [{"chosen": [u, call, tool, {"role": "assistant", "content": "42"}],
             "rejected": [u, {"role": "assistant", "content": "41"}]},
            {"chosen": [u, call, tool, {"role": "assistant", "content": "42"}],
             "rejected": [u, call, {"role": "tool", "content": "41"},
                          {"role": "assistant", "content": "41"}]}]
    pairs, _ = D.read_pairs(_write_jsonl(tmp_path / "agentic.jsonl", rows))
    explicit = [dict(prompt=[u], chosen=r["chosen"][1:], rejected=r["rejected"][1:]) for r in rows]
    assert pairs == D.read_pairs(_write_jsonl(tmp_path / "explicit.jsonl", explicit))[0]
    assert [len(p.chosen) for p in pairs] == [3, 3] and [len(p.rejected) for p in pairs] == [1, 3]


def test_file_kind_mistakes_get_a_hint(tmp_path):
    lines = tmp_path / "pairs.json"  # JSON Lines under a .json name
    lines.write_text("".join(json.dumps(r) + "\n" for r in _spot_records(2, seed=3)))
    with pytest.raises(D.DataError, match="Extra data; a .json file holds one list of records "
                                          "\\(JSON Lines files are named .jsonl\\)"):
        D.read_pairs(lines)
    arrow = tmp_path / "data-00000-of-00001.arrow"
    arrow.write_bytes(b"\xff\xff")
    with pytest.raises(D.DataError, match="give its folder"):
        D.read_pairs(arrow)


def test_role_checks_keep_the_valid_chat_forms(tmp_path):
    u, a, sys_ = ({"role": r, "content": c} for r, c in
                  (("user", "Q2"), ("assistant", "a1"), ("system", "S")))
    first = {"role": "user", "content": "Q1"}
    rows = [  # system + user prompt; several assistant turns; multi-turn implicit prompt;
        # an implicit prompt with the rejected response alone (as before)
        {"prompt": [sys_, first], "chosen": "c", "rejected": [a, {"role": "assistant",
                                                                   "content": "r"}]},
        {"chosen": [first, a, u, {"role": "assistant", "content": "c"}],
         "rejected": [first, a, u, {"role": "assistant", "content": "r"}]},
        {"chosen": [sys_, first, {"role": "assistant", "content": "c"}], "rejected": "r"},
        # tool use (TRL accepts a prompt ending with a tool result, and agentic answers)
        {"prompt": [first, {"role": "assistant", "content": "call f()"},
                    {"role": "tool", "content": "42"}], "chosen": "c", "rejected": "r"},
        {"prompt": "Q1", "chosen": [{"role": "assistant", "content": "call f()"},
                                    {"role": "tool", "content": "42"},
                                    {"role": "assistant", "content": "c"}], "rejected": "r"},
    ]
    pairs, skipped = D.read_pairs(_write_jsonl(tmp_path / "chat.jsonl", rows))
    assert skipped == 0
    assert [[m["role"] for m in p.prompt] for p in pairs] == [
        ["system", "user"], ["user", "assistant", "user"], ["system", "user"],
        ["user", "assistant", "tool"], ["user"]]
    assert [[m["content"] for m in p.chosen + p.rejected] for p in pairs] == [
        ["c", "a1", "r"], ["c", "r"], ["c", "r"], ["c", "r"], ["call f()", "42", "c", "r"]]


def test_non_utf8_file_is_one_line_error_even_with_skip_bad(tmp_path, tok_dir, capsys):
    lines = [json.dumps(r).encode() + b"\n" for r in _spot_records(4, seed=2)]
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(lines)))
    latin = tmp_path / "latin.jsonl"  # line 3 has a Latin-1 byte
    latin.write_bytes(b"".join(lines[:2]) + b'{"question": "caf\xe9?", "gemini_corrected_answer"'
                      b': "c", "original_answer": "w"}\n' + lines[3])
    js = tmp_path / "pairs.json"
    js.write_bytes(b'[\n{"prompt": "q",\n "chosen": "\xff", "rejected": "r"}]')
    for path, line in ((gz, 1), (latin, 3), (js, 3)):
        with pytest.raises(D.DataError, match=f"^{path}:{line}: not UTF-8 text \\(compressed"):
            D.read_pairs(path, skip_bad=True)
        code = main(["train", "--model", str(tok_dir), "--data", str(path), "--output",
                     str(tmp_path / "out"), "--no-progress", "--skip-bad"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"{path}:{line}: not UTF-8" in err[0], err


def test_utf8_bom_and_suffix_case(tmp_path):
    rows = _spot_records(3, seed=3)
    want = [r["question"] for r in rows]
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "upper.JSON").write_text(json.dumps(rows, indent=1))  # not JSONL
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "upper.Parquet")
    for name in ("bom.jsonl", "bom.json", "upper.JSON", "upper.Parquet"):
        pairs, skipped = D.read_pairs(tmp_path / name)
        assert ([p.prompt[-1]["content"] for p in pairs], skipped) == (want, 0), name


def test_a_folder_of_hub_shards_reads_the_train_split_only(tmp_path):
    """Shards named by split as on the Hub: the train split's, never the test split beside it
    (as for a saved DatasetDict); several splits and none named train is an error; shards
    without split names are all read, in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = _spot_records(5, seed=4)
    q = [r["question"] for r in rows]

    def got(folder):
        return [p.prompt[-1]["content"] for p in D.read_pairs(folder)[0]]

    hub = tmp_path / "hub"
    hub.mkdir()
    for name, part in (("train-00000-of-00002", rows[:2]), ("train-00001-of-00002", rows[2:3]),
                       ("test-00000-of-00001", rows[3:])):
        pq.write_table(pa.Table.from_pylist(part), hub / f"{name}.parquet")
    assert got(hub) == q[:3]
    (hub / "train-00000-of-00002.parquet").unlink()
    (hub / "train-00001-of-00002.parquet").unlink()
    pq.write_table(pa.Table.from_pylist(rows[:1]), hub / "validation-00000-of-00001.parquet")
    with pytest.raises(D.DataError, match=r"several splits \(test, validation\) and none named train"):
        D.read_pairs(hub)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):  # "data-..." names no split; "trainer" is not "train"
        pq.write_table(pa.Table.from_pylist(rows[i:i + 1]), plain / f"data-{i}.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), plain / "trainer-x.parquet")
    assert got(plain) == q


def test_a_bad_row_is_named_from_0_with_its_split(tmp_path):
    """JSONL errors give 1-based lines; Parquet and ``datasets`` rows and a .json file's
    records are counted from 0, and say so; a ``DatasetDict``'s error names the split read."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = _spot_records(3, seed=4)
    rows[2] = dict(rows[2], original_answer="")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "l.json").write_text(json.dumps(rows))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "d")
    for name, where in (("p.parquet", "p.parquet:row 2 (from 0)"),
                        ("l.json", "l.json:record 2 (from 0)"),
                        ("d", "d (split train):row 2 (from 0)")):
        with pytest.raises(D.DataError, match=re.escape(where) + ".*original_answer"):
            D.read_pairs(tmp_path / name)


@pytest.mark.parametrize("argv, usage, unknown", [
    (["train", "--lr", "1", "--lrr", "2"], "usage: spot train", "--lrr 2"),
    (["demo", "--stepz", "3"], "usage: spot demo", "--stepz 3"),
    (["rectify", "filter", "--input", "a", "--output", "b", "--tokenizer", "t", "--zz"],
     "usage: spot rectify filter", "--zz")])
def test_an_unknown_argument_gets_its_subcommands_usage(argv, usage, unknown, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(usage), err
    assert f"error: unrecognized arguments: {unknown}" in err, err


def test_missing_file_and_config_errors(tmp_path, tok_dir, capsys):
    assert main(["train", "--model", str(tok_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("beta: 0.5\nlearning_rate: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--model", "m", "--data", "d",
                 "--output", "o"]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("betta: 0.5\nmax-stepz: 3\n")  # near misses are named
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--model", "m", "--data", "d",
                 "--output", "o"]) == 2
    assert ("unknown option(s) betta (did you mean beta?), max_stepz (did you mean max_steps?)"
            in capsys.readouterr().err)
    with pytest.raises(ConfigError, match="beta"):
        make_config({"beta": -1.0}, {"model": "m", "data": "d", "output": "o"}).validate()
    with pytest.raises(ConfigError, match="epochs"):
        make_config({"epochs": "two"})
    assert main(["train", "--model", "m", "--data", "d", "--output", "o", "--attn", "flash"]) == 2
    assert "--attn: must be auto|flash_attention_2|varlen|sdpa|eager" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": 1}) + "\n")
    with pytest.raises(D.DataError, match="no usable pairs"):
        D.read_pairs(tmp_path / "empty.jsonl", skip_bad=True)


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 0.5\nlr: 3.0e-5\nmax-steps: 7\ndelta: zero\n")
    (tmp_path / "c.json").write_text(json.dumps({"beta": 0.25, "grad_accum": 3}))
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--beta",
                                      "0.2", "--model", "m", "--data", "d", "--output", "o",
                                      "--no-bf16"])
    from spot.cli import BOOL_FLAGS, TRAIN_FLAGS
    cfg = make_config(load_file(args.config),
                      {k: getattr(args, k) for k in list(TRAIN_FLAGS) + list(BOOL_FLAGS)})
    assert (cfg.beta, cfg.lr, cfg.max_steps, cfg.delta, cfg.bf16) == (0.2, 3e-5, 7, "zero", False)
    assert cfg.epochs == 2 and cfg.grad_accum == 1  # defaults survive
    assert make_config(load_file(tmp_path / "c.json")).grad_accum == 3


def test_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--output", "--config", "--beta", "--delta", "--lr",
                 "--epochs", "--max-steps", "--save-every", "--max-length",
                 "--tokens-per-batch", "--grad-accum", "--backend", "--resume", "--skip-bad",
                 "--loss"):
        assert flag in text, flag
    usage = text[:text.index("\n\n")]  # the off switches are in the usage line too
    for name in ("bf16", "gradient-checkpointing", "skip-bad", "resume", "trust-remote-code",
                 "progress"):
        assert f"[--{name} | --no-{name}]" in " ".join(usage.split()), name


def test_a_boolean_flag_wins_over_the_config_file_either_way(tmp_path):
    from spot.cli import BOOL_FLAGS, TRAIN_FLAGS
    (tmp_path / "c.yaml").write_text("bf16: false\nskip_bad: true\n")
    base = ["train", "--config", str(tmp_path / "c.yaml"), "--model", "m", "--data", "d",
            "--output", "o"]

    def cfg(*flags):
        args = build_parser().parse_args(base + list(flags))
        return make_config(load_file(args.config),
                           {k: getattr(args, k) for k in list(TRAIN_FLAGS) + list(BOOL_FLAGS)})
    assert (cfg().bf16, cfg().skip_bad) == (False, True)  # neither flag given: the file's
    assert (cfg("--bf16", "--no-skip-bad").bf16, cfg("--no-skip-bad").skip_bad) == (True, False)
    assert cfg("--no-bf16", "--bf16").bf16 is True  # the last one given


def test_chat_template_and_truncation():
    tok = build_tokenizer()
    p, r = D.encode_turns(tok, [{"role": "user", "content": "2+2?"}],
                          [{"role": "assistant", "content": "4"}])
    assert tok.decode(p) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(r) == "4<|im_end|>\n"
    rng = random.Random()
    for _ in range(50):
        pl, rl, m = rng.randint(1, 40), rng.randint(1, 40), rng.randint(8, 60)
        prompt, resp = list(range(pl)), list(range(100, 100 + rl))
        p2, r2, pc, rc = D.truncate(prompt, resp, m)
        assert len(p2) + len(r2) <= m
        assert p2 == prompt[len(prompt) - len(p2):] and r2 == resp[:len(r2)]  # left / right
        assert pc == (len(p2) < pl) and rc == (len(r2) < rl)
        if pl + rl > m:
            assert len(p2) + len(r2) == m
            assert len(p2) >= min(pl, m // 2)


def test_a_template_with_an_empty_thinking_block():
    """A Qwen3-style template (written here, not Qwen's file): with ``enable_thinking=False``
    the generation prompt ends in an empty thinking block, and the last assistant turn of a
    conversation carries the same block before its text. The block belongs to the prompt;
    the response is the text and the end-of-turn marker, with no fallback."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}")
    counts = {}
    p, r = D.encode_turns(tok, [{"role": "user", "content": "2+2?"}],
                          [{"role": "assistant", "content": "4"}], counts)
    assert tok.decode(p).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(r) == "4<|im_end|>\n" and not counts


def test_truncation_counts_prompts_once_per_pair():
    tok = build_tokenizer()
    pairs = [D.Pair([{"role": "user", "content": "Q" * n}], [{"role": "assistant", "content": c}],
                    [{"role": "assistant", "content": r}])
             for n, c, r in ((60, "a" * 5, "b" * 30), (50, "a" * 40, "b" * 40), (2, "a", "b"),
                             (3, "a" * 50, "b"))]
    ex, counts = D.encode_pairs(tok, pairs, 40)
    # chosen and rejected keep the same prompt, cut for the longer response (TRL's rule)
    for e in ex:
        assert e.chosen_prompt == e.rejected_prompt
        assert e.chosen[:e.chosen_prompt] == e.rejected[:e.rejected_prompt]
        assert max(len(e.chosen), len(e.rejected)) <= 40
    assert [e.chosen_prompt for e in ex][3] < len(D.encode_turns(tok, pairs[3].prompt,
                                                                 pairs[3].rejected)[0])
    cut = [[D.truncate(*D.encode_turns(tok, p.prompt, resp), 40)[2:] for resp in
            (p.chosen, p.rejected)] for p in pairs]
    # alone, a sequence's prompt is cut in both, in one (next to the long response) or in none
    assert [[pc for pc, _ in c] for c in cut] == [[True, True], [True, True], [False, False],
                                                   [True, False]]
    assert counts["prompt_truncated"] == 3  # prompts, once per pair (not 5 sequences)
    assert counts["response_truncated"] == sum(rc for c in cut for _, rc in c) == 4


def test_data_warnings_name_what_gives_no_signal():
    """No chat template, a template that rewrites the prompt once a response follows, pairs
    whose chosen and rejected tokens are the same (here after truncation), pairs above the
    micro-batch budget: each gets a line; clean data gets none."""
    tok = build_tokenizer()
    pairs = [D.Pair([{"role": "user", "content": "q" * n}], [{"role": "assistant", "content": c}],
                    [{"role": "assistant", "content": r}])
             for n, c, r in ((4, "good", "bad"), (30, "s" * 30 + "A", "s" * 30 + "B"),
                             (2, "x" * 70, "y"))]
    ex, counts = D.encode_pairs(tok, pairs, 40)
    assert D.data_warnings(tok, ex[:1], counts, 300) == []
    assert D.data_warnings(tok, ex[:1] * 3, counts, 300) == [
        "2 of 3 pairs repeat an earlier pair token for token (they weigh double)"]
    lines = D.data_warnings(tok, ex, counts, 70)
    assert len(lines) == 2 and "1 of 3 pairs have identical" in lines[0], lines
    assert "1 of 3 pairs are longer than tokens_per_batch (70)" in lines[1], lines
    plain = build_tokenizer()
    plain.chat_template = None
    ex, counts = D.encode_pairs(plain, pairs[:1], 40)
    assert "no chat template" in D.data_warnings(plain, ex, counts, 300)[0]
    odd = build_tokenizer()  # the last turn is marked: the prompt alone renders differently
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}*{% endif %}: "
                         "{{ m['content'] }}\n{% endfor %}")
    ex, counts = D.encode_pairs(odd, pairs[:1], 40)
    assert counts["template_fallback"] == 2
    assert "2 of 2 responses: the chat template rewrites" in D.data_warnings(odd, ex, counts,
                                                                              300)[0]


def test_pack_layout():
    tok = build_tokenizer()
    recs = _spot_records(3, seed=random.randrange(1 << 30))
    pairs = [D.to_pair(r, "x") for r in recs]
    ex, _ = D.encode_pairs(tok, pairs, 64)
    b = D.pack(ex, [2, 0])
    seqs = [ex[2].chosen, ex[2].rejected, ex[0].chosen, ex[0].rejected]
    plens = [ex[2].chosen_prompt, ex[2].rejected_prompt, ex[0].chosen_prompt, ex[0].rejected_prompt]
    assert b["input_ids"][0].tolist() == sum(seqs, [])
    assert b["cu_seqlens"].tolist() == [0] + torch.cumsum(torch.tensor([len(s) for s in seqs]), 0).tolist()
    assert b["position_ids"][0].tolist() == sum([list(range(len(s))) for s in seqs], [])
    assert b["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert b["seq_ids"].tolist() == [4, 5, 0, 1]
    off = 0
    for s, pl in zip(seqs, plens):
        t = b["targets"][off:off + len(s)].tolist()
        assert t == [-100] * (pl - 1) + s[pl:] + [-100]
        off += len(s)
    assert b["rows"].tolist() == (b["targets"] != -100).nonzero().squeeze(-1).tolist()
    counts = [len(s) - pl for s, pl in zip(seqs, plens)]
    assert b["cu_rows"].tolist() == [0] + torch.cumsum(torch.tensor(counts), 0).tolist()
    plan = D.plan_batches(ex, [0, 1, 2], ex[0].length + ex[1].length)
    assert sum(plan, []) == [0, 1, 2]
    assert all(sum(ex[i].length for i in b_) <= ex[0].length + ex[1].length or len(b_) == 1
               for b_ in plan)


def test_tool_calls_and_text_parts_reach_the_chat_template(tmp_path):
    """Messages keep every field a template renders (an agentic answer's ``tool_calls``, with
    no content), text parts are joined, and what is not a message gets a line that names it;
    without a template the tool calls are left out, and a warning says so."""
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]}
    rows = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "2+"},
                                                      {"type": "text", "text": "2?"}]}],
             "chosen": [call, {"role": "tool", "content": "4"},
                        {"role": "assistant", "content": "It is 4.", "reasoning_content": None}],
             "rejected": "5"}]
    [pair], _ = D.read_pairs(_write_jsonl(tmp_path / "tools.jsonl", rows))
    assert pair.prompt == [{"role": "user", "content": "2+2?"}]
    assert pair.chosen[0] == {"role": "assistant", "content": "", "tool_calls": call["tool_calls"]}
    assert pair.chosen[2] == {"role": "assistant", "content": "It is 4."}  # None fields dropped
    tok = build_tokenizer()
    tok.chat_template = (  # renders tool calls, as Qwen's and Llama's templates do
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %}<call>{{ c['function']['name'] }}</call>"
        "{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    counts = {}
    _, r = D.encode_turns(tok, pair.prompt, pair.chosen, counts)
    assert "<call>add</call>" in tok.decode(r) and not counts
    tok.chat_template = None
    ex, counts = D.encode_pairs(tok, [pair], 200)
    assert counts["tool_calls_lost"] == 1
    assert any("tool calls" in w for w in D.data_warnings(tok, ex, counts, 300))
    for bad, what in (([{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                       "message 0 \\(user\\): content parts must all be text"),
                      ([{"content": "q"}], "message 0: a message is an object with a 'role'"),
                      ([{"role": "user", "content": 3}],
                       "message 0 \\(user\\): 'content' must be a string, got int")):
        with pytest.raises(D.DataError, match=f"bad.jsonl:1: key 'prompt' {what}"):
            D.read_pairs(_write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], prompt=bad)]))


def test_a_pair_the_chat_template_refuses_is_a_data_error(tmp_path):
    """Gemma-style templates raise for a system turn: that record gets one line naming it, or
    with skip_bad is skipped and counted like any bad record."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"},
            {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q2"}],
             "chosen": "a", "rejected": "b"}]
    path = _write_jsonl(tmp_path / "sys.jsonl", rows)
    pairs, _ = D.read_pairs(path)
    with pytest.raises(D.DataError, match=f"^{path}:2: the chat template refuses it: System "
                                          f"role not supported"):
        D.encode_pairs(tok, pairs, 100)
    errors = []
    ex, counts = D.encode_pairs(tok, pairs, 100, skip_bad=True, errors=errors)
    assert len(ex) == 1 and counts["bad"] == 1 and errors[0].startswith(f"{path}:2: ")


def test_without_a_template_the_tokenizers_bos_opens_the_prompt():
    """A base model's tokenizer that starts its own encodings with BOS gets it here too (TRL
    does the same for text without a template); one that does not, gets none."""
    from tokenizers.processors import TemplateProcessing
    tok = build_tokenizer()
    tok.chat_template = None
    prompt, resp = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}]
    p, _ = D.encode_turns(tok, prompt, resp)
    assert tok.decode(p) == "q\n"
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    p, r = D.encode_turns(tok, prompt, resp)
    assert p[0] == bos and tok.decode(p[1:]) == "q\n" and bos not in r
    tok.eos_token = None
    assert "no EOS token" in D.data_warnings(tok, [], {}, 100)[0]


def test_files_made_the_wrong_way_get_a_hint(tmp_path):
    """A JSON list saved as .jsonl (one line or pretty-printed), UTF-16 text, a DatasetDict
    without a 'train' split; a folder of Parquet shards is read in name order."""
    rows = _spot_records(4, seed=5)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows))
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps(rows, indent=1))
    for path in (one, pretty):
        with pytest.raises(D.DataError, match=f"^{path}:1: .*a .jsonl file holds one JSON object "
                                              f"a line \\(a JSON list of records: name it .json\\)"):
            D.read_pairs(path)
    wide = tmp_path / "wide.jsonl"
    wide.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-16"))
    with pytest.raises(D.DataError, match="UTF-16 text .*save it as UTF-8"):
        D.read_pairs(wide)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (0, 1):  # names sort as the rows go
        pq.write_table(pa.Table.from_pylist(rows[2 * i:2 * i + 2]),
                       shards / f"train-0000{i}-of-00002.parquet")
    want, _ = D.read_pairs(_write_jsonl(tmp_path / "all.jsonl", rows))
    assert D.read_pairs(shards)[0] == want
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                               "test_prefs": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(D.DataError, match="without a 'train' split \\(train_prefs, test_prefs\\); "
                                          "give a split's folder, e.g. .*dd/train_prefs"):
        D.read_pairs(tmp_path / "dd")
    assert D.read_pairs(tmp_path / "dd" / "train_prefs")[0] == want


def test_a_response_that_reasons_gets_one_thinking_block():
    """Qwen3's template (TRL's copy, when installed) in non-thinking mode puts an empty block
    in the generation prompt; a response with its own <think> block is rendered in thinking
    mode instead, so it is trained once, without a fallback."""
    import importlib.util
    spec = importlib.util.find_spec("trl")
    path = spec and spec.submodule_search_locations and os.path.join(
        spec.submodule_search_locations[0], "chat_templates", "qwen3.jinja")
    if not path or not os.path.exists(path):
        pytest.skip("needs TRL's bundled Qwen3 chat template")
    tok = build_tokenizer()
    tok.chat_template = open(path).read()
    pair = D.to_pair({"prompt": "q", "chosen": "<think>\nreason\n</think>\n\nans",
                      "rejected": "bad"}, "x:1")
    (ex,), counts = D.encode_pairs(tok, [pair], 1024)
    chosen, rejected = tok.decode(ex.chosen), tok.decode(ex.rejected)
    assert chosen.count("<think>") == 1 and not counts.get("template_fallback"), chosen
    assert tok.decode(ex.chosen[ex.chosen_prompt:]).startswith("<think>\nreason\n</think>")
    assert rejected.count("<think>") == 1 and "<think>\n\n</think>\n\nbad" in rejected
    # one mode a pair: both responses follow the same prompt (and share its cut)
    assert ex.chosen[:ex.chosen_prompt] == ex.rejected[:ex.rejected_prompt]
    # and the same when only the rejected response reasons
    pair = D.to_pair({"prompt": "q", "chosen": "ans",
                      "rejected": "<think>\nr\n</think>\n\nbad"}, "x:2")
    (ex,), counts = D.encode_pairs(tok, [pair], 1024)
    assert ex.chosen[:ex.chosen_prompt] == ex.rejected[:ex.rejected_prompt]
    for seq in (ex.chosen, ex.rejected):
        assert tok.decode(seq).count("<think>") == 1, tok.decode(seq)
    assert not counts.get("template_fallback")


def _trl_template(name):
    import importlib.util
    spec = importlib.util.find_spec("trl")
    path = spec and spec.submodule_search_locations and os.path.join(
        spec.submodule_search_locations[0], "chat_templates", name)
    if not path or not os.path.exists(path):
        pytest.skip(f"needs TRL's bundled {name}")
    tok = build_tokenizer()
    tok.chat_template = open(path).read()
    return tok


def _texts(tok, ex):
    return [(tok.decode(s[:p]), tok.decode(s[p:])) for s, p in
            ((ex.chosen, ex.chosen_prompt), (ex.rejected, ex.rejected_prompt))]


def test_a_response_that_only_closes_its_thinking_block_reasons():
    """Thinking models whose generation prompt opens the block write ``reasoning</think>
    answer``: that is reasoning too, rendered in thinking mode (it was rendered after Qwen3's
    empty non-thinking block, a stray ``</think>`` in the answer)."""
    tok = _trl_template("qwen3.jinja")
    pair = D.to_pair({"question": "q", "gemini_corrected_answer": "ok\n</think>\n\nfinal 4",
                      "original_answer": "bad\n</think>\n\nfinal 5"}, "x:1")
    (ex,), counts = D.encode_pairs(tok, [pair], 1024)
    for prompt, response in _texts(tok, ex):
        assert (prompt + response).count("</think>") == 1, prompt + response
        assert response.startswith("<think>\n") and "</think>\n\nfinal" in response
    assert not counts.get("template_fallback")


def test_the_fallback_does_not_repeat_the_prompts_end_nor_train_tool_results():
    """A template that rewrites the conversation falls back to the response's text: what the
    generation prompt already ends with (R1-distill's ``<think>\\n``) is not written again, and
    a tool's result, not the model's words, is left out."""
    tok = _trl_template("deepseek_r1_distill.jinja")
    pair = D.Pair([{"role": "user", "content": "q"}],
                  [{"role": "assistant", "content": "<think>\nr\n</think>\n\ngood"}],
                  [{"role": "assistant", "content": "bad"}], "x:1")
    (ex,), counts = D.encode_pairs(tok, [pair], 1024)
    assert counts.get("template_fallback") == 2
    (p, chosen), _ = _texts(tok, ex)
    assert (p + chosen).count("<think>") == 1, p + chosen
    tok.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}|{% endfor %}"
    agentic = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
               {"role": "tool", "content": "4242"}, {"role": "assistant", "content": "good"}]
    _, r_ids = D.encode_turns(tok, [{"role": "user", "content": "q"}], agentic, {})
    assert "4242" not in tok.decode(r_ids) and "good" in tok.decode(r_ids)


def test_an_agentic_answer_keeps_its_tool_calls_under_qwen3():
    """Qwen3 without thinking writes an empty block into the generation prompt, none before an
    agentic answer's first turn, so the prompt is not a prefix of the conversation: the other
    mode is tried before falling back (which lost the tool call)."""
    tok = _trl_template("qwen3.jinja")
    pair = D.Pair([{"role": "user", "content": "q"}],
                  [{"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                   {"role": "tool", "content": "42"}, {"role": "assistant", "content": "good"}],
                  [{"role": "assistant", "content": "bad"}], "x:1")
    (ex,), counts = D.encode_pairs(tok, [pair], 1024)
    assert not counts.get("template_fallback") and not counts.get("tool_calls_lost")
    (_, chosen), (_, rejected) = _texts(tok, ex)
    assert '"name": "f"' in chosen and chosen.rstrip().endswith("good<|im_end|>")
    assert rejected.startswith("bad")


def test_a_tokenizer_that_prepends_a_space_to_every_text_keeps_the_responses_first_token():
    """Llama-2 / Mistral-v0.1 tokenizers (SentencePiece's "▁" prepended to every text): the
    response alone started with a lone "▁" token that the conversation tokenized as a whole
    never has; the response takes the whole's tokens after the prompt's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    corpus = ["what does the packer do? the packer lays out pairs of answers. " * 20]
    t.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["▁"]))
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + "
        "eos_token }}{% endif %}{% endfor %}")
    prompt = [{"role": "user", "content": "what does the packer do?"}]
    response = [{"role": "assistant", "content": "the packer lays out pairs."}]
    p_ids, r_ids = D.encode_turns(tok, prompt, response)
    whole = tok(tok.apply_chat_template(prompt + response, tokenize=False),
                add_special_tokens=False)["input_ids"]
    assert p_ids + r_ids == whole, (tok.convert_ids_to_tokens(r_ids),
                                    tok.convert_ids_to_tokens(whole[len(p_ids):]))


def test_a_template_that_renders_no_prompt_text_is_an_error():
    """Idefics3's template iterates over content parts: given strings it renders nothing, and
    every pair became an empty prompt and two empty answers; now an error naming the record."""
    tok = _trl_template("idefics3.jinja")
    pair = D.to_pair({"prompt": "what is 2+2?", "chosen": "4", "rejected": "5"}, "f.jsonl:3")
    with pytest.raises(D.DataError, match="f.jsonl:3: the chat template renders none of the "
                                          "prompt's turn 0 \\(user: 'what is 2\\+2\\?'\\)"):
        D.encode_pairs(tok, [pair], 1024, skip_bad=True)


def test_parquet_is_read_a_batch_at_a_time_and_only_the_pairs_columns(tmp_path):
    """A Parquet file is read in batches of rows and only the key sets' columns (an image column
    beside them is never loaded); rows are numbered across batches."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    n = 5000  # more than one batch
    table = pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n,
                      "rejected": ["b"] * n, "image": [b"\0" * 64] * n})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1000)
    records = list(D.read_records(tmp_path / "p.parquet"))
    assert len(records) == n
    assert records[-1][0].endswith("p.parquet:row 4999 (from 0)")
    assert records[-1][1]["prompt"] == "q4999"
    assert all(set(rec) == {"prompt", "chosen", "rejected"} for _, rec in records)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(D.DataError, match="bad.parquet: cannot read Parquet"):
        list(D.read_records(tmp_path / "bad.parquet"))


def test_nulls_paths_inside_files_and_odd_values_are_one_line_errors(tmp_path, capsys):
    """A config null for an option that takes none is refused (it crashed on a comparison, or
    turned bf16 off); an --output or --cache-dir below a file is refused before any work
    (a NotADirectoryError traceback after the reference pass); --max-grad-norm must be
    finite; an upper-case .YAML file is YAML."""
    for key, value in (("beta", None), ("bf16", None), ("epochs", None)):
        with pytest.raises(ConfigError, match=f"--{key}: expected .*, got null"):
            make_config({key: value, "model": "m", "data": "d", "output": "o"})
    assert make_config({"max_steps": None, "save_every": None, "model": "m", "data": "d",
                        "output": "o"}).validate().save_every == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    for key in ("output", "cache_dir"):
        with pytest.raises(ConfigError, match=f"{key}: .*afile is a file, not a folder"):
            make_config({"model": "m", "data": "d", "output": "o",
                         key: str(afile / "sub" / "deeper")}).validate()
    with pytest.raises(ConfigError, match="--max-grad-norm: must be a finite number > 0"):
        make_config({"max_grad_norm": float("inf"), "model": "m", "data": "d",
                     "output": "o"}).validate()
    cfg = tmp_path / "run.YAML"
    cfg.write_text("lr: 0.001\n")
    assert load_file(cfg) == {"lr": 0.001}
    assert main(["demo", "--output", str(afile / "sub")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
