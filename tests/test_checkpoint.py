"""checkpoint.py and train.py under faults: SIGKILL at random moments, a full disk while saving, a damaged newest
checkpoint, one torchrun rank killed. Each time the run folder keeps only complete checkpoints, and --resume
continues bit-identical to a run that was never disturbed.

The runs use the `toy` model on rows of 32 tokens, one row a step, so a step takes milliseconds and a
checkpoint is written every step.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import train

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

STEPS = 8
FLAGS = ["--size", "toy", "--seq-len", "32", "--batch-size", "1", "--total-batch-tokens", "32", "--lr", "1e-3",
         "--warmup-steps", "2", "--device", "cpu", "--log-every", "1", "--eval-batches", "1", "--mixture", "arith=1",
         "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "3", "--dtype", "float32"]  # as in-process
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "text.jsonl", "w") as f:
        for _ in range(200):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            f.write(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n")
    data.prepare("arith", [str(root / "text.jsonl")], str(root / "data"), tokenizer="toy", workers=1)
    return root / "data"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """A run never disturbed: its losses and final weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(corpus, out) == 0
    return losses(out), final_weights(out)


def run(corpus, out, *extra):
    try:
        train.main([*FLAGS, "--data", str(corpus), "--out-dir", str(out), *map(str, extra)])
    except SystemExit as e:
        return e.code
    return 0


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    ckpt = torch.load(Path(out) / f"ckpt_{STEPS:07d}.pt", weights_only=True)
    assert ckpt["step"] == STEPS
    return ckpt["model"]


def assert_same_run(out, reference):
    ref_losses, ref_weights = reference
    assert losses(out) == ref_losses
    weights = final_weights(out)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def every_checkpoint_is_complete(out):
    for file in checkpoint.checkpoints(out):
        ckpt = torch.load(file, weights_only=True)  # raises on a half-written file
        assert ckpt["step"] == int(file.stem.split("_")[1])


def start(corpus, out, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FLAGS, "--data", str(corpus),
                             "--out-dir", str(out), *map(str, extra)], cwd=out.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def kill_trials(corpus, reference, tmp_path, trials):
    """SIGKILL each run at a random moment after its first step (during a step, a log write or a save),
    then continue it as a user would: --resume when a checkpoint exists, else the same command again."""
    rng = random.Random(16)
    t0 = time.perf_counter()
    probe = start(corpus, tmp_path / "probe")
    (tmp_path / "probe").mkdir(exist_ok=True)
    lines = [line for line in probe.stdout]
    assert probe.wait() == 0, "".join(lines)
    duration = time.perf_counter() - t0  # an upper bound of the time from step 1 to the end
    killed_at = []
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        proc = start(corpus, out)
        for line in proc.stdout:
            if line.startswith("step 1/"):
                break
        time.sleep(rng.uniform(0, duration / 3))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        every_checkpoint_is_complete(out)
        latest = checkpoint.latest_checkpoint(out)
        killed_at.append(None if latest is None else int(latest.stem.split("_")[1]))
        assert run(corpus, out, *(["--resume"] if latest else [])) == 0
        assert_same_run(out, reference)
        assert not list(out.glob(".ckpt_*"))  # a killed save's temporary file is gone
    return killed_at


def test_sigkill_at_random_moments_then_resume_is_bit_identical(corpus, reference, tmp_path):
    killed_at = kill_trials(corpus, reference, tmp_path, trials=2)
    assert len(killed_at) == 2


@pytest.mark.slow
def test_sigkill_many_trials(corpus, reference, tmp_path):
    killed_at = kill_trials(corpus, reference, tmp_path, trials=12)
    print(f"newest complete checkpoint after each kill (None: killed before the first): {killed_at}")
    assert len(set(killed_at)) >= 3, killed_at  # the kills landed at different points of the run


# The disk fills up after the first checkpoint: the second cannot be written.
FULL_DISK = """
import resource, sys
import checkpoint, train
write = checkpoint.atomic_save
def then_full(obj, path):
    write(obj, path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # log lines still fit
checkpoint.atomic_save = then_full
train.main(sys.argv[1:])
"""


def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus, reference, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", FULL_DISK, *FLAGS, "--data", str(corpus), "--out-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert "could not write" in errors[0] and "ckpt_0000002.pt" in errors[0] and "File too large" in errors[0]
    assert [p.name for p in out.iterdir() if "ckpt" in p.name] == ["ckpt_0000001.pt"]  # nothing half-written
    every_checkpoint_is_complete(out)
    assert run(corpus, out, "--resume") == 0
    assert_same_run(out, reference)


@pytest.fixture(scope="module")
def every_step(corpus, tmp_path_factory):
    """The reference run again, all its checkpoints kept: the states a run stopped after any step left."""
    out = tmp_path_factory.mktemp("every-step") / "run"
    assert run(corpus, out, "--keep-last", STEPS) == 0
    return out


def stopped_after(every_step, step, out):
    """A run folder as a run stopped after `step` left it: its checkpoints up to then (copies) and records."""
    out.mkdir()
    for k in range(1, step + 1):
        name = f"ckpt_{k:07d}.pt"
        (out / name).write_bytes((every_step / name).read_bytes())
    records = (every_step / "metrics.jsonl").read_text().splitlines()[:step]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in records))


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_newest_checkpoint_is_named_skipped_and_the_run_continues(corpus, reference, every_step, tmp_path,
                                                                          capsys, damage):
    out = tmp_path / "run"
    stopped_after(every_step, 5, out)
    newest = out / "ckpt_0000005.pt"
    raw = newest.read_bytes()  # damaged by something outside train.py: a copy cut short, or bytes overwritten
    newest.write_bytes(raw[:len(raw) // 2] if damage == "truncate" else raw[:64] + os.urandom(4096) + raw[4160:])
    capsys.readouterr()
    assert run(corpus, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: cannot read checkpoint" in err and "ckpt_0000005.pt" in err and "skipping it" in err
    assert (out / "ckpt_0000005.pt.damaged").is_file()  # set aside for a look, never again taken for the newest
    assert "resume at step 4" in (out / "log.txt").read_text()
    every_checkpoint_is_complete(out)
    assert_same_run(out, reference)


def test_no_readable_checkpoint_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(corpus, out, "--max-steps", 2) == 0
    for file in checkpoint.checkpoints(out):
        file.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run(corpus, out, "--max-steps", 2, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no readable checkpoint" in err[-1]


def worker_pids(parent):
    """Worker pids of a torchrun process, by their RANK."""
    pids = {}
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e.split(b"=")[1] for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                pids[int(rank)] = int(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
def test_one_torchrun_rank_killed_the_other_exits_with_a_message(corpus, tmp_path):
    out = tmp_path / "run"
    flags = [f if f != str(STEPS) else "100000" for f in FLAGS]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *flags, "--total-batch-tokens", "64", "--data", str(corpus),
                             "--out-dir", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 5/"):
            break
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    t0 = time.perf_counter()
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0 and elapsed < 60, (elapsed, output[-3000:])
    # rank 0 says what happened in one line, torchrun's summary names the rank that died
    assert "error: rank 0: another process of this torchrun job is gone" in output, output[-3000:]
    assert "[rank0]: Traceback" not in output and "Signal 9 (SIGKILL)" in output
    every_checkpoint_is_complete(out)
    assert checkpoint.latest_checkpoint(out) is not None
    assert not list(out.glob("ckpt_*.pt.tmp*"))
