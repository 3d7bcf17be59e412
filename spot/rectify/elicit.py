"""``spot rectify elicit``: the student model answers problems with known answers; wrong answers are
SPoT's ``y-``.

Input: JSONL, one problem per line, the problem under ``prompt``, ``question`` or ``problem`` and
the ground truth under ``ground_truth``, ``answer`` or ``solution`` (a solution's last ``\\boxed{}``
is its answer); an optional ``id`` (default: the record's 0-based index). The ground truth must be a
string or a number, and the text valid Unicode: a lone surrogate (a JSON ``"\\ud83d"`` escape) is
refused with the file and line, not sanitised, since the problem would no longer be the one given.
Each problem is sampled ``--samples`` times; sample ``k`` of problem ``p`` has id ``"p:k"``.

Generation applies the tokenizer's chat template (Qwen3 in non-thinking mode:
``enable_thinking=False``; a leading ``<think>...</think>`` block is dropped from a response if one
appears anyway) and runs in batches, with ``transformers``' ``generate`` (left padding) or with vLLM
when it is installed and asked for (``--engine vllm``). Pending samples are sorted by prompt length
so a batch pads little.

Output folder: ``all.jsonl`` (every sample, with ``correct``) and ``errors.jsonl`` (the wrong
ones). A sample is appended to ``all.jsonl`` and then, if wrong, to ``errors.jsonl`` as soon as its
batch finishes. Resuming skips the ids already in ``all.jsonl`` and first re-adds to
``errors.jsonl`` any wrong sample a kill left out of it, so neither file holds a duplicate.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

from .answers import check_answer, checker_name, ground_truth_answer
from .jsonl import (Appender, OutputLock, check_same_settings, done_ids, has_surrogate, iter_jsonl,
                    records_of, repair)

QUESTION_KEYS = ("prompt", "question", "problem")
ANSWER_KEYS = ("ground_truth", "answer", "solution")
DTYPES = ("auto", "bfloat16", "float16", "float32")
NO_VLLM = ("--engine vllm: vllm is not installed (pip install vllm, or use --engine "
           "transformers)")
_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")  # a Hub repo id: NAME or ORG/NAME


def _first(rec, keys):
    """The first of ``keys`` set to something other than None or a blank string."""
    for k in keys:
        v = rec.get(k)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return k, v
    return None, None


def load_problems(path, limit=None):
    """Problems as ``{"id", "question", "ground_truth"}`` dicts from a JSONL file; ``limit``:
    only the first ``limit`` (>= 0) problems. A file without any is an error."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"--limit must be an integer >= 0, got {limit!r}")
    if not os.path.exists(path):
        raise ValueError(f"data: {path} does not exist")
    out, seen = [], set()
    for k, (line, rec) in enumerate(iter_jsonl(path)):
        if limit is not None and len(out) >= limit:
            break
        where = f"data: {path}:{line}:"
        qk, q = _first(rec, QUESTION_KEYS)
        ak, a = _first(rec, ANSWER_KEYS)
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where} no problem text under any of {QUESTION_KEYS}")
        if a is None:
            raise ValueError(f"{where} no ground truth under any of {ANSWER_KEYS} (not blank)")
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise ValueError(f"{where} the ground truth ({ak}) must be a string or a number, "
                             f"got {type(a).__name__}")
        if has_surrogate(q) or has_surrogate(str(a)):
            raise ValueError(f"{where} the text holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape), which is not valid Unicode")
        pid = str(rec.get("id", k))
        if pid in seen:
            raise ValueError(f"{where} duplicate id {pid!r}")
        seen.add(pid)
        gt = ground_truth_answer(a)
        if not gt.strip():  # every sample would be judged wrong, and no correction verified
            raise ValueError(f"{where} the ground truth ({ak}) has no answer (an empty "
                             "\\boxed{})")
        out.append({"id": pid, "question": q, "ground_truth": gt})
    if not out and limit != 0:
        raise ValueError(f"data: no problems in {path}")
    return out


def strip_thinking(text):
    """Drop a ``<think>...</think>`` block (Qwen3's thinking) in front of the answer."""
    if "</think>" in text:
        return text.split("</think>", 1)[1].lstrip()
    return text


def chat_prompt(tokenizer, question, system=None):
    """The model's chat-templated prompt text for one problem (Qwen3: non-thinking mode)."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; elicit needs a chat model's tokenizer")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


class TransformersGenerator:
    """Batched sampling with ``model.generate`` (left padding)."""

    def __init__(self, model, tokenizer, *, seed=0):
        import torch
        self.model, self.tok, self.torch = model.eval(), tokenizer, torch
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        torch.manual_seed(seed)

    def __call__(self, prompts, *, temperature, top_p, max_new_tokens):
        torch = self.torch
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        # only what a causal LM's generate takes (some tokenizers add token_type_ids, which
        # generate refuses as unused model_kwargs)
        enc = {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id)
        kw.update(dict(do_sample=True, temperature=temperature, top_p=top_p)
                  if temperature > 0 else dict(do_sample=False))
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        eos.add(self.tok.eos_token_id)
        results = []
        for row in new.tolist():
            stopped = any(t in eos for t in row)
            results.append((self.tok.decode(row, skip_special_tokens=True),
                            "stop" if stopped or len(row) < max_new_tokens else "length"))
        return results


class VLLMGenerator:
    """Sampling with vLLM (only when installed and asked for with ``--engine vllm``). Prompts go
    in as token ids, tokenized exactly as for ``transformers`` (no special tokens added on top of
    the chat template's)."""

    def __init__(self, model_path, tokenizer, *, seed=0, dtype="auto"):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ValueError(NO_VLLM) from e
        self.llm = LLM(model=pretrained(model_path, "model"), seed=seed, dtype=dtype)
        self.SamplingParams, self.tok = SamplingParams, tokenizer

    def __call__(self, prompts, *, temperature, top_p, max_new_tokens):
        params = self.SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                     max_tokens=max_new_tokens)
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].finish_reason or "stop") for o in outs]


def pretrained(name, what):
    """``name`` as ``from_pretrained`` should get it: an existing folder (``~`` expanded), or
    a Hub id (``NAME`` or ``ORG/NAME``) as it is. A name that can only be a path (absolute,
    ``./``, ``../``, ``~``, more than one ``/``) and is no folder is a ``ValueError`` naming
    ``what`` (``model``, ``tokenizer``), not transformers' "Repo id must be in the form ..."."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{what}: {name} is a file, not a folder")
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"{what}: no such folder {name}")
    return name


def from_pretrained(load, name, what):
    """``load(source)`` (a transformers ``from_pretrained``) for :func:`pretrained`'s source;
    a folder or Hub id that does not load is one ``ValueError`` line naming ``what``."""
    from spot.model import first_line
    source = pretrained(name, what)
    try:
        return load(source)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a package its files need
        raise ValueError(f"{what}: cannot load {name}: {first_line(e)}") from None


def load_tokenizer(name, what="model"):
    """The tokenizer of a folder or Hub id (``--model``'s, or the filter's ``--tokenizer``);
    one ``ValueError`` line naming ``what`` when it does not load or encodes text to nothing."""
    from transformers import AutoTokenizer

    from spot.model import check_tokenizer
    return check_tokenizer(from_pretrained(AutoTokenizer.from_pretrained, name, what), name, what)


def load_model(path, *, device=None, dtype="auto", tokenizer=None):
    """``(model, tokenizer)`` from a folder or Hub id, on ``device`` (default: cuda if present);
    ``tokenizer``: one already loaded."""
    import torch
    from transformers import AutoModelForCausalLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    model = from_pretrained(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dt), path,
                            "model")
    return model.to(device), tok


def elicit(problems, generator, tokenizer, output_dir, *, samples=1, batch_size=8,
           temperature=0.7, top_p=0.8, max_new_tokens=2048, system=None, model_name=None,
           checker="auto", progress=True, load=None):
    """Sample, check and write ``all.jsonl`` / ``errors.jsonl`` in ``output_dir`` (resumable),
    holding the folder's :class:`OutputLock` (a second writer is refused).

    ``generator(prompts, temperature=, top_p=, max_new_tokens=) -> [(text, finish_reason)]``;
    with ``load=`` (a callable returning ``(generator, tokenizer)``) both may be None: the model
    loads only once the output has been checked and something is left to sample.
    Returns counts: ``{"done", "new", "correct", "wrong", "skipped"}`` over the whole folder.
    """
    # checked before the lock, which makes the folder (an output that is a file: this error)
    check_options(samples, batch_size, temperature, top_p, max_new_tokens, output_dir)
    checker = checker_name(checker)
    all_path, err_path = os.path.join(output_dir, "all.jsonl"), os.path.join(output_dir, "errors.jsonl")
    settings = sampling_settings(temperature, top_p, max_new_tokens, system)
    if model_name is not None:  # y- must be this model's own errors: one model a folder
        model_name = os.path.normpath(str(model_name))
        settings["model"] = model_name
    with OutputLock(all_path):
        check_same_settings(records_of(all_path), settings, "answers", all_path,
                            normalize={"model": _same_path})
        repair(all_path)
        have_err = done_ids(err_path)
        # one streamed pass over all.jsonl (it may hold millions): the ids done, the counts,
        # and the errors a kill between the two appends left out of errors.jsonl
        done, n, n_ok = set(), 0, 0
        with Appender(err_path) as errs:
            for rec in records_of(all_path):
                n += 1
                n_ok += bool(rec.get("correct"))
                if "id" in rec:
                    done.add(str(rec["id"]))
                if not rec.get("correct") and str(rec.get("id")) not in have_err:
                    errs.write(rec)
        todo = pending(problems, samples, done)
        if todo and load is not None:  # nothing left to sample (a rerun of `run`): no model loads
            generator, tokenizer = load()
        work = [(f"{p['id']}:{k}", k, p, chat_prompt(tokenizer, p["question"], system))
                for p, k in todo]  # the tokenizer only for what is left
        work.sort(key=lambda w: -len(w[3]))  # longest first: similar lengths share a batch

        from tqdm.auto import tqdm
        total = len(problems) * samples
        bar = tqdm(total=total, initial=total - len(work), desc="elicit", unit="answer",
                   disable=not progress, file=sys.stderr)
        new = new_ok = 0
        with Appender(all_path) as out, Appender(err_path) as errs:
            for s in range(0, len(work), batch_size):
                chunk = work[s:s + batch_size]
                results = generator([w[3] for w in chunk], temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens)
                if len(results) != len(chunk):
                    raise RuntimeError(f"generator returned {len(results)} answers for "
                                       f"{len(chunk)} prompts")
                for (sid, k, p, _), (text, finish) in zip(chunk, results):
                    text = strip_thinking(text)
                    ok = check_answer(text, p["ground_truth"], checker=checker)
                    rec = {"id": sid, "problem_id": p["id"], "sample": k,
                           "question": p["question"], "ground_truth": p["ground_truth"],
                           "response": text, "correct": ok,
                           "finish_reason": finish, "checker": checker, "model": model_name,
                           **settings}
                    out.write(rec)
                    if not ok:
                        errs.write(rec)
                    new += 1
                    new_ok += bool(ok)
                bar.update(len(chunk))
        bar.close()
    n, n_ok = n + new, n_ok + new_ok
    return {"done": n, "new": new, "correct": n_ok, "wrong": n - n_ok, "skipped": len(done)}


def check_options(samples, batch_size, temperature, top_p, max_new_tokens, output_dir):
    """The sampling options and the output folder, checked before any model loads; the errors
    name the command-line flags."""
    for flag, v in (("--samples", samples), ("--batch-size", batch_size),
                    ("--max-new-tokens", max_new_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {v!r}")
    if not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output: {output_dir} is a file, not a folder")


def check_device(device):
    """``device`` (None: the default) as torch names it, and present on this machine."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0]
        raise ValueError(f"--device {device!r} is not a torch device ({why})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for, but this torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}, but there are {torch.cuda.device_count()} "
                         f"CUDA devices")


def _same_path(model):
    """A model path as written, compared up to ``./``, ``..`` and a trailing ``/``."""
    return os.path.normpath(model) if isinstance(model, str) else model


def sampling_settings(temperature, top_p, max_new_tokens, system):
    """What each answer record keeps of how it was sampled (a resume must not mix them)."""
    return {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
            "system": system}


def pending(problems, samples, done):
    """``(problem, k)`` of every sample whose id ``problem:k`` is not in ``done``."""
    return [(p, k) for p in problems for k in range(samples) if f"{p['id']}:{k}" not in done]


def check_args(args):
    """Every elicit option that can be checked without loading anything, before the output
    folder is made (``run``: before any request too), the model's path last; returns the
    problems."""
    check_options(args.samples, args.batch_size, args.temperature, args.top_p,
                  args.max_new_tokens, args.output)
    problems = load_problems(args.data, args.limit)
    check_device(args.device)
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(NO_VLLM)
    pretrained(args.model, "model")
    return problems


def elicit_main(args, problems=None):
    """``spot rectify elicit``; ``problems``: those :func:`check_args` already returned."""
    problems = check_args(args) if problems is None else problems
    # the tokenizer first (cheap): a name that does not load (a mistyped relative folder looks
    # like a Hub id) fails before the output folder is made; the model loads only for work
    tok = load_tokenizer(args.model)

    def load():
        if args.engine == "vllm":
            return VLLMGenerator(args.model, tok, seed=args.seed, dtype=args.dtype), tok
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype, tokenizer=tok)
        return TransformersGenerator(model, tok, seed=args.seed), tok

    stats = elicit(problems, None, None, args.output, samples=args.samples,
                   batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, system=args.system_prompt,
                   model_name=args.model, progress=args.progress, load=load)
    acc = stats["correct"] / max(1, stats["done"])
    print(f"elicit: {stats['done']} answers ({stats['new']} new, {stats['skipped']} resumed), "
          f"{stats['correct']} correct ({acc:.1%}), {stats['wrong']} wrong -> "
          f"{os.path.join(args.output, 'errors.jsonl')}")
    return 0
