"""
Train MobileLLM-R1: pre-training, mid-training with distillation, and SFT (shared/RECIPE.md section 4),
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
        --teacher TEACHER_DIR --data data/midtrain --mixture midtrain-phase1 --out-dir out/140m-mt1
    torchrun --standalone --nproc_per_node 8 train.py --stage sft --init-from out/140m-mt2 \
        --data data/sft --mixture tulu3=1 --out-dir out/140m-sft1
    torchrun --standalone --nproc_per_node 8 train.py --stage sft --long-context --init-from out/140m-sft1 \
        --data data/sft --mixture reasoning=1 --out-dir out/140m-sft2
(`--init-from` also takes a Hugging Face folder, e.g. facebook/MobileLLM-R1-140M-base as downloaded.)
Multi-node, as in the paper (16 nodes x 8 GPUs), the same command on every node:
    torchrun --nnodes 16 --nproc_per_node 8 --node-rank $NODE_RANK --master-addr $MASTER_ADDR \
        --master-port 29500 train.py --size 950m --stage pretrain ...
Continue a stopped run (Ctrl-C / SIGTERM save at the next step boundary): the same command + --resume.
"""

import argparse
import json
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import kernels
from tokenizer import TokenizerError
import sample
import toydata
from model import (MobileLLM, ModelConfig, ModelError, latest_checkpoint, load_model, model_from_checkpoint,
                   read_checkpoint)

# -------------------------------------------------------------------------------------------------
# The embedded laptop run (`python train.py`): pre-train, then SFT, then held-out accuracy.
# Each stage dict is exactly a set of command-line flags (printed in the log, so it can be re-run).
TOY_DEFAULTS = {
    "data": "data/toy", "out_dir": "out/toy", "eval_problems": 400, "max_new_tokens": 400,
    # ~4.5M tokens of worked problems (about one epoch of toy-traces), then ~1,800 conversations.
    # The eval loss: the 400 held-out problems, worked (toy-heldout, ~174 rows: 11 batches of 16).
    "pretrain": dict(size="toy", stage="pretrain", mixture="toy", max_steps=1100, batch_size=16,
                     seq_len=256, total_batch_tokens=16 * 256, lr=3e-3, warmup_steps=50,
                     eval_every=500, log_every=50, save_every=500, eval_mixture="toy-heldout=1", eval_batches=11),
    # SFT rows pack whole conversations (up to ~300 tokens each) into 512 tokens. The eval loss: the
    # assistant tokens of the held-out problems as conversations (toy-heldout-sft, ~200 rows).
    "sft": dict(stage="sft", mixture="toy-sft=1", max_steps=100, batch_size=8, seq_len=512,
                total_batch_tokens=8 * 512, lr=1e-3, warmup_steps=10, eval_every=100,
                log_every=20, save_every=100, eval_mixture="toy-heldout-sft=1", eval_batches=25),
}

# Table: training recipe per stage (RECIPE section 4). Total batch = 16 nodes x 8 GPUs x BS x seq.
# `sft` is the general SFT row; `sft --long-context` is reasoning SFT (32k context, theta x 8).
# Warmup: an int is steps, a float < 1 a fraction of max_steps. Pre-training decays to 10% of the
# peak, the later stages to 0. Decay shape (--decay): linear by default, as the official README
# states for every stage; the released pre-training code decays with a cosine (--decay cosine).
# Mid-training publishes no warmup: 0.
STAGE_DEFAULTS = {
    "pretrain": dict(lr=4e-3, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, max_steps=500_000,
                     batch_size=16, seq_len=2048, total_batch_tokens=128 * 16 * 2048),
    "midtrain": dict(lr=3.6e-4, warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.1, max_steps=50_000,
                     batch_size=4, seq_len=4096, total_batch_tokens=128 * 4 * 4096),
    "sft": dict(lr=5e-6, warmup_steps=0.03, min_lr_ratio=0.0, weight_decay=0.0, epochs=2,
                batch_size=4, seq_len=4096, total_batch_tokens=128 * 4 * 4096),
    "sft-reasoning": dict(lr=8e-5, warmup_steps=0.10, min_lr_ratio=0.0, weight_decay=0.0, epochs=4,
                          batch_size=8, seq_len=32768, total_batch_tokens=128 * 8 * 32768),
}
BETAS, EPS, GRAD_CLIP = (0.9, 0.95), 1e-8, 1.0  # AdamW and clipping, all stages (RECIPE section 4)
# Without --eval-data, eval rows come from another seed's stream of the training sources: other rows,
# not unseen documents. A held-out folder (--eval-data) gives a true held-out loss.
EVAL_SEED_OFFSET = 1_000_003

# Peak dense bf16 FLOP/s per device, for MFU. First matching substring of the device name wins;
# an unknown device shows MFU as n/a rather than a wrong number.
PEAK_FLOPS = [("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("H800", 989e12), ("H20", 148e12), ("GH200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("MI300X", 1307e12), ("MI250X", 383e12)]


class TrainError(Exception):
    """A problem with the run's settings the user can fix: printed as one line, exit code 2."""


class Diverged(Exception):
    """The loss or gradient became non-finite: stop before the optimizer step, save nothing."""


# -------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    stages = "\n".join(f"  {k}: " + ", ".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}"
                                              for n, v in d.items()) for k, d in STAGE_DEFAULTS.items())
    p = argparse.ArgumentParser(description="Train MobileLLM-R1 (no arguments: the laptop toy run).",
                                epilog=f"defaults per --stage (RECIPE section 4; sft-reasoning = sft --long-context):\n"
                                       f"{stages}", formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--size", help="model size for --init-from scratch: toy, toy-teacher, 140m, 360m, 950m")
    a("--stage", default="pretrain", choices=["pretrain", "midtrain", "sft"], help="recipe stage (sets defaults)")
    a("--data", help="prepared data folder (python data.py prepare / toy)")
    a("--mixture", help="preset name (e.g. pretrain-phase1) or NAME=WEIGHT,... pairs")
    a("--renormalize", action="store_true", help="let a preset use only the sources that are prepared")
    a("--eval-data", help="held-out data folder for the eval loss (default: --data, another seed's rows)")
    a("--eval-mixture", help="mixture of --eval-data (default: --mixture)")
    a("--init-from", default="scratch", help="scratch, our checkpoint (file or run folder), or a Hugging Face folder")
    a("--teacher", help="distillation teacher (our checkpoint or Hugging Face folder; same vocabulary)")
    a("--kd-temperature", type=float, default=1.0, help="distillation temperature (loss scaled by T^2)")
    a("--kd-ce-weight", type=float, default=0.0, help="weight of plain cross-entropy added to the KD loss")
    a("--out-dir", help="run folder for checkpoints, log.txt and metrics.jsonl")
    a("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    a("--max-steps", type=int, help="optimizer steps (default: the stage's, or --epochs for SFT)")
    a("--epochs", type=float, help="SFT only: passes over the data, used when --max-steps is not given")
    a("--batch-size", type=int, help="sequences per device per micro-step")
    a("--total-batch-tokens", type=int, help="tokens per optimizer step over all devices")
    a("--seq-len", type=int, help="tokens per sequence")
    a("--long-context", action="store_true", help="reasoning SFT: rope theta x 8 and 32k context")
    a("--lr", type=float, help="peak learning rate")
    a("--warmup-steps", type=float, help="warmup: steps, or a fraction of --max-steps when < 1")
    a("--min-lr-ratio", type=float, help="final learning rate as a fraction of the peak")
    a("--decay", default="linear", choices=["linear", "cosine"],
      help="decay shape after warmup (the official README says linear; the released code uses cosine)")
    a("--weight-decay", type=float, help="AdamW weight decay (never applied to norm weights)")
    a("--device", default="auto", help="auto, cuda, mps or cpu")
    a("--seed", type=int, default=0, help="seed for initialisation and the data stream")
    a("--log-every", type=int, default=10, help="steps between log lines and metrics.jsonl records")
    a("--eval-every", type=int, default=0, help="steps between held-out eval losses (0: only at the end)")
    a("--eval-batches", type=int, default=8, help="micro-batches per device in each eval")
    a("--save-every", type=int, default=1000, help="steps between checkpoints")
    a("--keep-last", type=int, default=3, help="checkpoints to keep in --out-dir")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward to save memory")
    args = p.parse_args(argv)
    key = "sft-reasoning" if args.stage == "sft" and args.long_context else args.stage
    for name, value in STAGE_DEFAULTS[key].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.data is None or args.out_dir is None:
        raise TrainError("--data and --out-dir are required (or run `python train.py` alone for the toy run)")
    if args.init_from == "scratch" and args.size is None and not args.resume:
        raise TrainError("--size is required with --init-from scratch (toy, 140m, 360m, 950m)")
    if args.teacher and args.stage != "midtrain":
        raise TrainError("--teacher is for --stage midtrain (distillation)")
    for name in ("max_steps", "batch_size", "total_batch_tokens", "seq_len", "log_every", "save_every",
                 "keep_last", "eval_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# Flags that may differ when resuming: they change how the run executes, not what it computes.
RESUMABLE = {"resume", "out_dir", "device", "compile", "activation_checkpointing", "batch_size",
             "log_every", "eval_every", "eval_batches", "save_every", "keep_last", "init_from"}


# -------------------------------------------------------------------------------------------------
# Devices, processes, logging

class Runtime:
    """Where this process runs: device, rank and world size (torchrun sets RANK / WORLD_SIZE)."""

    def __init__(self, device="auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device == "cuda" and self.ddp:
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        if device.startswith("cuda"):
            # The loss kernels multiply hidden states by the 128k-row embedding in float32: let that
            # (and any other float32 matmul) use TF32 tensor cores.
            torch.set_float32_matmul_precision("high")
        self.device = torch.device(device)
        if self.ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def autocast(self):
        # bf16 autocast on CUDA (weights and optimizer stay float32); float32 elsewhere.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def all_sum(self, tensor):
        if self.ddp:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj):
        """A list with every rank's obj (rank order); [obj] without DDP."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class Logger:
    """Rank 0 prints (above the progress bar) and appends to out_dir/log.txt; other ranks stay quiet."""

    def __init__(self, rt, out_dir):
        self.rt, self.path, self.bar = rt, Path(out_dir) / "log.txt", None

    def __call__(self, msg):
        if not self.rt.master:
            return
        (self.bar.write if self.bar is not None else print)(msg)
        sys.stdout.flush()  # a line per step also when stdout is a file or a pipe (nohup, tee)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


STOP = {"signal": None}  # set by the signal handler, read at each step boundary


def request_stop(signum, frame):
    STOP["signal"] = signum


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def lr_at(step, args):
    """Linear warmup to the peak, then linear or cosine decay to min_lr_ratio * peak at max_steps."""
    warmup = round(args.warmup_steps * args.max_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.max_steps - warmup))
    shape = 1 - progress if args.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * shape)


def memory_estimate(model, args, device_type, teacher=None):
    """Rough bytes per device: float32 weights and grads, AdamW's two moments, a teacher's weights, and
    the activations kept for backward: 10 d_model + 4 ffn values per token per layer (measured with
    saved_tensors_hooks on CPU in float32: within 7% for toy and 140m), counted at 2 bytes under bf16
    autocast (a lower bound: the norms keep float32 copies); with --activation-checkpointing, the
    block inputs plus one block."""
    n, c = model.num_params(), model.config
    act_bytes = 2 if device_type == "cuda" else 4
    tokens = args.batch_size * args.seq_len
    per_layer = tokens * (10 * c.d_model + 4 * c.ffn_dim) * act_bytes
    acts = (tokens * c.d_model * act_bytes * c.n_layer + per_layer) if args.activation_checkpointing \
        else per_layer * c.n_layer
    parts = {"weights": 4 * n, "grads": 4 * n, "adamw": 8 * n, "activations": acts}
    if teacher is not None:
        parts["teacher"] = teacher.num_params() * (2 if device_type == "cuda" else 4)
    return parts


# -------------------------------------------------------------------------------------------------
# Checkpoints: run_dir/ckpt_{step:07d}.pt, written atomically, last K kept

def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(rt, args, model, optimizer, sampler, step):
    """Rank 0 writes the file, with every rank's RNG states. The sampler's state is the same on all
    ranks (each does the bookkeeping of the whole global stream), so rank 0's is enough."""
    rngs = rt.gather(rng_state())
    if not rt.master:
        return
    ckpt = {"model": model.state_dict(), "config": asdict(model.config), "optimizer": optimizer.state_dict(),
            "step": step, "sampler": sampler.state_dict(), "rng": rngs, "args": vars(args),
            "tokenizer": sampler.tokenizer, "stage": args.stage}
    path = Path(args.out_dir) / f"ckpt_{step:07d}.pt"
    torch.save(ckpt, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # a crash mid-write never leaves a truncated ckpt_*.pt
    for old in sorted(Path(args.out_dir).glob("ckpt_*.pt"))[:-args.keep_last]:
        old.unlink()


def check_same_run(saved, args):
    for k, v in vars(args).items():
        if k not in RESUMABLE and saved.get(k) != v:
            flag = "--" + k.replace("_", "-")
            raise TrainError(f"--resume: {args.out_dir} was trained with {flag} {saved.get(k)}, now {v}; "
                             "resume with the same settings or use another --out-dir")


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
        # Reasoning SFT extends the context by multiplying rope theta by 8 (RECIPE section 4); the
        # numbers come from ModelConfig.from_size. A model already at the long context (a released
        # post-trained checkpoint, or our own reasoning SFT) is left as it is.
        base, long = ModelConfig.from_size("140m"), ModelConfig.from_size("140m", long_context=True)
        if args.long_context and model.config.max_seq_len < long.max_seq_len:
            config = ModelConfig(**dict(asdict(model.config), max_seq_len=long.max_seq_len,
                                        rope_theta=model.config.rope_theta * long.rope_theta / base.rope_theta))
            extended = MobileLLM(config)
            extended.load_state_dict(model.state_dict())  # rope tables are buffers outside the state dict
            model = extended
    if args.seq_len > model.config.max_seq_len:
        raise TrainError(f"--seq-len {args.seq_len} exceeds the model's context {model.config.max_seq_len}"
                         " (--long-context extends it for reasoning SFT)")
    if args.activation_checkpointing:
        model.gradient_checkpointing = True
    return model.to(rt.device)


def load_teacher(args, rt, student):
    # Inference only: bf16 on CUDA, read straight into that dtype on the device (an 8B Llama-3.1 teacher,
    # RECIPE section 4, takes its 16 GB once), no grads, kept out of the optimizer, DDP and the checkpoint.
    dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    teacher, _, meta = load_model(args.teacher, rt.device, dtype)
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


class TrainLoss(nn.Module):
    """What DDP wraps: one micro-batch in, its summed loss out (mean taken over the global count of
    supervised tokens by the caller). Without a teacher: cross-entropy. With one (mid-training,
    RECIPE section 4): KL(teacher || student) at every supervised position, computed chunk by chunk,
    plus kd_ce_weight x cross-entropy. The paper publishes neither the temperature nor any CE mixing:
    defaults T = 1 and pure distillation, as the official README describes."""

    def __init__(self, model, teacher=None, temperature=1.0, ce_weight=0.0):
        super().__init__()
        self.model = model
        self.teacher = [teacher]  # in a list: not a submodule, so not in parameters() or state_dict()
        self.temperature, self.ce_weight = temperature, ce_weight

    def forward(self, x, y, doc_ids=None):
        teacher = self.teacher[0]
        if teacher is None:
            _, loss = self.model(x, y, doc_ids=doc_ids, return_logits=False, loss_reduction="sum")
            return loss, loss.detach(), torch.zeros_like(loss)
        h = self.model.forward_hidden(x, doc_ids)
        w = self.model.lm_head_weight
        with torch.no_grad():
            t_h = teacher.forward_hidden(x, doc_ids)
        kd = kernels.distill_loss(h, w, t_h, teacher.lm_head_weight, mask=y != -100,
                                  temperature=self.temperature, reduction="sum")
        with torch.no_grad() if self.ce_weight == 0 else nullcontext():
            ce = kernels.linear_cross_entropy(h, w, y, reduction="sum")  # logged even when not trained on
        loss = kd + self.ce_weight * ce if self.ce_weight else kd
        return loss, ce.detach(), kd.detach()


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
    log(f"params {model.num_params():,} | tokens/step {args.total_batch_tokens:,} = {args.batch_size} seq x "
        f"{args.seq_len} x {rt.world_size} proc x {accum} accum | steps {args.max_steps:,} | memory/device est. "
        + " + ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()) / 2**30:.2f} GiB")


def train(args, rt):
    """Run one stage as the args describe; returns the last metrics record, with "stopped" added."""
    out_dir = Path(args.out_dir)
    accum, rem = divmod(args.total_batch_tokens, args.batch_size * args.seq_len * rt.world_size)
    if rem or accum == 0:
        raise TrainError(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of --batch-size "
                         f"{args.batch_size} x --seq-len {args.seq_len} x {rt.world_size} processes: "
                         "pick values that divide it")
    sampler = data.MixtureSampler(args.data, args.mixture, args.seq_len, args.batch_size, rank=rt.rank,
                                  world_size=rt.world_size, seed=args.seed, renormalize=args.renormalize)
    eval_sampler = data.MixtureSampler(args.eval_data or args.data, args.eval_mixture or args.mixture,
                                       args.seq_len, args.batch_size, rank=rt.rank, world_size=rt.world_size,
                                       seed=args.seed + EVAL_SEED_OFFSET, renormalize=args.renormalize)
    eval_start = eval_sampler.state_dict()
    if args.max_steps is None:  # SFT: steps from --epochs over the data (RECIPE section 4: 2 or 4 epochs)
        args.max_steps = max(1, math.ceil(args.epochs * sampler.total_tokens() / args.total_batch_tokens))
    ckpt = None
    if args.resume:
        if latest_checkpoint(out_dir) is None:
            raise TrainError(f"--resume: no checkpoint in {out_dir}; drop --resume to start the run")
        ckpt, _ = read_checkpoint(out_dir)
        check_same_run(ckpt["args"], args)
    elif latest_checkpoint(out_dir) is not None:
        raise TrainError(f"{out_dir} already holds a run: add --resume to continue it, or choose another "
                         "--out-dir (or delete it)")
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(rt, out_dir)

    if ckpt is not None:
        model = model_from_checkpoint(ckpt, latest_checkpoint(out_dir))
        model.gradient_checkpointing = args.activation_checkpointing
        model.to(rt.device)
    else:
        model = build_model(args, rt, sampler.tokenizer)
    if sampler.vocab_size > model.config.vocab_size:
        raise TrainError(f"--data {args.data} uses tokenizer {sampler.tokenizer!r} ({sampler.vocab_size} tokens), "
                         f"the model has {model.config.vocab_size}: prepare the data with the model's tokenizer")
    teacher = load_teacher(args, rt, model) if args.teacher else None
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, BETAS, EPS, rt.device.type)
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        # The global row stream does not depend on the number of processes, so a run may resume on
        # another number (bit-exactness then only up to summation order); RNG states are per rank.
        set_rng_state(ckpt["rng"][rt.rank if len(ckpt["rng"]) == rt.world_size else 0])
        step = ckpt["step"]
        if rt.master:  # forget log records past the checkpoint: they are about to be redone
            metrics = out_dir / "metrics.jsonl"
            if metrics.exists():
                keep = [l for l in metrics.read_text().splitlines() if json.loads(l)["step"] <= step]
                metrics.write_text("".join(l + "\n" for l in keep))
        del ckpt

    runner = TrainLoss(model, teacher, args.kd_temperature, args.kd_ce_weight)
    if args.compile:
        runner = torch.compile(runner)
    if rt.ddp:
        runner = DDP(runner, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    log_header(log, args, rt, model, teacher, accum, step)
    tokens_per_step = args.total_batch_tokens
    flops_per_step = model.estimate_flops_per_token(args.seq_len) * tokens_per_step
    peak = peak_flops(rt.device)
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.master or None, dynamic_ncols=True)
    log.bar = bar
    record, t0, dt_avg = {}, time.time(), None
    while step < args.max_steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [sampler.next_batch() for _ in range(accum)]
        # The loss is a mean over every supervised token of the global batch, whatever the split of
        # rows over micro-steps and ranks: count them all first (torchtitan does the same).
        n_sup = rt.all_sum(torch.tensor(float(sum((b[1] != -100).sum() for b in batches)), device=rt.device))
        n_sup = n_sup.clamp(min=1)
        scale = rt.world_size / n_sup  # DDP averages gradients over ranks: undo it
        parts = torch.zeros(4, device=rt.device)  # loss, ce, kd sums; stop request
        for i, batch in enumerate(batches):
            x, y, doc_ids = to_device(batch, rt.device)
            sync = not rt.ddp or i == accum - 1  # reduce gradients once per step, not per micro-step
            with nullcontext() if sync else runner.no_sync():
                with rt.autocast():
                    loss, ce, kd = runner(x, y, doc_ids)
                (loss * scale).backward()
            parts[:3] += torch.stack([loss.detach().float(), ce.float(), kd.float()])
        parts[3] = float(STOP["signal"] is not None)
        parts = rt.all_sum(parts)
        train_loss = (parts[0] / n_sup).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise Diverged(f"loss {train_loss} / grad norm {grad_norm} at step {step + 1}, before the optimizer "
                           f"step; the last good checkpoint is {latest_checkpoint(out_dir)}: lower --lr and "
                           "start again from it (--init-from) or resume")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        dt, t0 = time.time() - t0, time.time()
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
        tok_s = tokens_per_step / dt
        mfu = f"{flops_per_step / dt / rt.world_size / peak:.1%}" if peak else "n/a"
        bar.set_postfix_str(f"loss {train_loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mfu {mfu}", refresh=False)
        bar.update(1)
        last = step == args.max_steps
        do_eval = last or (args.eval_every and step % args.eval_every == 0)
        if step % args.log_every == 0 or last or do_eval:
            epochs = {k: round(float(v), 6) for k, v in sampler.epochs().items()}
            record = {"step": step, "loss": train_loss, "lr": lr, "tokens": step * tokens_per_step,
                      "supervised_tokens": int(n_sup.item()), "grad_norm": grad_norm, "dt": dt,
                      "tok_per_s": tok_s, "mfu": mfu, "served": sampler.served, "epochs": epochs}
            if teacher is not None:
                record.update(kd=(parts[2] / n_sup).item(), ce=(parts[1] / n_sup).item())
            if do_eval:
                record["eval_loss"] = eval_loss(rt, model, eval_sampler, eval_start, args.eval_batches)
            eta = dt_avg * (args.max_steps - step)
            log(f"step {step}/{args.max_steps} | loss {train_loss:.4f}"
                + (f" (kd {record['kd']:.4f} ce {record['ce']:.4f})" if teacher is not None else "")
                + (f" | eval {record['eval_loss']:.4f}" if do_eval else "")
                + f" | lr {lr:.2e} | norm {grad_norm:.2f} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s | mfu {mfu}"
                + " | epochs " + " ".join(f"{k}:{v:.3g}" for k, v in epochs.items())
                + f" | eta {eta / 60:.1f} min")
            if rt.master:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        stop = parts[3].item() > 0
        if last or stop or step % args.save_every == 0:
            save_checkpoint(rt, args, model, optimizer, sampler, step)
        if stop:
            log(f"stopped by signal at step {step}; checkpoint saved: continue with the same command + --resume")
            break
    bar.close()
    log.bar = None
    return dict(record, stopped=step < args.max_steps)


# -------------------------------------------------------------------------------------------------
# The embedded default and the entry point

def toy_flags(stage, **extra):
    """Command-line flags for one stage of the toy run (TOY_DEFAULTS)."""
    settings = dict(TOY_DEFAULTS[stage], data=TOY_DEFAULTS["data"], **extra)
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def run_toy(rt):
    """`python train.py`: toy data, pre-training, SFT, then held-out accuracy via sample.py."""
    t_start = time.time()
    data_dir, out = Path(TOY_DEFAULTS["data"]), Path(TOY_DEFAULTS["out_dir"])
    if latest_checkpoint(out) or latest_checkpoint(out / "pretrain"):
        raise TrainError(f"{out} holds an earlier toy run: try it with `python sample.py`, or delete it "
                         f"(rm -r {out}) to train again")
    if rt.master:
        toydata.write_toy(str(data_dir))  # `python data.py toy`; does nothing when the corpus is there
    if rt.ddp:
        dist.barrier()
    stages = [("pretrain", dict(out_dir=out / "pretrain")),
              ("sft", dict(out_dir=out, init_from=out / "pretrain"))]
    for stage, extra in stages:
        flags = toy_flags(stage, **extra)
        if rt.master:
            print(f"\n== python train.py {' '.join(flags)}")
        if train(parse_args(flags), rt)["stopped"]:
            return
    if not rt.master:
        return
    print(f"\ntoy training done in {(time.time() - t_start) / 60:.1f} min; model in {out}/")
    # Scored exactly as `python sample.py --eval N` scores it: greedy, last \boxed{} (RECIPE section 6).
    flags = ["--ckpt", out, "--eval", TOY_DEFAULTS["eval_problems"], "--eval-file", data_dir / "eval.jsonl",
             "--max-new-tokens", TOY_DEFAULTS["max_new_tokens"], "--device", str(rt.device)]
    print(f"== python sample.py {' '.join(map(str, flags))}")
    sample.main([str(f) for f in flags])


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
            train(args, Runtime(args.device))
        if dist.is_initialized():
            # every rank done (rank 0 may still be writing the last checkpoint) before the process group
            # goes: a rank tearing gloo down while its peer is mid-collective can abort (SIGABRT)
            dist.barrier()
    except (ModelError, data.DataError, TokenizerError, TrainError) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank fails alike: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
