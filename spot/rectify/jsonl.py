"""Crash-safe JSONL files: whole-line appends and resumption by record id.

Every finished record is appended as one complete line with a single ``write`` system call on a
file opened with ``O_APPEND``: a process killed at any moment leaves either the whole line or none
of it (the kernel does not interrupt a regular-file write halfway for a signal). As a second line of
defence, :func:`repair` cuts a trailing fragment without a newline (a full disk, a power loss)
before a step resumes (a last line that is a complete record only lacks its newline and is
kept), and :func:`done_ids` then lists the records that are finished, so a restarted step neither
redoes nor duplicates them. Text that UTF-8 cannot encode (a lone surrogate such as ``"\\ud83d"``
from a JSON ``\\u`` escape) is written as U+FFFD, so such a record is still written once.
"""
from __future__ import annotations

import errno
import json
import os
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def iter_jsonl(path, *, strict=True, torn_tail=False):
    """``(line number, record)`` for each record of a JSONL file (blank lines skipped).
    ``strict=False`` skips undecodable lines instead of raising; ``torn_tail=True`` skips only
    a last line without its newline (cut short by a kill, also inside a UTF-8 character) and
    raises for any other."""
    with open(path, "rb") as f:
        for k, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if k == 1 else "utf-8"))  # a BOM
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if strict and not (torn_tail and not raw.endswith(b"\n")):
                    why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
                    raise ValueError(f"{path}:{k}: not valid JSON ({why})") from None
                continue
            if not isinstance(rec, dict):
                if strict:
                    raise ValueError(f"{path}:{k}: expected a JSON object per line")
                continue
            yield k, rec


def read_jsonl(path, *, strict=True):
    """Records of a JSONL file (see :func:`iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path, strict=strict)]


def has_surrogate(text):
    """True when ``text`` holds a lone surrogate, which UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def dumps_line(record):
    """One record as a UTF-8 JSON line; lone surrogates become U+FFFD."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", line).encode("utf-8")


def repair(path):
    """Drop a trailing partial line from ``path``; returns the bytes removed. A last line without
    its newline that is a complete JSON record is kept and gets the newline."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline
        pos, chunk = size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            k = buf.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            pos = start
        else:
            keep = 0
        f.seek(keep)
        try:
            whole = isinstance(json.loads(f.read()), dict)
        except ValueError:  # a torn line (JSONDecodeError, or UTF-8 cut inside a character)
            whole = False
        if whole:
            f.seek(size)
            f.write(b"\n")
            return 0
        f.truncate(keep)
        return size - keep


def check_same_settings(records, settings, what, where, normalize=None):
    """Refuse (``ValueError``) to resume ``where`` when its ``records`` were made with other
    ``settings``: for each key, the first record that has it is compared (records of older
    versions without the key pass), through ``normalize[key]`` when given (both sides). One
    file of answers sampled, or corrected, two ways would mix them silently."""
    normalize = normalize or {}
    seen = {}
    for rec in records:
        for k in settings:
            if k in rec and k not in seen:
                seen[k] = rec[k]
        if len(seen) == len(settings):
            break
    same = {k: normalize.get(k, lambda x: x) for k in settings}
    changed = [f"{k} {seen[k]!r} -> {v!r}" for k, v in settings.items()
               if k in seen and same[k](seen[k]) != same[k](v)]
    if changed:
        raise ValueError(f"output: {where} holds {what} made with other settings "
                         f"({', '.join(changed)}); rerun with the same ones, or choose a new "
                         f"output")


def records_of(path):
    """The records of ``path`` (none if it does not exist), lazily, torn lines skipped."""
    if os.path.exists(path):
        yield from (rec for _, rec in iter_jsonl(path, strict=False))


_HELD = {}  # lock file -> [fd, depth]: this process's locks (re-entrant)


class OutputLock:
    """Exclusive use of an output for one step (``flock`` on a hidden ``.NAME.lock`` beside it,
    held for the whole step, re-entrant within the process): a second process writing it would
    interleave duplicates or lose a rewrite, so it is refused with a ``ValueError``. A file
    system without working ``flock`` (some NFS and Lustre mounts) runs unlocked. ``lock``: the
    lock file's path, instead of ``.NAME.lock`` beside ``path`` (a folder may hold its own)."""

    def __init__(self, path, lock=None):
        d, name = os.path.split(os.path.abspath(path))
        self.path, self.lock = path, os.path.abspath(lock or os.path.join(d, f".{name}.lock"))

    def __enter__(self):
        held = _HELD.get(self.lock)
        if held is not None:
            held[1] += 1
            return self
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unlocked
            fcntl = None
        os.makedirs(os.path.dirname(self.lock), exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise ValueError(f"output: {self.path} is being written by another "
                                     f"process; wait for it to finish or choose another "
                                     f"output") from None
        _HELD[self.lock] = [fd, 1]
        return self

    def __exit__(self, *exc):
        held = _HELD[self.lock]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.lock]
            os.close(held[0])  # releases the flock
        return False


def done_ids(path, key="id"):
    """Ids of the records already in ``path`` (after :func:`repair`)."""
    if not os.path.exists(path):
        return set()
    repair(path)
    return {str(r[key]) for _, r in iter_jsonl(path, strict=False) if key in r}


class Appender:
    """Append records to a JSONL file, one complete line per ``write`` (the step holds an
    :class:`OutputLock` on it)."""

    def __init__(self, path):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        repair(path)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record):
        data = dumps_line(record)
        n = os.write(self.fd, data)
        while n < len(data):  # only on exotic file systems; still appended in order
            n += os.write(self.fd, data[n:])

    def close(self):
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fsync_path(path, folder=False):
    """Flush ``path`` (a file, or a folder's entries: a rename in it) to disk; a no-op where the
    system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Replace ``path`` atomically with what ``write(binary_file)`` writes: a temporary file of
    its own in the same folder (two writers never share one), synced, given the file's mode (or
    a new file's), renamed over ``path``, the folder synced too; removed if anything fails."""
    import tempfile
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):  # the file's own mode, else what a new file would get
            mode = os.stat(path).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(d, folder=True)  # the rename itself survives a power loss


def rewrite(path, records):
    """Replace ``path`` with ``records`` atomically (:func:`atomic_write`)."""
    def write(f):
        for r in records:
            f.write(dumps_line(r))
    atomic_write(path, write)
