"""Answer checking: table-driven, for the fallback and (when installed) math-verify."""
import pytest

from spot.rectify import answers as A

CHECKERS = ["fallback"] + (["math-verify"] if A._math_verify() is not None else [])

# (response, ground truth, expected): rows both checkers must agree on.
TABLE = [
    (r"so \boxed{5}", "5", True),
    (r"so \boxed{5}", "6", False),
    (r"\boxed{0.5}", "1/2", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
    (r"\boxed{\frac12}", "1/2", True),
    (r"\boxed{-\frac{3}{4}}", "-0.75", True),
    (r"\boxed{\frac{3}{4}}", "-0.75", False),
    (r"first \boxed{3} then fixed: \boxed{4}", "4", True),
    (r"first \boxed{4} then fixed: \boxed{3}", "4", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", True),
    (r"\boxed{(1, 2)}", "(2,1)", False),
    (r"$\boxed{12}$.", "12", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{x = 7}", "7", True),
    ("no boxed answer here, it is 5", r"\boxed{6}", False),
    ("garbled x0 LC 0 q", "0", False),                # a stray number is not an answer
    (r"\boxed{2}", r"The solution ... hence \boxed{2}.", True),
    (r"\boxed{2}", 2, True),
    (r"\boxed{2.0}", "2", True),
    (r"\boxed{\{1, 2\}}", r"\{1,2\}", True),
    # only the last \boxed{} is the answer (math-verify alone read the set {7, 14})
    (r"First 3 + 4 = \boxed{7}. Then 7 * 2 = 14, so the answer is \boxed{14}.", "14", True),
    (r"First 3 + 4 = \boxed{7}. Then 7 * 2 = 14, so the answer is \boxed{14}.", "7", False),
    (r"\boxed{12.}", "12", True),                  # a trailing period is not part of it
    (r"\boxed 5.", "5", True),
    # intervals: the brackets count
    (r"\boxed{(1,2]}", "(1,2)", False),
    (r"\boxed{[1,2)}", "[1,2]", False),
    (r"\boxed{(1, 2]}", "(1,2]", True),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", True),
    # a \boxed{} is the answer whenever there is one: an anchor after it does not count
    (r"\boxed{5} Answer: 4", "4", False),
    # no anchor, no answer: neither reads "x = 4" or a bare number
    ("So x = 4.", "4", False),
    ("4", "4", False),
    ("Answer:\n\n4", "4", False),                  # math-verify's anchor stays on its line
    ("Answer: yes", "yes", False),                  # not math: compared as the fallback does
    # prices, units with a power, LaTeX's thousands separator (GSM8K-style answers)
    (r"So she pays \boxed{\$18}.", "18", True),
    (r"\boxed{\$18.90}", "18.90", True),
    (r"The area is \boxed{48 \text{ cm}^2}.", "48", True),
    (r"\boxed{10{,}000}", "10000", True),
    (r"\boxed{10{,}001}", "10000", False),
    # a ground truth that is no expression, or words: compared as plain answers, words in any
    # case; math-verify alone read "5." as nothing and words as products of letters ("no" = "on")
    (r"\boxed{5}", "5.", True),
    (r"\boxed{5.}", "5.", True),
    (r"\boxed{no}", "on", False),
    (r"\boxed{sey}", "yes", False),
    (r"\boxed{dynamo}", "Monday", False),
    (r"\boxed{yes}", "Yes", True),
    (r"\boxed{\text{blue whale}}", "Blue whale", True),
    # a number given as a float is written out: 1e20 is not 1 * e + 20
    (r"\boxed{100000000000000000000}", 1e20, True),
    (r"\boxed{0.00001}", 1e-05, True),
]


# Rows where the checkers differ: (response, ground truth, fallback, math-verify).
DIFFERENT = [
    (r"\boxed{\sqrt{4}}", "2", False, True),       # only sympy evaluates
    (r"\boxed{2x + x}", "3x", False, True),
    ("The final answer is 7.", "7", False, True),   # math-verify also accepts this anchor
    # ... and the other ones without a \boxed{}: "answer" anywhere (any case), then within
    # 50 characters a number, an expression or $...$ / \(...\) / \[...\] / \frac{}{} math
    ("Answer: 4", "4", False, True),
    ("The answer is 1,000", "1000", False, True),
    (r"The answer is $\frac{1}{2}$", "0.5", False, True),
    ("answer: 2+2 = 4", "4", False, True),          # after "answer:", the last "= ..." in 100
    ("The answer is not 4, it is 5", "4", False, True),  # ... so the anchor reads the first one
]


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("response,gt,expected", TABLE)
def test_check_answer_table(checker, response, gt, expected):
    assert A.check_answer(response, gt, checker=checker) is expected


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("response,gt,fallback,mathverify", DIFFERENT)
def test_check_answer_checker_specific(checker, response, gt, fallback, mathverify):
    expected = fallback if checker == "fallback" else mathverify
    assert A.check_answer(response, gt, checker=checker) is expected


def test_auto_checker_matches_installation():
    assert A.checker_name() == ("math-verify" if len(CHECKERS) == 2 else "fallback")


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{a}", "a"),
    (r"x \boxed{\frac{1}{2}} y \boxed{\frac{\sqrt{3}}{2}} z", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{ {a}{b}{ {c} } }", "{a}{b}{ {c} }"),
    (r"\boxed{\{1\}}", r"\{1\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5.", "5"),
    (r"\boxed{3} and a broken \boxed{4", "3"),
    (r"\boxed{a} \boxed{b \{ c", "a"),
    (r"} \boxed{ {x} } {", "{x}"),
    ("nothing", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert A.extract_boxed(text) == expected


@pytest.mark.parametrize("a,b,expected", [
    ("0.5", "1/2", True), (r"\frac{1}{2}", "0.50", True), ("1e-3", "1/1000", True),
    ("3", "3.0001", False), ("a", "b", False), ("", "", False), (r"\text{yes}", "yes", True),
    ("50\\%", "50", True), (r"\$5", "5", True), ("Yes", "yes", True), ("A", "a", False),
    ("(1,2]", "(1,2)", False), ("[1,2)", "(1,2)", False), ("(1, 2]", "(1,2]", True),
    ("(1,2)", "(1,2)", True), ("1,2", "(1,2)", False), (r"\{1,2\}", r"\{1, 2\}", True),
    ("1,2", "1,2.0", True), ("2,3", "2.0,3.0", True), ("x=1,y=2", "x=1,y=2.0", True),
])
def test_answers_equal(a, b, expected):
    assert A.answers_equal(a, b) is expected


def test_math_verify_reads_only_the_last_boxed():
    pytest.importorskip("math_verify")
    r = r"First 3 + 4 = \boxed{7}. Then 7 * 2 = 14, so the answer is \boxed{14}."
    assert A.check_answer(r, "14", checker="math-verify")
    assert not A.check_answer(r, "7", checker="math-verify")
    assert A.check_answer(r"\boxed{5.}", "5", checker="math-verify")


def test_extract_boxed_is_linear():
    import time
    for text in ("\\boxed{3} " + "\\boxed{" * 30000, "\\boxed{3} " + "\\boxed$" * 30000):
        t = time.perf_counter()
        assert A.extract_boxed(text) == "3"
        assert time.perf_counter() - t < 2  # was quadratic: 6,000 unclosed took 7 s
    assert not A.check_answer("\\boxed{" * 30000, "1", checker="fallback")


def test_fallback_is_exact_on_random_fractions():
    import random
    from fractions import Fraction
    rng = random.Random(0)
    for _ in range(200):
        p, q = rng.randint(-50, 50), rng.randint(1, 20)
        f = Fraction(p, q)
        dec = f"{float(f):.10f}".rstrip("0").rstrip(".")
        exact = f.denominator in (1, 2, 4, 5, 8, 10, 16, 20)  # terminating within 10 digits
        assert A.answers_equal(f"\\frac{{{p}}}{{{q}}}", dec) is exact
        assert A.answers_equal(f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}")
        assert not A.answers_equal(f"{p}/{q}", f"{p + 1}/{q}")


def test_bad_arguments():
    with pytest.raises(ValueError, match="checker"):
        A.check_answer(r"\boxed{1}", "1", checker="nope")
    with pytest.raises(TypeError, match="response"):
        A.check_answer(None, "1")
    with pytest.raises(TypeError, match="ground truth"):
        A.check_answer("x", None)
