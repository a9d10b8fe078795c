"""
Train MobileLLM-R1: pre-training, mid-training with distillation, and SFT (RECIPE section 4),
from a laptop CPU to many GPUs, resumable to the bit.

The laptop toy run (CPU, at most 10 minutes on 2 cores): writes data/toy if missing, pre-trains and fine-tunes the
`toy` model, then reports its accuracy on held-out problems; the model lands in out/toy/:
    python train.py

The paper's stages at 140m on one node of 8 GPUs (RECIPE section 4; the global batch is given in
tokens and gradient accumulation is derived from it; prepare the data with `python data.py prepare`):
    torchrun --standalone --nproc_per_node 8 train.py --size 140m --stage pretrain \
        --data data/pretrain --mixture pretrain-phase1 --out-dir out/140m-pt1
    torchrun --standalone --nproc_per_node 8 train.py --stage pretrain --init-from out/140m-pt1 \
        --data data/pretrain --mixture pretrain-phase2 --out-dir out/140m-pt2
    torchrun --standalone --nproc_per_node 8 train.py --stage midtrain --init-from out/140m-pt2 \
        --teacher Llama-3.1-8B-Instruct --data data/midtrain --mixture midtrain-phase1 --out-dir out/140m-mt1
    torchrun --standalone --nproc_per_node 8 train.py --stage midtrain --init-from out/140m-mt1 \
        --teacher Llama-3.1-8B-Instruct --data data/midtrain --mixture midtrain-phase2 --out-dir out/140m-mt2
    torchrun --standalone --nproc_per_node 8 train.py --stage sft --init-from out/140m-mt2 \
        --data data/sft --mixture general-sft --out-dir out/140m-sft1
    torchrun --standalone --nproc_per_node 8 train.py --stage sft --long-context --init-from out/140m-sft1 \
        --data data/sft --mixture reasoning-sft --out-dir out/140m-sft2
(`--init-from` and `--teacher` also take Hugging Face folders as downloaded: facebook/MobileLLM-R1-140M-base,
meta-llama/Llama-3.1-8B-Instruct.)
Multi-node, as in the paper (16 nodes x 8 GPUs), the same command on every node:
    torchrun --nnodes 16 --nproc_per_node 8 --node-rank $NODE_RANK --master-addr $MASTER_ADDR \
        --master-port 29500 train.py --size 950m --stage pretrain ...
Continue a stopped run (Ctrl-C / SIGTERM save at the next step boundary): the same command + --resume. Also
after a kill, a crash or a full disk: checkpoints are written atomically, a damaged newest one is skipped.
"""

import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import kernels
from checkpoint import (CheckpointError, check_same_run, latest_checkpoint, read_checkpoint, remove_partial_files,
                        save_checkpoint)
from runtime import (ArgumentParser, DeviceError, Logger, Runtime, check_memory, device_name, memory_estimate,
                     describe_dtype, name_or_path, number, path, peak_flops)
from tokenizer import TokenizerError
import sample
import toydata
from model import SIZES, MobileLLM, ModelConfig, ModelError, load_model, model_from_checkpoint

# Table: training recipe per stage (RECIPE section 4). Total batch = 16 nodes x 8 GPUs x BS x seq.
# `sft` is the general SFT row; `sft --long-context` is reasoning SFT (32k context, theta x 8).
# Warmup: an int is steps, a float < 1 a fraction of max_steps (SFT: from --epochs). Pre-training decays to
# 10% of the peak, the later stages to 0. Decay shape (--decay): linear by default, as the official README states
# for every stage; the released pre-training code decays with a cosine. Mid-training publishes no warmup: 0.
STAGE_DEFAULTS = {
    "pretrain": dict(lr=4e-3, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.95, max_steps=500_000,
                     batch_size=16, seq_len=2048, total_batch_tokens=128 * 16 * 2048),
    "midtrain": dict(lr=3.6e-4, warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.1, beta2=0.95, max_steps=50_000,
                     batch_size=4, seq_len=4096, total_batch_tokens=128 * 4 * 4096),
    "sft": dict(lr=5e-6, warmup_steps=0.03, min_lr_ratio=0.0, weight_decay=0.0, beta2=0.999, epochs=2,
                batch_size=4, seq_len=4096, total_batch_tokens=128 * 4 * 4096),
    "sft-reasoning": dict(lr=8e-5, warmup_steps=0.10, min_lr_ratio=0.0, weight_decay=0.0, beta2=0.999, epochs=4,
                          batch_size=8, seq_len=32768, total_batch_tokens=128 * 8 * 32768),
}
# AdamW beta1, eps and clipping, all stages (RECIPE section 4). beta2 is per stage above: the pre-training
# script passes (0.9, 0.95); the SFT scripts pass none, so SFT runs with the Hugging Face default (0.9, 0.999).
BETA1, EPS, GRAD_CLIP = 0.9, 1e-8, 1.0
# Without --eval-data, eval rows come from another seed's stream of the training sources: other rows,
# not unseen documents. A held-out folder (--eval-data) gives a true held-out loss.
EVAL_SEED_OFFSET = 1_000_003

class TrainError(Exception):
    """A problem with the run's settings the user can fix: printed as one line, exit code 2."""


class Diverged(Exception):
    """The loss or gradient became non-finite: stop before the optimizer step, save nothing."""


# -------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    stages = "\n".join(f"  {k}: " + ", ".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}"
                                              for n, v in d.items()) for k, d in STAGE_DEFAULTS.items())
    p = ArgumentParser(description="Train MobileLLM-R1 (no arguments: the laptop toy run).",
                                epilog=f"defaults per --stage (RECIPE section 4; sft-reasoning = sft --long-context):\n"
                                       f"{stages}", formatter_class=argparse.RawDescriptionHelpFormatter)
    count, positive, at_least_0 = number(int, at_least=1), number(float, above=0), number(float, at_least=0)
    model_path = name_or_path(["scratch"], ["ckpt_*.pt", "config.json"],
                                    "a run folder, ckpt_*.pt or Hugging Face folder")
    g = p.add_argument_group("model").add_argument
    g("--size", choices=list(SIZES), help="model size for --init-from scratch: toy, toy-teacher, 140m, 360m, 950m")
    g("--init-from", default="scratch", type=model_path,
      help="scratch, our checkpoint (file or run folder), or a Hugging Face folder")
    g("--long-context", action="store_true", help="reasoning SFT: rope theta x 8 and 32k context (RECIPE section 4)")
    g = p.add_argument_group("data").add_argument
    g("--stage", default="pretrain", choices=["pretrain", "midtrain", "sft"], help="recipe stage (sets defaults)")
    g("--data", type=path("dir"), help="prepared data folder (python data.py prepare / toy)")
    g("--mixture", type=data.mixture_arg, help="preset (e.g. pretrain-phase1), NAME=WEIGHT,... or @FILE (mixing.py)")
    g("--renormalize", action="store_true", help="let a preset use only the sources that are prepared")
    g("--eval-data", type=path("dir"),
      help="held-out data folder for the eval loss (default: --data, another seed's rows)")
    g("--eval-mixture", type=data.mixture_arg, help="mixture of --eval-data (default: --mixture)")
    g("--seq-len", type=count, help="tokens per sequence")
    # The official SFT (sft/sft.py: TRL SFTTrainer, RECIPE section 4.6) trains on every token of the conversation but
    # padding: `all`. Ours, `assistant`, trains only on what the model will write: the assistant's tokens and their
    # <|eot_id|>, not on predicting prompts and headers. Both pack conversations into rows with document masks, so
    # none attends to another and each one's loss is the same as alone in a row (RoPE scores are relative). The
    # eval loss stays on the assistant's tokens, so runs of either setting compare.
    g("--sft-loss", default="assistant", choices=["assistant", "all"],
      help="chat tokens trained on: assistant turns (ours) or the whole conversation (the official SFT)")
    g("--seed", type=number(int, at_least=0), default=0, help="seed for initialisation and the data stream")
    g = p.add_argument_group("schedule and optimizer").add_argument
    g("--max-steps", type=count, help="optimizer steps (default: the stage's, or --epochs for SFT)")
    g("--epochs", type=positive, help="SFT: passes over every source (packed rows), used when --max-steps is not given")
    g("--total-batch-tokens", type=count, help="tokens per optimizer step over all devices")
    g("--lr", type=positive, help="peak learning rate")
    g("--warmup-steps", type=at_least_0, help="warmup: steps, or a fraction of --max-steps when < 1")
    g("--min-lr-ratio", type=number(float, at_least=0, at_most=1), help="final learning rate as a fraction of the peak")
    g("--decay", default="linear", choices=["linear", "cosine"],
      help="decay shape after warmup (the official README says linear; the released code uses cosine)")
    g("--weight-decay", type=at_least_0, help="AdamW weight decay (never applied to norm weights)")
    g("--beta2", type=number(float, at_least=0, below=1),
      help="AdamW beta2 (default per stage: 0.95 pre/mid-training, 0.999 SFT)")
    g = p.add_argument_group("distillation (--stage midtrain)").add_argument
    g("--teacher", type=model_path,
      help="distillation teacher (our checkpoint or Hugging Face folder; same vocabulary)")
    g("--kd-temperature", type=positive, default=1.0, help="distillation temperature (loss scaled by T^2)")
    g("--kd-ce-weight", type=at_least_0, default=0.0, help="weight of plain cross-entropy added to the KD loss")
    g = p.add_argument_group("run folder").add_argument
    g("--out-dir", type=path("new"), help="run folder for checkpoints, log.txt and metrics.jsonl")
    g("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    g("--log-every", type=count, default=10, help="steps between log lines and metrics.jsonl records")
    g("--eval-every", type=number(int, at_least=0), default=0,
      help="steps between held-out eval losses (0: only at the end)")
    g("--eval-batches", type=count, default=8, help="micro-batches per device in each eval")
    g("--save-every", type=count, default=1000, help="steps between checkpoints")
    g("--keep-last", type=count, default=3, help="checkpoints to keep in --out-dir")
    g = p.add_argument_group("performance").add_argument
    g("--device", default="auto", type=device_name, help="auto, cuda, mps or cpu")
    g("--batch-size", type=count, help="sequences per device per micro-step (gradient accumulation fills the rest)")
    g("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="bfloat16: autocast, float32 weights and AdamW; auto: bf16 on CUDA and CPUs with AMX/AVX512-BF16")
    g("--compile", action="store_true", help="torch.compile the model")
    g("--parallel-micro", type=count, default=1,
      help="CPU: micro-batches computed at once, each in a thread with its share of the cores (small models, "
           "where intra-op threads scale poorly: the toy run uses 2); the same gradients as one after another")
    g("--activation-checkpointing", action="store_true", help="recompute each block in backward to save memory")
    g("--force", action="store_true", help="start even when the memory estimate exceeds what the device has")
    args = p.parse_args(argv)
    key = "sft-reasoning" if args.stage == "sft" and args.long_context else args.stage
    for name, value in STAGE_DEFAULTS[key].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.data is None or args.mixture is None or args.out_dir is None:
        raise TrainError("--data, --mixture and --out-dir are required (or `python train.py` alone for the toy run)")
    if args.init_from == "scratch" and args.size is None and not args.resume:
        raise TrainError("--size is required with --init-from scratch (toy, 140m, 360m, 950m)")
    if args.teacher and args.stage != "midtrain":
        raise TrainError("--teacher is for --stage midtrain (distillation)")
    return args


# -------------------------------------------------------------------------------------------------
# Signals, the schedule, the metrics log

STOP = {"signal": None}  # set by the signal handler, read at each step boundary


def request_stop(signum, frame):
    STOP["signal"] = signum


def lr_at(step, args):
    """Linear warmup to the peak, then linear or cosine decay to min_lr_ratio * peak at max_steps."""
    warmup = round(args.warmup_steps * args.max_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.max_steps - warmup))
    shape = 1 - progress if args.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * shape)


def record_step(line):
    """The step of a metrics.jsonl line; a partial line (the run was killed writing it) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# -------------------------------------------------------------------------------------------------
# Model, loss, evaluation

def build_model(args, rt, tokenizer):
    """The student: from scratch, our checkpoint or a Hugging Face folder; --long-context applied."""
    if args.init_from == "scratch":
        torch.manual_seed(args.seed)
        model = MobileLLM(ModelConfig.from_size(args.size, long_context=args.long_context))
    else:
        model, init_tokenizer, meta = load_model(args.init_from)
        if meta["format"] == "ours" and init_tokenizer != tokenizer:
            raise TrainError(f"--init-from {args.init_from} was trained with tokenizer {init_tokenizer!r} but "
                             f"--data {args.data} uses {tokenizer!r}: prepare the data with the model's tokenizer")
        if args.long_context and model.config.long_context() != model.config:
            extended = MobileLLM(model.config.long_context())  # theta x 8, 32k (RECIPE section 4)
            extended.load_state_dict(model.state_dict())  # rope tables are buffers outside the state dict
            model = extended
    if args.seq_len > model.config.max_seq_len:
        raise TrainError(f"--seq-len {args.seq_len} exceeds the model's context {model.config.max_seq_len}"
                         " (--long-context extends it for reasoning SFT)")
    if args.activation_checkpointing:
        model.gradient_checkpointing = True
    return model.to(rt.device)


def load_teacher(args, rt, student, data_tokenizer):
    # Inference only, in the run's dtype (bf16: read straight into it, so an 8B Llama-3.1 teacher, RECIPE
    # section 4.5, takes its 16 GB once), no grads, kept out of the optimizer, DDP and the checkpoint.
    teacher, tokenizer, meta = load_model(args.teacher, rt.device, rt.dtype)
    if meta["format"] == "ours" and tokenizer != data_tokenizer:
        raise TrainError(f"--teacher {args.teacher} was trained with tokenizer {tokenizer!r} but --data {args.data} "
                         f"uses {data_tokenizer!r}: distil on data of the teacher's tokenizer")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise TrainError(f"--teacher {args.teacher} has a vocabulary of {teacher.config.vocab_size}, the "
                         f"student {student.config.vocab_size}: logit distillation needs the same tokenizer")
    # A teacher asked about positions it never trained on answers badly, and the student learns that:
    # at toy scale, a teacher trained on 256-token rows had loss 0.83 at positions 257-512 (0.24
    # before) and distilling from it at 512 made the student worse than plain cross-entropy.
    trained = (meta.get("args") or {}).get("seq_len") or teacher.config.max_seq_len
    if args.seq_len > trained and rt.master:
        print(f"warning: --teacher {args.teacher} was trained on {trained}-token rows, --seq-len is "
              f"{args.seq_len}: it has never seen the later positions; distil at --seq-len {trained} or "
              "use a teacher trained on longer rows", file=sys.stderr)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def micro_step_loss(runner, x, y, doc_ids, distilling):
    """Summed loss of one micro-batch and its (ce, kd) parts for the log (kd is 0 without a teacher)."""
    if distilling:
        return runner(x, y, doc_ids)
    _, loss = runner(x, y, doc_ids=doc_ids, return_logits=False, loss_reduction="sum")
    return loss, loss.detach(), torch.zeros_like(loss.detach())


def to_device(batch, device):
    return [None if t is None else t.to(device, non_blocking=True) for t in batch]


@torch.no_grad()
def eval_loss(rt, model, sampler, start_state, n_batches):
    """Mean cross-entropy over the same held-out rows every time (the eval stream is rewound)."""
    model.eval()
    sampler.load_state_dict(start_state)
    total = torch.zeros(2, device=rt.device)
    for _ in range(n_batches):
        x, y, doc_ids = to_device(sampler.next_batch(), rt.device)
        with rt.autocast():
            _, loss = model(x, y, doc_ids=doc_ids, return_logits=False, loss_reduction="sum")
        total += torch.stack([loss.float(), (y != -100).sum().float()])
    model.train()
    total = rt.all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


# -------------------------------------------------------------------------------------------------
# The training loop

def log_header(log, args, rt, model, teacher, accum, step):
    """Top of log.txt: what runs, with which software, on what, and whether it fits in memory."""
    mem = memory_estimate(model, args, rt.device.type, teacher)
    hw = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or platform.machine()
    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume at step %d' % step if step else 'start'}")
    log(f"command: {' '.join(sys.argv)}")
    log("args: " + json.dumps(vars(args), sort_keys=True))
    log("model: " + json.dumps(asdict(model.config)))
    log(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    log(f"hardware: {rt.world_size} x {rt.device.type} ({hw}), {os.cpu_count()} CPUs, {platform.platform()}")
    log(describe_dtype(rt.dtype, rt.dtype_reason))
    log(f"params {model.num_params():,} | tokens/step {args.total_batch_tokens:,} = {args.batch_size} seq x "
        f"{args.seq_len} x {rt.world_size} proc x {accum} accum | steps {args.max_steps:,} | memory/device est. "
        + " + ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()) / 2**30:.2f} GiB")


def setup_run(args, rt):
    """Everything a stage needs before its first step, from scratch or from the run's checkpoint:
    a namespace with samplers, model, teacher, optimizer, the module DDP wraps, step and logger."""
    out_dir = Path(args.out_dir)
    accum, rem = divmod(args.total_batch_tokens, args.batch_size * args.seq_len * rt.world_size)
    if rem or accum == 0:
        raise TrainError(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of --batch-size "
                         f"{args.batch_size} x --seq-len {args.seq_len} x {rt.world_size} processes: "
                         "pick values that divide it")
    if args.parallel_micro > 1 and (rt.device.type != "cpu" or rt.ddp or args.compile):
        raise TrainError("--parallel-micro is for one eager CPU process (no CUDA/MPS, torchrun or --compile): "
                         "drop it, or use --batch-size to fill the device")
    sampler = data.MixtureSampler(args.data, args.mixture, args.seq_len, args.batch_size, rank=rt.rank,
                                  world_size=rt.world_size, seed=args.seed, renormalize=args.renormalize,
                                  epochs=args.epochs if args.max_steps is None else None, sft_loss=args.sft_loss)
    eval_sampler = data.MixtureSampler(args.eval_data or args.data, args.eval_mixture or args.mixture,
                                       args.seq_len, args.batch_size, rank=rt.rank, world_size=rt.world_size,
                                       seed=args.seed + EVAL_SEED_OFFSET, renormalize=args.renormalize)
    if args.max_steps is None:  # SFT: --epochs of every source, in packed rows (RECIPE section 4.1: 2 or 4)
        args.max_steps = math.ceil(sum(sampler.epoch_rows) * args.seq_len / args.total_batch_tokens)
    ckpt = None
    if args.resume:
        if latest_checkpoint(out_dir) is None:
            raise TrainError(f"--resume: no checkpoint in {out_dir}; drop --resume to start the run")
        ckpt, ckpt_file = read_checkpoint(out_dir, set_aside=rt.master)  # a damaged newest one: skipped, named
        check_same_run(ckpt["args"], args)
    elif latest_checkpoint(out_dir) is not None:
        raise TrainError(f"{out_dir} already holds a run: add --resume to continue it, or choose another "
                         "--out-dir (or delete it)")
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(out_dir)  # of a save that was killed midway
        if ckpt is None:  # records of an earlier start that was killed before its first checkpoint
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)

    if ckpt is not None:
        model = model_from_checkpoint(ckpt, ckpt_file)
        model.gradient_checkpointing = args.activation_checkpointing
        model.to(rt.device)
    else:
        model = build_model(args, rt, sampler.tokenizer)
    hf_init = ckpt is None and (Path(args.init_from) / "config.json").is_file()  # its tokenizer: not by name
    if sampler.vocab_size > model.config.vocab_size or hf_init and sampler.vocab_size != model.config.vocab_size:
        raise TrainError(f"--data {args.data} uses tokenizer {sampler.tokenizer!r} ({sampler.vocab_size} tokens), "
                         f"the model has {model.config.vocab_size}: prepare the data with the model's tokenizer")
    teacher = load_teacher(args, rt, model, sampler.tokenizer) if args.teacher else None
    check_memory(args, rt, model, teacher)
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, (BETA1, args.beta2), EPS, rt.device.type)
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        # The global row stream does not depend on the number of processes, so a run may resume on
        # another number (bit-exactness then only up to summation order); RNG states are per rank.
        rt.set_rng_states(ckpt["rng"])
        step = ckpt["step"]
        if rt.master:  # forget log records past the checkpoint: they are about to be redone
            metrics = out_dir / "metrics.jsonl"
            if metrics.exists():  # a run killed mid-line leaves a partial last record: dropped too
                keep = [line for line in metrics.read_text().splitlines() if record_step(line) <= step]
                metrics.with_suffix(".tmp").write_text("".join(line + "\n" for line in keep))
                os.replace(metrics.with_suffix(".tmp"), metrics)
        del ckpt

    runner = kernels.DistillationLoss(model, teacher, args.kd_temperature, args.kd_ce_weight) if teacher else model
    if args.compile:
        runner = torch.compile(runner)
    if rt.ddp:
        runner = DDP(runner, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    log = Logger(rt, out_dir)
    log_header(log, args, rt, model, teacher, accum, step)
    pool, workers = None, min(args.parallel_micro, accum, torch.get_num_threads())
    if workers > 1:  # each thread's ops run on its own share of the intra-op threads
        intra = torch.get_num_threads() // workers
        pool = ThreadPoolExecutor(workers, thread_name_prefix="micro", initializer=torch.set_num_threads,
                                  initargs=(intra,))
        log(f"micro-batches: {workers} at a time, {intra} intra-op thread{'s' if intra > 1 else ''} each")
    if sampler.epoch_rows:  # --epochs: the packed rows that serve every source E times, and the steps they take
        log(f"--epochs {args.epochs:g}: {sum(sampler.epoch_rows):,} rows in {args.max_steps:,} steps; rows per source: "
            + ", ".join(f"{name} {rows:,}" for name, rows in zip(sampler.names, sampler.epoch_rows)))
    return SimpleNamespace(sampler=sampler, eval_sampler=eval_sampler, eval_start=eval_sampler.state_dict(),
                           model=model, teacher=teacher, optimizer=optimizer, runner=runner, accum=accum,
                           pool=pool, step=step, log=log, out_dir=out_dir)


def train_step(run, args, rt, lr):
    """One optimizer step over accum micro-batches; returns (loss, ce, kd, supervised tokens, grad norm)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [run.sampler.next_batch() for _ in range(run.accum)]
    # The loss is a mean over every supervised token of the global batch, whatever the split of
    # rows over micro-steps and ranks: count them all first (torchtitan does the same).
    n_sup = rt.all_sum(torch.tensor(float(sum((b[1] != -100).sum() for b in batches)), device=rt.device))
    n_sup = n_sup.clamp(min=1)
    scale = rt.world_size / n_sup  # DDP averages gradients over ranks: undo it
    if run.pool is not None:
        sums = parallel_micro_steps(run, rt, batches, scale)
    else:
        sums = torch.zeros(3, device=rt.device)  # loss, ce, kd
        for i, batch in enumerate(batches):
            x, y, doc_ids = to_device(batch, rt.device)
            sync = not rt.ddp or i == run.accum - 1  # reduce gradients once per step, not per micro-step
            with nullcontext() if sync else run.runner.no_sync():
                with rt.autocast():
                    loss, ce, kd = micro_step_loss(run.runner, x, y, doc_ids, run.teacher is not None)
                (loss * scale).backward()
            sums += torch.stack([loss.detach().float(), ce.float(), kd.float()])
    loss, ce, kd = (rt.all_sum(sums) / n_sup).tolist()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), GRAD_CLIP).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"loss {loss} / grad norm {grad_norm} at step {run.step + 1}, before the optimizer "
                       f"step; the last good checkpoint is {latest_checkpoint(run.out_dir)}: lower --lr and "
                       "start again from it (--init-from) or resume")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss, ce, kd, int(n_sup.item()), grad_norm


def parallel_micro_steps(run, rt, batches, scale):
    """--parallel-micro: the micro-batches' forward and backward in run.pool's threads at once (autograd
    runs a CPU backward in the thread that calls it, and autocast is per thread). Each returns its own
    gradients, summed here in micro-batch order, as .backward() one after another would accumulate them."""
    params = [p for p in run.model.parameters() if p.requires_grad]

    def micro(batch):
        x, y, doc_ids = to_device(batch, rt.device)
        with rt.autocast():
            loss, ce, kd = micro_step_loss(run.runner, x, y, doc_ids, run.teacher is not None)
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
        return grads, torch.stack([loss.detach().float(), ce.float(), kd.float()])

    sums = torch.zeros(3, device=rt.device)  # loss, ce, kd
    for grads, micro_sums in run.pool.map(micro, batches):
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        sums += micro_sums
    return sums


def log_step(run, args, rt, metrics, lr, dt, eta):
    """One log line and one metrics.jsonl record, with the held-out eval loss when it is due."""
    loss, ce, kd, n_sup, grad_norm = metrics
    tok_s = args.total_batch_tokens / dt
    peak = peak_flops(rt.device)
    flops = run.model.estimate_flops_per_token(args.seq_len) * args.total_batch_tokens
    mfu = f"{flops / dt / rt.world_size / peak:.1%}" if peak else "n/a"
    epochs = {k: round(float(v), 6) for k, v in run.sampler.epochs().items()}
    record = {"step": run.step, "loss": loss, "lr": lr, "tokens": run.step * args.total_batch_tokens,
              "supervised_tokens": n_sup, "grad_norm": grad_norm, "dt": dt, "tok_per_s": tok_s, "mfu": mfu,
              "served": run.sampler.served, "epochs": epochs}
    if run.teacher is not None:
        record.update(kd=kd, ce=ce)
    if run.step == args.max_steps or (args.eval_every and run.step % args.eval_every == 0):
        record["eval_loss"] = eval_loss(rt, run.model, run.eval_sampler, run.eval_start, args.eval_batches)
    run.log(f"step {run.step}/{args.max_steps} | loss {loss:.4f}"
            + (f" (kd {kd:.4f} ce {ce:.4f})" if run.teacher is not None else "")
            + (f" | eval {record['eval_loss']:.4f}" if "eval_loss" in record else "")
            + f" | lr {lr:.2e} | norm {grad_norm:.2f} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s | mfu {mfu}"
            + " | epochs " + " ".join(f"{k}:{v:.3g}" for k, v in epochs.items())
            + f" | eta {eta / 60:.1f} min")
    if rt.master:
        with open(run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def stop_requested(rt):
    """Ctrl-C / SIGTERM seen on any rank (all ranks must stop at the same step)."""
    return rt.all_sum(torch.tensor(float(STOP["signal"] is not None), device=rt.device)).item() > 0


def train(args, rt):
    """Run one stage as the args describe; returns the last metrics record, with "stopped" added."""
    run = setup_run(args, rt)
    bar = tqdm(total=args.max_steps, initial=run.step, disable=not rt.master or None, dynamic_ncols=True)
    run.log.bar = bar
    record, t0, dt_avg = {}, time.time(), None
    while run.step < args.max_steps:
        lr = lr_at(run.step, args)
        metrics = train_step(run, args, rt, lr)
        dt, t0 = time.time() - t0, time.time()
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
        bar.set_postfix_str(f"loss {metrics[0]:.4f} lr {lr:.2e} {args.total_batch_tokens / dt:,.0f} tok/s",
                            refresh=False)
        bar.update(1)
        last = run.step == args.max_steps
        if last or run.step % args.log_every == 0 or (args.eval_every and run.step % args.eval_every == 0):
            record = log_step(run, args, rt, metrics, lr, dt, dt_avg * (args.max_steps - run.step))
        stop = stop_requested(rt)
        if last or stop or run.step % args.save_every == 0:
            save_checkpoint(rt, args, run.model, run.optimizer, run.sampler, run.step)
        if stop:
            run.log(f"stopped by signal at step {run.step}; checkpoint saved: continue with the same command + --resume")
            break
    bar.close()
    run.log.bar = None
    if run.pool is not None:
        run.pool.shutdown()
    return dict(record, stopped=run.step < args.max_steps)


# -------------------------------------------------------------------------------------------------
# The embedded default and the entry point

def run_toy(rt):
    """`python train.py`: toy data, pre-training, SFT, then held-out accuracy via sample.py."""
    t_start = time.time()
    data_dir, out = Path(toydata.TOY_RUN["data"]), Path(toydata.TOY_RUN["out_dir"])
    if latest_checkpoint(out) or latest_checkpoint(out / "pretrain"):
        raise TrainError(f"{out} holds an earlier toy run: try it with `python sample.py`, or delete it "
                         f"(rm -r {out}) to train again")
    if rt.master:
        toydata.write_toy(str(data_dir))  # `python data.py toy`; does nothing when the corpus is there
    if rt.ddp:
        dist.barrier()
    # On a CPU the two micro-batches of a pre-training step run at once, a core each (the same numbers,
    # ~17% faster); an SFT step is one micro-batch.
    cpu = dict(parallel_micro=toydata.TOY_RUN["parallel_micro"]) if rt.device.type == "cpu" and not rt.ddp else {}
    stages = [("pretrain", dict(out_dir=out / "pretrain", **cpu)),
              ("sft", dict(out_dir=out, init_from=out / "pretrain"))]
    for stage, extra in stages:
        flags = toydata.toy_flags(stage, **extra)
        if rt.master:
            print(f"\n== python train.py {' '.join(flags)}")
        if train(parse_args(flags), rt)["stopped"]:
            return
    if not rt.master:
        return
    print(f"\ntoy training done in {(time.time() - t_start) / 60:.1f} min; model in {out}/")
    # Scored exactly as `python sample.py --eval N` scores it: --protocol ours, graded by grading.grade.
    flags = ["--ckpt", out, "--eval", toydata.TOY_RUN["eval_problems"], "--eval-file", data_dir / "eval.jsonl",
             "--max-new-tokens", toydata.TOY_RUN["max_new_tokens"], "--device", str(rt.device),
             "--dtype", str(rt.dtype).removeprefix("torch.")]
    print(f"== python sample.py {' '.join(map(str, flags))}")
    sample.main([str(f) for f in flags])


# How gloo and NCCL report a peer that is gone: torch raises them as RuntimeError, not always as DistError.
PEER_LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|socket timeout|timed out|gloo|nccl", re.I)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    STOP["signal"] = None
    # Ctrl-C / SIGTERM (a scheduler's preemption) only raise a flag: the loop saves at the next step
    # boundary and exits cleanly.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not argv:
            run_toy(Runtime())
        else:
            args = parse_args(argv)
            train(args, Runtime(args.device, args.dtype))
        if dist.is_initialized():
            # every rank done (rank 0 may still be writing the last checkpoint) before the process group
            # goes: a rank tearing gloo down while its peer is mid-collective can abort (SIGABRT)
            dist.barrier()
    except (ModelError, CheckpointError, data.DataError, TokenizerError, DeviceError, TrainError) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank fails alike: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk is full, a folder is not writable, ...: the environment, not a bug
        where = f"{e.filename}: {e.strerror}" if e.filename else f"{e}: is the disk full?"
        print(f"error: {where}; fix that and continue with --resume", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # a peer process died (killed, out of memory) or cannot be reached
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or PEER_LOST.search(str(e)))):
            raise  # a bug
        reason = re.sub(r"^\[[^]]*\] ", "", str(e).strip().splitlines()[0]).split(". ")[0][:120]
        print(f"error: rank {os.environ.get('RANK')}: another process of this torchrun job is gone ({reason}); "
              "stopping. The checkpoints in --out-dir are complete: continue with the same command + --resume",
              file=sys.stderr)
        sys.exit(1)
    except Diverged as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
