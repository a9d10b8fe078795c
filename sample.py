"""
Watch a MobileLLM-R1 model reason, chat with it, and measure its accuracy.

Our toy model (after `python train.py`, which writes out/toy):
    python sample.py                              # a few held-out problems, reasoning trace dimmed
    python sample.py --prompt "What is 482+917?"
    python sample.py --chat                       # multi-turn; /reset starts over, /exit quits
    python sample.py --eval                       # accuracy on every held-out toy problem
    python sample.py --eval 100 --ckpt out/toy/ckpt_0000600.pt   # one checkpoint of a run

A released checkpoint as downloaded from Hugging Face (config.json + safetensors + tokenizer.json),
scored as the official evaluation harness scores it (RECIPE section 6):
    python sample.py --hf MobileLLM-R1-950M --protocol official --eval-file math500_test.jsonl --batch-size 16
    python sample.py --hf MobileLLM-R1-950M --protocol official --prompt "Compute 12*13."

Two protocols (RECIPE section 6). `ours`, the default, is how the toy model is scored: our system
prompt, greedy, 1,024 new tokens. `official` is the official harness: one user turn and no system
message (rendered with the checkpoint's own chat template when its tokenizer_config.json has one,
so whatever default the template adds applies, as in Hugging Face), temperature 0.6, top-p 0.95, up
to 30,000 new tokens (capped by the context), seed 0. Flags given explicitly override either.
Both grade with grading.grade: the last \\boxed{} (else "the answer is", else the last number),
LaTeX-normalised and compared as numbers, tuples or sympy expressions. pass@1 is averaged over
--num-samples samples per problem. Eval files are jsonl records with a question ("question",
"problem", "Question" or "input") and an answer ("answer"; GSM8K's "... #### 42" accepted) or a MATH
"solution" with a boxed answer. Prompts of any lengths run --batch-size at a time (left-padded); the
last line printed is `accuracy: C/N = P%` (C correct samples out of N = problems x samples).
"""

import argparse
import codecs
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from inputs import DataError, read_jsonl
from grading import extract_answer, grade, reference_answer
from tokenizer import DEFAULT_SYSTEM_PROMPT, TokenizerError, get_tokenizer, render_chat, stop_ids
from model import MobileLLM, ModelError, latest_checkpoint, left_pad, load_model
from checkpoint import CheckpointError
from runtime import ArgumentParser, DeviceError, describe_dtype, device_name, name_or_path, number, path, \
    keep_freed_memory, pick_device, pick_dtype

DEFAULT_CKPT = "out/toy"  # where `python train.py` saves the toy run
DEFAULT_EVAL = "data/toy/eval.jsonl"  # held-out problems written by `python data.py toy`
SHOW_PROBLEMS = 3  # how many problems a bare `python sample.py` walks through
# The two protocols' settings (module docstring; RECIPE section 6 for the official harness's).
PROTOCOLS = {
    "ours": dict(system=DEFAULT_SYSTEM_PROMPT, temperature=0.0, top_p=None, max_new_tokens=1024, seed=0),
    "official": dict(system="", temperature=0.6, top_p=0.95, max_new_tokens=30000, seed=0),
}
QUESTION_KEYS = ("question", "problem", "Question", "input")  # the official loader's order
THINK_START, THINK_END = "<think>", "</think>"  # ordinary text, several tokens each (RECIPE section 3)


class SampleError(Exception):
    """A bad flag value or input the user can fix: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Loading


def load(args, device):
    """(model, tokenizer) from --hf (a Hugging Face folder) or --ckpt (a run folder or file of ours)."""
    if args.dtype == "float16":
        dtype, why = torch.float16, "asked for with --dtype"
    else:  # auto: bf16 on CUDA and on CPUs with native bf16 (half the bytes read per token), else float32
        dtype, why = pick_dtype(args.dtype, device)
    if args.hf:
        if os.path.isdir(args.hf) and not os.path.isfile(os.path.join(args.hf, "config.json")) and \
                any(f.startswith("ckpt_") for f in os.listdir(args.hf)):
            raise SampleError(f"{args.hf} is a training run of ours, not a Hugging Face folder: "
                              f"use --ckpt {args.hf}")
        model = MobileLLM.from_hf(args.hf, device=device, dtype=dtype)  # read as dtype: an 8B model once
        enc = get_tokenizer(args.hf)
        enc.chat_template = read_chat_template(args.hf)
    else:
        if args.ckpt is None and latest_checkpoint(DEFAULT_CKPT) is None:
            raise SampleError(f"no checkpoint in {DEFAULT_CKPT}: run `python train.py` first "
                              "(or pass --ckpt DIR or --hf DIR)")
        model, tokenizer_name, meta = load_model(args.ckpt or DEFAULT_CKPT, device)
        enc = get_tokenizer(tokenizer_name)
        enc.chat_template = read_chat_template(meta["path"]) if meta["format"] == "hf" else None
    if model.config.vocab_size < enc.n_vocab:
        raise SampleError(f"the tokenizer has {enc.n_vocab} tokens but the model only "
                          f"{model.config.vocab_size}: they do not belong together")
    print(describe_dtype(dtype, why), file=sys.stderr)
    return model.to(dtype).eval(), enc


def read_chat_template(folder):
    """(template, special tokens) of a Hugging Face folder: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of named ones: "default"); None when it has neither."""
    config = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if not template:
        return None
    tokens = {}
    for key, value in config.items():  # bos_token, eos_token, pad_token, ...: strings or AddedToken dicts
        if key.endswith("_token") and value is not None:
            tokens[key] = value["content"] if isinstance(value, dict) else value
    return template, tokens


def render_template(enc, messages, template):
    """Token ids of messages rendered by a Jinja chat template as transformers' apply_chat_template
    renders and tokenizes it (sandboxed, trim_blocks and lstrip_blocks, add_generation_prompt, the
    special tokens as variables, special tokens in the text as tokens, nothing added around)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise SampleError("this checkpoint's chat template needs jinja2: pip install jinja2")

    def raise_exception(message):
        raise TemplateError(message)
    source, tokens = template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: time.strftime(fmt))  # templates that print today's date
    try:
        text = env.from_string(source).render(messages=messages, add_generation_prompt=True, **tokens)
    except TemplateError as e:
        raise SampleError(f"the checkpoint's chat template fails on this conversation: {e}")
    return enc.encode(text, allowed_special="all")


# ------------------------------------------------------------------------------------------------
# Printing a reply as it streams in


class ReplyPrinter:
    """Turns token ids into printable text, one token at a time. Bytes are decoded incrementally,
    since one character may span several byte-level tokens, and the reasoning trace
    <think>...</think> is dimmed on a terminal. The tags are ordinary text split over several
    tokens, so a possible partial tag is held back until the next token settles it."""

    def __init__(self, enc, color):
        self.enc = enc
        self.dim, self.reset = ("\033[2m", "\033[0m") if color else ("", "")
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending, self.thinking = "", False

    def feed(self, token):
        self.pending += self.utf8.decode(self.enc.decode_single_token_bytes(token))
        out = []
        while True:
            tag = THINK_END if self.thinking else THINK_START
            i = self.pending.find(tag)
            if i < 0:
                break
            j = i + len(tag)
            out.append(self.pending[:j] + self.reset if self.thinking else self.pending[:i] + self.dim + tag)
            self.pending, self.thinking = self.pending[j:], not self.thinking
        held = next((k for k in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:k])), 0)
        out.append(self.pending[:len(self.pending) - held])
        self.pending = self.pending[len(self.pending) - held:]
        return "".join(out)

    def flush(self):
        out = self.pending + self.utf8.decode(b"", final=True) + (self.reset if self.thinking else "")
        self.pending, self.thinking = "", False
        return out


def paint(text, code, color):
    return f"\033[{code}m{text}\033[0m" if color else text


# ------------------------------------------------------------------------------------------------
# Generation


def cut_at_stop(ids, stops):
    """A row's new tokens up to and including its first stop id (later ones are padding), or up to
    the -1 that marks a row of a padded batch that reached the context (model.stream)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
        if t < 0:
            return ids[:i]
    return ids


def decode(enc, ids, stops):
    return enc.decode([t for t in ids if t not in stops])


def chat_ids(enc, messages, context, args=None):
    """Prompt ids for a conversation: the checkpoint's own chat template under --protocol official
    (when it has one), else our chat format (tokenizer.render_chat)."""
    template = getattr(enc, "chat_template", None)
    if args is not None and args.protocol == "official" and template:
        ids = render_template(enc, messages, template)
    else:
        ids, _ = render_chat(messages, enc, add_generation_prompt=True)
    if len(ids) >= context:
        raise SampleError(f"the prompt is {len(ids)} tokens but the model's context is {context}: "
                          "shorten it (or --system)")
    return ids


def sampling(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def reply(model, enc, messages, args, color):
    """Answer one conversation, printing as it goes: one sample streams token by token; several
    share one prefill and are printed when the batch is done. Returns (texts, n_tokens, seconds)."""
    device = model.embed_tokens.weight.device
    stops = set(stop_ids(enc))
    prompt = chat_ids(enc, messages, model.config.max_seq_len, args)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    out, t0 = sys.stdout, time.perf_counter()
    if args.num_samples == 1:
        printer, new = ReplyPrinter(enc, color), []
        for step in model.stream(idx, args.max_new_tokens, stop_ids=sorted(stops), **sampling(args)):
            new.append(int(step[0]))
            if new[-1] in stops:
                break
            out.write(printer.feed(new[-1]))
            out.flush()
        out.write(printer.flush() + "\n")
        rows = [new]
    else:
        gen = model.generate(idx, args.max_new_tokens, stop_ids=sorted(stops),
                             num_samples=args.num_samples, **sampling(args))
        rows = [cut_at_stop(r, stops) for r in gen[:, len(prompt):].tolist()]
        for s, row in enumerate(rows):
            printer = ReplyPrinter(enc, color)
            text = "".join(printer.feed(t) for t in row if t not in stops) + printer.flush()
            out.write(paint(f"[sample {s + 1}/{len(rows)}]", "1", color) + "\n" + text + "\n")
    seconds = time.perf_counter() - t0
    if args.print_ids:  # machine-readable, for tests and tokenizer debugging
        out.write(json.dumps({"prompt_ids": prompt, "ids": rows}) + "\n")
    return [decode(enc, r, stops) for r in rows], sum(map(len, rows)), seconds


def generate_batched(model, enc, prompts, args, references=None):
    """Completions for many prompts of any lengths: num_samples texts per prompt, plus tokens generated
    and seconds. Prompts run --batch-size rows at a time, sorted by length so that a batch holds
    similar lengths (little padding), left-padded (model.stream's lengths): each row generates what
    it would alone. Its samples are consecutive rows after one prefill. With references, the
    progress bar also shows the running accuracy."""
    device = model.embed_tokens.weight.device
    stops = set(stop_ids(enc))
    per_batch = max(1, args.batch_size // args.num_samples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, n_tokens, correct, done, t0 = [None] * len(prompts), 0, 0, 0, time.perf_counter()
    progress = tqdm(total=len(prompts), desc="eval", unit="problem", disable=not sys.stderr.isatty())
    for k in range(0, len(order), per_batch):
        batch = order[k:k + per_batch]
        idx, lengths = left_pad([prompts[i] for i in batch], pad_id=min(stops))
        gen = model.generate(idx.to(device), args.max_new_tokens, stop_ids=sorted(stops),
                             num_samples=args.num_samples, lengths=lengths, **sampling(args))
        rows = [cut_at_stop(r, stops) for r in gen[:, idx.size(1):].tolist()]
        n_tokens += sum(map(len, rows))
        for b, i in enumerate(batch):
            texts[i] = [decode(enc, r, stops) for r in rows[b * args.num_samples:(b + 1) * args.num_samples]]
            if references is not None:
                correct += sum(grade(t, references[i]) for t in texts[i])
        done += len(batch) * args.num_samples
        progress.update(len(batch))
        if references is not None:
            progress.set_postfix(accuracy=f"{100 * correct / done:.1f}%")
    progress.close()
    return texts, n_tokens, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Scoring (RECIPE section 6; grading.py)


def load_eval_set(path):
    """Records with a question (QUESTION_KEYS) and an answer or a MATH solution:
    [{"question": str, "answer": str}], the answer being the reference grading.grade reads."""
    out = []
    for lineno, rec in read_jsonl(path):
        fields = rec if isinstance(rec, dict) else {}
        question = next((fields[k] for k in QUESTION_KEYS if k in fields), None)
        answer = next((fields[k] for k in ("answer", "solution") if k in fields), None)
        if question is None or answer is None:
            lacks = " and ".join(w for w, v in (("a question", question), ("an answer", answer)) if v is None)
            has = ", ".join(map(repr, rec)) if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise SampleError(f"{path}:{lineno}: an eval record needs a question ({', '.join(QUESTION_KEYS)}) and an "
                              f"answer ('answer' or a MATH 'solution'), this one lacks {lacks} (it has {has or 'no fields'})")
        out.append({"question": str(question), "answer": str(answer)})
    if not out:
        raise SampleError(f"{path} holds no eval records: one JSON object per line")
    return out


def eval_problems(args):
    path = args.eval_file or DEFAULT_EVAL
    if not os.path.isfile(path):
        hint = "run `python data.py toy` first" if path == DEFAULT_EVAL else "check the path"
        raise SampleError(f"no evaluation set at {path}: {hint}")
    problems = load_eval_set(path)
    if args.eval is None and not args.eval_file:
        return problems[:SHOW_PROBLEMS]  # a bare `python sample.py`: a short walk-through
    return problems[:args.eval] if args.eval else problems


def summary(correct, total, n_tokens, seconds, num_samples):
    print(f"generated {n_tokens} tokens in {seconds:.1f} s: {n_tokens / max(seconds, 1e-9):.1f} tokens/s")
    if num_samples > 1:
        print(f"pass@1 averaged over {num_samples} samples per problem")
    print(f"accuracy: {correct}/{total} = {100 * correct / max(total, 1):.1f}%")


# ------------------------------------------------------------------------------------------------
# The four ways to run


def messages_for(question, args, history=()):
    """The conversation sent: our system prompt (unless --system ''), then the turns. The official
    harness sends the problem alone, stripped, as one user turn (RECIPE section 6)."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    question = question.strip() if args.protocol == "official" else question
    return system + list(history) + [{"role": "user", "content": question}]


def run_show(model, enc, problems, args, color):
    """Walk through a few problems: question, streamed trace and answer, right or wrong."""
    correct = n_tokens = 0
    seconds = 0.0
    for k, problem in enumerate(problems):
        print(paint(f"[{k + 1}/{len(problems)}] {problem['question']}", "1", color))
        texts, n, s = reply(model, enc, messages_for(problem["question"], args), args, color)
        n_tokens, seconds = n_tokens + n, seconds + s
        gold = reference_answer(problem["answer"])
        for text in texts:
            ok = grade(text, problem["answer"])
            correct += ok
            verdict = paint("right", "32", color) if ok else paint(f"wrong (expected {gold})", "31", color)
            answer = extract_answer(text)
            print(f"answer: {answer or '(none)'}  {verdict}")
        print()
    summary(correct, len(problems) * args.num_samples, n_tokens, seconds, args.num_samples)


def run_eval(model, enc, problems, args, color):
    """Score problems in batches; print the first few mistakes, throughput, then accuracy."""
    prompts = [chat_ids(enc, messages_for(p["question"], args), model.config.max_seq_len, args) for p in problems]
    texts, n_tokens, seconds = generate_batched(model, enc, prompts, args, [p["answer"] for p in problems])
    correct, shown = 0, 0
    for problem, samples in zip(problems, texts):
        for text in samples:
            ok = grade(text, problem["answer"])
            correct += ok
            if not ok and shown < 5:
                shown += 1
                print(f"{paint('wrong', '31', color)}: {problem['question']!r} -> {extract_answer(text)!r} "
                      f"(expected {reference_answer(problem['answer'])!r})")
    summary(correct, len(problems) * args.num_samples, n_tokens, seconds, args.num_samples)


def run_prompt(model, enc, args, color):
    _, n_tokens, seconds = reply(model, enc, messages_for(args.prompt, args), args, color)
    print(f"({n_tokens} tokens, {n_tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)


def run_chat(model, enc, args, color):
    """A conversation: each turn sees the whole history (reasoning included). /exit or EOF quits."""
    history = []
    print("chat: /exit or Ctrl-D quits, /reset starts over", file=sys.stderr)
    while True:
        try:
            question = input(paint("> ", "1", color))
        except EOFError:
            print()
            return
        command = question.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = []
        if command in ("", "/reset"):
            continue
        try:
            texts, _, _ = reply(model, enc, messages_for(question, args, history), args, color)
        except SampleError as e:  # the conversation outgrew the context: say so and start over
            print(f"error: {e}; starting a new conversation", file=sys.stderr)
            history = []
            continue
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": texts[0]}]


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = number(int, at_least=1)
    model = p.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--ckpt", metavar="PATH",
                        type=name_or_path([], ["ckpt_*.pt", "config.json"], "a run folder or ckpt_*.pt"),
                        help=f"run folder or ckpt_*.pt file of ours (default {DEFAULT_CKPT}; "
                        "the newest checkpoint of a folder is used)")
    source.add_argument("--hf", metavar="DIR", type=name_or_path([], ["config.json"], "a Hugging Face folder"),
                        help="Hugging Face folder: config.json, *.safetensors, tokenizer.json")
    model.add_argument("--device", default=None, metavar="NAME", type=device_name,
                       help="cpu, cuda, cuda:1, mps (default: best available)")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weights' dtype; auto: bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, else float32")
    what = p.add_argument_group("what to run (default: walk through a few held-out toy problems)")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument("--prompt", metavar="TEXT", help="answer one question, streaming the reply")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn conversation")
    mode.add_argument("--eval", type=number(int, at_least=0), nargs="?", const=0, metavar="N",
                      help="score N held-out problems (all when N is omitted or 0)")
    what.add_argument("--eval-file", metavar="FILE.jsonl", type=path("file", (".jsonl",)),
                      help=f"question/answer (or MATH problem/solution) records to score, GSM8K '#### 42' answers "
                           f"accepted (default {DEFAULT_EVAL}; all of it unless --eval N)")
    what.add_argument("--batch-size", type=count, default=64, metavar="ROWS",
                      help="rows generated at once when scoring (prompts of any lengths, left-padded)")
    what.add_argument("--print-ids", action="store_true", help="also print prompt and generated token ids as JSON")
    proto = p.add_argument_group("protocol: prompt and sampling (explicit flags override the protocol's values)")
    proto.add_argument("--protocol", choices=sorted(PROTOCOLS), default="ours",
                       help="ours (default): system prompt, greedy, 1024 new tokens; official: the official "
                            "harness (one user turn, no system message, T 0.6, top-p 0.95, 30000 new tokens, seed 0)")
    proto.add_argument("--system", default=None, metavar="TEXT", help="system prompt ('' for none)")
    proto.add_argument("--temperature", type=number(float, at_least=0), default=None, metavar="T", help="0 = greedy")
    proto.add_argument("--top-p", type=number(float, above=0, at_most=1), default=None, metavar="P",
                       help="nucleus sampling")
    proto.add_argument("--top-k", type=count, default=None, metavar="K", help="sample among the k most likely tokens")
    proto.add_argument("--max-new-tokens", type=count, default=None, metavar="N", help="per reply (capped by the context)")
    proto.add_argument("--num-samples", type=count, default=1, metavar="N",
                       help="continuations per prompt, sampled in one batch after one prefill; pass@1 is averaged")
    proto.add_argument("--seed", type=number(int, at_least=0), default=None, help="seed for sampling")
    args = p.parse_args(argv)
    if args.eval_file and (args.prompt is not None or args.chat):
        p.error("--eval-file scores a file: use it alone or with --eval N, not with --prompt or --chat")
    for name, value in PROTOCOLS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org
        device = pick_device(args.device)
        if device.type == "cpu":
            keep_freed_memory()
        model, enc = load(args, device)
        if args.prompt is not None:
            run_prompt(model, enc, args, color)
        elif args.chat:
            run_chat(model, enc, args, color)
        elif args.eval is None and not args.eval_file:
            run_show(model, enc, eval_problems(args), args, color)
        else:
            run_eval(model, enc, eval_problems(args), args, color)
    except (ModelError, CheckpointError, DataError, TokenizerError, DeviceError, SampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while a reply streams: stop quietly, as a shell command does
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
