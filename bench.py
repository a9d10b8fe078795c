"""
Speed and memory side by side with the reference implementation, in one process, same threads, same
weights: warm-up first, then repetitions alternating ours and the reference, median reported. The
workloads themselves (what each side runs) are built in workloads.py; this file measures and reports.

    python bench.py                          # every comparison (~6 minutes on a 2-core CPU)
    python bench.py --quick                  # one timed repetition, fewer shapes: under 2 minutes
    python bench.py --only attention,loss    # sections whose name contains one of these
    python bench.py --json results.json      # the rows as JSON: name, ours, reference, unit, ratio
    python bench.py --profile --only "train 140m"   # top operators (self CPU time) of both sides

Sections: train 140m / train toy (forward, backward, clip, AdamW step: ours vs transformers'
Llama4ForCausalLM with the weights copied, under the optimizer HF's Trainer builds by default; ours
at --dtype, default auto = bf16 autocast where the CPU has AMX / AVX512-BF16, against the reference
in float32, and for 140m also both in bf16, the reference under CPU autocast as HF's Trainer runs
bf16=True), generate 140m (greedy, KV cache, 128 new tokens after 64; ours at --dtype vs the float32
reference, then both with bf16 weights; memory-bandwidth utilisation = bytes read per token x
tokens/s over the bandwidth of a large tensor copy measured in the same run), attention (ours vs
torch SDPA, causal and with a dense mask of 8 equal or unequal documents; with documents also
kernels.py's tile loop), loss (kernels.linear_cross_entropy,
recomputing in the backward or with gradients made in the forward, vs logits + F.cross_entropy),
sampler (MixtureSampler vs nanoGPT's get_batch), compile (ours eager vs torch.compile: the first
step, compilation included, and the steady state; only without --quick), cuda (bf16 tokens/s and
MFU, eager and compiled; only when a GPU is present; python bench.py --only cuda), eval batched
(sample.py's --eval-file path on the toy model: 32 prompts of 8 to 200 tokens, 128 new tokens each,
batch 16 left-padded vs one at a time). ratio = ours / reference: below 1 is better for s and MB,
above 1 for tokens/s and problems/s. A summary then says which goals each row meets.

Peak memory on CPU: torch keeps no peak statistics for CPU tensors, so we ask the kernel. Each memory
figure comes from a fresh child process (this file with --memory-child) started with
MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every buffer over 64 KiB with its own mmap and returns
it on free, so the resident set (RSS) follows live memory instead of keeping freed blocks (with its
default, dynamic threshold a freed buffer stays resident and a second run would look free). The child
builds the case, runs it once (warm-up: optimizer state, lazy initialisation), frees what it can,
then resets the kernel's high-water mark (echo 5 > /proc/self/clear_refs) and runs it again.
"peak" = VmHWM - VmRSS just before that run: what the call adds (activations, gradients, workspaces).
"total" (training rows) = VmHWM - VmRSS before the model was built: weights, gradients, AdamW state
and activations together. Timings come from the parent process with glibc's default settings.
"""

import argparse
import ctypes
import fnmatch
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import data
import workloads
from checkpoint import CheckpointError
from model import MobileLLM, ModelConfig, ModelError
from runtime import ArgumentParser, DeviceError, checked, describe_dtype, keep_freed_memory, number, path, \
    pick_dtype
from tokenizer import TokenizerError
from workloads import SIDES


# -------------------------------------------------------------------------------------------------
# Measurement

def time_sides(fns, warmup, reps, sync=lambda: None):
    """Median seconds per call of each side. Sides alternate inside each repetition, so a slow
    moment of a shared machine hits both rather than one. sync: waits for a GPU to finish."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {side: [] for side in fns}
    for _ in range(reps):
        for side, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[side].append(time.perf_counter() - t0)
    return {side: statistics.median(t) for side, t in times.items()}


def profile_sides(fns, title, rows=12):
    from torch.profiler import ProfilerActivity, profile
    for side, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n--- profile: {title}, {side} (top operators by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def release_memory():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed small-block pages back too


def memory_child(spec):
    """Runs in the child process (see the module docstring): peak and total MB of each case."""
    if spec["side"] == "reference":
        import transformers  # noqa: F401  (imported before the baseline: its modules are not the model's)
    results = []
    for params in spec["cases"]:
        release_memory()
        before_build = status_mb("VmRSS")
        fn = workloads.BUILDERS[spec["kind"]](sides=(spec["side"],), **params)[spec["side"]]
        fn()
        release_memory()
        before_call = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        fn()
        peak = status_mb("VmHWM")
        results.append({"peak": peak - before_call, "total": peak - before_build})
        del fn
    print(json.dumps(results))


def measure_memory(kind, cases, side, threads):
    """Run memory_child in a fresh process; a list of {"peak", "total"} MB, one per case."""
    if not os.path.exists("/proc/self/clear_refs"):  # not Linux: no honest CPU figure, shown as n/a
        return [{"peak": None, "total": None} for _ in cases]
    spec = json.dumps({"kind": kind, "cases": cases, "side": side})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--memory-child", spec]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {kind} ({side}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_bandwidth(nbytes=2**28, reps=5):
    """Bytes/s of a large tensor copy (read + write, far beyond the caches): what decoding can hope to
    stream at most on this machine with these threads."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def row(name, ours, reference, unit):
    ratio = ours / reference if ours is not None and reference else None
    return dict(name=name, ours=ours, reference=reference, unit=unit, ratio=ratio)




# -------------------------------------------------------------------------------------------------
# Sections: each yields rows

def compare(fns, title, args):
    if args.profile:
        profile_sides(fns, title)
    return time_sides(fns, args.warmup, args.reps)


def with_bf16_sides(args, dtypes):
    """dtypes plus the sides of the "both bf16" rows: the reference in bf16, and ours in bf16 when
    --dtype did not already pick it (then the "ours" side serves both rows)."""
    dtypes = dict(dtypes, **{"reference bf16": "bfloat16"})
    if args.dtype != "bfloat16":
        dtypes["ours bf16"] = "bfloat16"
    return dtypes


def bench_train(size, args):
    """ours at --dtype (auto: bf16 where the CPU has it) vs the reference in float32; for 140m also
    both in bf16 (the reference under CPU autocast, as HF's Trainer runs bf16=True)."""
    batch, seq = workloads.TRAIN_SHAPES[size]
    name = f"train {size} {batch}x{seq}"
    dtypes = {"ours": args.dtype, "reference": "float32"}
    if size == "140m":
        dtypes = with_bf16_sides(args, dtypes)
    t = compare(workloads.build_train(size, batch, seq, dtypes), name, args)
    yield row(f"{name} step time", t["ours"], t["reference"], "s")
    if "reference bf16" in t:
        yield row(f"{name} step time, both bf16", t.get("ours bf16", t["ours"]), t["reference bf16"], "s")
    gc.collect()
    mem = {side: measure_memory("train", [dict(size=size, batch=batch, seq=seq, dtypes={side: dtypes[side]})],
                                side, args.threads)[0] for side in SIDES}
    yield row(f"{name} peak memory (step)", mem["ours"]["peak"], mem["reference"]["peak"], "MB")
    yield row(f"{name} peak memory (total)", mem["ours"]["total"], mem["reference"]["total"], "MB")


def bench_generate(args):
    """ours at --dtype vs the reference in float32, then both in bf16 weights; and how much of the
    machine's memory bandwidth (a copy benchmark, same run) each side's decoding uses."""
    fns, read = workloads.build_generate("140m", with_bf16_sides(args, {"ours": args.dtype, "reference": "float32"}))
    t = compare(fns, "generate 140m", args)
    tok_s = {side: workloads.NEW_TOKENS / t[side] for side in t}
    name = f"generate 140m {workloads.PROMPT}+{workloads.NEW_TOKENS} greedy"
    yield row(name, tok_s["ours"], tok_s["reference"], "tok/s")
    yield row(f"{name}, both bf16", tok_s.get("ours bf16", tok_s["ours"]), tok_s["reference bf16"], "tok/s")
    bandwidth = copy_bandwidth()
    yield row("memory bandwidth (tensor copy)", bandwidth / 1e9, None, "GB/s")
    # bytes read per token x tokens/s over the copy bandwidth; prefill is counted as decoding time
    use = {side: 100 * read[side] * tok_s[side] / bandwidth for side in SIDES}
    yield row(f"{name} memory-bandwidth utilisation", use["ours"], use["reference"], "%")



def bench_eval_batched(args):
    t = compare(workloads.build_eval_batched(), "eval batched", args)
    yield row(f"eval {workloads.EVAL_PROMPTS} mixed-length prompts: batch {workloads.EVAL_BATCH} vs one at a time",
              workloads.EVAL_PROMPTS / t["ours"], workloads.EVAL_PROMPTS / t["reference"], "problems/s")


def bench_attention(args):
    n = workloads.ATTN_DOCS
    kinds = {"causal": dict(docs=0), f"doc-masked ({n} docs)": dict(docs=n),
             f"doc-masked ({n} docs, lengths 1:...:{n})": dict(docs=n, varied=True)}
    cases = [dict(kind, T=T) for kind in kinds.values() for T in args.lengths]
    mem = {side: measure_memory("attention", cases, side, args.threads) for side in SIDES}
    peaks = {}
    for i, (what, case) in enumerate(zip([w for w in kinds for _ in args.lengths], cases)):
        name = f"attention {what} T={case['T']} fwd+bwd"
        t = compare(workloads.build_attention(**case), name, args)
        yield row(f"{name} time", t["ours"], t["reference"], "s")
        yield row(f"{name} peak memory", mem["ours"][i]["peak"], mem["reference"][i]["peak"], "MB")
        peaks[what, case["T"]] = {side: mem[side][i]["peak"] for side in SIDES}
        if case["docs"]:  # the tile loop, which a CPU's automatic choice (varlen) replaced above 512 keys
            t = compare(workloads.build_attention(**case, backend="fused"), f"{name}, tile loop", args)
            yield row(f"{name} time, tile loop", t["ours"], t["reference"], "s")
    # Linear memory shows as growth equal to the length ratio, quadratic as its square.
    lo, hi = min(args.lengths), max(args.lengths)
    if lo != hi:
        for what in kinds:
            growth = {side: peaks[what, hi][side] / peaks[what, lo][side] if peaks[what, lo][side] else None
                      for side in SIDES}
            yield row(f"attention {what} memory growth T={lo}->{hi} (linear: {hi / lo:g}x)",
                      growth["ours"], growth["reference"], "x")


def bench_loss(args):
    # --quick: only the mode model.py trains with
    modes = {"grads in forward": False} if args.quick else {"recompute": True, "grads in forward": False}
    shapes = [dict(batch=b, seq=t) for b, t in args.loss_shapes]
    mem = {"ours": measure_memory("loss", [dict(s, recompute=r) for s in shapes for r in modes.values()],
                                  "ours", args.threads),
           "reference": measure_memory("loss", shapes, "reference", args.threads)}
    for i, shape in enumerate(shapes):
        # both modes and the naive loss side by side: the naive one is timed once for both rows
        fns = {mode: workloads.build_loss(**shape, recompute=r, sides=("ours",))["ours"] for mode, r in modes.items()}
        fns["reference"] = workloads.build_loss(**shape, sides=("reference",))["reference"]
        name = f"loss 140m {shape['batch']}x{shape['seq']} fwd+bwd"
        t = compare(fns, name, args)
        for j, mode in enumerate(modes):
            yield row(f"{name} ({mode}) time", t[mode], t["reference"], "s")
            yield row(f"{name} ({mode}) peak memory", mem["ours"][len(modes) * i + j]["peak"],
                      mem["reference"][i]["peak"], "MB")

def bench_sampler(args):
    fns = workloads.build_sampler(args.sampler_docs)
    t = compare(fns, "sampler", args)
    tokens_per_call = workloads.SAMPLER_BATCHES * workloads.SAMPLER_BATCH * workloads.SAMPLER_SEQ
    yield row(f"sampler {workloads.SAMPLER_BATCH}x({workloads.SAMPLER_SEQ}+1) rows vs nanoGPT get_batch",
              tokens_per_call / t["ours"], tokens_per_call / t["reference"], "tok/s")



def bench_compile(args):
    """torch.compile on ours at --dtype: the first step (compilation included) and the steady step,
    against eager ours; and the steps after which compiling has paid for itself."""
    for size in ("toy", "140m"):
        batch, seq = workloads.TRAIN_SHAPES[size]
        name = f"compile {size} {batch}x{seq}"
        fns, first = {}, {}
        for side, compiled in (("compiled", True), ("eager", False)):
            torch._dynamo.reset()
            fns[side] = workloads.build_train(size, batch, seq, {"ours": args.dtype}, compile=compiled)["ours"]
            t0 = time.perf_counter()
            fns[side]()
            first[side] = time.perf_counter() - t0
        t = time_sides(fns, args.warmup, args.reps)
        yield row(f"{name} first step, compiled vs eager", first["compiled"], first["eager"], "s")
        yield row(f"{name} steady step, compiled vs eager", t["compiled"], t["eager"], "s")
        saved = t["eager"] - t["compiled"]
        payback = (first["compiled"] - first["eager"]) / saved if saved > 0 else None  # n/a: never
        yield row(f"{name} steps until compiling pays off", payback, None, "steps")
        fns = None
        gc.collect()


def bench_mixing(args):
    """mixing.py's scoring pass at 140m, 2k-token documents: documents/s; there is no reference (the
    paper's code is unreleased)."""
    t = compare(workloads.build_mixing("140m", args.dtype), "mixing", args)
    yield row("mixing score 140m, 2k-token docs", workloads.MIXING_DOCS / t["ours"], None, "docs/s")


def bench_cuda(args):
    """bf16 autocast training step on the GPU (float32 weights and AdamW state, as train.py runs),
    eager and torch.compile'd: tokens/s, MFU (against the GPU's dense bf16 peak) and peak memory."""
    from runtime import peak_flops
    device = torch.device("cuda")
    peak = peak_flops(device)
    batch, seq = workloads.CUDA_SHAPE
    for size in workloads.CUDA_SIZES:
        for compile in (False, True):
            name = f"cuda {size} {batch}x{seq} bf16{' compile' if compile else ''}"
            tok_s, mem = {}, {}
            for side in SIDES:  # one side at a time: both 950m models and their states would be large
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    fns = workloads.build_train(size, batch, seq, {side: "bfloat16"}, device="cuda", compile=compile)
                    t = time_sides(fns, args.warmup + 1, args.reps, sync=torch.cuda.synchronize)
                    tok_s[side], mem[side] = batch * seq / t[side], torch.cuda.max_memory_allocated() / 2**20
                except torch.cuda.OutOfMemoryError:
                    tok_s[side] = mem[side] = None  # shown as n/a
                fns = None
            with torch.device("meta"):  # only the parameter count is needed
                flops = MobileLLM(ModelConfig.from_size(size)).estimate_flops_per_token(seq)  # 6N + attention
            mfu = {s: 100 * flops * tok_s[s] / peak if peak and tok_s[s] else None for s in SIDES}
            yield row(f"{name} tokens/s", tok_s["ours"], tok_s["reference"], "tok/s")
            yield row(f"{name} MFU", mfu["ours"], mfu["reference"], "%")
            yield row(f"{name} peak memory", mem["ours"], mem["reference"], "MB")


def sections(args):
    """(name, rows generator) in run order; --only picks by name."""
    return [
        ("train 140m", lambda: bench_train("140m", args)),
        ("train toy", lambda: bench_train("toy", args)),
        ("generate 140m", lambda: bench_generate(args)),
        ("attention", lambda: bench_attention(args)),
        ("loss", lambda: bench_loss(args)),
        ("sampler", lambda: bench_sampler(args)),
        ("compile", lambda: bench_compile(args) if not args.quick or args.only else iter(())),
        ("mixing", lambda: bench_mixing(args)),
        ("cuda", lambda: bench_cuda(args) if torch.cuda.is_available() else iter(())),
        ("eval batched", lambda: bench_eval_batched(args)),
    ]


# -------------------------------------------------------------------------------------------------

def fmt(x):
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def print_rows(rows):
    header = ("name", "ours", "reference", "unit", "ratio")
    table = [header] + [(r["name"], fmt(r["ours"]), fmt(r["reference"]), r["unit"], fmt(r["ratio"])) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for k, line in enumerate(table):  # text columns left-aligned, numbers right-aligned
        print(" | ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("-+-".join("-" * w for w in widths))


# Goals, checked on the rows: (row name pattern, test, what it asks).
GOALS = [
    ("train 140m 2x256 step time", lambda r: r["ratio"] <= 0.33, "training step (ours --dtype auto) >= 3x faster"),
    ("train 140m 2x256 step time, both bf16", lambda r: r["ratio"] <= 0.67, "training step in bf16 >= 1.5x faster"),
    ("train 140m 2x256 peak memory (step)", lambda r: r["ratio"] <= 0.5, "training step <= 1/2 the peak memory"),
    ("train toy 16x256 step time", lambda r: r["ratio"] <= 0.5, "toy training step >= 2x faster"),
    ("generate 140m 64+128 greedy", lambda r: r["ratio"] >= 2.0, "generation (ours --dtype auto) >= 2x the tokens/s"),
    ("generate 140m 64+128 greedy, both bf16", lambda r: r["ratio"] >= 1.3, "generation in bf16 >= 1.3x the tokens/s"),
    ("attention doc-masked (8 docs) T=4096 fwd+bwd time", lambda r: r["ratio"] <= 0.5,
     "doc-masked attention >= 2x faster at T=4096"),
    ("attention doc-masked (8 docs) memory growth *", lambda r: r["ours"] <= 1.25 * linear_growth(r["name"]),
     "doc-masked attention memory linear in T (growth <= 1.25x the length ratio)"),
    ("loss 140m 2x256 fwd+bwd (*) time", lambda r: r["ratio"] <= 1.1, "chunked loss as fast as naive (within 10%)"),
    ("loss 140m 2x256 fwd+bwd (*) peak memory", lambda r: r["ratio"] <= 0.5,
     "chunked loss <= 1/2 the naive peak memory"),
    ("cuda 140m * compile MFU", lambda r: r["ours"] >= 45, "140m bf16 compiled >= 45% MFU"),
    ("eval * mixed-length prompts: *", lambda r: r["ratio"] >= 4, "batched eval >= 4x the problems/s"),
]


def linear_growth(name):
    lo, hi = name.split("T=")[1].split(" ")[0].split("->")
    return int(hi) / int(lo)


def print_goals(rows):
    for pattern, test, goal in GOALS:
        for r in rows:
            judged = r["ours"] is not None and (r["ratio"] is not None or r["unit"] == "%")  # n/a: not judged
            if fnmatch.fnmatchcase(r["name"], pattern) and judged:
                print(f"goal {'met' if test(r) else 'MISSED'}: {goal} ({r['name']}: ours {fmt(r['ours'])}, "
                      f"reference {fmt(r['reference'])} {r['unit']})")


def section_names(text):
    names = [name for name, _ in sections(None)]
    if not any(w.strip() in name for w in text.split(",") if w.strip() for name in names):
        raise ValueError(f"{text!r} matches no section; sections: {', '.join(names)}")


def length_list(text):
    if not all(n.strip().isdigit() and int(n) > 0 for n in text.split(",")):
        raise ValueError(f"{text!r}: give comma-separated positive integers, e.g. 1024,4096")


def parse_args(argv):
    p = ArgumentParser(description="ours vs the reference implementation: time and memory")
    p.add_argument("--quick", action="store_true", help="one repetition, fewer shapes (~2 minutes on 2 cores)")
    p.add_argument("--only", type=checked(section_names, ValueError, "no-such-section"),
                   help="comma-separated substrings: run the sections whose name contains one "
                                  "(train 140m, train toy, generate 140m, attention, loss, sampler, compile, mixing, cuda)")
    p.add_argument("--json", type=path("file"), help="also write the rows to this file as JSON")
    p.add_argument("--threads", type=number(int, at_least=1), default=torch.get_num_threads(),
                   help="torch CPU threads (default: torch's, here %(default)s)")
    p.add_argument("--reps", type=number(int, at_least=1),
                   help="timed repetitions per side (default 5, 1 with --quick)")
    p.add_argument("--warmup", type=number(int, at_least=0), default=1, help="untimed calls per side first (default 1)")
    p.add_argument("--lengths", type=checked(length_list, ValueError, "0,-1"),
                   help="attention sequence lengths (default 1024,2048,4096; 1024,4096 with --quick)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="ours' dtype in the rows against the float32 reference (auto: bf16 where the CPU has "
                        "AMX / AVX512-BF16); the 'both bf16' rows run both sides in bf16")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of each side")
    p.add_argument("--memory-child", type=checked(json.loads, ValueError, "{"),
                   help=argparse.SUPPRESS)  # internal: one memory measurement process
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    lengths = args.lengths or ("1024,4096" if args.quick else "1024,2048,4096")
    args.lengths = [int(n) for n in lengths.split(",")]
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist; create it or pick another path")
    args.loss_shapes = [workloads.TRAIN_SHAPES["140m"]] + ([] if args.quick else [(2, 1024)])
    args.sampler_docs = 100 if args.quick else 400
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    chosen = sections(args)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [(name, run) for name, run in chosen if any(w in name for w in wanted)]
        if not chosen:
            print(f"error: --only {args.only!r} matches no section; sections: "
                  f"{', '.join(name for name, _ in sections(args))}", file=sys.stderr)
            sys.exit(2)
    keep_freed_memory()  # as train.py and sample.py do on a CPU; both sides share this process
    dtype, why = pick_dtype(args.dtype, torch.device("cpu"))
    args.dtype = str(dtype).removeprefix("torch.")
    print(describe_dtype(dtype, why) + " (ours, CPU rows)")
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"warm-up {args.warmup}, median of {args.reps}")
    rows = []
    for name, run in chosen:
        t0 = time.perf_counter()
        for r in run():
            rows.append(r)
            print(f"  {r['name']}: ours {fmt(r['ours'])} {r['unit']}, reference {fmt(r['reference'])}", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        gc.collect()
    print()
    print_rows(rows)
    print()
    print_goals(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except (ModelError, CheckpointError, data.DataError, TokenizerError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)