"""Pairs ``(x, y-, y+)``: reading, validation, chat template, truncation and padding-free packing.

Records
-------
A file is JSONL (one record a line), JSON (a list of records), Parquet, or a folder written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` uses its ``train`` split), chosen by the
suffix in any case (``.json``, ``.parquet``, anything else is JSONL); a folder of Parquet shards
is read shard by shard in name order (of shards named by split, ``train-*`` only). Text files are UTF-8 (a BOM is allowed; compressed and
UTF-16 files are not read). Two key sets:

* SPoT: ``question`` (or ``prompt``), ``gemini_corrected_answer`` (the chosen ``y+``),
  ``original_answer`` (the rejected ``y-``);
* TRL: ``prompt``, ``chosen``, ``rejected``, each a string or a list of chat messages
  (``{"role", "content"}``); without ``prompt`` the chosen conversation's leading turns are the
  prompt (TRL's implicit-prompt form), and the rejected conversation must have the same ones.

Roles: the prompt ends with a ``user`` (or, as TRL allows, a ``tool``) turn; a response starts and
ends with an ``assistant`` turn and holds only those and ``tool`` results between them (with an
explicit ``prompt``, ``chosen`` and ``rejected`` hold only the response). An assistant prefill
(a prompt ending with an ``assistant`` turn) is refused.

A missing or empty key, or a wrong role, raises :class:`DataError` naming the file, the line (or
row) and the problem; ``skip_bad=True`` counts and skips such records instead (a file that
cannot be read at all, e.g. not UTF-8, is always an error).

Tokens
------
Each sequence is ``chat_template(prompt as the user turn(s), add_generation_prompt)`` followed by
the rest of ``chat_template(prompt + response as the assistant turn)``: the response tokens
include the template's end-of-turn marker, so the model is also trained to stop. Qwen3 templates
get ``enable_thinking=False``, unless a response of the pair reasons (a ``<think>`` block or
``reasoning_content``): then ``True`` for both, so that its block is the only one and both
follow the same prompt (a response that only closes a block, ``...</think>``, reasons too).
Prompt and response are tokenized separately so the boundary is exact, unless the two together
start with the prompt's tokens and give the response other ones (a SentencePiece tokenizer that
prepends "▁" to every text: Llama-2, Mistral-v0.1): then the response takes those. A template
that renders no text of a user or system turn (one that expects content parts) is an error.
Without a chat template a prompt is its text and a newline (after the tokenizer's BOS when its
own encoding starts with one), a response its text and EOS. Truncation to ``max_length``
tokens: the prompt is cut from the *left* (keeping its end, next to the answer) but keeps at
least ``max_length // 2`` tokens if it has them; the response is then cut from the *right*. The
prompt cut is made for the pair's longer response, so chosen and rejected keep the same prompt
(as TRL's DPO truncation does). Both cuts are counted (prompts once per pair, responses per
sequence) and logged.

Packing
-------
A micro-batch is a list of pairs; it is laid out as one row ``[1, N]`` holding
``chosen_1, rejected_1, chosen_2, rejected_2, ...`` back to back with no padding:
``position_ids`` restart at 0 for each sequence, ``cu_seqlens [S + 1]`` delimits them,
``labels [S]`` is 1 for chosen and 0 for rejected. The hidden state at token ``i`` predicts token
``i + 1``, so ``targets[i] = input_ids[i + 1]`` when ``i + 1`` is a response token of the same
sequence and ``-100`` otherwise (prompt tokens and each sequence's last token). ``rows`` lists the
positions whose target counts and ``cu_rows`` delimits them per sequence: only those rows of the
hidden states go through the LM head. Pairs are grouped greedily, in the epoch's order, so that a
micro-batch holds at most ``tokens_per_batch`` tokens (a pair longer than that gets a batch alone).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """A bad data file or record; printed by the CLI as one line (no traceback)."""


@dataclass
class Pair:
    prompt: list       # chat messages ending with the user turn
    chosen: list       # assistant message(s): y+
    rejected: list     # assistant message(s): y-
    where: str = field(default="", compare=False)  # "FILE:LINE", for errors found later


@dataclass
class Example:
    """One tokenized pair: full sequences and the number of prompt tokens in each."""
    chosen: list
    rejected: list
    chosen_prompt: int
    rejected_prompt: int

    @property
    def length(self):
        return len(self.chosen) + len(self.rejected)


# ---------------------------------------------------------------- reading records

# every key a record is read for (the two key sets); other columns are not loaded
RECORD_KEYS = ("prompt", "chosen", "rejected", "question", "gemini_corrected_answer",
               "original_answer")
NOT_UTF8 = "not UTF-8 text (compressed files are not supported)"
UTF16 = "UTF-16 text (PowerShell's default encoding): save it as UTF-8"
JSONL_HINT = "; a .jsonl file holds one JSON object a line (a JSON list of records: name it .json)"


def _utf16(head):
    return head.startswith((b"\xff\xfe", b"\xfe\xff"))


def read_records(path):
    """Yields ``(where, record)``; ``where`` is ``"FILE:LINE"`` (from 1) or ``"FILE:row N (from
    0)"`` / ``"FILE:record N (from 0)"`` (Parquet and datasets rows, a .json file's list)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        yield from _read_dataset_dir(p)
    elif p.suffix.lower() == ".parquet":
        # the pairs' columns only (a preference set may carry images beside them), a batch of
        # rows at a time
        def unreadable(e):
            return DataError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}")
        try:
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(p)
            cols = [c for c in pf.schema_arrow.names if c in RECORD_KEYS]
            batches = pf.iter_batches(batch_size=4096, columns=cols)
        except Exception as e:  # noqa: BLE001
            raise unreadable(e) from None
        i = 0
        while True:
            try:
                rows = next(batches).to_pylist()
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                raise unreadable(e) from None
            for rec in rows:
                yield f"{path}:row {i} (from 0)", rec
                i += 1
    elif p.suffix.lower() == ".json":
        raw = p.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM
        if _utf16(raw[:2]):
            raise DataError(f"{path}: {UTF16}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{lineno}: {NOT_UTF8}") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            hint = ("; a .json file holds one list of records (JSON Lines files are named "
                    ".jsonl)" if e.msg == "Extra data" else "")
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}{hint}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold a list of records")
        for i, rec in enumerate(rows):
            yield f"{path}:record {i} (from 0)", rec
    elif p.suffix.lower() == ".arrow":
        raise DataError(f"{path}: an .arrow file of a saved dataset: give its folder (the one "
                        f"`save_to_disk` wrote) instead")
    else:  # JSONL, read as bytes so that a non-UTF-8 line is reported with its number
        with open(p, "rb") as fh:
            if _utf16(fh.read(2)):
                raise DataError(f"{path}: {UTF16}")
            fh.seek(0)
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: {NOT_UTF8}") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = JSONL_HINT if lineno == 1 and line.lstrip().startswith("[") else ""
                    yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: invalid JSON: "
                                                        f"{e.msg}{hint}")
                    continue
                if isinstance(rec, list):
                    rec = DataError(f"{path}:{lineno}: a record must be a JSON object, got a "
                                    f"list{JSONL_HINT}")
                yield f"{path}:{lineno}", rec


_SPLIT = re.compile(r"(train|test|validation|valid|dev|eval)(?=[-_.]|$)", re.IGNORECASE)


def _read_dataset_dir(p):
    """A folder: ``datasets``' ``save_to_disk`` output, or Parquet shards (read in name order).
    Shards named by split as on the Hub (``train-00000-of-00002.parquet`` beside
    ``test-00000-of-00001.parquet``): only the train split's, as for a saved ``DatasetDict``."""
    shards = sorted(p.glob("*.parquet"))
    if shards and not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
        splits = {}
        for shard in shards:
            m = _SPLIT.match(shard.stem)
            splits.setdefault(m.group(1).lower() if m else None, []).append(shard)
        if len(splits) > 1:  # never train on a test split that sits beside it
            if "train" not in splits:
                named = ", ".join(sorted(k or "unnamed" for k in splits))
                raise DataError(f"{p}: Parquet shards of several splits ({named}) and none named "
                                f"train; give one split's file or folder")
            shards = splits["train"]
        for shard in shards:
            yield from read_records(shard)
        return
    try:
        import datasets
    except ImportError:
        raise DataError(f"{p}: a folder is read as a saved `datasets` dataset, which needs the "
                        f"datasets package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{p}: not a datasets folder: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            first = next(iter(ds), "SPLIT")
            raise DataError(f"{p}: DatasetDict without a 'train' split ({', '.join(ds)}); give "
                            f"a split's folder, e.g. {p / first}")
        ds, p = ds["train"], f"{p} (split train)"
    for i, rec in enumerate(ds):
        yield f"{p}:row {i} (from 0)", rec


def _message(m, i, where, key):
    """One chat message, copied with every field the chat template may render (``tool_calls``,
    ``reasoning_content``, ``name``, ...; fields that are None, as Parquet fills them, dropped).
    ``content`` is a string: text parts (``[{"type": "text", "text": ...}]``) are joined, and
    an assistant turn that only calls tools may have none."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
        raise DataError(f"{where}: key '{key}' message {i}: a message is an object with a "
                        f"'role' string, got {m!r:.60}")
    out = {k: v for k, v in m.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise DataError(f"{where}: key '{key}' message {i} ({m['role']}): content parts must "
                            f"all be text ({{'type': 'text', 'text': ...}})")
        content = out["content"] = "".join(p["text"] for p in content)
    if content is None and out.get("tool_calls"):
        content = out["content"] = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: key '{key}' message {i} ({m['role']}): 'content' must be a "
                        f"string, got {type(content).__name__}")
    return out


def _messages(value, role, where, key):
    """A non-empty string or list of messages -> list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty key '{key}'")
        return [{"role": role, "content": value}]
    if value is None or value == [] or value == "":
        raise DataError(f"{where}: empty key '{key}'")
    if not isinstance(value, list):
        raise DataError(f"{where}: key '{key}' must be a string or a list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}")
    msgs = [_message(m, i, where, key) for i, m in enumerate(value)]
    if not any(m["content"].strip() or m.get("tool_calls") for m in msgs):
        raise DataError(f"{where}: empty key '{key}'")
    return msgs


def to_pair(rec, where):
    """One record (SPoT or TRL keys) -> :class:`Pair`, or :class:`DataError`.

    A key whose value is ``None`` counts as absent (a Parquet or ``datasets`` column that
    other rows use). Roles are checked: the prompt must end with a ``user`` (or ``tool``) turn
    and the responses hold only ``assistant`` turns (with tool results between them); with an
    explicit prompt, ``chosen``/``rejected`` hold only the response; without one, the prompt is
    the leading turns they share, as TRL's ``extract_prompt`` takes it, cut back to end before
    an assistant turn (``rejected`` may also be one response message alone: then the turns of
    ``chosen`` before its last are the prompt).
    """
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    rec = {k: v for k, v in rec.items() if v is not None}
    if "chosen" in rec or "rejected" in rec:
        rkeys = ("chosen", "rejected")
        for k in rkeys:
            if k not in rec:
                raise DataError(f"{where}: missing key '{k}'")
        chosen = _messages(rec["chosen"], "assistant", where, "chosen")
        rejected = _messages(rec["rejected"], "assistant", where, "rejected")
        if "prompt" in rec:
            prompt = _messages(rec.get("prompt"), "user", where, "prompt")
            pname = "key 'prompt'"
            rule = "with a 'prompt' key it must hold only the assistant response"
        elif len(chosen) > 1 and len(rejected) == 1:  # the rejected response alone
            prompt, chosen = chosen[:-1], chosen[-1:]
            pname = "the prompt (the turns of 'chosen' before its last)"
            rule = "it must end with the 'assistant' response"
        elif len(chosen) > 1:  # implicit prompt: the leading turns both share
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            while n and chosen[n - 1]["role"] == "assistant":  # a response opens with one
                n -= 1
            if n == 0:
                raise DataError(f"{where}: keys 'chosen' and 'rejected' start with different "
                                f"turns; without a 'prompt' key the leading turns they share "
                                f"are the prompt")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            for k, msgs in zip(rkeys, (chosen, rejected)):
                if not msgs:
                    raise DataError(f"{where}: key '{k}' has no response after the turns it "
                                    f"shares with the other (the prompt)")
            pname = "the prompt (the leading turns of 'chosen' and 'rejected')"
            rule = "after the shared prompt it must hold only the assistant response"
        else:
            raise DataError(f"{where}: missing key 'prompt'")
    elif "gemini_corrected_answer" in rec or "original_answer" in rec:
        pkey = "question" if "question" in rec else "prompt"
        if pkey not in rec:
            raise DataError(f"{where}: missing key 'question'")
        rkeys = ("gemini_corrected_answer", "original_answer")
        for k in rkeys:
            if k not in rec:
                raise DataError(f"{where}: missing key '{k}'")
        prompt = _messages(rec[pkey], "user", where, pkey)
        chosen = _messages(rec["gemini_corrected_answer"], "assistant", where,
                           "gemini_corrected_answer")
        rejected = _messages(rec["original_answer"], "assistant", where, "original_answer")
        pname, rule = f"key '{pkey}'", "it must hold only the assistant response"
    else:
        raise DataError(f"{where}: missing key 'chosen' (TRL keys: prompt, chosen, rejected; "
                        f"SPoT keys: question, gemini_corrected_answer, original_answer)")
    if prompt[-1]["role"] not in ("user", "tool"):  # TRL's rule for a prompt's last turn
        raise DataError(f"{where}: {pname} must end with a 'user' (or 'tool') turn, not "
                        f"'{prompt[-1]['role']}'")
    for k, msgs in zip(rkeys, (chosen, rejected)):
        for m in msgs:  # assistant turns, with tool results between them (an agentic answer)
            if m["role"] not in ("assistant", "tool"):
                raise DataError(f"{where}: key '{k}' has a '{m['role']}' turn; {rule}")
        for end in (msgs[0], msgs[-1]):
            if end["role"] != "assistant":
                raise DataError(f"{where}: key '{k}' must start and end with an 'assistant' "
                                f"turn, not '{end['role']}'")
    return Pair(prompt, chosen, rejected, where)


def read_pairs(path, skip_bad=False, errors=None):
    """``(pairs, skipped)``; raises :class:`DataError` at the first bad record unless
    ``skip_bad`` (then each skipped record's error is appended to ``errors``, when given)."""
    pairs, skipped = [], 0
    for where, rec in read_records(path):
        try:
            pairs.append(to_pair(rec, where))
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            if errors is not None:
                errors.append(str(e))
    if not pairs:
        raise DataError(f"{path}: no usable pairs" + (f" ({skipped} bad skipped)" if skipped else ""))
    return pairs, skipped


# ---------------------------------------------------------------- tokens

def _render(tokenizer, messages, add_generation_prompt, thinking=False):
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=thinking)


def _ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _reasons(messages):
    """A response that reasons: a ``<think>`` block, a closing ``</think>`` alone (models whose
    generation prompt opens the block: Qwen3-Thinking-2507, R1-distill), or
    ``reasoning_content``."""
    return any("<think>" in m["content"] or "</think>" in m["content"]
               or m.get("reasoning_content") for m in messages)


def _split_ids(tokenizer, p_text, r_text):
    """``(prompt_ids, response_ids)``: each text tokenized alone (a byte-level BPE merges
    newlines across the boundary when they are tokenized together), unless the two together
    start with the prompt's ids and give the response other ids: a SentencePiece tokenizer
    that prepends "▁" to every text it is given (Llama-2's, Mistral-v0.1's) would start a
    response alone with a "▁" token the model never sees after its prompt."""
    p_ids, r_ids = _ids(tokenizer, p_text), _ids(tokenizer, r_text)
    if r_ids:
        both = _ids(tokenizer, p_text + r_text)
        if both[:len(p_ids)] == p_ids and both[len(p_ids):] != r_ids:
            r_ids = both[len(p_ids):]
    return p_ids, r_ids


def _check_rendered(text, prompt, where="the prompt"):
    """A template that renders no text of a user or system turn (one that expects ``content``
    as a list of parts, Idefics3's and SmolVLM's) is an error, not an empty prompt."""
    for i, m in enumerate(prompt):
        body = m["content"].strip()
        if m["role"] in ("user", "system") and body and body not in text:
            raise DataError(f"the chat template renders none of {where}'s turn {i} "
                            f"({m['role']}: {body[:40]!r}); it may expect content as a list of "
                            f"parts, which this trainer does not write: give the tokenizer a "
                            f"text-only chat template")


def encode_turns(tokenizer, prompt, response, counts=None, thinking=None):
    """``(prompt_ids, response_ids)`` through the chat template (see the module docstring);
    ``counts["template_fallback"]`` (when given) counts responses that the template could not
    separate from their prompt."""
    if getattr(tokenizer, "chat_template", None):
        # a response that reasons (a <think> block, or reasoning_content) is rendered in
        # thinking mode, else Qwen3's non-thinking prompt would add an empty block before it
        # (``thinking``: the pair's choice, so that both responses get the same prompt)
        thinking = _reasons(response) if thinking is None else thinking
        p_text = _render(tokenizer, prompt, True, thinking)
        _check_rendered(p_text, prompt)
        full = _render(tokenizer, prompt + response, False, thinking)
        if not full.startswith(p_text):
            # the other mode (Qwen3 without thinking writes an empty block into the generation
            # prompt but none before an agentic answer's first turn)
            other = _render(tokenizer, prompt, True, not thinking)
            other_full = _render(tokenizer, prompt + response, False, not thinking)
            if other_full.startswith(other):
                p_text, full = other, other_full
        if full.startswith(p_text):
            r_text = full[len(p_text):]
        else:  # a template that rewrites earlier turns: fall back to the raw content + EOS
            r_text = _unrepeated(p_text, _plain(tokenizer, response))
            _count(counts, "template_fallback")
            if any(m.get("tool_calls") for m in response):
                _count(counts, "tool_calls_lost")
    else:
        p_text = "".join(m["content"] + "\n" for m in prompt)
        r_text = _plain(tokenizer, response)
        if any(m.get("tool_calls") for m in prompt + response):
            _count(counts, "tool_calls_lost")
        # the BOS the tokenizer's own encoding starts with (a chat template writes its own)
        bos = tokenizer.bos_token_id
        if bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]:
            p_ids, r_ids = _split_ids(tokenizer, p_text, r_text)
            return [bos] + p_ids, r_ids
    return _split_ids(tokenizer, p_text, r_text)


def _plain(tokenizer, response):
    """A response without a template: its assistant turns' text (tool results are not the
    model's words) and EOS."""
    return "".join(m["content"] for m in response if m["role"] == "assistant") + (
        tokenizer.eos_token or "")


def _unrepeated(p_text, r_text):
    """``r_text`` without a start that the prompt already ends with (R1-distill's generation
    prompt opens ``<think>\n``, which a response that reasons writes again); whitespace alone is
    kept."""
    for k in range(min(len(r_text), 64), 0, -1):
        if r_text[:k].strip() and p_text.endswith(r_text[:k]):
            return r_text[k:]
    return r_text


def _count(counts, key):
    if counts is not None:
        counts[key] = counts.get(key, 0) + 1


def _template_errors():
    """The exceptions a chat template raises for a conversation it refuses (Jinja's, which
    ``raise_exception`` in a template also raises)."""
    try:
        import jinja2
        return (jinja2.TemplateError,)
    except ImportError:
        return ()


def truncate(prompt_ids, response_ids, max_length, longest=None):
    """``(prompt, response, prompt_cut, response_cut)`` with ``len(prompt + response) <=
    max_length``: the prompt loses tokens on the left but keeps ``max_length // 2`` if it has
    them, then the response loses tokens on the right. ``longest`` (default: this response's
    length) is the longer response of the pair: the prompt is cut for it, so that chosen and
    rejected keep the same prompt, as TRL's DPO truncation does."""
    longest = len(response_ids) if longest is None else max(longest, len(response_ids))
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, response_ids, False, False
    keep_prompt = min(len(prompt_ids), max(max_length // 2, max_length - longest))
    p = prompt_ids[len(prompt_ids) - keep_prompt:]
    r = response_ids[:max_length - keep_prompt]
    return p, r, len(p) < len(prompt_ids), len(r) < len(response_ids)


def encode_pairs(tokenizer, pairs, max_length, skip_bad=False, errors=None, progress=False):
    """Tokenize pairs -> ``(examples, counts)``. ``counts["prompt_truncated"]`` is the number of
    pairs whose prompt was cut (once per pair, in either sequence); ``counts["response_truncated"]``
    the number of responses cut (a chosen and a rejected response per pair). A pair that the chat
    template refuses (a system turn where the template has none, say) is a :class:`DataError`
    naming its record, or with ``skip_bad`` is skipped, counted in ``counts["bad"]`` and its
    error appended to ``errors``. ``progress``: a progress bar on stderr (about a millisecond
    a pair: minutes for a few hundred thousand)."""
    examples = []
    counts = {"prompt_truncated": 0, "response_truncated": 0, "bad": 0}
    refused = _template_errors()
    if progress:
        import sys

        from tqdm import tqdm
        pairs = tqdm(pairs, desc="tokenizing", unit=" pairs", leave=False, file=sys.stderr,
                     dynamic_ncols=True)
    for pair in pairs:
        try:
            thinking = _reasons(pair.chosen) or _reasons(pair.rejected)
            encoded = [encode_turns(tokenizer, pair.prompt, response, counts, thinking)
                       for response in (pair.chosen, pair.rejected)]
        except DataError as e:  # the template itself (every pair would fail): not skipped
            raise DataError(f"{pair.where or 'a pair'}: {e}") from None
        except refused as e:
            msg = f"{pair.where or 'a pair'}: the chat template refuses it: " + (
                str(e).splitlines()[0] if str(e) else type(e).__name__)
            if not skip_bad:
                raise DataError(msg) from None
            counts["bad"] += 1
            if errors is not None:
                errors.append(msg)
            continue
        seqs, prompt_cut = [], False
        # one prompt cut for both (the longer response's), when the template gave one prompt
        longest = max(len(r) for _, r in encoded) if encoded[0][0] == encoded[1][0] else None
        for p, r in encoded:
            p, r, pc, rc = truncate(p, r, max_length, longest)
            prompt_cut |= pc
            counts["response_truncated"] += rc
            seqs.append((p + r, len(p)))
        counts["prompt_truncated"] += prompt_cut
        examples.append(Example(seqs[0][0], seqs[1][0], seqs[0][1], seqs[1][1]))
    return examples, counts


def data_warnings(tokenizer, examples, counts, tokens_per_batch):
    """Lines worth a user's attention about the encoded pairs (none when all is well): no chat
    template, template fallbacks (``encode_turns``), pairs whose chosen and rejected sequences
    are the same tokens (no signal: often truncation), repeated pairs, pairs above the
    micro-batch budget."""
    out = []
    if not getattr(tokenizer, "chat_template", None):
        out.append("the tokenizer has no chat template: a prompt is its text and a newline, a "
                   "response its text and EOS" + ("" if tokenizer.eos_token else
                   " (the tokenizer has no EOS token: responses end without one, so the model "
                   "is not trained to stop)"))
    elif counts.get("template_fallback"):
        out.append(f"{counts['template_fallback']} of {2 * len(examples)} responses: the chat "
                   f"template rewrites the prompt once a response follows, so those responses "
                   f"are their text and EOS")
    if counts.get("tool_calls_lost"):
        out.append(f"{counts['tool_calls_lost']} responses or conversations carry tool calls "
                   f"that only a chat template renders; without it they are left out")
    same = sum(ex.chosen == ex.rejected for ex in examples)
    if same:
        out.append(f"{same} of {len(examples)} pairs have identical chosen and rejected tokens "
                   f"(no preference to learn; truncation at max_length can do that)")
    seen, dup = set(), 0
    for ex in examples:
        key = (tuple(ex.chosen), tuple(ex.rejected))
        dup += key in seen
        seen.add(key)
    if dup:
        out.append(f"{dup} of {len(examples)} pairs repeat an earlier pair token for token (they "
                   f"weigh double)")
    long = sum(ex.length > tokens_per_batch for ex in examples)
    if long:
        out.append(f"{long} of {len(examples)} pairs are longer than tokens_per_batch "
                   f"({tokens_per_batch}): each runs alone, above the budget")
    return out


def examples_fingerprint(examples):
    """A hash of the encoded pairs (their tokens and prompt lengths, in order): it changes with
    the data, ``skip_bad``, the tokenizer, its chat template and ``max_length``."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.chosen, ex.rejected, ex.chosen_prompt, ex.rejected_prompt]).encode())
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer):
    """A string that changes when tokenization would: vocabulary size, template, special tokens."""
    return json.dumps([type(tokenizer).__name__, len(tokenizer),
                       getattr(tokenizer, "chat_template", None),
                       tokenizer.eos_token, tokenizer.bos_token], sort_keys=True, default=str)


# ---------------------------------------------------------------- packing

def plan_batches(examples, order, tokens_per_batch):
    """Greedy grouping of pair indices (in ``order``) into micro-batches within the budget."""
    batches, cur, used = [], [], 0
    for i in order:
        n = examples[i].length
        if cur and used + n > tokens_per_batch:
            batches.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        batches.append(cur)
    return batches


def pack(examples, indices):
    """A packed micro-batch of the pairs ``indices`` (see the module docstring).

    Returns a dict of tensors: ``input_ids``/``position_ids`` ``[1, N]``, ``cu_seqlens``
    ``[S + 1]`` (int32), ``targets [N]``, ``rows`` and ``cu_rows`` (the scored positions),
    ``labels [S]`` (float), ``seq_ids [S]`` (``2 * pair + 0/1``, the reference-cache index).
    """
    ids, pos, tgt, lens, labels, seq_ids = [], [], [], [], [], []
    for i in indices:
        ex = examples[i]
        for k, (seq, plen) in enumerate(((ex.chosen, ex.chosen_prompt),
                                         (ex.rejected, ex.rejected_prompt))):
            n = len(seq)
            ids += seq
            pos += range(n)
            # token j+1 is a response token iff j + 1 >= plen
            tgt += [seq[j + 1] if j + 1 >= plen else -100 for j in range(n - 1)] + [-100]
            lens.append(n)
            labels.append(1.0 - k)
            seq_ids.append(2 * i + k)
    targets = torch.tensor(tgt, dtype=torch.long)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    valid = targets != -100
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    counts = torch.bincount(seg[valid], minlength=len(lens))
    cu_rows = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu_rows[1:] = torch.cumsum(counts, 0)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        "position_ids": torch.tensor(pos, dtype=torch.long).unsqueeze(0),
        "cu_seqlens": cu,
        "targets": targets,
        "rows": valid.nonzero().squeeze(-1),
        "cu_rows": cu_rows,
        "labels": torch.tensor(labels),
        "seq_ids": torch.tensor(seq_ids, dtype=torch.long),
    }
