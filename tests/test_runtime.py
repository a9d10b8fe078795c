"""runtime.py: the dtype choice (--dtype auto) with the CPU's capabilities mocked, autocast, and the
allocator setting that keeps a step's freed memory."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from runtime import DeviceError, Runtime, pick_dtype

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("device, features, expected", [
    (CPU, ["amx_bf16", "avx512_bf16"], torch.bfloat16),
    (CPU, ["avx512_bf16"], torch.bfloat16),
    (CPU, ["amx_bf16"], torch.bfloat16),
    (CPU, [], torch.float32),  # emulated bf16 is several times slower than float32
    (CUDA, [], torch.bfloat16),
    (MPS, ["amx_bf16"], torch.float32),
])
def test_auto_dtype_follows_the_hardware(device, features, expected):
    dtype, why = pick_dtype("auto", device, bf16_features=features)
    assert dtype == expected
    assert why and (device != CPU or all(f in why for f in features))  # the reason names what was found
    line = runtime.describe_dtype(dtype, why)
    assert line.startswith(f"dtype {str(expected).removeprefix('torch.')}:") and "\n" not in line


def test_explicit_dtypes_win_and_bad_names_are_refused():
    assert pick_dtype("float32", CUDA, bf16_features=["amx_bf16"])[0] == torch.float32
    assert pick_dtype("bfloat16", CPU, bf16_features=[])[0] == torch.bfloat16
    with pytest.raises(DeviceError, match="--dtype 'half'"):
        pick_dtype("half", CPU)


def test_cpuinfo_flags_when_torch_has_no_probes(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real probe, not conftest's hermetic stand-in
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert runtime.cpu_bf16_features(str(info)) == ["avx512_bf16"]  # amx_tile alone is not amx_bf16
    info.write_text("flags\t\t: fpu sse2 avx2\n")
    assert runtime.cpu_bf16_features(str(info)) == []
    assert runtime.cpu_bf16_features(str(tmp_path / "missing")) == []  # no /proc (macOS): float32


def test_torch_probes_are_used_when_present(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert runtime.cpu_bf16_features("/nonexistent") == ["avx512_bf16"]


def test_runtime_autocast_matches_its_dtype():
    rt = Runtime("cpu", "bfloat16")
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    rt = Runtime("cpu", "float32")
    with rt.autocast():
        assert not torch.is_autocast_enabled("cpu")


STEP_FAULTS = """
import resource, sys, torch
import runtime
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory()
def step():  # what a training step does to memory: activations, a vocabulary-sized gradient, freed
    blocks = [torch.ones(1 << 20) for _ in range(40)] + [torch.ones(1 << 24) for _ in range(3)]  # 4, 64 MB
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_step_memory_is_reused_not_faulted_in_again():
    # A step touches ~90,000 pages (4 KB). By default glibc hands them back to the OS and each of the ten
    # steps faults every one in again (~900,000). With keep_freed_memory the steps reuse them; the heap may
    # still grow once or twice while it settles (a 64 MB block that does not fit the holes: 16,384 pages).
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                             cwd=ROOT, check=True)
        return int(out.stdout.split()[-1])
    assert faults("keep") < 90_000, "ten steps faulted in more pages than one step touches"
