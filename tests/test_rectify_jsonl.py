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


def test_a_second_writer_is_refused_and_rewrite_leaves_nothing_behind(tmp_path):
    """Two writers of one output would interleave duplicates: the second is refused while the
    first holds the file. A rewrite that fails keeps the old file and leaves no temporary."""
    import pytest
    from spot.rectify.jsonl import Appender, read_jsonl, rewrite
    path = tmp_path / "out.jsonl"
    with Appender(str(path)) as a:
        a.write({"id": "1"})
        with pytest.raises(ValueError, match="being written by another process"):
            Appender(str(path))
    with Appender(str(path)) as a:  # free again once the first has closed
        a.write({"id": "2"})
    with pytest.raises(TypeError):
        rewrite(str(path), [{"id": "3"}, {"id": object()}])
    assert [r["id"] for r in read_jsonl(str(path))] == ["1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    rewrite(str(path), [{"id": "4"}])
    assert [r["id"] for r in read_jsonl(str(path))] == ["4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
