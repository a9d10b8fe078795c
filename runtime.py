"""
Where a script runs: the device (picked or checked), the processes of a torchrun job, and the peak
FLOP/s that MFU is measured against. train.py, sample.py, bench.py and mixing.py share it.

    from runtime import Runtime, pick_device
    device = pick_device("auto")          # cuda, else mps, else cpu
    rt = Runtime("auto")                  # + rank, world size, process group under torchrun
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


class Runtime:
    """Where this process runs: device, rank and world size (torchrun sets RANK / WORLD_SIZE)."""

    def __init__(self, device="auto"):
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
