"""
The embedded toy corpus: synthetic arithmetic problems solved step by step, so the laptop run
(`python train.py`) exercises the whole MobileLLM-R1 pipeline -- pre-training on worked traces,
SFT on chat conversations with a <think> trace and a \\boxed{} answer, greedy evaluation on held-out
problems -- in minutes on a CPU. `generate()` makes the corpus in memory; `write_toy()` (what
`python data.py toy` runs) writes it and prepares its sources with data.py.

    import toydata, random
    corpus = toydata.generate(seed=0)       # text_sources, chat_sources, eval
    trace, answer = toydata.solve("4827+395")
    question = toydata.make_problem(random.Random(0), "mul")

Problem kinds (operands drawn uniformly among numbers of the given digit counts):
    add      a+b      a, b: 3-4 digits                       (carries)
    sub      a-b      a, b: 3-4 digits, a >= b               (borrows)
    mul      a*b      a: 2-3 digits, b: 1-2 digits           (partial products, then their sum)
    add_sub  a+b-c    a, b, c: 3 digits, a+b >= c            (two chained steps)
    mul_add  a*b+c    a: 2-3 digits, b: 1 digit, c: 3 digits (two chained steps)

Trace format. The tokenizer is byte-level (one character = one token), so the trace is terse, and
it is laid out so that every token is a small function of a few tokens at predictable places:
  - each step first restates its sub-problem on one line, with the shorter operand zero-padded to
    the width of the longer one, so digit i of both operands sits the same distance from its end;
  - then one line per digit column, least significant first, always in the same fixed-width form,
    so the carry sits at the same place in the line above:
        addition        "7+5+0=12"      digit + digit + carry in = carry out and digit
        subtraction     "2-9-0=13"      digit - digit - borrow in = borrow out and digit (-7 = -10+3)
        multiplication  "4*8=32+5=37"   times-table fact, then the carry added on its own
  - then "=" and the step's result, most significant digit first;
  - a product by a two-digit number is the sum of its partial products: each is a step of its own
    (the tens one restated as "909*8" and later shifted by appending 0), then an addition step.
Example, the complete assistant message for "4827+395":
    <think>
    4827+0395
    7+5+0=12
    2+9+1=12
    8+3+1=12
    4+0+1=05
    =5222
    </think>
    \\boxed{5222}
"""
import json
import os
import random
import re
import shutil
import zlib

import data
from tokenizer import DEFAULT_SYSTEM_PROMPT as SYSTEM_PROMPT

KINDS = ("add", "sub", "mul", "add_sub", "mul_add")
# Share of each kind among training problems: the long multi-step kinds need more examples.
TRAIN_WEIGHTS = {"add": 1.0, "sub": 1.0, "mul": 3.0, "add_sub": 1.5, "mul_add": 1.5}
# Between question and answer in the pre-training text: as many characters as the chat template puts
# between the user's last token and the assistant's first (<|eot_id|> <|start_header_id|> "assistant"
# <|end_header_id|> "\n\n" = 14 byte-level tokens), so every look-back into the question that
# pre-training teaches spans the same distance after SFT's chat template (without it, the first SFT
# steps must re-learn them, and some runs copy the wrong operator).
TEXT_SEPARATOR = "\n\nassistant:\n\n"
HELD_OUT_BUCKETS = 16  # 1 in 16 questions (by a hash of the text) may appear only in the eval set


def _number(rng, min_digits, max_digits):
    n = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def make_problem(rng, kind):
    """A question string of the given kind, e.g. "4827+395", "347*68", "123+456-321"."""
    if kind == "add":
        return f"{_number(rng, 3, 4)}+{_number(rng, 3, 4)}"
    if kind == "sub":
        a, b = _number(rng, 3, 4), _number(rng, 3, 4)
        return f"{max(a, b)}-{min(a, b)}"  # results stay non-negative
    if kind == "mul":
        return f"{_number(rng, 2, 3)}*{_number(rng, 1, 2)}"
    if kind == "add_sub":
        a, b = _number(rng, 3, 3), _number(rng, 3, 3)
        return f"{a}+{b}-{rng.randint(100, min(999, a + b))}"
    if kind == "mul_add":
        return f"{_number(rng, 2, 3)}*{rng.randint(2, 9)}+{_number(rng, 3, 3)}"
    raise ValueError(f"unknown problem kind {kind!r}; choose from {KINDS}")


# -----------------------------------------------------------------------------
# Step-by-step solutions. Each step returns (lines, result).

def _columns(sx, sy, op, final):
    """sx op sy (digit strings of equal width; op "+" or "-", sx >= sy for "-") column by column,
    least significant digit first, then the result line ("=" + digits)."""
    lines, carry, digits = [], 0, ""
    for a, b in zip(map(int, reversed(sx)), map(int, reversed(sy))):
        if op == "+":
            s = a + b + carry
            lines.append(f"{a}+{b}+{carry}={s:02d}")  # two digits: carry out, then the digit
            carry, digits = s // 10, str(s % 10) + digits
        else:
            s = a - b - carry
            borrow = int(s < 0)
            lines.append(f"{a}-{b}-{carry}={borrow}{s % 10}")  # borrow out, then the digit
            carry, digits = borrow, str(s % 10) + digits
    if op == "+":
        digits = str(carry) + digits
    return lines, _result(digits, final)


def _result(digits, final):
    """A step's result: every column's digit (fixed width, so the next step finds each digit at a
    fixed place) for an intermediate result; without leading zeros for the final answer."""
    return digits.lstrip("0") or "0" if final else digits


def _times_digit(sx, d, final):
    """sx * d for a single digit d: per digit, the times-table fact, then the carry added."""
    lines, carry, digits = [], 0, ""
    for ch in reversed(sx):
        p = int(ch) * d
        lines.append(f"{ch}*{d}={p:02d}+{carry}={p + carry:02d}")
        carry, digits = (p + carry) // 10, str((p + carry) % 10) + digits
    return lines, _result(str(carry) + digits, final)


def _pad(sx, sy):
    width = max(len(sx), len(sy))
    return sx.zfill(width), sy.zfill(width)


def _step(left, op, right, final, restated):
    """One step: its restatement line, its lines, and its result. `restated` is the line the step
    starts from (None: write "left op right" with zero-padding; otherwise the previous step's result
    line, which already holds its first operand)."""
    if op == "*" and len(right) == 2:
        # A two-digit multiplier: the ones' partial product, then the tens' one, shifted by a 0,
        # plus the first (restated on the tens' result line, so no result is ever copied).
        ones, p1 = _step(left, "*", right[1], False, restated)
        tens, p10 = _step(left, "*", right[0], False, None)
        sx, sy = _pad(p10 + "0", p1)
        tens[-1] = f"={sx}+{sy}"
        add, total = _columns(sx, sy, "+", final)
        return ones + tens + add + [f"={total}"], total
    if restated is None:
        if op != "*":
            left, right = _pad(left, right)
        restated = f"{left}{op}{right}"
    if op == "*":
        lines, result = _times_digit(left, int(right), final)
    else:
        lines, result = _columns(left, right, op, final)
    return [restated] + lines + [f"={result}"], result


_QUESTION = re.compile(r"(\d+)([+*-])(\d+)(?:([+-])(\d+))?")


def solve(question):
    """(trace, answer) for a question made by make_problem. Operators apply left to right (the kinds
    never put * after + or -). The trace has no <think> tags; see assistant_content."""
    m = _QUESTION.fullmatch(question)
    if m is None:
        raise ValueError(f"not a toy question: {question!r}")
    a, op1, b, op2, c = m.groups()
    lines, result = _step(a, op1, b, final=not op2, restated=None)
    if op2:
        # The next step starts on the first step's result line: "=0579" becomes "=0579-0321".
        c = c.zfill(len(result))
        step, result = _step(result, op2, c, final=True, restated=f"={result}{op2}{c}")
        lines = lines[:-1] + step
    return "\n".join(lines), result


def assistant_content(question, with_trace=True):
    """The assistant message: the trace in <think> tags, then the boxed answer. with_trace=False
    gives the ablation that must answer directly (the tags stay, empty, so the format is the same)."""
    trace, answer = solve(question)
    return f"<think>\n{trace if with_trace else ''}\n</think>\n\\boxed{{{answer}}}"


def worked_text(question, with_trace=True):
    """One problem as a pre-training document: the question, TEXT_SEPARATOR, the assistant message."""
    return f"{question}{TEXT_SEPARATOR}{assistant_content(question, with_trace)}"


def conversation(question, with_trace=True):
    """[system, user, assistant] messages for one problem, as SFT and the held-out loss use them."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
            {"role": "assistant", "content": assistant_content(question, with_trace)}]


def is_held_out(question):
    """True for the questions reserved for evaluation. A hash of the text, not a random draw, so a
    question is on the same side for every seed and every corpus size."""
    return zlib.crc32(question.encode()) % HELD_OUT_BUCKETS == 0


def _questions(rng, n, weights, held_out, unique):
    kinds, w = list(weights), list(weights.values())
    out, seen = [], set()
    while len(out) < n:
        q = make_problem(rng, rng.choices(kinds, w)[0])
        if is_held_out(q) == held_out and not (unique and q in seen):
            seen.add(q)
            out.append(q)
    return out


# -----------------------------------------------------------------------------
# Facts: the one-step sub-skills of the traces, as drill sheets in exactly the trace's line formats.

def _fact(rng):
    a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{a}+{b}+{c}={a + b + c:02d}"
    if kind == 1:
        s = a - b - c
        return f"{a}-{b}-{c}={int(s < 0)}{s % 10}"
    if kind == 2:
        return f"{a}*{b}={a * b:02d}"
    p, carry = a * b, rng.randint(0, 8)  # a product plus a carry: the second half of a "*" line
    return f"{p:02d}+{carry}={p + carry:02d}"


def facts(rng, n, lines_per_doc=12):
    """n documents of random one-step facts, e.g. "7+5+1=13", "2-9-1=12", "7*8=56", "56+5=61"."""
    return ["\n".join(_fact(rng) for _ in range(lines_per_doc)) for _ in range(n)]


# -----------------------------------------------------------------------------

def generate(seed=0, n_traces=40000, n_facts=4000, n_sft=6000, n_eval=400, with_trace=True):
    """The whole corpus, deterministic in seed:
      text_sources["toy-traces"]: worked problems as plain text: question, TEXT_SEPARATOR, assistant message;
      text_sources["toy-facts"]:  drill sheets of one-step facts;
      chat_sources["toy-sft"]:    [system, user, assistant] conversations (other problems);
      eval: n_eval {"question", "answer"} records, equally many per kind, all distinct, none of them
            a training question (they come from the held-out hash buckets);
      text_sources["toy-heldout"], chat_sources["toy-heldout-sft"]: the eval problems worked, in the
            pre-training and the SFT format, for held-out losses (train.py --eval-mixture); never trained on.
    with_trace=False answers every training problem without its trace (the no-reasoning ablation)."""
    rng = random.Random(seed)
    train = _questions(rng, n_traces + n_sft, TRAIN_WEIGHTS, held_out=False, unique=False)
    traces = [worked_text(q, with_trace) for q in train[:n_traces]]
    sft = [conversation(q, with_trace) for q in train[n_traces:]]
    per_kind = [n_eval // len(KINDS) + (i < n_eval % len(KINDS)) for i in range(len(KINDS))]
    evals = []
    for kind, n in zip(KINDS, per_kind):
        qs = _questions(rng, n, {kind: 1.0}, held_out=True, unique=True)
        evals += [{"question": q, "answer": solve(q)[1]} for q in qs]
    heldout = [e["question"] for e in evals]
    return {"text_sources": {"toy-traces": traces, "toy-facts": facts(rng, n_facts),
                             "toy-heldout": [worked_text(q, with_trace) for q in heldout]},
            "chat_sources": {"toy-sft": sft, "toy-heldout-sft": [conversation(q, with_trace) for q in heldout]},
            "eval": evals}


# -----------------------------------------------------------------------------
# Writing the corpus: python data.py toy

TOY_DIR = "data/toy"
TOY_FORMAT = 2  # bumped when the corpus's contents change, so an older data/toy is rebuilt (2: held-out sets)


def write_toy(out_dir=TOY_DIR, seed=0, with_trace=True):
    """Generate the synthetic reasoning corpus (toydata.py) and prepare it with the toy tokenizer:
    text sources (toy-traces, toy-facts), chat sources (toy-sft), the eval problems worked for held-out
    losses (toy-heldout as text, toy-heldout-sft as chat), and DIR/eval.jsonl. The raw jsonl
    stays in DIR/raw for reading. DIR/toy.json and DIR/eval.jsonl, written last, mark a complete corpus;
    calling it again with the same seed does nothing."""
    marker = os.path.join(out_dir, "toy.json")
    wanted = {"seed": seed, "with_trace": with_trace, "format": TOY_FORMAT}
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        if all(info.get(k) == v for k, v in wanted.items()) and os.path.isfile(os.path.join(out_dir, "eval.jsonl")) \
                and all(data.read_meta(os.path.join(out_dir, name)) for name in info["sources"]):
            print(f"{out_dir} holds the toy corpus of seed {seed}; nothing to do")
            return info
        os.remove(marker)
    corpus = generate(seed, with_trace=with_trace)
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    sources = {}
    for key, field in (("text_sources", "text"), ("chat_sources", "messages")):
        for name, docs in corpus[key].items():
            sources[name] = os.path.join(raw, f"{name}.jsonl")
            write_jsonl(sources[name], ({field: d} for d in docs))
    for name, path in sources.items():
        data.prepare(name, [path], out_dir, tokenizer="toy", workers=1)
    info = dict(wanted, sources=list(sources), n_eval=len(corpus["eval"]))
    write_jsonl(marker, [info])
    write_jsonl(os.path.join(out_dir, "eval.jsonl"), corpus["eval"])  # last: its presence means complete
    return info


def write_jsonl(path, records):
    """Write records as jsonl atomically (a temporary file renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The laptop run (`python train.py` runs it: pre-train, then SFT, then held-out accuracy).
# Each stage dict is exactly a set of command-line flags (printed in the log, so it can be re-run).
TOY_RUN = {
    "data": "data/toy", "out_dir": "out/toy", "eval_problems": 400, "max_new_tokens": 400,
    # A pre-training step is two micro-batches of 8 rows, which train.py computes at once on a CPU
    # (--parallel-micro 2); an SFT step is one micro-batch (its masked attention runs faster on both cores).
    "parallel_micro": 2,
    # ~3.7M tokens of worked problems (0.65 epoch of toy-traces), then ~3,800 conversations: at this budget
    # SFT steps buy more accuracy than pre-training steps (RESULTS.md).
    # The eval loss: the 400 held-out problems, worked (toy-heldout, ~174 rows: 22 batches of 8).
    "pretrain": dict(size="toy", stage="pretrain", mixture="toy", max_steps=900, batch_size=8,
                     seq_len=256, total_batch_tokens=16 * 256, lr=3e-3, warmup_steps=50,
                     eval_every=500, log_every=50, save_every=500, eval_mixture="toy-heldout=1", eval_batches=22),
    # SFT rows pack whole conversations (up to ~300 tokens each) into 512 tokens. The eval loss: the
    # assistant tokens of the held-out problems as conversations (toy-heldout-sft, ~200 rows).
    # beta2 0.95 as in pre-training (the recipe's SFT default is 0.999): the toy SFT was tuned with it.
    "sft": dict(stage="sft", mixture="toy-sft=1", max_steps=250, batch_size=8, seq_len=512,
                total_batch_tokens=8 * 512, lr=1e-3, warmup_steps=10, beta2=0.95, eval_every=250,
                log_every=25, save_every=250, eval_mixture="toy-heldout-sft=1", eval_batches=25),
}


def toy_flags(stage, **extra):
    """Command-line flags for one stage of the toy run (TOY_RUN)."""
    settings = dict(TOY_RUN[stage], data=TOY_RUN["data"], **extra)
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


# -----------------------------------------------------------------------------
# Sources of uneven value, for the mixture-finding demonstration (`python mixing.py`, RECIPE section 7)

WORDS = ("the river runs past an old mill where children play and farmers bring grain to sell at the market "
         "every morning while birds sing above green fields and quiet roads lead toward distant hills").split()


def off_task(rng, n, words_per_doc=40):
    """n documents of plain prose with no arithmetic: tokens the probes never need."""
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)).capitalize() + "." for _ in range(n)]


def with_planted_errors(question, shift=1):
    """A worked problem written by a systematic wrong rule: every digit of the trace and of the boxed answer
    is raised by `shift`, mod 10 (the question itself stays right), so each operand is miscopied and each
    column and result is wrong ("682+361" is worked as "793+472", "3+2+1=14", ...) in the same way every time.
    A model learns the rule, which contradicts the correct traces token for token; the layout is exactly the
    correct trace's, so only the digits differ."""
    trace, answer = solve(question)
    shifted = "".join(str((int(c) + shift) % 10) if c.isdigit() else c for c in f"{trace}\n</think>\n\\boxed{{{answer}}}")
    return f"{question}{TEXT_SEPARATOR}<think>\n{shifted}"


def generate_mixing(seed=0, n_worked=3000, n_drills=800, n_errors=3000, n_off=1500, n_pool=1500, n_probe=40,
                    n_eval=20, n_sft=1500):
    """The demonstration corpus, deterministic in seed. Text sources:
      worked-addsub / worked-mul: worked problems of the additive kinds (add, sub, add_sub) / of the
        multiplicative ones (mul, mul_add); drills: drill sheets of one-step facts; errors: worked problems
        of every kind with planted arithmetic errors (the harmful source); off-task: prose;
      pool: a raw mid-training pool, one third each correct worked problems, planted errors and prose;
      probe-KIND: n_probe held-out problems of each kind, worked (one probe set per skill).
    Chat: toy-sft conversations (training problems). eval: n_eval other held-out problems per kind,
    {"question", "answer"}. Probe and eval problems come from the held-out hash buckets: never trained on."""
    rng = random.Random(seed)
    additive = {k: TRAIN_WEIGHTS[k] for k in ("add", "sub", "add_sub")}
    multiplicative = {k: TRAIN_WEIGHTS[k] for k in ("mul", "mul_add")}
    text = {"worked-addsub": [worked_text(q) for q in _questions(rng, n_worked, additive, False, False)],
            "worked-mul": [worked_text(q) for q in _questions(rng, n_worked, multiplicative, False, False)],
            "drills": facts(rng, n_drills),
            "errors": [with_planted_errors(q) for q in _questions(rng, n_errors, TRAIN_WEIGHTS, False, False)],
            "off-task": off_task(rng, n_off)}
    third = n_pool // 3
    text["pool"] = ([worked_text(q) for q in _questions(rng, third, TRAIN_WEIGHTS, False, False)]
                    + [with_planted_errors(q) for q in _questions(rng, third, TRAIN_WEIGHTS, False, False)]
                    + off_task(rng, n_pool - 2 * third))
    rng.shuffle(text["pool"])
    evals = []
    for kind in KINDS:
        held = _questions(rng, n_probe + n_eval, {kind: 1.0}, held_out=True, unique=True)
        text[f"probe-{kind}"] = [worked_text(q) for q in held[:n_probe]]
        evals += [{"question": q, "answer": solve(q)[1]} for q in held[n_probe:]]
    sft = [conversation(q) for q in _questions(rng, n_sft, TRAIN_WEIGHTS, False, False)]
    return {"text_sources": text, "chat_sources": {"toy-sft": sft}, "eval": evals}


MIXING_FORMAT = 2  # bumped when generate_mixing's contents change (2: planted errors by a systematic rule)


def write_mixing_toy(out_dir, seed=0):
    """Write and prepare generate_mixing()'s corpus in out_dir (toy tokenizer); DIR/toy-mix.json last. True when
    it was (re)built: a corpus of another seed or format is replaced."""
    marker, wanted = os.path.join(out_dir, "toy-mix.json"), {"seed": seed, "format": MIXING_FORMAT}
    if os.path.isfile(marker) and json.loads(open(marker).read()) == wanted:
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    corpus = generate_mixing(seed)
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    for key, field in (("text_sources", "text"), ("chat_sources", "messages")):
        for name, docs in corpus[key].items():
            path = os.path.join(raw, f"{name}.jsonl")
            write_jsonl(path, ({field: d} for d in docs))
            data.prepare(name, [path], out_dir, tokenizer="toy", workers=1)
    write_jsonl(os.path.join(out_dir, "eval.jsonl"), corpus["eval"])
    with open(marker, "w") as f:
        json.dump(wanted, f)
    return True
