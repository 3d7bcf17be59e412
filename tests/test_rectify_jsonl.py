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
    """Two writers of one output would interleave duplicates or lose a rewrite: while another
    process holds the output's lock, taking it is refused (the same process re-enters it). A
    rewrite that fails keeps the old file and leaves no temporary; one that succeeds keeps the
    file's mode."""
    import os
    import pytest
    from conftest import held_by_another_process
    from spot.rectify.jsonl import Appender, OutputLock, read_jsonl, rewrite
    path = tmp_path / "out.jsonl"
    with held_by_another_process(path):
        with pytest.raises(ValueError, match="being written by another process"):
            with OutputLock(str(path)):
                pass
    with OutputLock(str(path)), OutputLock(str(path)), Appender(str(path)) as a:  # re-entrant
        a.write({"id": "1"})
        a.write({"id": "2"})
    with pytest.raises(TypeError):
        rewrite(str(path), [{"id": "3"}, {"id": object()}])
    assert [r["id"] for r in read_jsonl(str(path))] == ["1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.jsonl.lock", "out.jsonl"]
    os.chmod(path, 0o640)
    rewrite(str(path), [{"id": "4"}])
    assert [r["id"] for r in read_jsonl(str(path))] == ["4"]
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.jsonl.lock", "out.jsonl"]


def test_a_torn_last_line_may_end_inside_a_character(tmp_path):
    from spot.rectify.jsonl import iter_jsonl
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "1"}\n' + '{"id": "2", "q": "\u00e9'.encode()[:-1])
    assert [r["id"] for _, r in iter_jsonl(str(path), torn_tail=True)] == ["1"]
    path.write_bytes(b'{"id": "1"}\n\xff\n{"id": "2"}\n')
    import pytest
    with pytest.raises(ValueError, match="c.jsonl:2: not valid JSON"):
        list(iter_jsonl(str(path), torn_tail=True))


def test_a_utf8_bom_is_read_past(tmp_path):
    """Windows editors start UTF-8 files with a BOM; spot train reads past it, and so does the
    rectify pipeline."""
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1}\n{"id": 2}\n')
    assert read_jsonl(str(path)) == [{"id": 1}, {"id": 2}]
