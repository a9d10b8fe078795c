"""
Watch a MobileLLM-R1 model reason, chat with it, and measure its accuracy.

Our toy model (after `python train.py`, which writes out/toy):
    python sample.py                              # a few held-out problems, reasoning trace dimmed
    python sample.py --prompt "What is 482+917?"
    python sample.py --chat                       # multi-turn; /reset starts over, /exit quits
    python sample.py --eval                       # accuracy on every held-out toy problem
    python sample.py --eval 100 --ckpt out/toy/ckpt_0000600.pt   # one checkpoint of a run

A released checkpoint as downloaded from Hugging Face (config.json + safetensors + tokenizer.json):
    python sample.py --hf MobileLLM-R1-950M --prompt "Compute 12*13." --max-new-tokens 4096
    python sample.py --hf MobileLLM-R1-950M --eval-file gsm8k_test.jsonl --max-new-tokens 4096 \\
        --temperature 0.6 --top-p 0.95 --num-samples 4          # the paper's sampling (RECIPE section 6)

Scoring follows the paper (RECIPE section 6): 0-shot, the answer is the last \\boxed{} of the output,
numbers normalised, pass@1 averaged over --num-samples samples per problem. The default is greedy
decoding, which is how the toy model is scored. The last line printed is `accuracy: C/N = P%`
(C correct samples out of N = problems x samples).
"""

import argparse
import codecs
import json
import os
import re
import sys
import time
from fractions import Fraction

import torch
from tqdm import tqdm

from inputs import DataError, read_jsonl
from tokenizer import DEFAULT_SYSTEM_PROMPT, TokenizerError, get_tokenizer, render_chat, stop_ids
from model import MobileLLM, ModelError, latest_checkpoint, load_model
from checkpoint import CheckpointError
from runtime import ArgumentParser, DeviceError, describe_dtype, device_name, name_or_path, number, path, \
    pick_device, pick_dtype

DEFAULT_CKPT = "out/toy"  # where `python train.py` saves the toy run
DEFAULT_EVAL = "data/toy/eval.jsonl"  # held-out problems written by `python data.py toy`
SHOW_PROBLEMS = 3  # how many problems a bare `python sample.py` walks through
# RECIPE section 6: post-trained models are scored sampling at temperature 0.6, top-p 0.95.
PAPER_TEMPERATURE, PAPER_TOP_P = 0.6, 0.95
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
    else:
        if args.ckpt is None and latest_checkpoint(DEFAULT_CKPT) is None:
            raise SampleError(f"no checkpoint in {DEFAULT_CKPT}: run `python train.py` first "
                              "(or pass --ckpt DIR or --hf DIR)")
        model, tokenizer_name, _ = load_model(args.ckpt or DEFAULT_CKPT, device)
        enc = get_tokenizer(tokenizer_name)
    if model.config.vocab_size < enc.n_vocab:
        raise SampleError(f"the tokenizer has {enc.n_vocab} tokens but the model only "
                          f"{model.config.vocab_size}: they do not belong together")
    print(describe_dtype(dtype, why), file=sys.stderr)
    return model.to(dtype).eval(), enc


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
    """A row's new tokens up to and including its first stop id (later ones are padding)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids


def decode(enc, ids, stops):
    return enc.decode([t for t in ids if t not in stops])


def chat_ids(enc, messages, context):
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
    prompt = chat_ids(enc, messages, model.config.max_seq_len)
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


def generate_batched(model, enc, prompts, args):
    """Completions for many prompts: num_samples texts per prompt, plus tokens generated and seconds.
    Our KV cache has no left padding, so prompts of identical length are batched together; each is
    prefilled once and its samples are consecutive rows (model.stream repeat_interleaves)."""
    device = model.embed_tokens.weight.device
    stops = set(stop_ids(enc))
    per_batch = max(1, args.batch_size // args.num_samples)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    texts, n_tokens, t0 = [None] * len(prompts), 0, time.perf_counter()
    todo = [group[k:k + per_batch] for group in by_length.values() for k in range(0, len(group), per_batch)]
    progress = tqdm(total=len(prompts), desc="eval", unit="problem", disable=not sys.stderr.isatty())
    for batch in todo:
        idx = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
        gen = model.generate(idx, args.max_new_tokens, stop_ids=sorted(stops),
                             num_samples=args.num_samples, **sampling(args))
        rows = [cut_at_stop(r, stops) for r in gen[:, idx.size(1):].tolist()]
        n_tokens += sum(map(len, rows))
        for b, i in enumerate(batch):
            texts[i] = [decode(enc, r, stops) for r in rows[b * args.num_samples:(b + 1) * args.num_samples]]
        progress.update(len(batch))
    progress.close()
    return texts, n_tokens, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Scoring (RECIPE section 6)


def extract_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the model stopped mid-answer


def normalize_answer(s):
    """Canonical form for exact-match grading: numbers compare by value ("1,000" == "1000.0",
    "0.5" == "\\frac{1}{2}"), anything else by its whitespace-collapsed text."""
    s = str(s).strip().strip("$").strip()
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s).replace("\\!", "").replace("\\,", "")
    t = re.sub(r"[\s,]", "", s)
    m = re.fullmatch(r"\(?([-+]?[\d.]+(?:e[-+]?\d+)?)\)?(?:/\(?([-+]?[\d.]+)\)?)?", t)
    if m:
        try:
            x = Fraction(m.group(1)) / Fraction(m.group(2) or 1)
            return str(x)
        except (ValueError, ZeroDivisionError):
            pass
    return " ".join(s.split())


def load_eval_set(path):
    """A jsonl of {"question": str, "answer": str} records."""
    out = []
    for lineno, rec in read_jsonl(path):
        missing = [k for k in ("question", "answer") if not isinstance(rec, dict) or k not in rec]
        if missing:
            has = ", ".join(map(repr, rec)) if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise SampleError(f"{path}:{lineno}: an eval record needs 'question' and 'answer', this one lacks "
                              f"{' and '.join(map(repr, missing))} (it has {has or 'no fields'})")
        out.append({"question": str(rec["question"]), "answer": str(rec["answer"])})
    return out


def gold_answer(answer):
    """The reference answer of a record; GSM8K keeps a worked solution ending in '#### 42'."""
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def is_correct(text, gold):
    """Right when the last \\boxed{} of the output equals the gold answer after normalisation."""
    predicted = extract_boxed(text)
    return predicted is not None and normalize_answer(predicted) == normalize_answer(gold_answer(gold))


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
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + list(history) + [{"role": "user", "content": question}]


def run_show(model, enc, problems, args, color):
    """Walk through a few problems: question, streamed trace and answer, right or wrong."""
    correct = n_tokens = 0
    seconds = 0.0
    for k, problem in enumerate(problems):
        print(paint(f"[{k + 1}/{len(problems)}] {problem['question']}", "1", color))
        texts, n, s = reply(model, enc, messages_for(problem["question"], args), args, color)
        n_tokens, seconds = n_tokens + n, seconds + s
        gold = gold_answer(problem["answer"])
        for text in texts:
            ok = is_correct(text, gold)
            correct += ok
            verdict = paint("right", "32", color) if ok else paint(f"wrong (expected {gold})", "31", color)
            answer = extract_boxed(text)
            print(f"answer: {'(none boxed)' if answer is None else answer}  {verdict}")
        print()
    summary(correct, len(problems) * args.num_samples, n_tokens, seconds, args.num_samples)


def run_eval(model, enc, problems, args, color):
    """Score problems in batches; print the first few mistakes, throughput, then accuracy."""
    prompts = [chat_ids(enc, messages_for(p["question"], args), model.config.max_seq_len) for p in problems]
    texts, n_tokens, seconds = generate_batched(model, enc, prompts, args)
    correct, shown = 0, 0
    for problem, samples in zip(problems, texts):
        for text in samples:
            ok = is_correct(text, problem["answer"])
            correct += ok
            if not ok and shown < 5:
                shown += 1
                print(f"{paint('wrong', '31', color)}: {problem['question']!r} -> {extract_boxed(text)!r} "
                      f"(expected {gold_answer(problem['answer'])!r})")
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
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ckpt", metavar="PATH",
                        type=name_or_path([], ["ckpt_*.pt", "config.json"], "a run folder or ckpt_*.pt"),
                        help=f"run folder or ckpt_*.pt file of ours (default {DEFAULT_CKPT}; "
                        "the newest checkpoint of a folder is used)")
    source.add_argument("--hf", metavar="DIR", type=name_or_path([], ["config.json"], "a Hugging Face folder"),
                        help="Hugging Face folder: config.json, *.safetensors, tokenizer.json")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", metavar="TEXT", help="answer one question, streaming the reply")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn conversation")
    mode.add_argument("--eval", type=number(int, at_least=0), nargs="?", const=0, metavar="N",
                      help="score N held-out problems (all when N is omitted or 0)")
    p.add_argument("--eval-file", metavar="FILE.jsonl", type=path("file", (".jsonl",)),
                   help=f"question/answer records to score, GSM8K-style '#### 42' answers accepted "
                        f"(default {DEFAULT_EVAL}; all of it unless --eval N)")
    p.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, metavar="TEXT", help="system prompt ('' for none)")
    p.add_argument("--temperature", type=number(float, at_least=0), default=0.0, metavar="T",
                   help=f"0 = greedy (default); the paper uses {PAPER_TEMPERATURE} for post-trained models")
    p.add_argument("--top-p", type=number(float, above=0, at_most=1), default=None, metavar="P",
                   help=f"nucleus sampling (paper: {PAPER_TOP_P})")
    p.add_argument("--top-k", type=count, default=None, metavar="K", help="sample among the k most likely tokens")
    p.add_argument("--max-new-tokens", type=count, default=1024, metavar="N", help="per reply (capped by the context)")
    p.add_argument("--num-samples", type=count, default=1, metavar="N",
                   help="continuations per prompt, sampled in one batch after one prefill; pass@1 is averaged")
    p.add_argument("--batch-size", type=count, default=64, metavar="ROWS", help="rows generated at once when scoring")
    p.add_argument("--seed", type=number(int, at_least=0), default=0, help="seed for sampling")
    p.add_argument("--device", default=None, metavar="NAME", type=device_name,
                   help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype; auto: bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, else float32")
    p.add_argument("--print-ids", action="store_true", help="also print prompt and generated token ids as JSON")
    args = p.parse_args(argv)
    if args.eval_file and (args.prompt is not None or args.chat):
        p.error("--eval-file scores a file: use it alone or with --eval N, not with --prompt or --chat")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org
        device = pick_device(args.device)
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
