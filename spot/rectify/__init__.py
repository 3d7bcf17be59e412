"""spot.rectify: the SPoT data pipeline (README, "Data: spot rectify").

Four steps, each a function and a ``spot rectify`` subcommand, all reading and writing JSONL:

1. ``elicit``  (:mod:`spot.rectify.elicit`): the student model answers problems with known answers;
   every answer goes to ``all.jsonl``, the wrong ones also to ``errors.jsonl`` (``y-``).
2. ``correct`` (:mod:`spot.rectify.correct`): an Oracle (any OpenAI-compatible chat-completions
   endpoint) rewrites each wrong answer minimally, keeping the student's correct steps and style;
   the correction is verified against the ground truth (``y+``).
3. ``filter``  (:mod:`spot.rectify.filter`): keeps verified pairs whose token-level change ratio
   ``1 - LCS(y-, y+) / |y+|`` is at most ``gamma`` and writes the trainer's
   ``prompt``/``chosen``/``rejected`` format.
4. ``run``: the three in one output folder.

Answer checking (:mod:`spot.rectify.answers`) is shared by all steps. Every step is resumable: a
record is written as one complete JSON line when it is finished, and a restarted step skips the
records whose ids are already in its output.
"""
