"""``spot rectify correct``: an Oracle rewrites each wrong answer minimally (SPoT's ``y+``).

Any OpenAI-compatible chat-completions endpoint is the Oracle, reached through the ``openai``
client. The correction prompt asks to keep the student's correct steps word for word, replace only
the wrong reasoning, match the student's style and put the whole corrected solution, ending in a
``\\boxed{}`` answer, between :data:`START` and :data:`END`. Two built-in variants: without the
ground truth (the default) and with it (``--with-ground-truth``); ``--prompt-template FILE``
replaces them (placeholders ``{question}``, ``{answer}``, ``{start}`` and ``{end}`` required,
``{ground_truth}`` only with ``--with-ground-truth``; filled by plain substitution so LaTeX braces
in the file need no escaping). All options are checked before any request (:func:`check_args`).

Design:

* Bounded concurrency: ``--workers`` threads send requests; the main thread alone verifies
  answers (math-verify's timeout needs the main thread) and appends results, so the output file
  has one writer. Each finished record is one complete JSON line (:mod:`spot.rectify.jsonl`); a
  killed run resumes by skipping the ids already written: every record appears exactly once.
  The workers are daemon threads: on Ctrl-C (or a fatal error) no new request or retry starts,
  requests in flight are abandoned, and what was written stays.
* Retries: HTTP 429, 408/409/425, 5xx, timeouts (``--timeout`` bounds each wait for the
  connection, not a whole request), dropped connections and replies cut short (malformed JSON)
  are retried up to ``--max-retries`` times with exponential backoff and "equal jitter" (delay
  ``d/2 + U(0, d/2)``, ``d = min(max_backoff, backoff * 2^k)``, at least a 429's ``Retry-After``
  when that is shorter than ``max_backoff``). The client's own retries are off, so the counts are ours.
  401/403/404 stop the run (every request would fail the same way); other 4xx fail the record.
* Failures are recorded, never guessed: ``status`` is ``verified``, ``wrong_answer`` (the
  correction's answer is not the ground truth), ``no_markers`` (the reply lacks the markers; its
  text is not used), ``empty`` (a chat completion without text), ``refused`` (the model's
  refusal, its text in ``error``), ``api_error`` (retries exhausted, also for a reply that is not
  a chat completion, e.g. a proxy's HTML page) or ``bad_request``. ``finish_reason`` is
  elicit's; ``oracle_finish_reason`` is the Oracle's (``None`` when there was no reply).
  A rerun redoes the ``api_error`` records (transient by nature); ``--retry-failed`` drops every
  failed line of a previous run and redoes those records.
* An Oracle that fails ``stuck_after(workers)`` records in a row with one error (``api_error``,
  ``bad_request``: a wrong URL, an option the endpoint rejects) stops the run with that error
  and exit status 1, rather than burning through every record.
* The API key is read only from the environment variable ``--api-key-env`` and scrubbed from
  error messages and replies before they are printed or written (a key shorter than 8
  characters, such as a local server's ``EMPTY``, is no secret and is left alone: scrubbing it
  would rewrite ordinary text).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import sys
import threading

from .answers import check_answer, checker_name, ground_truth_answer
from .jsonl import (Appender, OutputLock, check_same_settings, has_surrogate, iter_jsonl,
                    read_jsonl, repair, rewrite, same_file)

START, END = "<corrected_solution>", "</corrected_solution>"

_RULES = """Rewrite the student's solution with the smallest possible changes:
- keep every correct step exactly as the student wrote it, word for word;
- replace only the wrong reasoning or calculations, and what follows from them;
- match the student's style, wording, notation and level of detail;
- do not comment on the mistakes, do not mention the student or the corrections;
- end with the final answer in \\boxed{}.

Put the complete corrected solution, and nothing else, between {start} and {end}."""

PROMPT = ("You are an expert mathematics teacher. A student solved the problem below, but the "
          "solution contains mistakes and its final answer is wrong.\n\n" + _RULES +
          "\n\nProblem:\n{question}\n\nStudent's solution:\n{answer}\n")

PROMPT_WITH_GROUND_TRUTH = (
    "You are an expert mathematics teacher. A student solved the problem below, but the solution "
    "contains mistakes and its final answer is wrong. The correct final answer is: {ground_truth}\n"
    "The corrected solution must reach it through valid reasoning, not by only changing the last "
    "line.\n\n" + _RULES + "\n\nProblem:\n{question}\n\nStudent's solution:\n{answer}\n")

QUESTION_KEYS = ("question", "prompt", "problem")
ANSWER_KEYS = ("response", "original_answer")
GT_KEYS = ("ground_truth", "answer")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class OracleError(Exception):
    """A request that failed for good: ``kind`` is a status, ``attempts`` how many were sent."""

    def __init__(self, kind, message, attempts, finish=None):
        super().__init__(message)
        self.kind, self.attempts, self.finish = kind, attempts, finish


class OracleStuck(Exception):
    """Records in a row failed at the endpoint with one error: stop the run (exit status 1)."""


STOP_AFTER = 10  # at least this many in a row, and 3 per worker (``stuck_after``)
ENDPOINT_FAILURES = ("api_error", "bad_request")


def stuck_after(workers):
    """How many records in a row must fail at the endpoint, all with the same error (numbers
    aside), before the run stops: ``max(STOP_AFTER, 3 workers)``. Failures come back in
    completion order, and quick ones (a 400 for a too-long prompt) overtake slow successes
    in flight; three per worker keeps such a mix from looking like a dead endpoint."""
    return max(STOP_AFTER, 3 * workers)


def _same_error(text):
    return re.sub(r"\d+", "#", text or "")[:200]


def correct_settings(oracle_model, with_ground_truth, temperature, max_tokens, template):
    """What each correction keeps of how it was made (a resume must not mix them)."""
    return {"oracle_model": oracle_model, "with_ground_truth": with_ground_truth,
            "oracle_temperature": temperature, "oracle_max_tokens": max_tokens,
            "prompt_template": None if template is None else
            hashlib.sha256(template.encode()).hexdigest()[:16]}


def answered(row):
    """A row the Oracle answered (its settings count; an endpoint failure's do not)."""
    return row.get("status") not in ENDPOINT_FAILURES


class OracleFatal(Exception):
    """An error every request would hit (authentication, unknown model or URL): stop the run."""


class Stopped(Exception):
    """The run was stopped (Ctrl-C or a fatal error): no request or retry is started."""


def fill(template, **values):
    """One-pass ``{name}`` substitution of the known names (no ``str.format``: LaTeX braces stay
    as they are, and a ``{answer}`` inside the question is not substituted again)."""
    pat = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pat.sub(lambda m: str(values[m.group(1)]), template)


def build_prompt(question, answer, ground_truth=None, *, template=None, with_ground_truth=False):
    """The Oracle's user message for one record."""
    if template is None:
        template = PROMPT_WITH_GROUND_TRUTH if with_ground_truth else PROMPT
    elif "{ground_truth}" in template and not with_ground_truth:
        raise ValueError("--prompt-template uses {ground_truth} but --with-ground-truth is not "
                         "set")
    elif with_ground_truth and "{ground_truth}" not in template:
        raise ValueError("--with-ground-truth is set but --prompt-template has no "
                         "{ground_truth}: the Oracle would never see it")
    return fill(template, question=question, answer=answer, start=START, end=END,
                ground_truth=ground_truth if with_ground_truth else "")


def load_template(path):
    """A user prompt template; it must contain ``{question}``, ``{answer}``, ``{start}`` and
    ``{end}`` (the markers the reply is cut at)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:  # missing, a folder, unreadable, not UTF-8
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"--prompt-template: cannot read {path} ({why})") from None
    missing = [k for k in ("{question}", "{answer}", "{start}", "{end}") if k not in text]
    if missing:
        raise ValueError(f"--prompt-template: {path} lacks the placeholder(s) "
                         f"{', '.join(missing)}")
    return text


def extract_marked(text):
    """The text of the last complete block: between the last :data:`END` and the last
    :data:`START` before it, stripped (a marker named in a note after the block does not hide
    it); ``None`` when there is no such block (such a reply is a failure, not a guess)."""
    if not text:
        return None
    j = text.rfind(END)
    i = text.rfind(START, 0, max(j, 0))
    if j < 0 or i < 0 or i + len(START) > j:
        return None
    return text[i + len(START):j].strip()


def reply_text(resp):
    """``(text, finish_reason)`` of a chat-completions reply; ``text`` is ``None`` when the reply
    has no text, whatever its shape (content parts are joined)."""
    choices = getattr(resp, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    content = getattr(getattr(choice, "message", None), "content", None)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [getattr(p, "text", None) or (p.get("text") if isinstance(p, dict) else None)
                 for p in content]
        content = "".join(p for p in parts if isinstance(p, str))
    finish = getattr(choice, "finish_reason", None)
    return (content if isinstance(content, str) and content else None,
            finish if isinstance(finish, str) else None)


MIN_SECRET = 8  # a shorter "key" (EMPTY, x, none: local servers) is not scrubbed


def redact(text, secret):
    """``text`` with ``secret`` replaced by ``***`` (a ``secret`` of at least ``MIN_SECRET``
    characters: a short one would rewrite ordinary text, such as every x of an answer)."""
    text = str(text)
    return text.replace(secret, "***") if secret and len(secret) >= MIN_SECRET else text


def refusal(resp):
    """The model's refusal text of a chat completion, or None."""
    choices = getattr(resp, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    text = getattr(getattr(choice, "message", None), "refusal", None)
    return text if isinstance(text, str) and text else None


class Oracle:
    """Chat-completions calls with our own retry policy (see the module docstring)."""

    def __init__(self, base_url, model, *, api_key=None, timeout=120.0, max_retries=5, backoff=1.0,
                 max_backoff=60.0, temperature=0.0, max_tokens=None, seed=None):
        import openai
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        self.openai, self.model = openai, model
        self._key = api_key or ""
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY",
                                    max_retries=0, timeout=timeout)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self._rng, self._lock = random.Random(seed), threading.Lock()

    def _delay(self, k, err):
        d = min(self.max_backoff, self.backoff * 2.0 ** min(k, 64))  # past 2^1023: overflow
        with self._lock:
            delay = d / 2 + self._rng.uniform(0, d / 2)
        resp = getattr(err, "response", None)
        try:
            after = float(resp.headers.get("retry-after")) if resp is not None else None
        except (TypeError, ValueError):
            after = None
        if after is not None and 0 <= after <= self.max_backoff:
            delay = max(delay, after)
        return delay

    def _classify(self, e):
        """``"retry"``, ``"fatal"`` or a record failure kind."""
        o = self.openai
        if isinstance(e, o.APIStatusError):
            code = e.status_code
            if code in (408, 409, 425, 429) or code >= 500:
                return "retry"
            if code in (401, 403, 404):
                return "fatal"
            return "bad_request"
        # timeouts, dropped connections, replies cut short (in JSON, or inside a UTF-8 character)
        if isinstance(e, (o.APIConnectionError, json.JSONDecodeError, UnicodeDecodeError)):
            return "retry"
        return "api_error"

    def ask(self, prompt, stop=None):
        """``(text, finish_reason, attempts)``; raises :class:`OracleError` or :class:`OracleFatal`,
        or :class:`Stopped` once the event ``stop`` is set (checked before each attempt and
        during the backoff waits)."""
        stop = stop or threading.Event()
        kw = dict(model=self.model, messages=[{"role": "user", "content": prompt}],
                  temperature=self.temperature)
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        attempt = 0
        while True:
            if stop.is_set():
                raise Stopped()
            attempt += 1
            try:
                resp = self.client.chat.completions.create(**kw)
            except Exception as e:  # noqa: BLE001 - classified below, never swallowed silently
                kind = self._classify(e)
                msg = redact(f"{type(e).__name__}: {e}", self._key)[:1000]
                if kind == "fatal":
                    raise OracleFatal(msg) from None
                if kind == "retry" and attempt <= self.max_retries:
                    stop.wait(self._delay(attempt - 1, e))
                    continue
                raise OracleError("api_error" if kind == "retry" else kind, msg, attempt) from None
            if getattr(resp, "choices", None) is None:  # not a completion: a proxy's HTML page
                # the key out before the cut: a key across the cut would not match whole
                msg = f"the reply is not a chat completion: {redact(str(resp), self._key)[:200]!r}"
                if attempt <= self.max_retries:
                    stop.wait(self._delay(attempt - 1, None))
                    continue
                raise OracleError("api_error", msg, attempt)
            text, finish = reply_text(resp)
            if text is None:
                why = refusal(resp)
                if why is not None:
                    raise OracleError("refused", redact(why, self._key)[:1000], attempt, finish)
                raise OracleError("empty", "the reply had no text content", attempt, finish)
            return text, finish, attempt


def _field(rec, keys, what, where):
    """The first of ``keys`` that holds a non-blank string or a number; a ``ValueError`` naming
    ``where`` (``input: FILE:LINE:``) when none does, or the first one set is of another kind
    (a list, ``true``: found here, not after the Oracle was paid for it)."""
    for key in keys:
        v = rec.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{where} the {what} ({key}) must be a string or a number, got "
                             f"{type(v).__name__}")
        if has_surrogate(str(v)):
            raise ValueError(f"{where} the {what} ({key}) holds a lone surrogate (an unpaired "
                             "\\ud800-\\udfff escape), which is not valid Unicode")
        return v
    raise ValueError(f"{where} no {what} (any of {keys}, not blank)")


def load_errors(path):
    """Records to correct, each with ``id``, ``question``, ``original_answer``, ``ground_truth``.
    Records marked ``"correct": true`` (an ``all.jsonl`` given as input) are left out."""
    if not os.path.exists(path):
        raise ValueError(f"input: {path} does not exist")
    out, seen = [], set()
    for k, (line, rec) in enumerate(iter_jsonl(path)):
        where = f"input: {path}:{line}:"
        rid = str(rec.get("id", k))
        if rec.get("correct") is True:
            continue
        if rid in seen:
            raise ValueError(f"{where} duplicate id {rid!r}")
        seen.add(rid)
        item = {key: v for key, v in rec.items() if key not in ("response", "correct")}
        item.update(id=rid, question=str(_field(rec, QUESTION_KEYS, "problem", where)),
                    original_answer=str(_field(rec, ANSWER_KEYS, "answer to correct", where)),
                    ground_truth=_field(rec, GT_KEYS, "ground truth", where))
        if not ground_truth_answer(item["ground_truth"]).strip():
            raise ValueError(f"{where} the ground truth has no answer (an empty \\boxed{{}})")
        out.append(item)
    return out


def correct(records, output, oracle, *, workers=16, template=None, with_ground_truth=False,
            checker="auto", retry_failed=False, progress=True, log=None):
    """Correct ``records`` (from :func:`load_errors`) into ``output`` (appended, resumable).

    Returns the summary over the whole output file plus this run's ``new`` and ``retries``.
    Raises :class:`OracleFatal` (after keeping what was finished) on authentication errors, and
    :class:`OracleStuck` once ``stuck_after(workers)`` records in a row failed at the endpoint alike.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    checker = checker_name(checker)
    log = log or (lambda m: print(m, file=sys.stderr))
    with OutputLock(output):  # the whole step: a second writer is refused before it rewrites
        return _correct(records, output, oracle, workers, template, with_ground_truth, checker,
                        retry_failed, progress, log)


def check_resume(records, settings, output):
    """Refuse to resume ``output`` whose answered ``records`` had other correct settings (a run
    stopped by a rejected option may be rerun with another one)."""
    check_same_settings((r for r in records if answered(r)), settings, "corrections", output)


def kept_rows(rows, retry_failed):
    """The rows of an output that a rerun keeps: all but the ``api_error`` ones, or only the
    verified ones with ``retry_failed`` (the others are redone)."""
    return [r for r in rows if (r.get("status") == "verified" if retry_failed
                                else r.get("status") != "api_error")]


def _correct(records, output, oracle, workers, template, with_ground_truth, checker,
             retry_failed, progress, log):
    settings = correct_settings(oracle.model, with_ground_truth, oracle.temperature,
                                oracle.max_tokens, template)
    kept = []
    if os.path.exists(output):  # redo api_error records (all failed ones with retry_failed)
        repair(output)
        rows = read_jsonl(output, strict=False)
        kept = kept_rows(rows, retry_failed)
        check_resume(kept, settings, output)  # what stays
        if len(kept) < len(rows):
            rewrite(output, kept)
            log(f"correct: dropped {len(rows) - len(kept)} failed records "
                f"({'all failures' if retry_failed else 'api_error'}); those in the input are "
                f"redone")
    done = {str(r["id"]) for r in kept if "id" in r}  # done_ids of the file as it now is
    pending = [r for r in records if r["id"] not in done]

    stop, todo, results = threading.Event(), queue.SimpleQueue(), queue.SimpleQueue()
    for r in pending:
        todo.put(r)

    def worker():  # a daemon thread: one that is stuck in a request does not hold up the exit
        while not stop.is_set():
            try:
                rec = todo.get_nowait()
            except queue.Empty:
                return
            try:
                res = oracle.ask(build_prompt(rec["question"], rec["original_answer"],
                                              rec["ground_truth"], template=template,
                                              with_ground_truth=with_ground_truth), stop)
            except Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - an OracleError is the record's; the
                res = e  # main thread raises any other (OracleFatal, a bad template, a SystemExit
            results.put((rec, res))  # in the client): it never waits on a worker that died

    from tqdm.auto import tqdm
    bar = tqdm(total=len(records), initial=len(records) - len(pending), desc="correct",
               unit="record", disable=not progress, file=sys.stderr)
    new = retries = in_a_row = 0
    limit, streak_error = stuck_after(workers), None
    by = {}  # the output's records by status: those kept, then each one written
    for r in kept:
        by[r.get("status", "?")] = by.get(r.get("status", "?"), 0) + 1
    try:
        with Appender(output) as out:
            for _ in range(min(workers, len(pending))):
                threading.Thread(target=worker, daemon=True).start()
            for _ in pending:
                rec, res = results.get()
                if isinstance(res, BaseException) and not isinstance(res, OracleError):
                    raise res
                row = dict(rec, **settings, corrected_answer=None, verified=False,
                           oracle_finish_reason=None)
                if isinstance(res, OracleError):
                    row.update(status=res.kind, attempts=res.attempts, error=str(res),
                               oracle_finish_reason=res.finish)
                else:
                    text, finish, attempts = res
                    row.update(attempts=attempts, oracle_finish_reason=finish)
                    body = extract_marked(text)
                    if body is None:
                        row.update(status="no_markers", oracle_reply=text)
                    elif not body:
                        row.update(status="empty", oracle_reply=text)
                    else:
                        ok = check_answer(body, rec["ground_truth"], checker=checker)
                        row.update(corrected_answer=body, verified=ok, checker=checker,
                                   status="verified" if ok else "wrong_answer")
                retries += row["attempts"] - 1
                for k in ("error", "oracle_reply", "corrected_answer"):  # the Oracle's words
                    if isinstance(row.get(k), str):  # may quote the key; the input's are not
                        row[k] = redact(row[k], oracle._key)  # touched
                out.write(row)
                new += 1
                by[row["status"]] = by.get(row["status"], 0) + 1
                bar.update(1)
                if row["status"] in ENDPOINT_FAILURES:
                    error = _same_error(row.get("error"))
                    in_a_row = in_a_row + 1 if error == streak_error else 1
                    streak_error = error
                else:
                    in_a_row, streak_error = 0, None
                if in_a_row >= limit:
                    first = row["error"].splitlines()[0][:300] if row.get("error") else ""
                    raise OracleStuck(f"{in_a_row} records in a row failed at the endpoint with "
                                      f"the same error, {row['status']}: {first}")
    finally:  # done, Ctrl-C or an error: no new request or retry starts; those in flight are
        stop.set()  # abandoned (their daemon threads end with them or with the process)
        bar.close()
    return {"done": sum(by.values()), "verified": by.get("verified", 0),
            "failed": {k: v for k, v in sorted(by.items()) if k != "verified"},
            "new": new, "retries": retries}


def format_summary(s):
    failed = ", ".join(f"{k} {v}" for k, v in s["failed"].items()) or "none"
    hint = (" (a rerun redoes api_error; --retry-failed redoes every failure)"
            if s["failed"] else "")
    return (f"correct: {s['done']} done ({s['new']} this run, {s['retries']} retries), "
            f"{s['verified']} corrected and verified; failed: {failed}{hint}")


def check_args(args):
    """Check the Oracle options before any work (``run``: before the model loads); returns the
    prompt template (``None``: the built-in one)."""
    for opt, value, ok, need in (
            ("--workers", args.workers, args.workers >= 1, "an integer >= 1"),
            ("--max-retries", args.max_retries, args.max_retries >= 0, "an integer >= 0"),
            ("--timeout", args.timeout, args.timeout > 0, "> 0 seconds"),
            ("--backoff", args.backoff, args.backoff >= 0, ">= 0 seconds"),
            ("--max-backoff", args.max_backoff, args.max_backoff >= 0, ">= 0 seconds"),
            ("--oracle-temperature", args.oracle_temperature,
             0 <= args.oracle_temperature <= 2, "in [0, 2]"),
            ("--oracle-max-tokens", args.oracle_max_tokens,
             args.oracle_max_tokens is None or args.oracle_max_tokens >= 1,
             "an integer >= 1 (leave it out for the endpoint's default)")):
        if not ok:
            raise ValueError(f"{opt} must be {need}, got {value}")
    if not ENV_NAME.fullmatch(args.api_key_env):  # not echoed: it may be the key itself
        raise ValueError("--api-key-env takes the NAME of an environment variable (such as "
                         "OPENAI_API_KEY), not the key")
    template = load_template(args.prompt_template) if args.prompt_template else None
    if template and "{ground_truth}" in template and not args.with_ground_truth:
        raise ValueError(f"--prompt-template: {args.prompt_template} uses {{ground_truth}} but "
                         "--with-ground-truth is not set")
    if template and "{ground_truth}" not in template and args.with_ground_truth:
        raise ValueError(f"--prompt-template: {args.prompt_template} has no {{ground_truth}}, so "
                         "with --with-ground-truth the Oracle would never see it (records would "
                         "say it did)")
    return template


def oracle_from_args(args):
    key = os.environ.get(args.api_key_env) or None
    if key is None:
        name = args.api_key_env
        what = f"${name}" if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) else \
            "the environment variable named by --api-key-env"
        print(f"correct: {what} is not set; sending no API key", file=sys.stderr)
    return Oracle(args.oracle_url, args.oracle_model, api_key=key, timeout=args.timeout,
                  max_retries=args.max_retries, backoff=args.backoff, max_backoff=args.max_backoff,
                  temperature=args.oracle_temperature, max_tokens=args.oracle_max_tokens), key


def correct_main(args, input_path=None, output_path=None, template=None):
    """``spot rectify correct``; ``template``: the one ``check_args`` already returned."""
    template = check_args(args) if template is None else template
    output = output_path or args.output
    if os.path.isdir(output):
        raise ValueError(f"output: {output} is a folder, not a file")
    if same_file(input_path or args.input, output):  # the corrections would go into the input
        raise ValueError(f"output: {output} is the input file; choose another --output")
    records = load_errors(input_path or args.input)
    oracle, key = oracle_from_args(args)
    try:
        s = correct(records, output, oracle, workers=args.workers,
                    template=template, with_ground_truth=args.with_ground_truth,
                    retry_failed=args.retry_failed, progress=args.progress)
    except OracleFatal as e:
        print(f"correct: stopped, the Oracle refused the request: {redact(e, key)}", file=sys.stderr)
        return 1
    except OracleStuck as e:
        print(f"correct: stopped: {e}; fix the endpoint or the options and rerun (api_error "
              f"records are redone; --retry-failed redoes bad_request ones too)", file=sys.stderr)
        return 1
    print(format_summary(s))
    endpoint = sum(s["failed"].get(k, 0) for k in ENDPOINT_FAILURES)
    if s["done"] and endpoint == s["done"]:  # fewer records than stop a run, or a rerun of one
        again = (" (--retry-failed redoes the bad_request ones)"
                 if s["failed"].get("bad_request") else "")
        print(f"correct: no record has an answer: every request failed at the endpoint; check "
              f"--oracle-url and the options, then rerun{again}", file=sys.stderr)
        return 1
    return 0
