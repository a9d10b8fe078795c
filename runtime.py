"""
Where a script runs: the device (picked or checked), the processes of a torchrun job, and the peak
FLOP/s that MFU is measured against, the memory a device has, the C allocator setting of CPU runs
(keep_freed_memory), the command-line checks every script's flags share, and a run's log (Logger).
train.py, sample.py, data.py, bench.py, model.py and mixing.py use it.

    from runtime import Runtime, pick_device
    device = pick_device("auto")          # cuda, else mps, else cpu
    dtype, why = pick_dtype("auto", device)  # bfloat16 where the hardware has it, else float32
    rt = Runtime("auto")                  # + rank, world size, process group under torchrun, dtype
    p = ArgumentParser()                  # a bad flag: one line, exit 2
    p.add_argument("--lr", type=number(float, above=0))
"""

import argparse
import ctypes
import math
import os
import platform
import random
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kernels import LOSS_CHUNK_ELEMENTS


class DeviceError(Exception):
    """A device was asked for that this machine does not have (one line naming the ones it has), or a run
    that does not fit in its memory."""


def available_devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_device(name="auto"):
    """torch.device for auto (cuda, else mps, else cpu) or a name this machine has (cuda:1 included)."""
    have = available_devices()
    if name in (None, "auto"):
        return torch.device("cuda" if "cuda" in have else "mps" if "mps" in have else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device name: use auto, {', '.join(have)}")
    if device.type not in have:
        raise DeviceError(f"--device {name}: this machine has no {device.type.upper()} device "
                          f"(available: {', '.join(have)}); use --device auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_bf16_features(cpuinfo="/proc/cpuinfo"):
    """The native bf16 matmul features this CPU has: AMX (amx_bf16) and AVX512-BF16 (avx512_bf16).
    torch's own probes where it has them (any OS), else the Linux /proc/cpuinfo flags."""
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    if all(hasattr(torch.cpu, probe) for probe in probes.values()):
        return [name for name, probe in probes.items() if getattr(torch.cpu, probe)()]
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [name for name in probes if name in flags]


def pick_dtype(name, device, bf16_features=None):
    """(torch dtype, why) for --dtype auto|float32|bfloat16 on `device`. auto: bfloat16 on CUDA; on a
    CPU only with native bf16 (without it, bf16 matmuls are emulated and several times slower than
    float32); float32 elsewhere. bf16_features: cpu_bf16_features() (tests pass their own)."""
    if name not in ("auto", *DTYPES):
        raise DeviceError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    if name != "auto":
        return DTYPES[name], "asked for with --dtype"
    if device.type == "cuda":
        return torch.bfloat16, "CUDA: bf16 tensor cores"
    if device.type != "cpu":
        return torch.float32, f"{device.type}: float32"
    features = cpu_bf16_features() if bf16_features is None else bf16_features
    if features:
        return torch.bfloat16, f"the CPU has native bf16 ({', '.join(features)})"
    return torch.float32, "the CPU has no native bf16 (no AMX or AVX512-BF16): float32 is faster there"


def describe_dtype(dtype, why):
    """The one start-up line that says which precision runs, and why."""
    return f"dtype {str(dtype).removeprefix('torch.')}: {why}"


class Runtime:
    """Where this process runs: device, rank and world size (torchrun sets RANK / WORLD_SIZE), and the
    compute dtype of training (pick_dtype): bfloat16 means autocast, with float32 weights and AdamW."""

    def __init__(self, device="auto", dtype="auto"):
        device = pick_device(device).type
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
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype, self.dtype_reason = pick_dtype(dtype, self.device)
        if self.ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def autocast(self):
        # bf16: autocast runs the matmuls in bf16 while weights, gradients and AdamW state stay
        # float32 (master weights); norms, softmax statistics and losses accumulate in float32.
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
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

    def rng_states(self):
        """Every rank's RNG states (python, numpy, torch, cuda), in rank order: what a checkpoint keeps."""
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return self.gather(state)

    def set_rng_states(self, states):
        """Restore this rank's states from rng_states(); on another number of ranks, rank 0's."""
        state = states[self.rank if len(states) == self.world_size else 0]
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def keep_freed_memory():
    """Let the C allocator keep the memory a CPU training step frees for the next step. glibc maps each
    block above its mmap threshold (at most 32 MiB) afresh and unmaps it on free, and hands freed heap
    back to the OS, so every step faults its activations, logits and gradients in again page by page.
    Measured on a 2-core CPU, one thread, bf16: the 140m step (2 x 256) took 390,000 page faults and 2.76 s,
    with this ~0 and 1.73 s (peak resident memory 3.1 -> 3.5 GB: freed blocks are kept for reuse); the
    toy step 21,000 faults and 50-80 ms of system time, with this none and ~15% less time. All blocks
    come from the heap and up to 1 GiB of it is kept free. Linux with glibc only; True if applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


# Peak dense bf16 FLOP/s per device, for MFU. First matching substring of the device name wins;
# an unknown device shows MFU as n/a rather than a wrong number.
PEAK_FLOPS = [("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("H800", 989e12), ("H20", 148e12), ("GH200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("MI300X", 1307e12), ("MI250X", 383e12)]


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def available_memory(device):
    """Bytes this process may use on device: free device memory on CUDA, MemAvailable of
    /proc/meminfo on CPU (physical RAM where there is no /proc), None where unknown (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# What a training step holds beyond its tensors: the allocator's free-but-kept blocks and torch's work buffers
# (measured on CPU: 80-100 MB whatever the model, from toy to 140m).
RUNTIME_BUFFERS = 100 * 2**20


def memory_estimate(model, args, device_type, teacher=None):
    """Bytes per device at the peak of a step: float32 weights and grads, AdamW's two moments, a teacher's
    weights, the loss's logits chunk (logits, probabilities, their gradient), RUNTIME_BUFFERS, and the
    activations kept for backward: 12 d_model + 5 ffn values per token per layer, counted at 2 bytes under bf16 autocast (a lower
    bound: the norms keep float32 copies). With --activation-checkpointing: the block inputs plus what 2.5
    blocks hold (the recomputed one, its gradients, the allocator's leftovers). Fitted to the peak resident
    memory of training processes on CPU in float32 (tests/test_train.py checks it at three model sizes)."""
    n, c = model.num_params(), model.config
    act_bytes = 2 if device_type == "cuda" else 4
    tokens = args.batch_size * args.seq_len
    block = tokens * (12 * c.d_model + 5 * c.ffn_dim) * act_bytes
    acts = tokens * c.d_model * act_bytes * c.n_layer + 2.5 * block if args.activation_checkpointing \
        else block * c.n_layer
    loss = 3 * 4 * c.vocab_size * min(tokens, max(1, LOSS_CHUNK_ELEMENTS // c.vocab_size))
    parts = {"weights": 4 * n, "grads": 4 * n, "adamw": 8 * n, "activations": int(acts), "loss": loss,
             "buffers": RUNTIME_BUFFERS}
    if teacher is not None:
        parts["teacher"] = teacher.num_params() * (2 if device_type == "cuda" else 4)
    return parts


def check_memory(args, rt, model, teacher):
    """Refuse a run whose estimate exceeds what the device has, before its first step: the kernel's OOM
    killer would end it minutes later with nothing saved. --force starts it anyway."""
    need = memory_estimate(model, args, rt.device.type, teacher)
    free = available_memory(rt.device)
    if free is None or args.force:
        return
    # The weights (and the teacher) are already on the device, so what it has for the run is free + those;
    # ranks on one CPU share its RAM.
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if rt.device.type == "cpu" else 1
    has = free + need["weights"] * ranks + need.get("teacher", 0) * ranks
    if sum(need.values()) * ranks <= has:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    where = f"{ranks} processes on this CPU" if ranks > 1 else f"the {rt.device.type} device"
    raise DeviceError(f"this run needs about {gib(sum(need.values()) * ranks)} (activations "
                     f"{gib(need['activations'] * ranks)}) but {where} has {gib(has)}: lower --batch-size (now "
                     f"{args.batch_size}; accumulation keeps the tokens per step), add --activation-checkpointing, "
                     f"or lower --seq-len (now {args.seq_len}); --force starts anyway")


# -------------------------------------------------------------------------------------------------
# Command-line checks. Each `type=` below rejects a bad value while argparse reads it, before any
# work starts; its `invalid` attribute is a value it rejects, which tests/test_cli.py feeds to every
# flag of every script (a flag without a check fails there). Paths are checked for their kind when
# they exist; a missing one is reported by the code that opens it, also before any work.

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def _checker(name, invalid, check):
    def parse(text):
        message = check(text)
        if isinstance(message, str):
            raise argparse.ArgumentTypeError(message)
        return text if message is None else message[0]
    parse.__name__, parse.invalid = name, invalid
    return parse


def number(kind=int, at_least=None, above=None, at_most=None, below=None):
    """An int or float within the bounds given (inclusive at_least/at_most, exclusive above/below)."""
    bounds = [(at_least, ">=", lambda v, b: v >= b), (above, ">", lambda v, b: v > b),
              (at_most, "<=", lambda v, b: v <= b), (below, "<", lambda v, b: v < b)]
    bounds = [(b, sign, ok) for b, sign, ok in bounds if b is not None]
    need = " and ".join(f"{sign} {b:g}" for b, sign, _ in bounds)
    # the value tests feed: the lower bound itself when it is excluded, else just below it (or above the top)
    low = next(((b, sign) for b, sign, _ in bounds if sign in (">=", ">")), None)
    invalid = str(low[0] if low and low[1] == ">" else low[0] - 1 if low else bounds[0][0] + 1)

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            return f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        if not math.isfinite(value) or not all(ok(value, b) for b, _, ok in bounds):
            return f"must be {need}, got {text}"
        return (value,)
    return _checker(f"{kind.__name__} {need}", invalid, check)


HERE = os.path.dirname(os.path.abspath(__file__))  # an existing folder, and this file an existing file


def path(kind, suffixes=()):
    """A path that, if it exists, is a file (kind "file") or a folder ("dir"); "new" (an output folder):
    anything but an existing file. suffixes: the file names accepted."""
    def check(text):
        if kind == "file" and os.path.isdir(text) or kind in ("dir", "new") and os.path.isfile(text):
            return f"{text} is a {'folder' if os.path.isdir(text) else 'file'}, not a " \
                   f"{'file' if kind == 'file' else 'folder'}"
        if suffixes and not text.endswith(tuple(suffixes)):
            return f"{text}: expected a {' or '.join(suffixes)} file"
        return None
    return _checker(f"{kind} path", os.path.join(HERE, "runtime.py") if kind != "file" else HERE, check)


def name_or_path(names, holds, what):
    """One of names, or a path that, if it exists, is a file or a folder holding one of the `holds`
    patterns (a checkpoint: ckpt_*.pt or config.json; a tokenizer: tokenizer.json)."""
    def check(text):
        if text not in names and os.path.isdir(text) and not any(next(Path(text).glob(h), None) for h in holds):
            return f"{text} is a folder without {' or '.join(holds)}: expected {what}"
        return None
    return _checker(what, HERE, check)


def matching(regex, what):
    """A string that fully matches regex (what: the rule, for the message)."""
    return _checker(what, "no such/name", lambda text: None if re.fullmatch(regex, text) else f"{text!r}: use {what}")


def checked(check, errors, invalid):
    """A type from a function that raises one of errors (the script's own) for a bad value."""
    def parse(text):
        try:
            check(text)
        except errors as e:
            raise argparse.ArgumentTypeError(str(e))
        return text
    parse.__name__, parse.invalid = check.__name__, invalid
    return parse


def device_name(text):
    """auto, or a device this machine has (cuda:1 included); the message names the ones it has."""
    if text == "auto":
        return text
    try:
        pick_device(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text}: "))
    return text


device_name.invalid = "no-such-device"


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
