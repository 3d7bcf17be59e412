"""spot.data and the CLI's handling of bad input: formats, keys, truncation, packing."""
from __future__ import annotations

import json
import random

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


def test_missing_file_and_config_errors(tmp_path, tok_dir, capsys):
    assert main(["train", "--model", str(tok_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("beta: 0.5\nlearning_rate: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--model", "m", "--data", "d",
                 "--output", "o"]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="beta"):
        make_config({"beta": -1.0}, {"model": "m", "data": "d", "output": "o"}).validate()
    with pytest.raises(ConfigError, match="epochs"):
        make_config({"epochs": "two"})
    assert main(["train", "--model", "m", "--data", "d", "--output", "o", "--attn", "flash"]) == 2
    assert "attn: must be auto|flash_attention_2|sdpa|eager" in capsys.readouterr().err
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
