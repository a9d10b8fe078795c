"""bench.py runs and writes the rows it documents. No timing assertions: timings depend on the machine."""

import json
import os
import subprocess
import sys

import pytest

import bench

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
    # per length and mask kind a time and a memory row, a growth row per mask kind, one sampler row
    assert len(names) == 2 * 2 * 2 + 2 + 1 and len(set(names)) == len(names)
    assert sum("growth T=64->128" in n for n in names) == 2 and names[-1].startswith("sampler")
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


def test_eval_batched_row(tmp_path):
    """The batched-evaluation row: problems/s of sample.py's batched path vs one prompt at a time."""
    out = tmp_path / "bench.json"
    proc = run_bench("--only", "eval batched", "--reps", "1", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(out.read_text())
    assert r["unit"] == "problems/s" and "batch 16 vs one at a time" in r["name"]
    assert r["ours"] > 0 and r["reference"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["reference"])
