"""Synthetic reasoning corpus for the laptop toy run (placeholder v1; being iterated)."""
import random
import re
import zlib

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

KINDS = ("add", "sub", "mul", "addsub", "muladd")


def _num(rng, lo_digits, hi_digits):
    n = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def make_problem(rng, kind):
    if kind == "add":
        a, b = _num(rng, 3, 4), _num(rng, 3, 4)
        return f"{a}+{b}"
    if kind == "sub":
        a, b = _num(rng, 3, 4), _num(rng, 3, 4)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}"
    if kind == "mul":
        a, b = _num(rng, 2, 3), _num(rng, 1, 2)
        return f"{a}*{b}"
    if kind == "addsub":
        a, b = _num(rng, 3, 3), _num(rng, 3, 3)
        c = rng.randint(100, min(999, a + b))
        return f"{a}+{b}-{c}"
    if kind == "muladd":
        a, b, c = _num(rng, 2, 3), rng.randint(2, 9), _num(rng, 3, 3)
        return f"{a}*{b}+{c}"
    raise ValueError(kind)


# ---- step-by-step solvers: each returns (lines, result) -----------------------------------

def _add(x, y):
    sx, sy = str(x), str(y)
    w = max(len(sx), len(sy))
    sx, sy = sx.zfill(w), sy.zfill(w)
    lines = [f"{sx}+{sy}"]
    c = 0
    for i in range(w):
        da, db = int(sx[w - 1 - i]), int(sy[w - 1 - i])
        s = da + db + c
        lines.append(f"{da}+{db}+{c}={s:02d}")
        c = s // 10
    r = x + y
    lines.append(f"={r}")
    return lines, r


def _sub(x, y):
    sx, sy = str(x), str(y)
    w = max(len(sx), len(sy))
    sx, sy = sx.zfill(w), sy.zfill(w)
    lines = [f"{sx}-{sy}"]
    c = 0
    for i in range(w):
        da, db = int(sx[w - 1 - i]), int(sy[w - 1 - i])
        s = da - db - c
        borrow = 1 if s < 0 else 0
        lines.append(f"{da}-{db}-{c}={borrow}{s % 10}")
        c = borrow
    r = x - y
    lines.append(f"={r}")
    return lines, r


def _mul1(x, d):
    sx = str(x)
    lines = [f"{sx}*{d}"]
    c = 0
    for i in range(len(sx)):
        da = int(sx[-1 - i])
        p = da * d
        t = p + c
        lines.append(f"{da}*{d}={p:02d}+{c}={t:02d}")
        c = t // 10
    r = x * d
    lines.append(f"={r}")
    return lines, r


def _mul(x, y):
    sy = str(y)
    if len(sy) == 1:
        return _mul1(x, y)
    lines, parts = [], []
    for k in range(len(sy)):
        l, p = _mul1(x, int(sy[-1 - k]))
        lines += l
        parts.append(p * 10 ** k)
    acc = parts[0]
    for p in parts[1:]:
        l, acc = _add(acc, p)
        lines += l
    return lines, acc


def solve(question):
    m = re.fullmatch(r"(\d+)([+\-*])(\d+)(?:([+\-])(\d+))?", question)
    a, op1, b, op2, c = m.groups()
    a, b = int(a), int(b)
    f = {"+": _add, "-": _sub, "*": _mul}
    lines, r = f[op1](a, b)
    if op2:
        l2, r = f[op2](r, int(c))
        lines += l2
    return "\n".join(lines), str(r)


def assistant_content(question, with_trace=True):
    trace, ans = solve(question)
    if not with_trace:
        return f"<think>\n</think>\n\\boxed{{{ans}}}"
    return f"<think>\n{trace}\n</think>\n\\boxed{{{ans}}}"


def is_eval(question):
    return zlib.crc32(question.encode()) % 16 == 0


def sample_questions(rng, n, kinds, weights, want_eval):
    out, seen = [], set()
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        q = make_problem(rng, kind)
        if is_eval(q) != want_eval or (want_eval and q in seen):
            continue
        seen.add(q)
        out.append((kind, q))
    return out
