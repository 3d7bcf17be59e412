"""``spot rectify run``: elicit, correct and filter into one output folder.

``OUT/all.jsonl`` and ``OUT/errors.jsonl`` (elicit), ``OUT/corrected.jsonl`` (correct) and
``OUT/pairs.jsonl`` (filter, the input of ``spot train``). Each step resumes on its own, so
rerunning the same command after an interruption continues where it stopped; the tokenizer for the
filter defaults to the model's. Every option is checked, and the filter's tokenizer loaded, before
elicit starts: a bad one ends the run before any sampling or request.
"""
from __future__ import annotations

import os


def run_main(args):
    from .correct import check_args, check_resume, correct_main, correct_settings, kept_rows
    from .elicit import check_args as check_elicit_args
    from .elicit import elicit_main, load_tokenizer
    from .filter import check_gamma, filter_main
    from .jsonl import records_of

    check_gamma(args.gamma)  # every option before any request or load
    template = check_args(args)
    import openai  # noqa: F401 - the correct step's client: missing, fail now, not after elicit
    out = args.output
    pairs = os.path.join(out, "pairs.jsonl")
    if os.path.isdir(pairs):  # found now, not after sampling and the Oracle
        raise ValueError(f"output: {pairs} is a folder, not a file")
    corrected = os.path.join(out, "corrected.jsonl")  # a resume with another Oracle: now, not
    # after an hour of sampling (the rows the correct step will keep, as it checks them)
    check_resume(kept_rows(records_of(corrected), args.retry_failed),
                 correct_settings(args.oracle_model, args.with_ground_truth,
                                  args.oracle_temperature, args.oracle_max_tokens, template),
                 corrected)
    problems = check_elicit_args(args)  # the model's path last
    # the filter's tokenizer: one that does not load fails now, not after sampling and the Oracle
    tokenizer = load_tokenizer(args.tokenizer or args.model,
                               "tokenizer" if args.tokenizer else "model")
    rc = elicit_main(args, problems=problems)
    if rc:
        return rc
    rc = correct_main(args, input_path=os.path.join(out, "errors.jsonl"),
                      output_path=corrected, template=template)
    if rc:
        return rc
    return filter_main(args, input_path=corrected, output_path=pairs, tokenizer=tokenizer)
