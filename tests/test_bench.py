"""bench.py (with the workloads of workloads.py) runs and writes the rows it documents. No timing assertions: timings depend on the machine."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"name", "ours", "reference", "unit", "ratio"}


def run_bench(*flags):
    return subprocess.run([sys.executable, "bench.py", "--threads", "1", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_attention_and_sampler_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--only", "attention,sampler", "--lengths", "64,128", "--reps", "1",
                     "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert all(set(r) == KEYS for r in rows)
    names = [r["name"] for r in rows]
    # per length and mask kind (causal, equal documents, varied documents) a time and a memory row, with
    # documents also the tile loop's time; a growth row per mask kind, one sampler row
    assert len(names) == 3 * 2 * 2 + 2 * 2 + 3 + 1 and len(set(names)) == len(names)
    assert sum("growth T=64->128" in n for n in names) == 3 and names[-1].startswith("sampler")
    for r in rows:
        assert r["ours"] > 0 and r["reference"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
        assert r["unit"] in ("s", "MB", "x", "tok/s", "problems/s")
    assert "| ratio" in proc.stdout and names[0] in proc.stdout  # the table is printed too


def test_memory_child_measures_what_a_call_allocates():
    # Every call of the loss case allocates the weight's gradient, 128,256 x 576 floats (282 MiB).
    # The naive loss computes it from the 512 x 128,256 logits' gradient (250 MiB), so both exist at
    # once; the chunked loss holds a chunk of logits at a time. A method that let the allocator keep
    # the warm-up call's memory would report about 0 here.
    grad_mb, logits_mb = 128256 * 576 * 4 / 2**20, 512 * 128256 * 4 / 2**20
    case = [dict(batch=1, seq=512, recompute=True)]
    naive = bench.measure_memory("loss", case, "reference", threads=1)[0]
    chunked = bench.measure_memory("loss", case, "ours", threads=1)[0]
    assert naive["peak"] > 0.98 * (grad_mb + logits_mb)
    assert 0.98 * grad_mb < chunked["peak"] < naive["peak"]
    assert naive["total"] >= naive["peak"] + grad_mb  # the weight itself was there before the call


def test_bad_flags_exit_2_with_one_line():
    proc = run_bench("--only", "no-such-section")
    assert proc.returncode == 2 and proc.stderr.startswith("error: argument --only: 'no-such-section' matches no")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_bench("--lengths", "1k")
    assert proc.returncode == 2 and "--lengths" in proc.stderr


def test_train_and_generate_rows_carry_the_goal_names(monkeypatch):
    """The rows the README quotes, in-process at tiny shapes (the goals match on exact names)."""
    import argparse
    from model import ModelConfig
    tiny = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                       max_seq_len=512)
    monkeypatch.setattr(bench.ModelConfig, "from_size", staticmethod(lambda size: tiny))
    monkeypatch.setattr(bench, "measure_memory", lambda kind, cases, side, threads: [{"peak": 2.0, "total": 4.0}])
    monkeypatch.setattr(workloads, "NEW_TOKENS", 3)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 1e9)
    seen = []
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append(k.get("enabled", True)) or real_autocast(*a, **k))
    args = argparse.Namespace(dtype="float32", profile=False, warmup=0, reps=1, threads=1)
    rows = list(bench.bench_train("140m", args)) + list(bench.bench_generate(args))
    names = [r["name"] for r in rows]
    b, t = workloads.TRAIN_SHAPES["140m"]
    assert names == [f"train 140m {b}x{t} step time", f"train 140m {b}x{t} step time, both bf16",
                     f"train 140m {b}x{t} peak memory (step)", f"train 140m {b}x{t} peak memory (total)",
                     "generate 140m 64+3 greedy", "generate 140m 64+3 greedy, both bf16",
                     "memory bandwidth (tensor copy)", "generate 140m 64+3 greedy memory-bandwidth utilisation"]
    assert seen.count(True) >= 2 and False in seen  # the bf16 sides ran under autocast, the float32 ones not
    gen, bw, use = rows[4], rows[6], rows[7]
    weights = sum(p.numel() for p in bench.MobileLLM(tiny).parameters()) * 4  # float32 ours, tied once
    assert weights < workloads.bytes_per_token(bench.MobileLLM(tiny), tiny, 4) < 1.5 * weights
    assert bw["ours"] == 1.0 and bw["reference"] is None
    assert use["ours"] == pytest.approx(100 * workloads.bytes_per_token(bench.MobileLLM(tiny), tiny, 4) * gen["ours"] / 1e9)


def test_cuda_section_logic_on_cpu(monkeypatch):
    """bench.py --only cuda has no GPU here: its rows and MFU arithmetic run on the CPU instead, with
    the CUDA memory calls stubbed and torch.compile as the identity (compiling is measured elsewhere)."""
    import argparse
    import runtime
    from model import ModelConfig
    tiny = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                       max_seq_len=64)
    monkeypatch.setattr(bench.ModelConfig, "from_size", staticmethod(lambda size: tiny))
    for name, stub in (("empty_cache", lambda: None), ("reset_peak_memory_stats", lambda: None),
                       ("synchronize", lambda: None), ("max_memory_allocated", lambda: 3 * 2**20)):
        monkeypatch.setattr(torch.cuda, name, stub)
    monkeypatch.setattr(runtime, "peak_flops", lambda device: 1e9)
    monkeypatch.setattr(torch, "compile", lambda model: model)
    monkeypatch.setattr(workloads, "CUDA_SIZES", ("140m",))
    monkeypatch.setattr(workloads, "CUDA_SHAPE", (2, 32))
    build = workloads.build_train
    devices = []
    monkeypatch.setattr(workloads, "build_train", lambda *a, device, **k: devices.append(device) or build(*a, device="cpu", **k))
    rows = list(bench.bench_cuda(argparse.Namespace(warmup=0, reps=1)))
    assert [r["name"] for r in rows] == [f"cuda 140m 2x32 bf16{c} {m}" for c in ("", " compile")
                                         for m in ("tokens/s", "MFU", "peak memory")]
    assert set(devices) == {"cuda"} and len(devices) == 4  # each side alone, eager and compiled
    flops = bench.MobileLLM(tiny).estimate_flops_per_token(32)
    for tok_s, mfu, mem in (rows[:3], rows[3:]):
        assert tok_s["ours"] > 0 and mfu["ours"] == pytest.approx(100 * flops * tok_s["ours"] / 1e9)
        assert mem["ours"] == mem["reference"] == 3.0


def test_eval_batched_row(tmp_path):
    """The batched-evaluation row: problems/s of sample.py's batched path vs one prompt at a time."""
    out = tmp_path / "bench.json"
    proc = run_bench("--only", "eval batched", "--reps", "1", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(out.read_text())
    assert r["unit"] == "problems/s" and "batch 16 vs one at a time" in r["name"]
    assert r["ours"] > 0 and r["reference"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["reference"])


def test_mixing_row_scores_documents(monkeypatch):
    """The mixing section runs mixing.py's scoring pass (its parameter names API) and reports documents/s."""
    import argparse
    from model import ModelConfig
    tiny = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                       max_seq_len=4096)
    monkeypatch.setattr(bench.ModelConfig, "from_size", staticmethod(lambda size: tiny))
    (r,) = bench.bench_mixing(argparse.Namespace(dtype="float32", profile=False, warmup=0, reps=1, threads=1))
    assert r["unit"] == "docs/s" and r["ours"] > 0 and r["reference"] is None
