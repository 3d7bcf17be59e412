"""``spot rectify filter``: keep the corrections that stayed close to the student's answer.

For every verified correction, both answers are tokenized with the training tokenizer (no special
tokens) and the change ratio ``r = 1 - LCS(y-, y+) / |y+|`` is computed with the exact bit-parallel
LCS of :mod:`spot.rectify.lcs`: ``r = 0`` means ``y+`` only deleted tokens of ``y-``; ``r = 1``
means nothing of ``y-`` survived. Pairs with ``r <= gamma`` (SPoT: 0.6) are written in the
trainer's format::

    {"prompt": question, "chosen": y+, "rejected": y-, "id", "ground_truth", "change_ratio",
     "lcs", "chosen_tokens", "rejected_tokens", provenance...}

(``prompt`` becomes a system + user message list when elicit ran with ``--system-prompt``.)

With ``--masks`` each pair also gets ``chosen_changed``: the positions (token indices into the
tokenized ``chosen``) that one longest common subsequence does not match, i.e. the tokens the
Oracle wrote, for per-token weighting later. The output is rewritten whole (atomically): the step
is deterministic and fast, so it needs no resumption.
"""
from __future__ import annotations

import os

from .elicit import load_tokenizer
from .jsonl import iter_jsonl, rewrite, same_file
from .lcs import lcs_alignment, lcs_length

PROVENANCE = ("problem_id", "sample", "model", "oracle_model", "with_ground_truth", "checker",
              "system", "attempts")


def _quantiles(xs, qs=(0.0, 0.25, 0.5, 0.75, 1.0)):
    xs = sorted(xs)
    if not xs:
        return {}
    out = {}
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[q] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def check_gamma(gamma):
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"--gamma must be a number in [0, 1], got {gamma!r}")


def check_paths(input_path, output_path):
    """The input is a file and the output, rewritten whole, is not a folder."""
    if not os.path.exists(input_path):
        raise ValueError(f"input: {input_path} does not exist")
    if os.path.isdir(input_path):
        raise ValueError(f"input: {input_path} is a folder, not a file")
    if os.path.isdir(output_path):
        raise ValueError(f"output: {output_path} is a folder, not a file")
    if same_file(input_path, output_path):  # the pairs would replace the corrections
        raise ValueError(f"output: {output_path} is the input file; choose another --output")


def filter_pairs(records, tokenizer, *, gamma=0.6, masks=False, source="records"):
    """``(pairs, stats)`` from corrected records (see the module docstring); a verified record
    without a string ``question`` or ``original_answer`` is a ``ValueError`` naming ``source``
    (the input file), the record and the key."""
    check_gamma(gamma)
    verified = []
    for k, r in enumerate(records, 1):
        if r.get("status") != "verified" or not r.get("corrected_answer"):
            continue
        for key in ("question", "original_answer"):
            if r.get(key) is None:
                raise ValueError(f"{source}: record {k} (id {r.get('id')!r}): verified but "
                                 f"missing key '{key}'")
            if not isinstance(r[key], str):
                raise ValueError(f"{source}: record {k} (id {r.get('id')!r}): key '{key}' must "
                                 f"be a string, got {type(r[key]).__name__}")
        verified.append(r)
    stats = {"input": len(records), "verified": len(verified), "kept": 0, "over_gamma": 0,
             "ratios": []}
    if not verified:
        return [], stats
    enc = tokenizer([r["original_answer"] for r in verified] + [r["corrected_answer"] for r in verified],
                    add_special_tokens=False)["input_ids"]
    minus, plus = enc[:len(verified)], enc[len(verified):]
    pairs = []
    for r, ym, yp in zip(verified, minus, plus):
        if masks:
            align = lcs_alignment(ym, yp)
            lcs = len(align)
        else:
            lcs = lcs_length(ym, yp)
        ratio = 1.0 - lcs / len(yp) if yp else 1.0
        stats["ratios"].append(ratio)
        if ratio > gamma:
            stats["over_gamma"] += 1
            continue
        prompt = r["question"]
        if r.get("system"):  # elicited under a system message: train under the same one
            prompt = [{"role": "system", "content": r["system"]}, {"role": "user", "content": prompt}]
        pair = {"prompt": prompt, "chosen": r["corrected_answer"],
                "rejected": r["original_answer"], "id": r.get("id"),
                "ground_truth": r.get("ground_truth"), "change_ratio": round(ratio, 6),
                "lcs": lcs, "chosen_tokens": len(yp), "rejected_tokens": len(ym)}
        pair.update({k: r[k] for k in PROVENANCE if k in r})
        if masks:
            matched = {j for _, j in align}
            pair["chosen_changed"] = [j for j in range(len(yp)) if j not in matched]
        pairs.append(pair)
    stats["kept"] = len(pairs)
    return pairs, stats


def format_stats(stats, gamma):
    lines = [f"filter: kept {stats['kept']} of {stats['verified']} verified corrections "
             f"(change ratio <= {gamma}; {stats['over_gamma']} over; "
             f"{stats['input'] - stats['verified']} not verified)"]
    rs = stats["ratios"]
    if rs:
        q = _quantiles(rs)
        lines.append("change ratio: min {:.3f}  p25 {:.3f}  median {:.3f}  p75 {:.3f}  max {:.3f}  "
                     "mean {:.3f}".format(q[0.0], q[0.25], q[0.5], q[0.75], q[1.0], sum(rs) / len(rs)))
        bins = [0] * 10
        for r in rs:
            bins[min(9, int(r * 10))] += 1
        top = max(bins)
        for k, n in enumerate(bins):
            bar = "#" * (round(30 * n / top) if top else 0)
            lines.append(f"  [{k / 10:.1f}, {(k + 1) / 10:.1f}{']' if k == 9 else ')'} {n:6d} {bar}")
    return "\n".join(lines)


def read_corrected(path):
    """The records of ``correct``'s output: a line that is not a JSON object is an error naming
    it, except a last line cut short without its newline (a run killed mid-write); a file of
    records without ``status`` is not ``correct``'s output."""
    records = [rec for _, rec in iter_jsonl(path, torn_tail=True)]
    if records and not any("status" in r for r in records):
        raise ValueError(f"input: {path} holds no records of `spot rectify correct` (no "
                         f"'status' key): give its output, corrected.jsonl")
    return records


def filter_file(input_path, output_path, tokenizer, *, gamma=0.6, masks=False):
    check_paths(input_path, output_path)
    pairs, stats = filter_pairs(read_corrected(input_path), tokenizer, gamma=gamma,
                                masks=masks, source=input_path)
    d = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(d, exist_ok=True)
    rewrite(output_path, pairs)
    return pairs, stats


def filter_main(args, input_path=None, output_path=None, tokenizer=None):
    """``spot rectify filter``; ``tokenizer``: one already loaded (``run`` loads it first)."""
    input_path, output_path = input_path or args.input, output_path or args.output
    check_gamma(args.gamma)
    check_paths(input_path, output_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(args.tokenizer, "tokenizer")
    _, stats = filter_file(input_path, output_path, tok, gamma=args.gamma, masks=args.masks)
    print(format_stats(stats, args.gamma))
    return 0
