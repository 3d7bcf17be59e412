"""Crash-safe JSONL files on real files: text UTF-8 cannot encode, and resumption's repair."""
from spot.rectify.jsonl import Appender, done_ids, read_jsonl, repair, rewrite


def test_lone_surrogates_are_written_as_replacement_characters(tmp_path):
    p = tmp_path / "a.jsonl"
    with Appender(str(p)) as out:
        out.write({"id": "a", "text": "x \ud83d y"})
        out.write({"id": "b", "text": "\U0001F600 ok"})
    assert read_jsonl(str(p)) == [{"id": "a", "text": "x \ufffd y"}, {"id": "b", "text": "\U0001F600 ok"}]
    rewrite(str(p), [{"id": "c", "text": "\udc80"}])
    assert read_jsonl(str(p)) == [{"id": "c", "text": "\ufffd"}]


def test_repair_keeps_a_whole_last_record_and_drops_a_torn_one(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "1"}\n{"id": "2"}')  # complete, only the newline is missing
    assert repair(str(p)) == 0 and p.read_text() == '{"id": "1"}\n{"id": "2"}\n'
    assert done_ids(str(p)) == {"1", "2"}
    p.write_text('{"id": "1"}\n{"id": "2", "x": "\u00e9')  # torn
    assert repair(str(p)) == len('{"id": "2", "x": "\u00e9'.encode())
    assert p.read_text() == '{"id": "1"}\n'
    p.write_bytes('{"id": "1"}\n{"id": "\u00e9"}'.encode()[:-3])  # cut inside a UTF-8 character
    assert done_ids(str(p)) == {"1"} and p.read_text() == '{"id": "1"}\n'
    p.write_text('{"id": "1"}')  # a single line
    with Appender(str(p)) as out:
        out.write({"id": "2"})
    assert [r["id"] for r in read_jsonl(str(p))] == ["1", "2"]
