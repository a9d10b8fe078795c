"""The toy corpus is arithmetic: every accuracy figure of the toy run rests on its worked traces being
true. A checker written independently of toydata's generator reads each trace line by line."""

import random
import re

import pytest

import toydata

RESTATE = re.compile(r"(=?)(\d+)([+*-])(\d+)")
ADD = re.compile(r"(\d)\+(\d)\+(\d)=(\d)(\d)")
SUB = re.compile(r"(\d)-(\d)-(\d)=(\d)(\d)")
MUL = re.compile(r"(\d)\*(\d)=(\d\d)\+(\d)=(\d\d)")
RESULT = re.compile(r"=(\d+)")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def finish(step, result, where):
    """A step's result line: the true value of the step, and the digits its columns wrote."""
    value = APPLY[step["op"]](int(step["x"]), int(step["y"]))
    assert int(result) == value, f"{where}: {step['x']}{step['op']}{step['y']} is {value}, not {result}"
    assert step["column"] == len(step["x"]), f"{where}: {step['column']} columns for {len(step['x'])} digits"
    digits = (str(step["carry"]) if step["op"] != "-" else "") + step["digits"]
    assert result in (digits, digits.lstrip("0") or "0"), f"{where}: the result is not the columns' digits {digits}"
    step["result"] = result


def check_trace(question, trace):
    """Assert that every line of a worked trace is arithmetically true and uses only numbers it was
    given or has derived; return the trace's final result."""
    known = {int(n) for n in re.findall(r"\d+", question)}  # numbers a line may start from
    multiplier = re.search(r"\*(\d+)", question)
    multiplier = multiplier.group(1) if multiplier else ""
    step, lines = None, trace.split("\n")
    for lineno, line in enumerate(lines):
        where = f"{question}: line {lineno} {line!r}"
        m = RESTATE.fullmatch(line)
        if m:
            chained, x, op, y = m.groups()
            if chained:  # "=1261-0197": the last step's result line, which also starts the next step
                assert step is not None, f"{where}: a chained step with nothing before it"
                if step["result"] is None:
                    # a tens partial product ends shifted by one 0 ("=20820+02776"), any other result as is
                    shift = step["op"] == "*" and len(multiplier) == 2 and x.endswith("0")
                    finish(step, x[:-1] if shift else x, where)
                    known.add(int(x))
            else:
                assert step is None or step["result"] is not None, f"{where}: a new step before the last one ended"
            # a multiplier's digit multiplies on its own: "347*68" is worked as 347*8, then 347*6
            allowed = known | ({int(ch) for ch in multiplier} if op == "*" else set())
            assert int(x) in known and int(y) in allowed, f"{where}: an operand that was neither given nor derived"
            assert op == "*" and len(y) == 1 or op != "*" and len(x) == len(y), f"{where}: operands not aligned"
            step = {"x": x, "op": op, "y": y, "column": 0, "carry": 0, "digits": "", "result": None}
            continue
        assert step is not None and step["result"] is None, f"{where}: a line outside any step"
        m = RESULT.fullmatch(line)
        if m:
            finish(step, m.group(1), where)
            known.add(int(m.group(1)))
            continue
        i = step["column"]
        assert i < len(step["x"]), f"{where}: more columns than digits"
        a = int(step["x"][-1 - i])
        if step["op"] == "+":
            m = ADD.fullmatch(line)
            assert m, f"{where}: not an addition column"
            da, db, c, out, d = map(int, m.groups())
            assert (da, db, c) == (a, int(step["y"][-1 - i]), step["carry"]), f"{where}: wrong digits or carry in"
            assert da + db + c == 10 * out + d, f"{where}: false"
        elif step["op"] == "-":
            m = SUB.fullmatch(line)
            assert m, f"{where}: not a subtraction column"
            da, db, c, out, d = map(int, m.groups())
            assert (da, db, c) == (a, int(step["y"][-1 - i]), step["carry"]), f"{where}: wrong digits or borrow in"
            assert da - db - c == d - 10 * out and out in (0, 1), f"{where}: false"
        else:
            m = MUL.fullmatch(line)
            assert m, f"{where}: not a multiplication column"
            da, dy, p, c, total = map(int, m.groups())
            assert (da, dy, c) == (a, int(step["y"]), step["carry"]), f"{where}: wrong digits or carry in"
            assert da * dy == p and p + c == total, f"{where}: false"
            out, d = divmod(total, 10)
        step["carry"], step["digits"], step["column"] = out, str(d) + step["digits"], i + 1
    assert step is not None and step["result"] is not None, f"{question}: the trace does not end with a result"
    return step["result"]


def python_value(question):
    """The question evaluated left to right by Python (the kinds never put * after + or -)."""
    numbers, ops = re.findall(r"\d+", question), re.findall(r"[+*-]", question)
    value = int(numbers[0])
    for op, n in zip(ops, numbers[1:]):
        value = APPLY[op](value, int(n))
    assert value == eval(question)
    return value


@pytest.mark.parametrize("kind", toydata.KINDS)
def test_every_trace_line_is_true_and_the_answer_is_pythons(kind):
    rng = random.Random(kind)
    for _ in range(3000):
        question = toydata.make_problem(rng, kind)
        trace, answer = toydata.solve(question)
        assert check_trace(question, trace) == answer
        assert int(answer) == python_value(question) and answer == str(int(answer)), question
        content = toydata.assistant_content(question)
        assert content == f"<think>\n{trace}\n</think>\n\\boxed{{{answer}}}"
        assert toydata.worked_text(question).endswith(content)


def test_edge_operands():
    """Carries through every column, borrows through zeros, a zero result, two-digit multipliers with zeros."""
    for question in ("9999+9999", "1000-999", "1000-1000", "999*99", "10*10", "100*90", "999+999-999",
                     "100+100-200", "99*9+999", "10*2+100"):
        trace, answer = toydata.solve(question)
        assert check_trace(question, trace) == answer and int(answer) == python_value(question), question


@pytest.mark.parametrize("question", ["4827+395", "8808-7634", "347*68", "388+873-197", "645*4+201"])
def test_the_checker_catches_a_false_line(question):
    """Changing any one digit of any line of a true trace makes the checker fail."""
    lines = toydata.solve(question)[0].split("\n")
    for i, line in enumerate(lines):
        for pos, ch in enumerate(line):
            if ch.isdigit():
                bad = lines[:i] + [line[:pos] + str((int(ch) + 1) % 10) + line[pos + 1:]] + lines[i + 1:]
                with pytest.raises(AssertionError):
                    check_trace(question, "\n".join(bad))
