"""Answer checking for the rectification pipeline: is a response's final answer the ground truth?

Two checkers behind one function, :func:`check_answer`:

* ``math-verify`` (HuggingFace's parser + sympy grader) when it is installed: the answer is the
  last ``\\boxed{}`` when there is one, else one after an anchor (math-verify's: "final answer
  ... is", "answer:", or the word "answer" and within 50 characters a number, a plain
  expression or ``$...$``-style math: "Answer: 4", "the answer is $\\frac12$"), never a stray
  number; expressions are compared symbolically. The fallback reads no anchor: "Answer: 4"
  without a ``\\boxed{}`` is right for math-verify only.
* a dependency-free fallback: the answer is the content of the *last* ``\\boxed{...}`` (nested
  braces matched), both sides are normalised (spaces, ``$``, ``\\left``/``\\right``,
  ``\\dfrac``/``\\tfrac`` -> ``\\frac``, trailing ``.``, ``\\text{}`` units, ``^\\circ``, ``\\%``,
  a leading ``x =``) and compared as strings, then as exact rationals (``0.5 == 1/2 == \\frac12``,
  ``1,000 == 1000``), then element-wise for comma-separated tuples.

The ground truth may be a bare answer (``"1/2"``) or a full solution; a solution's last
``\\boxed{}`` is its answer; one that math-verify does not read as an expression (``"5."``) is
compared as the fallback compares, and so is one of words (``"yes"``, ``"blue whale"``), but
regardless of case (math-verify would read words as products of symbols: ``"no"`` would equal
``"on"``). A number is written out in full (``1e20`` as ``100000000000000000000``).
math-verify's timeouts use ``signal.alarm``, which only works in the main thread, so off the
main thread it runs without one (the pipeline verifies in the main thread).
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Decimal
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"(?<!\\)[{}]")
_TAIL = re.compile(r"([^\s$]+)")
_WORDS = re.compile(r"[A-Za-z]{2,}(?:\s+[A-Za-z]+)*")  # "yes", "no", "Monday", "blue whale"


def extract_boxed(text):
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces matched),
    also ``\\boxed 5``; ``None`` when there is none or its braces never close. Linear time: the
    braces are matched in one pass."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    close, stack = {}, []  # close[i]: the "}" matching the "{" at i (not after a backslash)
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in close:
                return text[i + 1:close[i]].strip()
            continue  # unbalanced: try an earlier one
        tail = _TAIL.match(text, i)  # \boxed 5
        if tail:
            return tail.group(1).rstrip(".")
    return None


def ground_truth_answer(gt):
    """The answer inside a ground-truth field: its last ``\\boxed{}`` when it has one, else the
    whole (stripped) string. Numbers are accepted and converted."""
    if isinstance(gt, float) and math.isfinite(gt):  # 1e+20 would read as 1 * e + 20
        return format(Decimal(repr(gt)), "f")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        return str(gt)
    if not isinstance(gt, str):
        raise TypeError(f"ground truth must be a str or a number, got {type(gt).__name__}")
    boxed = extract_boxed(gt)
    return boxed if boxed is not None else gt.strip()


def _strip_text_groups(s):
    """``\\text{...}``/``\\mbox{...}``/``\\mathrm{...}``: drop them when something else remains
    (units such as ``5\\text{ cm}``, with a power of them: ``48\\text{ cm}^2``), otherwise keep
    their content (``\\text{yes}`` -> ``yes``)."""
    pat = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm)\s*\{([^{}]*)\}")
    without = re.compile(pat.pattern + r"(?:\^\s*\{?\s*\d\s*\}?)?").sub("", s).strip()
    return without if without else pat.sub(lambda m: m.group(1), s)


def normalize(ans):
    """A canonical string form of an answer (see the module docstring)."""
    s = ans.strip()
    s = s.replace("\\$", "").replace("$", "")  # \\$18 (a price) as well as $18$
    s = re.sub(r"\\(?:left|right)\s*", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:displaystyle|!|,|;|:|quad|qquad)", "", s)
    s = s.replace("\\ ", "").replace("~", "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_text_groups(s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".").rstrip("\\")
    s = re.sub(r"^[a-zA-Z]\w*=(?!=)", "", s)  # "x=5" -> "5"
    # \frac12 and \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = s.replace("{,}", ",")  # LaTeX's thousands separator: 10{,}000
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def to_number(s):
    """An exact ``Fraction`` for a normalised numeric answer (``-3``, ``0.25``, ``1/4``,
    ``\\frac{1}{4}``, ``-\\frac{1}{4}``, ``1e-3``), else ``None``."""
    m = re.fullmatch(r"([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        num, den = to_number(m.group(2)), to_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return -num / den if m.group(1) == "-" else num / den
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)/([-+]?\d+(?:\.\d+)?)", s)
    if m:
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        return Fraction(s)
    return None


def _split_top(s):
    """Split on commas that are not inside brackets or braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def answers_equal(a, b):
    """Fallback comparison of two extracted answers (strings)."""
    na, nb = normalize(a), normalize(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if _WORDS.fullmatch(na) and _WORDS.fullmatch(nb):  # "Yes" is "yes"
        return na.lower() == nb.lower()
    xa, xb = to_number(na), to_number(nb)
    if xa is not None and xb is not None:
        return xa == xb
    pa, pb = _split_top(na.strip("()[]{}")), _split_top(nb.strip("()[]{}"))

    def brackets(s):  # the enclosing brackets, if any: (1,2] is not (1,2); 1,2 has none
        return (s[:1] if s[:1] in "([{" else "", s[-1:] if s[-1:] in ")]}" else "")
    if len(pa) > 1 and len(pa) == len(pb) and brackets(na) == brackets(nb):
        return all(answers_equal(x, y) for x, y in zip(pa, pb))
    return False


def _math_verify():
    try:
        import math_verify
        return math_verify
    except ImportError:
        return None


def checker_name(checker="auto"):
    """The checker ``check_answer`` uses: ``"math-verify"`` or ``"fallback"``."""
    if checker not in ("auto", "math-verify", "fallback"):
        raise ValueError(f"checker must be 'auto', 'math-verify' or 'fallback', got {checker!r}")
    if checker == "auto":
        return "math-verify" if _math_verify() is not None else "fallback"
    if checker == "math-verify" and _math_verify() is None:
        raise ValueError("checker='math-verify' but math-verify is not installed "
                         "(pip install math-verify)")
    return checker


def check_answer(response, ground_truth, *, checker="auto"):
    """True when the final answer in ``response`` equals ``ground_truth``.

    ``checker``: ``"auto"`` (math-verify when installed), ``"math-verify"`` or ``"fallback"``.
    A response without an extractable answer is wrong, never guessed.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    gt = ground_truth_answer(ground_truth)
    name = checker_name(checker)
    if name == "fallback":
        pred = extract_boxed(response)
        return pred is not None and answers_equal(pred, gt)
    mv = _math_verify()
    main = threading.current_thread() is threading.main_thread()
    tmo = 5 if main else None
    gold = mv.parse(f"\\boxed{{{gt}}}", parsing_timeout=tmo)
    # not math: nothing parsed, only the string back ("5."), or words, which math-verify
    # reads as products of symbols (so "no" would equal "on"): compare as a plain answer
    if not any(not isinstance(g, str) for g in gold) or _WORDS.fullmatch(gt.strip()):
        pred = extract_boxed(response)
        return pred is not None and answers_equal(pred, gt)
    # anchored extraction only (a \boxed{} or "the answer is ..."): a stray number in a garbled
    # response is not an answer. Only the last \boxed{} is the answer (given all of them,
    # math-verify reads the set {7, 14}), less a trailing period, as in the fallback.
    boxed = extract_boxed(response)
    if boxed is not None:
        response = "\\boxed{%s}" % re.sub(r"(?<![\\.])\.$", "", boxed)
    config = [mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
              mv.ExprExtractionConfig(try_extract_without_anchor=False)]
    pred = mv.parse(response, extraction_config=config, parsing_timeout=tmo)
    if not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=tmo))
