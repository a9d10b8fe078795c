"""
Math answer grading as the official MobileLLM-R1 harness grades (RECIPE section 6): one function.

    from grading import grade
    grade("... so the answer is \\boxed{\\dfrac{1}{2}}.", "0.5")     # True
    grade("Natalia sold 72 clips.", "48 + 24 = 72 clips\\n#### 72")   # True: the last number

1. Extraction, in the official order: the last "boxed" (its braced content, or the text up to a "$"
   when no brace follows), else the text after the last "he answer is", else after the last "final
   answer is", else the last number of the completion.
2. Normalisation (`normalize`) of the answer and the reference alike: LaTeX spellings unified
   (\\dfrac, \\left/\\right, \\text{}, ^\\circ, $, \\%), units stripped, "k = 5" -> "5", "3/4" -> \\frac{3}{4}.
3. Equivalence (`equivalent`): numbers with a relative tolerance of 1e-4 (the reference also counts
   x100 and /100, the official percentage rule), tuples, intervals and matrices element by element,
   equations up to sign, then symbolic equality with sympy (LaTeX read by latex2sympy2_extended when
   installed, else a small LaTeX-to-Python rewrite), under a time limit per comparison.

Where the official normalisation destroys information we keep it (said where it happens): single
letters are not units ("x+a" stays "x+a"), "and" inside a word is not deleted, and an interval's
brackets must match ("[1,2)" is not "[1,2]").
"""

import math
import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction

try:
    import sympy
except ImportError:  # optional: without it, equality stops at numbers and strings
    sympy = None
try:
    from latex2sympy2_extended import latex2sympy
except ImportError:  # optional: without it, LaTeX is rewritten to Python syntax for sympy
    latex2sympy = None

SYMBOLIC_SECONDS = 3.0  # the official harness gives each comparison 3 s, then counts it wrong
REL_TOL = 1e-4  # the official numeric tolerance (relative)

NUMBER = re.compile(r"-?\d*\.?\d+")  # what "the last number" means (integers, decimals, negatives)
UNIT_WORDS = (  # units and nouns that follow numbers in MATH and GSM8K answers, plural forms included
    "degree", "deg", "radian", "cm", "mm", "km", "meter", "metre", "inch", "inches", "ft", "foot", "feet",
    "yard", "mile", "mph", "kmh", "kmph", "second", "sec", "minute", "min", "hour", "hr", "day", "week",
    "month", "year", "yr", "dollar", "cent", "euro", "pound", "lb", "ounce", "oz", "kg", "gram", "liter",
    "litre", "ml", "gallon", "gal", "cup", "acre", "hectare", "square", "sq", "cubic", "unit",
    "percent", "people", "person", "student", "apple", "coin", "page", "book", "mark", "point", "rupee", "rs",
)
UNITS = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(sorted(UNIT_WORDS, key=len, reverse=True)) + r")(?:e?s)?(?![A-Za-z])")
WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
WORD_NUMBERS.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9}


# ------------------------------------------------------------------------------------------------
# 1. Extraction


def braced(text, start):
    """The content of the {...} opening at text[start], nested braces kept; an unclosed brace (the
    model stopped mid-answer) gives everything after it, as the official harness reads it."""
    depth = 0
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start + 1:j]
    return text[start + 1:]


def extract_answer(completion):
    """The answer a completion gives, in the official order (module docstring), before normalising."""
    text = completion.replace("\u043a\u0438", "")  # a stray token some reasoning traces end with
    if "final answer is $" in text and "$. I hope" in text:  # Minerva-style closing sentence
        answer = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0]
    elif "boxed" in text:
        after = text.rsplit("boxed", 1)[1]
        answer = braced(after, 0) if after.startswith("{") else after.split("$")[0]
    elif "he answer is" in text:  # "The answer is" and "the answer is"
        answer = text.rsplit("he answer is", 1)[1]
    elif "final answer is" in text:
        answer = text.rsplit("final answer is", 1)[1]
    else:
        numbers = NUMBER.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = re.sub(r"\n\s*", "", answer.strip())
    answer = answer[1:] if answer.startswith(":") else answer
    return answer[:-1] if answer.endswith((".", "/")) else answer


def reference_answer(reference):
    """The gold answer of a record: GSM8K's worked solution ends '#### 42', a MATH solution boxes it,
    anything else is the answer itself."""
    reference = str(reference)
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return extract_answer(reference) if "boxed" in reference else reference.strip()


# ------------------------------------------------------------------------------------------------
# 2. Normalisation


def word_number(s):
    """"forty-two" -> "42"; any text that is not wholly a number in words comes back unchanged."""
    words = s.lower().replace("-", " ").split()
    if not words or any(w not in WORD_NUMBERS and w not in SCALES for w in words):
        return s
    total = current = 0
    for w in words:
        if w in WORD_NUMBERS:
            current += WORD_NUMBERS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        else:
            total, current = total + max(current, 1) * SCALES[w], 0
    return str(total + current)


def fix_fracs(s):
    """\\frac12 -> \\frac{1}{2} and \\frac1b -> \\frac{1}{b}: one-character arguments get braces."""
    return re.sub(r"\\frac(?:([^{\s\\])|(\{[^{}]*\}))(?:([^{\s\\])|(\{))",
                  lambda m: "\\frac" + (m[2] or "{" + m[1] + "}") + ("{" + m[3] + "}" if m[3] else "{"), s)


def normalize(answer):
    """One spelling for the ways an answer is written; applied to the prediction and the reference."""
    s = str(answer).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{[^}]*\}", r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    unit = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}$", "", s).strip()  # "5 \text{ cm}" -> "5"
    s = unit if unit else s
    stripped = UNITS.sub("", s).strip()  # "12 apples" -> "12"; never a single letter such as "x+a"'s
    s = stripped if stripped else s
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = word_number(s)
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s).replace("\\mathbf", "")
    s = re.sub(r"(?:^|(?<=[\s,(\[]))[xyz]\s*(?:=|\\in\b|\\to\b)\s*", "", s)  # "x = 3", "x \in [0,1]"
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    s = re.sub(r"(?<!\\)\binf\b", "\\\\infty", s)
    s = re.sub(r"\s*\band\b\s*", ",", s)  # "2 and 3" -> "2,3" (the official deletes every "and")
    if "j" in s and "i" not in s:  # the imaginary unit, engineering spelling
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*(?=\D|$)", r"\1", s)  # "12.00" -> "12", "3.0x" -> "3x"
    s = "0" + s if s.startswith(".") else s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s).replace(" ", "")
    s = fix_fracs(s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)  # "3/4" as the MATH references write it
    return f"\\frac{{{m[1]}}}{{{m[2]}}}" if m else s


# ------------------------------------------------------------------------------------------------
# 3. Equivalence


def as_float(s):
    """A plain number ("1,234", "-0.5", "12%" = 0.12), or None: the official numeric stage."""
    s = s.replace(",", "")
    scale = 1.0
    if s.endswith("%"):
        s, scale = s[:-1].rstrip("\\"), 0.01
    try:
        return float(s) * scale
    except ValueError:
        return None


def close(a, b):
    return math.isclose(a, b, rel_tol=REL_TOL)


def split_top(s):
    """Split at the commas outside any brackets: "(\\frac{1}{2},f(1,2))" -> ["\\frac{1}{2}", "f(1,2)"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def unwrap(s):
    """s without one pair of braces or parentheses around all of it ("(1)+(2)" keeps its own)."""
    if s[:1] + s[-1:] not in ("{}", "()"):
        return s
    depth = 0
    for c in s[1:-1]:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return s
    return s[1:-1]


def matrix_rows(s):
    m = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s)
    return None if m is None else [row.split("&") for row in m[1].split("\\\\") if row.strip()]


def equivalent(pred, ref):
    """Normalised prediction and reference: the same answer? (stages in the module docstring)"""
    if not pred or not ref:
        return False
    if pred.lower() == ref.lower():
        return True
    if ref in ("A", "B", "C", "D", "E") and re.findall(r"\b([A-E])\b", pred.upper())[-1:] == [ref]:
        return True  # multiple choice: the last standalone letter of the answer
    p, r = as_float(pred), as_float(ref)
    if p is not None and r is not None:  # the reference may be a percentage written either way
        return any(close(p, x) for x in (r, r / 100, r * 100))
    if unwrap(pred).lower() == unwrap(ref).lower():
        return True  # "{2,3}" vs "2,3" (the official strips every brace, so \frac{1}{23} == \frac{12}{3})
    tuples = [re.fullmatch(r"([(\[])(.+)([)\]])", s) for s in (pred, ref)]
    if all(tuples):
        (po, pi, pc), (ro, ri, rc) = tuples[0].groups(), tuples[1].groups()
        a, b = split_top(pi), split_top(ri)
        if len(a) > 1 and len(a) == len(b):  # a tuple or an interval: element-wise, brackets equal
            return (po, pc) == (ro, rc) and all(equivalent(x.strip(), y.strip()) for x, y in zip(a, b))
    rows = matrix_rows(pred), matrix_rows(ref)
    if all(rows):
        return [len(x) for x in rows[0]] == [len(x) for x in rows[1]] and all(
            equivalent(x.strip(), y.strip()) for pr, rr in zip(*rows) for x, y in zip(pr, rr))
    if pred.count("=") == 1 and ref.count("=") == 1:  # equations up to sign: "y=2x+1" vs "2x-y+1=0"
        (pl, pr), (rl, rr) = pred.split("="), ref.split("=")
        return symbolic_equal(f"{pl}-({pr})", f"{rl}-({rr})") or symbolic_equal(f"-({pl}-({pr}))", f"{rl}-({rr})")
    return symbolic_equal(pred, ref)


# ------------------------------------------------------------------------------------------------
# Symbolic equality with a time limit


class _Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds):
    """Interrupt the block after `seconds` (SIGALRM, so in the main thread of a Unix process; elsewhere
    the block runs unlimited)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise _Timeout()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def latex_to_python(s):
    """Enough LaTeX for sympy's parser when latex2sympy2_extended is absent: fractions, roots, powers,
    products, pi and the common functions."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    for _ in range(5):  # nested \frac and \sqrt, innermost first
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\(sin|cos|tan|log|ln|exp)", r"\1", s).replace("ln", "log")
    return s.replace("{", "(").replace("}", ")")


SAFE_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "exp"}


def to_sympy(s):
    """s as a sympy value. sympy's parse_expr evaluates Python, so model text reaches it only when it
    is arithmetic over single-letter symbols and SAFE_NAMES."""
    if latex2sympy is not None:
        try:
            return latex2sympy(s)
        except Exception:  # noqa: BLE001 - any parse failure means "not LaTeX it can read"
            pass
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations
    code = latex_to_python(s)
    if not re.fullmatch(r"[\w\s+\-*/().]*", code) or set(re.findall(r"[A-Za-z_]\w+", code)) - SAFE_NAMES:
        raise ValueError(f"not arithmetic: {s!r}")
    return parse_expr(code, transformations=standard_transformations + (implicit_multiplication_application,))


def symbolic_equal(a, b):
    """a and b parse to the same sympy value: equal as written, their difference simplifies to 0, or
    they evaluate to numbers within the tolerance. False when unparsable, or after SYMBOLIC_SECONDS."""
    exact = [fraction(s) for s in (a, b)]
    if None not in exact:  # plain fractions and decimals: exact arithmetic, no sympy needed
        return exact[0] == exact[1] or close(float(exact[0]), float(exact[1]))
    if sympy is None:
        return False
    try:
        with time_limit(SYMBOLIC_SECONDS):
            x, y = to_sympy(a), to_sympy(b)
            if x == y or str(x) == str(y):
                return True
            try:
                if sympy.simplify(x - y) == 0:
                    return True
            except Exception:  # noqa: BLE001 - sets, intervals, matrices have no subtraction
                pass
            try:
                return close(float(sympy.N(x)), float(sympy.N(y)))
            except Exception:  # noqa: BLE001 - not numbers (free symbols, sets)
                return False
    except Exception:  # noqa: BLE001 - _Timeout, and sympy's parse and evaluation errors alike
        return False


def fraction(s):
    """A number written as a decimal or \\frac{p}{q} (with a sign), exactly, or None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
        return Fraction(s) if re.fullmatch(r"-?\d*\.?\d+", s) else None
    except ZeroDivisionError:
        return None


def grade(completion, reference):
    """True when the completion's answer (extracted as the official harness does) equals the reference
    (a bare answer, a GSM8K '#### 42' solution or a MATH solution with a \\boxed{} answer)."""
    return equivalent(normalize(extract_answer(completion)), normalize(reference_answer(reference)))
