"""grading.py: one table of MATH/GSM8K-style completions, each a way a grader goes wrong, graded with
and without the optional symbolic packages; the time limit; model text never reaches eval."""

import time

import pytest

import grading
from grading import grade

# (completion, reference, right?, what a wrong grader does here)
CASES = [
    # Extraction: which part of the completion is the answer (the official order)
    ("so \\boxed{5}", "5", True, "a plain boxed answer"),
    ("first \\boxed{3}, then \\boxed{5}", "5", True, "the last box is the answer"),
    ("first \\boxed{5}, then \\boxed{3}", "5", False, "the first box is not the answer"),
    ("<think>\\boxed{7}</think> so \\boxed{1,234}", "#### 1234", True, "a box inside the trace is superseded"),
    ("\\boxed{\\frac{1}{2}}", "\\frac12", True, "nested braces inside the box"),
    ("so $\\boxed 7$.", "7", True, "\\boxed without braces reads up to the $"),
    ("the sum is \\boxed{12", "12", True, "a box cut off by the token limit still holds the answer"),
    ("\\boxed{}", "0", False, "an empty box is no answer"),
    ("\\boxed{5}. Wait, the answer is 6.", "6", False, "a box takes precedence over 'the answer is'"),
    ("The answer is 42.", "42", True, "no box: the text after 'The answer is'"),
    ("so the answer is $-3$.", "-3", True, "'the answer is' with math delimiters"),
    ("The answer is 5, or maybe 6", "6", False, "'the answer is' takes all that follows, not the last number"),
    ("My final answer is 17", "17", True, "'final answer is' without 'the answer is'"),
    ("3+4=7, and 7*2=14", "14", True, "no phrase: the last number"),
    ("In total 1,250 dollars", "#### 1250", True, "the last number read without its thousands comma"),
    ("the change is -4", "-4", True, "the last number keeps its sign"),
    ("I could not solve it", "0", False, "no number at all is wrong, not zero"),
    ("", "0", False, "an empty completion"),
    ("\\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True, "GSM8K reference: after ####"),
    ("\\boxed{0.75}", "Hence the probability is $\\boxed{\\frac{3}{4}}$.", True, "MATH reference: its box"),
    ("\\boxed{24}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", False, "a number of the worked solution"),
    # Numbers
    ("\\boxed{1234.0}", "1234", True, "trailing .0"),
    ("\\boxed{18.00}", "18", True, "trailing zeros"),
    ("\\boxed{1,000,000}", "1000000", True, "thousands separators"),
    ("\\boxed{3.14159}", "3.1416", True, "within the relative tolerance"),
    ("\\boxed{3.2}", "3.1416", False, "outside the tolerance"),
    ("\\boxed{-5}", "5", False, "the sign matters"),
    ("\\boxed{10}", "100", False, "a factor of 10 is no percentage"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "decimal vs fraction"),
    ("\\boxed{0.333}", "\\frac{1}{3}", False, "a rounded decimal is not the fraction"),
    ("\\boxed{1/3}", "\\frac{1}{3}", True, "a/b vs \\frac"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "\\dfrac vs \\frac"),
    ("\\boxed{\\tfrac34}", "0.75", True, "\\tfrac with unbraced digits"),
    ("\\boxed{\\frac{1}{23}}", "\\frac{12}{3}", False, "deleting every brace makes both \\frac123"),
    ("\\boxed{-\\frac{2}{4}}", "-0.5", True, "a negative fraction, unreduced"),
    ("\\boxed{50\\%}", "50", True, "a percent sign"),
    ("\\boxed{10\\%}", "0.1", True, "a percentage against its fraction (the official rule)"),
    ("\\boxed{five}", "5", True, "a number in words"),
    # Units, text, degrees, money
    ("\\boxed{\\$18.50}", "18.5", True, "a dollar sign"),
    ("\\boxed{5 \\text{ cm}}", "5", True, "a unit in \\text{}"),
    ("\\boxed{12 apples}", "12", True, "a unit word"),
    ("\\boxed{3 hours}", "3", True, "a plural unit"),
    ("\\boxed{90^\\circ}", "90", True, "degrees"),
    ("\\boxed{90^{\\circ}}", "90", True, "degrees, braced"),
    ("\\boxed{x+a}", "x", False, "a single letter is a variable, not a unit"),
    ("\\boxed{2m+1}", "2+1", False, "m is a variable here, not metres"),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", True, "a word answer"),
    ("\\boxed{\\text{Tuesday}}", "Monday", False, "a different word"),
    ("\\boxed{\\text{(C)}}", "C", True, "a multiple-choice letter in parentheses"),
    ("\\boxed{x = 3}", "3", True, "a variable assignment"),
    ("\\boxed{k=5}", "5", True, "a short left-hand side"),
    # Tuples, intervals, sets, matrices
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True, "\\left/\\right and spaces"),
    ("\\boxed{(0.5, 2)}", "\\left(\\frac{1}{2}, 2\\right)", True, "a tuple element by element"),
    ("\\boxed{(1,2,3)}", "(1,2)", False, "tuples of different lengths"),
    ("\\boxed{(2,1)}", "(1,2)", False, "a tuple's order matters"),
    ("\\boxed{(1,2)}", "[1,2]", False, "an open interval is not a closed one"),
    ("\\boxed{[1,2)}", "[1,2]", False, "half-open vs closed"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True, "an interval with infinity"),
    ("\\boxed{2 and 3}", "2,3", True, "a list written with 'and'"),
    ("\\boxed{\\{2,3\\}}", "2,3", True, "a set's braces"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True, "matrix spacing"),
    ("\\boxed{\\begin{bmatrix}0.5 & 1\\end{bmatrix}}", "\\begin{pmatrix}\\frac12&1\\end{pmatrix}", True,
     "bmatrix vs pmatrix, entries compared as numbers"),
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False, "matrix order"),
    # Symbolic equality
    ("\\boxed{\\frac{x+2}{7}}", "\\frac{x}{7}+\\frac{2}{7}", True, "the same expression, rearranged"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True, "a root, simplified"),
    ("\\boxed{2\\sqrt2}", "2\\sqrt{2}", True, "\\sqrt without braces"),
    ("\\boxed{\\sqrt{2}}", "2", False, "a root is not its radicand"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "expanded vs factored"),
    ("\\boxed{x^2+1}", "(x+1)^2", False, "a different polynomial"),
    ("\\boxed{\\pi}", "3.14159", True, "a constant against its decimal"),
    ("\\boxed{2\\pi}", "3.14159", False, "a multiple of the constant"),
    ("\\boxed{x-y=3}", "y-x=-3", True, "an equation, both sides negated"),
    ("\\boxed{x+y=3}", "x-y=3", False, "a different equation"),
]


@pytest.mark.parametrize("completion,reference,right,why", CASES, ids=[c[3] for c in CASES])
def test_grade(completion, reference, right, why):
    assert grade(completion, reference) is right, why


def test_the_table_is_large_and_balanced():
    assert len(CASES) >= 50 and sum(not c[2] for c in CASES) >= 20


@pytest.mark.parametrize("missing", ["latex2sympy", "sympy"])
def test_grading_without_the_optional_packages(monkeypatch, missing):
    """Without latex2sympy2_extended, sympy still reads the LaTeX rewritten to Python; without sympy,
    numbers, fractions, tuples and text still grade, and symbolic comparisons say no."""
    monkeypatch.setattr(grading, missing, None)
    symbolic = [c for c in CASES if c[3] in ("the same expression, rearranged", "a root, simplified",
                                               "expanded vs factored", "a constant against its decimal")]
    for completion, reference, right, why in CASES:
        if (completion, reference, right, why) in symbolic:
            assert grade(completion, reference) is (missing == "latex2sympy"), why
        elif not right or why not in ("an interval with infinity", "an equation, both sides negated"):
            assert grade(completion, reference) is right, why


def test_symbolic_comparison_has_a_time_limit(monkeypatch):
    """A comparison that runs past the limit is interrupted (and counts as not equal), not waited for."""
    finished = []

    def slow(s):
        time.sleep(30)
        finished.append(s)
    monkeypatch.setattr(grading, "to_sympy", slow)
    monkeypatch.setattr(grading, "SYMBOLIC_SECONDS", 0.2)
    assert not grade("\\boxed{x^2}", "x*x")
    assert not finished


def test_model_text_is_never_evaluated(monkeypatch, tmp_path):
    """The fallback parser (sympy's parse_expr runs eval) refuses anything but arithmetic."""
    monkeypatch.setattr(grading, "latex2sympy", None)
    target = tmp_path / "pwned"
    for text in [f"__import__('os').system('touch {target}')", f"open('{target}','w')"]:
        assert not grade(f"\\boxed{{{text}}}", "0")
    assert not target.exists()
