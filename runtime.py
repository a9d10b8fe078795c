"""
Where a script runs: the device (picked or checked), the processes of a torchrun job, and the peak
FLOP/s that MFU is measured against. train.py, sample.py, bench.py and mixing.py share it.

    from runtime import Runtime, pick_device
    device = pick_device("auto")          # cuda, else mps, else cpu
    dtype, why = pick_dtype("auto", device)  # bfloat16 where the hardware has it, else float32
    rt = Runtime("auto")                  # + rank, world size, process group under torchrun, dtype
"""

import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


class DeviceError(Exception):
    """A device was asked for that this machine does not have: one line naming the ones it has."""


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
