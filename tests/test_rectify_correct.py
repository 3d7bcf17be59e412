"""``spot rectify correct`` against a real HTTP server on 127.0.0.1 speaking chat-completions,
driven through the real ``openai`` client.

The server is a small rule-based Oracle: it finds the student's solution in the prompt (it starts
with "Let me compute." and ends at its ``\\boxed{}``), recomputes every ``a op b = c`` line of it and
the boxed answer, and replies with the corrected text between the markers. A script per question
tag (``Q7: ...``) makes it misbehave first: 429, 500, a reply slower than the client's timeout, a
dropped connection, no markers, a wrong correction, a reply cut short or of an odd shape, a lone
surrogate, a reply that never comes.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spot.rectify import correct as C
from spot.rectify.jsonl import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SECRET = "sk-test-7d1e2f9a-SECRET"


def oracle_fix(prompt, wrong=False):
    """The rule-based correction of the student solution inside ``prompt``."""
    m = re.search(r"Let me compute\..*?\\boxed\{[^}]*\}\.?", prompt, re.S)
    if m is None:  # a garbled answer (a random model's): keep it and add the computed result
        a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
        c = OPS[op](int(a), int(b)) + (1 if wrong else 0)
        student = prompt.split("Student's solution:\n", 1)[1].rstrip("\n")
        return f"{student}\nSo {a} {op} {b} = {c} and the answer is \\boxed{{{c}}}."
    text = m.group(0)
    last = None

    def fix(mm):
        nonlocal last
        a, op, b = int(mm.group(1)), mm.group(2), int(mm.group(3))
        last = OPS[op](a, b) + (1 if wrong else 0)
        return f"{a} {op} {b} = {last}"
    text = re.sub(r"(\d+) ([-+*]) (\d+) = (-?\d+)", fix, text)
    return re.sub(r"\\boxed\{[^}]*\}", lambda _: f"\\\\boxed{{{last}}}", text)


class OracleServer:
    """A ThreadingHTTPServer with per-question scripts and request logs."""

    def __init__(self, delay=0.0):
        self.scripts, self.counts, self.prompts, self.auth = {}, {}, [], []
        self.delay, self.lock = delay, threading.Lock()
        oracle = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                tag = re.search(r"Q\d+", prompt).group(0)
                with oracle.lock:
                    oracle.prompts.append(prompt)
                    oracle.auth.append(self.headers.get("Authorization"))
                    n = oracle.counts[tag] = oracle.counts.get(tag, 0) + 1
                    script = oracle.scripts.get(tag, [])
                    action = script[n - 1] if n <= len(script) else (
                        script[-1] if script and script[-1] in ("always500", "always400", "html",
                                                                "html_auth") else "ok")

                if oracle.delay:
                    time.sleep(oracle.delay)
                try:
                    self.act(action, body, prompt)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def act(self, action, body, prompt):
                self.cut = action == "cut"
                self.cut_in_char = action == "cut_in_char"
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "slow":
                    time.sleep(1.5)
                if action == "hang":  # longer than any test waits
                    time.sleep(30)
                if action in ("429", "500", "always500", "leak"):
                    code = 429 if action == "429" else 500
                    detail = f"saw {self.headers.get('Authorization')}" if action == "leak" else "busy"
                    return self.send(code, {"error": {"message": detail, "type": "server_error"}},
                                     {"Retry-After": "0"} if code == 429 else {})
                if action == "401":
                    return self.send(401, {"error": {"message": "bad key", "type": "auth"}})
                if action == "always400":  # e.g. an option the endpoint rejects
                    return self.send(400, {"error": {"message": "temperature is not supported",
                                                     "type": "invalid_request_error"}})
                if action in ("html", "html_auth"):  # a proxy's page, with status 200
                    data = b"<html><body>Gateway says hello</body></html>"
                    if action == "html_auth":  # a debug page echoing the key across char 200
                        data = (b"<html><pre>" + b"." * 160 + b" Authorization: " +
                                self.headers.get("Authorization", "").encode() + b"</pre></html>")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if action == "refuse":
                    return self.send(200, {"id": "x", "object": "chat.completion", "created": 0,
                                           "model": body["model"], "choices": [{
                                               "index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": None,
                                                           "refusal": "I can't help with that."}}]})
                odd = {"choices_str": ["x"], "message_str": [{"message": "hi"}],
                       "choices_dict": {"a": 1},
                       "content_int": [{"message": {"role": "assistant", "content": 5}}]}
                if action in odd:
                    return self.send(200, {"id": "x", "object": "chat.completion", "created": 0,
                                           "model": body["model"], "choices": odd[action]})
                fixed = oracle_fix(prompt, wrong=action == "wrong")
                if action == "surrogate":  # json.dumps writes it as the escape "\\ud83d"
                    fixed += " \ud83d"
                if action == "cut_in_char":  # raw UTF-8 text, cut inside a character
                    fixed += " caf\u00e9" * 40
                if action == "echo":  # a reply quoting the key
                    fixed += f"\n(auth was {self.headers.get('Authorization')})"
                content = ("Here is the corrected solution.\n" + fixed if action == "nomarkers" else
                           f"Here you go.\n{C.START}\n{fixed}\n{C.END}\n")
                if action == "parts":  # content as a list of text parts
                    content = [{"type": "text", "text": content[:20]},
                               {"type": "text", "text": content[20:]}]
                self.send(200, {"id": "x", "object": "chat.completion", "created": 0,
                                "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": content}}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def send(self, code, payload, headers=None):
                data = json.dumps(payload, ensure_ascii=not self.cut_in_char).encode()
                if self.cut:  # the reply cut short: half of the JSON
                    data = data[:len(data) // 2]
                if self.cut_in_char:  # after the first byte of a 2-byte character (as vLLM
                    data = data[:data.index("\u00e9".encode()) + 1]  # and others send text)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def oracle():
    pytest.importorskip("openai")  # the client under test
    o = OracleServer()
    yield o
    o.close()


def problem(i, rng, wrong=True):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    c = OPS[op](a, b)
    shown = c + rng.choice([-3, -1, 1, 2, 10]) if wrong else c
    return {"id": f"p{i}:0", "question": f"Q{i}: What is {a} {op} {b}?", "ground_truth": str(c),
            "response": f"Let me compute. First, {a} {op} {b} = {shown}. So the answer is \\boxed{{{shown}}}.",
            "correct": not wrong}


def write_errors(path, n, seed=0):
    rng = random.Random(seed)
    recs = [problem(i, rng) for i in range(n)]
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return recs


def make_oracle(url, **kw):
    kw = {"timeout": 0.6, "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05, "seed": 0, **kw}
    return C.Oracle(url, "rule-oracle", **kw)


def test_oracle_rules_really_correct():
    rng = random.Random(1)
    for i in range(20):
        p = problem(i, rng)
        fixed = oracle_fix("x\n" + p["response"])
        assert f"\\boxed{{{p['ground_truth']}}}" in fixed
        assert fixed.startswith("Let me compute. First,")


def test_correct_all_behaviours(tmp_path, oracle, capsys):
    errors = tmp_path / "errors.jsonl"
    recs = write_errors(errors, 10)
    oracle.scripts = {"Q1": ["429", "ok"], "Q2": ["500", "500", "ok"], "Q3": ["slow", "ok"],
                      "Q4": ["nomarkers"], "Q5": ["wrong"], "Q6": ["drop", "ok"],
                      "Q7": ["always500"], "Q8": ["leak"] * 4, "Q9": ["echo"]}
    out = tmp_path / "corrected.jsonl"
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, api_key=SECRET),
                  workers=4, progress=False)
    rows = {r["id"]: r for r in read_jsonl(str(out))}
    assert sorted(rows) == sorted(r["id"] for r in recs)
    status = {k[1:-2]: r["status"] for k, r in rows.items()}
    attempts = {k[1:-2]: r["attempts"] for k, r in rows.items()}
    assert status == {"0": "verified", "1": "verified", "2": "verified", "3": "verified",
                      "4": "no_markers", "5": "wrong_answer", "6": "verified", "7": "api_error",
                      "8": "api_error", "9": "verified"}
    assert attempts == {"0": 1, "1": 2, "2": 3, "3": 2, "4": 1, "5": 1, "6": 2, "7": 4, "8": 4, "9": 1}
    assert oracle.counts == {f"Q{i}": attempts[str(i)] for i in range(10)}
    for k, r in rows.items():
        src = recs[int(k[1:-2])]
        assert r["original_answer"] == src["response"] and r["ground_truth"] == src["ground_truth"]
        if r["status"] == "verified":
            assert r["verified"] and f"\\boxed{{{src['ground_truth']}}}" in r["corrected_answer"]
            assert C.START not in r["corrected_answer"] and "Here you go" not in r["corrected_answer"]
            tail = "\n(auth was Bearer ***)" if k == "p9:0" else ""  # the key scrubbed
            assert r["corrected_answer"] == oracle_fix(src["response"]) + tail
        else:
            assert not r["verified"]
    assert rows["p4:0"]["corrected_answer"] is None  # no markers: recorded, not guessed
    assert "ground_truth" in rows["p5:0"] and rows["p5:0"]["corrected_answer"] is not None
    assert "InternalServerError" in rows["p7:0"]["error"]
    assert "saw Bearer ***" in rows["p8:0"]["error"]  # the server echoed the key: scrubbed
    assert s["done"] == 10 and s["verified"] == 6 and s["new"] == 10
    assert s["failed"] == {"api_error": 2, "no_markers": 1, "wrong_answer": 1}
    assert s["retries"] == sum(attempts.values()) - 10
    # the key reached the server, and nothing we wrote or printed contains it
    assert f"Bearer {SECRET}" in oracle.auth
    assert SECRET not in out.read_text()
    cap = capsys.readouterr()
    assert SECRET not in cap.out + cap.err
    # the prompt: without the ground truth unless asked for
    assert all("correct final answer is" not in p for p in oracle.prompts)


def test_correct_with_ground_truth_and_template(tmp_path, oracle):
    errors = tmp_path / "errors.jsonl"
    recs = write_errors(errors, 3, seed=2)
    C.correct(C.load_errors(str(errors)), str(tmp_path / "a.jsonl"), make_oracle(oracle.url),
              workers=2, with_ground_truth=True, progress=False)
    for r in recs:
        assert any(r["question"] in p and f"correct final answer is: {r['ground_truth']}" in p
                   for p in oracle.prompts)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Fix it, keep \\boxed{} style. {question}\n---\n{answer}\n---\nUse {start} {end}")
    oracle.prompts.clear()
    s = C.correct(C.load_errors(str(errors)), str(tmp_path / "b.jsonl"), make_oracle(oracle.url),
                  workers=2, template=C.load_template(str(tpl)), progress=False)
    assert s["verified"] == 3
    assert all(p.startswith("Fix it, keep \\boxed{} style. Q") and C.END in p for p in oracle.prompts)
    with pytest.raises(ValueError, match="^--prompt-template uses"):
        C.build_prompt("q", "a", "1", template="{question}{answer}{ground_truth}")
    with pytest.raises(ValueError, match="^--with-ground-truth is set but"):  # never shown
        C.build_prompt("q", "a", "1", template="{question}{answer}", with_ground_truth=True)
    bad = tmp_path / "bad.txt"
    bad.write_text("{question} only")
    with pytest.raises(ValueError, match="answer"):
        C.load_template(str(bad))


def test_extract_marked():
    s, e = C.START, C.END
    assert C.extract_marked(f"intro {s} a {e} x {s}\n b \n{e}") == "b"
    assert C.extract_marked(f"{s} never closed") is None
    assert C.extract_marked(f"{e} {s}") is None
    # a note after the block that names the opening tag does not hide the block
    assert C.extract_marked(f"{s} fixed {e}\nI put it inside {s} tags.") == "fixed"
    assert C.extract_marked(f"{s}{e}") == "" and C.extract_marked(f"{s} x {s} y {e}") == "y"
    assert C.extract_marked("plain") is None and C.extract_marked(None) is None


def test_auth_error_stops_and_resume(tmp_path, oracle):
    errors = tmp_path / "errors.jsonl"
    write_errors(errors, 4, seed=3)
    oracle.scripts = {f"Q{i}": ["401"] for i in range(4)}
    with pytest.raises(C.OracleFatal, match="401"):
        C.correct(C.load_errors(str(errors)), str(tmp_path / "c.jsonl"),
                  make_oracle(oracle.url, api_key=SECRET), workers=1, progress=False)
    assert read_jsonl(str(tmp_path / "c.jsonl")) == []


def test_retry_failed_and_torn_line(tmp_path, oracle):
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 4, seed=4)
    oracle.scripts = {"Q1": ["nomarkers", "ok"]}
    recs = C.load_errors(str(errors))
    C.correct(recs, str(out), make_oracle(oracle.url), workers=2, progress=False)
    with open(out, "a") as f:
        f.write('{"id": "p9:0", "sta')  # a torn last line: dropped on resume
    s = C.correct(recs, str(out), make_oracle(oracle.url), workers=2, progress=False)
    assert s["new"] == 0 and s["failed"] == {"no_markers": 1}
    s = C.correct(recs, str(out), make_oracle(oracle.url), workers=2, progress=False,
                  retry_failed=True)
    assert s["new"] == 1 and s["verified"] == 4 and s["failed"] == {}
    ids = [r["id"] for r in read_jsonl(str(out))]
    assert sorted(ids) == sorted(r["id"] for r in recs)


def test_kill_and_resume_exactly_once(tmp_path, capsys, monkeypatch):
    pytest.importorskip("openai")
    oracle = OracleServer(delay=0.05)
    try:
        errors, out = tmp_path / "errors.jsonl", tmp_path / "corrected.jsonl"
        recs = write_errors(errors, 40, seed=5)
        argv = ["correct", "--input", str(errors), "--output", str(out), "--oracle-url", oracle.url,
                "--oracle-model", "m", "--workers", "3", "--api-key-env", "SPOT_TEST_ORACLE_KEY",
                "--backoff", "0.01"]
        cmd = [sys.executable, "-m", "spot.rectify.cli", *argv]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   SPOT_TEST_ORACLE_KEY=SECRET)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if out.exists() and out.read_text().count("\n") >= 8:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = out.read_text()
        assert first.endswith("\n")
        n_first = len(read_jsonl(str(out)))  # every line complete JSON
        assert 8 <= n_first < 40, n_first
        # resume in this process, through the same command line
        monkeypatch.setenv("SPOT_TEST_ORACLE_KEY", SECRET)
        from spot.rectify.cli import main
        assert main(argv) == 0
        cap = capsys.readouterr()
        rows = read_jsonl(str(out))
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == 40 and set(ids) == {r["id"] for r in recs}
        assert all(r["status"] == "verified" for r in rows)
        assert "40 done (" in cap.out and f"{40 - n_first} this run" in cap.out
        assert "40 corrected and verified" in cap.out
        assert SECRET not in cap.out + cap.err + out.read_text()
        assert f"Bearer {SECRET}" in oracle.auth
    finally:
        oracle.close()


def test_load_errors_skips_correct_and_checks_fields(tmp_path):
    p = tmp_path / "all.jsonl"
    rng = random.Random(9)
    recs = [problem(0, rng), problem(1, rng, wrong=False)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["id"] for r in C.load_errors(str(p))] == ["p0:0"]
    p.write_text(json.dumps({"id": "x", "question": "q", "ground_truth": "1"}) + "\n")
    with pytest.raises(ValueError, match="answer to correct"):
        C.load_errors(str(p))
    base = {"id": "x", "question": "q", "response": r"\boxed{2}", "ground_truth": "1"}
    # found at load, with the file and line, not after the Oracle was paid for the record
    for change, msg in [({"ground_truth": [1]}, "ground truth .ground_truth. must be a string or "
                         "a number, got list"),
                        ({"ground_truth": True}, "must be a string or a number, got bool"),
                        ({"ground_truth": {"v": 1}}, "got dict"),
                        ({"ground_truth": "  "}, "no ground truth"),
                        ({"ground_truth": r"see \boxed{}"}, "ground truth has no answer"),
                        ({"question": "\ud83d 2+2?"}, "problem .question. holds a lone surrogate"),
                        ({"response": "\ud83d"}, "answer to correct .response. holds a lone"),
                        ({"question": ["q"]}, "problem .question. must be a string")]:
        p.write_text(json.dumps({"id": "a", "question": "q", "response": "r",
                                 "ground_truth": "1"}) + "\n" + json.dumps({**base, **change}))
        with pytest.raises(ValueError, match=f"input: {re.escape(str(p))}:2: .*{msg}"):
            C.load_errors(str(p))
    # a blank field gives way to the next key, as in elicit (an empty "answer", a real "solution")
    p.write_text(json.dumps({**base, "ground_truth": "", "answer": r"so \boxed{7}"}))
    assert C.load_errors(str(p))[0]["ground_truth"] == r"so \boxed{7}"


def test_backoff_is_exponential_jittered_and_capped():
    pytest.importorskip("openai")  # the Oracle builds its client
    o = C.Oracle("http://127.0.0.1:9/v1", "m", backoff=0.1, max_backoff=1.0, seed=3)
    for k in range(8):
        d = min(1.0, 0.1 * 2 ** k)
        delays = [o._delay(k, None) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in delays)
        assert max(delays) - min(delays) > d / 4  # jittered, not constant

    class Err:  # a 429 carrying Retry-After
        class response:
            headers = {"retry-after": "0.7"}
    assert all(0.7 <= o._delay(0, Err) <= 1.0 for _ in range(20))
    Err.response.headers = {"retry-after": "30"}  # longer than max_backoff: ignored
    assert all(o._delay(0, Err) <= 0.1 for _ in range(20))
    for k in (1023, 1024, 10**6):  # "retry forever": 2^k past a float's range is the cap still
        assert 0.5 <= o._delay(k, None) <= 1.0
    with pytest.raises(ValueError, match="max_retries"):
        C.Oracle("http://127.0.0.1:9/v1", "m", max_retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        C.Oracle("http://127.0.0.1:9/v1", "m", timeout=0)


def test_odd_replies_are_recorded_and_the_run_goes_on(tmp_path, oracle):
    """Replies of an unexpected shape fail their record (``empty``) instead of the run; text parts
    are joined; a reply cut short is retried; a lone surrogate is written (as U+FFFD), so a rerun
    asks again only for the api_error record. Elicit's finish_reason stays; the Oracle's is ``oracle_finish_reason``."""
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    recs = write_errors(errors, 9, seed=6)
    with open(errors, "w") as f:
        for r in recs:
            f.write(json.dumps(dict(r, finish_reason="length")) + "\n")
    oracle.scripts = {"Q0": ["choices_str"], "Q1": ["message_str"], "Q2": ["choices_dict"],
                      "Q3": ["content_int"], "Q4": ["parts"], "Q5": ["surrogate"],
                      "Q6": ["cut", "ok"], "Q7": ["always500"]}
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, max_retries=1),
                  workers=3, progress=False)
    rows = {r["id"]: r for r in read_jsonl(str(out))}
    status = {k[1:-2]: r["status"] for k, r in rows.items()}
    assert status == {"0": "empty", "1": "empty", "2": "empty", "3": "empty", "4": "verified",
                      "5": "verified", "6": "verified", "7": "api_error", "8": "verified"}
    assert rows["p6:0"]["attempts"] == 2 and oracle.counts["Q6"] == 2  # cut short: retried
    assert rows["p5:0"]["corrected_answer"].endswith(" \ufffd")
    assert rows["p4:0"]["corrected_answer"] == oracle_fix(recs[4]["response"])
    for k, r in rows.items():
        assert r["finish_reason"] == "length"  # elicit's
        assert r["oracle_finish_reason"] == ("stop" if r["status"] == "verified" else None)
    assert s["new"] == 9 and s["verified"] == 4
    counts = dict(oracle.counts)
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), workers=3,
                  progress=False)
    # every record was written: a rerun redoes only the api_error one (transient by nature)
    assert s["new"] == 1 and s["done"] == 9
    assert {k: v for k, v in oracle.counts.items() if k != "Q7"} == {
        k: v for k, v in counts.items() if k != "Q7"} and oracle.counts["Q7"] > counts["Q7"]


def test_refusals_proxy_pages_and_a_short_key(tmp_path, oracle):
    """A refusal is its own status with the model's words; a 200 that is not a chat completion
    (a proxy's HTML page) is retried, then an api_error saying so; a key of a few characters
    (a local server's) is not scrubbed from text, where it would rewrite every x."""
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    recs = write_errors(errors, 4, seed=9)
    oracle.scripts = {"Q0": ["refuse"], "Q1": ["html"], "Q2": ["html", "ok"]}
    C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, api_key="x"),
              workers=2, progress=False)
    rows = {r["id"]: r for r in read_jsonl(str(out))}
    assert rows["p0:0"]["status"] == "refused" and "can't help" in rows["p0:0"]["error"]
    assert rows["p0:0"]["oracle_finish_reason"] == "stop"
    assert rows["p1:0"]["status"] == "api_error" and "not a chat completion" in rows["p1:0"]["error"]
    assert "Gateway says hello" in rows["p1:0"]["error"] and oracle.counts["Q1"] == 4
    assert rows["p2:0"]["status"] == "verified" and rows["p3:0"]["status"] == "verified"
    for k, r in rows.items():  # "x" in the texts stays
        src = recs[int(k[1:-2])]
        assert r["original_answer"] == src["response"] and r["question"] == src["question"]
        if r["status"] == "verified":
            assert r["corrected_answer"] == oracle_fix(src["response"])


def test_a_debug_page_echoing_the_key_and_a_reply_cut_inside_a_character(tmp_path, oracle):
    """A proxy's page that quotes the Authorization header across the 200 characters kept of it
    never puts any of the key in the output (it is scrubbed before the cut); a reply whose raw
    UTF-8 is cut inside a character is retried like one cut between ASCII bytes."""
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 3, seed=21)
    oracle.scripts = {"Q0": ["html_auth"], "Q1": ["cut_in_char", "ok"], "Q2": ["cut", "ok"]}
    C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, api_key=SECRET),
              workers=2, progress=False)
    rows = {r["id"]: r for r in read_jsonl(str(out))}
    assert rows["p0:0"]["status"] == "api_error" and "Authorization: Bearer ***" in \
        rows["p0:0"]["error"]
    text = out.read_text()
    assert all(SECRET[i:i + 6] not in text for i in range(len(SECRET) - 5))
    for k, tag in (("p1:0", "Q1"), ("p2:0", "Q2")):
        assert rows[k]["status"] == "verified" and rows[k]["attempts"] == 2, rows[k]
        assert oracle.counts[tag] == 2


def test_an_output_that_is_the_input_is_refused(tmp_path, oracle, capsys):
    """``correct`` and ``filter`` with ``--output`` naming the input file (or a link to it):
    refused before anything is written (filter would have replaced the corrections with the
    pairs, correct appended its corrections to its own input)."""
    from spot.rectify.cli import main
    errors = tmp_path / "errors.jsonl"
    write_errors(errors, 2)
    before = errors.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(errors)
    for out in (errors, tmp_path / "link.jsonl"):
        assert main(["correct", "--input", str(errors), "--output", str(out), "--oracle-url",
                     oracle.url, "--oracle-model", "m", "--no-progress"]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert errors.read_bytes() == before and not oracle.counts
    out = tmp_path / "c.jsonl"
    assert main(["correct", "--input", str(errors), "--output", str(out), "--oracle-url",
                 oracle.url, "--oracle-model", "m", "--no-progress"]) == 0
    corrected = out.read_bytes()
    capsys.readouterr()
    assert main(["filter", "--input", str(out), "--output", str(out), "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert out.read_bytes() == corrected


def test_resuming_with_another_oracle_or_prompt_is_refused(tmp_path, oracle):
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 3, seed=11)
    C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), workers=1,
              progress=False)
    other = C.Oracle(oracle.url, "another-oracle", timeout=0.6)
    with pytest.raises(ValueError, match="other settings .*oracle_model 'rule-oracle' -> "
                                         "'another-oracle'"):
        C.correct(C.load_errors(str(errors)), str(out), other, progress=False)
    with pytest.raises(ValueError, match="with_ground_truth False -> True"):
        C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url),
                  with_ground_truth=True, progress=False)
    with pytest.raises(ValueError, match="prompt_template None -> "):
        C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url),
                  template=C.PROMPT + " ", progress=False)
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), progress=False)
    assert s["new"] == 0 and s["done"] == 3


def test_an_endpoint_failing_every_record_stops_the_run(tmp_path, oracle, capsys):
    """Records in a row failing at the endpoint with one error (a 400 for every request: an
    option it rejects) stop the run with the error and status 1, instead of burning through all
    30; the rerun with another option goes on (--retry-failed redoes the bad_request ones: the
    failed rows' settings do not count)."""
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 30, seed=10)
    oracle.scripts = {f"Q{i}": ["always400"] for i in range(30)}
    assert C.stuck_after(1) == C.STOP_AFTER == 10 and C.stuck_after(16) == 48
    with pytest.raises(C.OracleStuck, match="10 records in a row .*same error, bad_request: "
                                            ".*temperature"):
        C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), workers=1,
                  progress=False)
    # the worker runs ahead of the writer by a request or two: far from all 30
    assert len(read_jsonl(str(out))) == C.STOP_AFTER and sum(oracle.counts.values()) < 20
    oracle.scripts = {}
    s = C.correct(C.load_errors(str(errors)), str(out),
                  make_oracle(oracle.url, temperature=0.5), workers=2, retry_failed=True,
                  progress=False, log=lambda m: None)
    assert s["done"] == s["verified"] == 30 and s["new"] == 30


def test_quick_failures_overtaking_slow_successes_do_not_stop_the_run(tmp_path, oracle):
    """Every other record fails at once (a 400: its prompt is too long, say) while the others
    take a while: in completion order the failures bunch up, but a mix is not a dead endpoint."""
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 40, seed=12)
    oracle.scripts = {f"Q{i}": ["always400"] if i % 2 else ["slow"] for i in range(40)}
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, timeout=5.0),
                  workers=4, progress=False)
    assert s["done"] == 40 and s["verified"] == 20 and s["failed"] == {"bad_request": 20}


def test_a_second_process_cannot_take_the_output(tmp_path, oracle):
    """While another process holds corrected.jsonl, correct is refused before it touches the
    file (its rewrite of the failed rows would otherwise replace the file under the writer)."""
    from conftest import held_by_another_process
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 3, seed=13)
    oracle.scripts = {"Q0": ["always500"]}
    C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url, max_retries=0),
              workers=1, progress=False)
    before = out.read_bytes()
    assert b"api_error" in before
    with held_by_another_process(out):
        with pytest.raises(ValueError, match="being written by another process"):
            C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url),
                      progress=False)
    assert out.read_bytes() == before


def test_resume_keeps_a_whole_last_record_without_newline(tmp_path, oracle):
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 3, seed=7)
    C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), workers=1,
              progress=False)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # e.g. an editor that drops it
    s = C.correct(C.load_errors(str(errors)), str(out), make_oracle(oracle.url), workers=1,
                  progress=False)
    assert s["new"] == 0 and s["done"] == 3 and sum(oracle.counts.values()) == 3
    assert out.read_text().endswith("}\n") and len(read_jsonl(str(out))) == 3


def test_ctrl_c_stops_requests_and_retries(tmp_path, capsys, monkeypatch):
    """SIGINT: no request or retry starts after it, a request that never returns does not hold
    up the exit, finished records stay written once, and a rerun completes the rest."""
    pytest.importorskip("openai")
    oracle, proc = OracleServer(), None
    try:
        errors, out = tmp_path / "errors.jsonl", tmp_path / "corrected.jsonl"
        recs = write_errors(errors, 9, seed=8)
        oracle.scripts = {"Q4": ["hang"], **{f"Q{i}": ["always500"] for i in range(5, 9)}}
        argv = ["correct", "--input", str(errors), "--output", str(out), "--oracle-url", oracle.url,
                "--oracle-model", "m", "--workers", "5", "--backoff", "2", "--timeout", "60",
                "--api-key-env", "SPOT_TEST_ORACLE_KEY"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "spot.rectify.cli", *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (
                len(oracle.counts) == 9 and out.exists() and out.read_text().count("\n") == 4):
            time.sleep(0.02)
        assert len(oracle.counts) == 9, oracle.counts
        sent = sum(oracle.counts.values())
        t = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.time() - t < 5, err  # was: until the hanging request and all retries ended
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert sum(oracle.counts.values()) - sent <= 1  # between the signal and the stop: at most one
        rows = read_jsonl(str(out))
        assert sorted(r["id"] for r in rows) == [f"p{i}:0" for i in range(4)]
        assert all(r["status"] == "verified" for r in rows)
        oracle.scripts = {}  # the Oracle is well again: the rerun finishes the other five
        from spot.rectify.cli import main
        assert main(argv) == 0
        rows = read_jsonl(str(out))
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == 9 and set(ids) == {r["id"] for r in recs}
        assert all(oracle.counts[f"Q{i}"] == 1 for i in range(4))  # not asked again
        assert "9 done (5 this run" in capsys.readouterr().out
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        oracle.close()


def test_oracle_options_are_checked_before_any_request(tmp_path, oracle, capsys):
    from spot.rectify.cli import main
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 2)
    base = ["correct", "--input", str(errors), "--output", str(out), "--oracle-url", oracle.url,
            "--oracle-model", "m"]
    nostart = tmp_path / "nostart.txt"
    nostart.write_text("{question} {answer} put it in tags")
    gt = tmp_path / "gt.txt"
    gt.write_text("{question} {answer} {ground_truth} {start} {end}")
    (tmp_path / "nogt.txt").write_text("{question} {answer} {start} {end}")
    for extra, msg in ((["--workers", "0"], "--workers must be an integer >= 1, got 0"),
                       (["--max-retries", "-1"], "--max-retries must be an integer >= 0, got -1"),
                       (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
                       (["--backoff", "-1"], "--backoff must be >= 0 seconds, got -1.0"),
                       (["--oracle-max-tokens", "0"], "--oracle-max-tokens"),
                       (["--prompt-template", str(nostart)],
                        f"--prompt-template: {nostart} lacks the placeholder(s) {{start}}, "
                        f"{{end}}"),
                       (["--prompt-template", str(gt)], "--with-ground-truth"),
                       (["--prompt-template", str(nostart).replace("nostart", "nogt"),
                         "--with-ground-truth"], "nogt.txt has no {ground_truth}, so"),
                       (["--prompt-template", str(tmp_path / "missing.txt")],
                        f"--prompt-template: cannot read {tmp_path / 'missing.txt'} (No such file "
                        f"or directory)"),
                       (["--prompt-template", str(tmp_path)],
                        f"--prompt-template: cannot read {tmp_path} (Is a directory)"),
                       (["--api-key-env", "sk-proj-REALKEY"], "NAME of an environment variable")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "REALKEY" not in err and len(err.splitlines()) == 1, err
    assert oracle.counts == {} and not out.exists()
    # an output that is a folder: said before the key warning, the lock or any request
    assert main(["correct", "--input", str(errors), "--output", str(tmp_path),
                 *base[5:]]) == 2
    assert capsys.readouterr().err == f"spot rectify: error: output: {tmp_path} is a folder, " \
                                      f"not a file\n"
    assert oracle.counts == {} and not (tmp_path.parent / f".{tmp_path.name}.lock").exists()
    # a valid name that is not set: said without echoing a name that may be a key
    assert main(base + ["--api-key-env", "ghp_abc123SECRET", "--max-retries", "0"]) == 0
    err = capsys.readouterr().err
    assert "SECRET" not in err and "named by --api-key-env is not set" in err
    assert main(base + ["--api-key-env", "SPOT_UNSET_TEST_KEY"]) == 0
    assert "$SPOT_UNSET_TEST_KEY is not set" in capsys.readouterr().err


def test_no_progress_hides_the_bar(tmp_path, oracle, capsys, monkeypatch):
    from spot.rectify.cli import main
    errors = tmp_path / "errors.jsonl"
    write_errors(errors, 3)
    monkeypatch.setenv("SPOT_TEST_ORACLE_KEY", SECRET)
    base = ["correct", "--input", str(errors), "--oracle-url", oracle.url, "--oracle-model", "m",
            "--api-key-env", "SPOT_TEST_ORACLE_KEY"]
    assert main(base + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert "correct: 100%" in capsys.readouterr().err  # the bar this test would see
    assert main(base + ["--output", str(tmp_path / "b.jsonl"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "3 corrected and verified" in cap.out


def test_a_dead_endpoint_fails_a_run_too_small_to_be_stopped(tmp_path, oracle, capsys):
    """Fewer records than stop a run (10 in a row) all failing at the endpoint (nothing listens
    there) are still exit status 1, not a success with every record failed; the rerun against
    a live endpoint redoes them (status 0)."""
    from spot.rectify.cli import main
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 4, seed=11)
    args = ["correct", "--input", str(errors), "--output", str(out), "--oracle-model", "m",
            "--max-retries", "1", "--backoff", "0.01", "--max-backoff", "0.02", "--timeout", "2",
            "--no-progress"]
    assert main(args + ["--oracle-url", "http://127.0.0.1:9/v1"]) == 1
    cap = capsys.readouterr()
    assert "api_error 4" in cap.out and "every request failed at the endpoint" in cap.err
    assert main(args + ["--oracle-url", oracle.url]) == 0  # the rerun redoes them and succeeds
    assert "4 corrected and verified" in capsys.readouterr().out


def test_a_rerun_of_a_file_that_only_failed_at_the_endpoint_still_fails(tmp_path, oracle, capsys):
    """bad_request records are kept (only --retry-failed redoes them), so a plain rerun sends
    nothing: still status 1, and the message names --retry-failed; with it the run succeeds."""
    from spot.rectify.cli import main
    errors, out = tmp_path / "errors.jsonl", tmp_path / "c.jsonl"
    write_errors(errors, 3, seed=13)
    oracle.scripts = {f"Q{i}": ["always400"] for i in range(3)}
    args = ["correct", "--input", str(errors), "--output", str(out), "--oracle-model", "m",
            "--oracle-url", oracle.url, "--no-progress"]
    for _ in range(2):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "every request failed at the endpoint" in err and "--retry-failed" in err, err
    oracle.scripts = {}
    assert main(args + ["--retry-failed"]) == 0
