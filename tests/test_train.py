"""train.py: schedule, resume to the bit, DDP equals accumulation, distillation, clean stops, user errors.

Every run uses the `toy` model on a tiny hermetic corpus prepared here with the toy tokenizer, a few
optimizer steps of 64-token rows, in-process where possible (one torch import for the whole file).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import data
import runtime
import toydata
import train
from model import MobileLLM, ModelConfig

# One intra-op thread: these models are tiny, and on a shared 2-core machine more threads only wait
# on each other (3x slower measured). The torchrun and signal tests' subprocesses use one too.
torch.set_num_threads(1)

# --dtype float32: the same precision in torchrun's child processes as in-process (conftest.py)
TINY = ["--size", "toy", "--seq-len", "64", "--batch-size", "2", "--total-batch-tokens", "256",
        "--lr", "1e-3", "--warmup-steps", "2", "--device", "cpu", "--log-every", "1", "--eval-batches", "1",
        "--dtype", "float32"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text source, a chat source (user + assistant with a trace, ~50 tokens) and eval.jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    problems = [(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(300)]
    write_jsonl(root / "text.jsonl", [{"text": f"{a}+{b}={a + b}\n{b}+{a}={a + b}"} for a, b in problems])
    chats = [{"messages": [{"role": "user", "content": f"{a}+{b}"},
                           {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n\\boxed{{{a + b}}}"}]}
             for a, b in problems]
    write_jsonl(root / "chat.jsonl", chats)
    out = root / "data"
    data.prepare("arith", [str(root / "text.jsonl")], str(out), tokenizer="toy", workers=1)
    data.prepare("arith-chat", [str(root / "chat.jsonl")], str(out), tokenizer="toy", workers=1)
    write_jsonl(out / "eval.jsonl", [{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in problems[:4]])
    return out


def run(*argv):
    """train.main in-process; returns the exit code (0 when it returns normally)."""
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def pretrain(corpus, out, *extra):
    return run(*TINY, "--data", corpus, "--mixture", "arith=1", "--out-dir", out, *extra)


def test_lr_schedule_warmup_and_decay_shapes():
    from argparse import Namespace
    args = Namespace(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, decay="linear")
    assert train.lr_at(0, args) == pytest.approx(0.1)
    assert train.lr_at(9, args) == pytest.approx(1.0)
    assert train.lr_at(60, args) == pytest.approx(0.55)  # halfway down the linear decay
    assert train.lr_at(110, args) == pytest.approx(0.1)
    args.decay = "cosine"
    assert train.lr_at(60, args) == pytest.approx(0.55)  # cosine also passes the midpoint there
    assert train.lr_at(35, args) > 0.55 + 0.2  # but stays higher early on
    args.warmup_steps, args.min_lr_ratio = 0.1, 0.0  # a fraction of max_steps: 11 steps
    assert train.lr_at(10, args) == pytest.approx(1.0)
    assert train.lr_at(110, args) == pytest.approx(0.0)


def test_stage_defaults_follow_the_recipe():
    args = train.parse_args(["--stage", "sft", "--long-context", "--data", "d", "--out-dir", "o", "--init-from", "x",
                             "--mixture", "general-sft"])
    assert (args.lr, args.warmup_steps, args.min_lr_ratio, args.weight_decay, args.seq_len) == (8e-5, 0.1, 0, 0, 32768)
    assert (args.beta2, args.epochs, args.max_steps, args.sft_loss) == (0.999, 4, None, "assistant")
    args = train.parse_args(["--stage", "pretrain", "--size", "140m", "--data", "d", "--out-dir", "o", "--lr", "1e-3",
                             "--mixture", "pretrain-phase1"])
    assert (args.lr, args.warmup_steps, args.min_lr_ratio, args.weight_decay) == (1e-3, 2000, 0.1, 0.1)
    assert args.beta2 == 0.95
    assert args.total_batch_tokens == 4 * 2**20  # 128 GPUs x 16 x 2048


def test_run_writes_checkpoint_metrics_and_log(corpus, tmp_path):
    out = tmp_path / "run"
    assert pretrain(corpus, out, "--max-steps", 3, "--eval-every", 2) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["tokens"] == 256 and set(rows[0]["served"]) == {"arith"}
    assert "eval_loss" in rows[1] and "eval_loss" in rows[2] and "eval_loss" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    log = (out / "log.txt").read_text()
    assert "versions: python" in log and "hardware:" in log and "memory/device est." in log
    model, tokenizer, meta = train.load_model(out)
    assert tokenizer == "toy" and meta["step"] == 3 and meta["stage"] == "pretrain"
    ckpt = torch.load(train.latest_checkpoint(out), weights_only=True)
    assert {"model", "optimizer", "step", "sampler", "rng", "config", "args", "tokenizer", "stage"} <= set(ckpt)
    assert not list(out.glob("*.tmp"))


def test_load_model_refuses_foreign_or_mismatched_files(corpus, tmp_path):
    from checkpoint import CheckpointError
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt"):
        train.load_model(tmp_path / "foreign.pt")
    (tmp_path / "ckpt_0000001.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="ckpt_0000001.pt"):
        train.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train.load_model(tmp_path / "nowhere")


def test_resume_continues_bit_for_bit(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain(corpus, full, "--max-steps", 6, "--save-every", 3, "--keep-last", 5) == 0
    # A run stopped after step 3: its checkpoint of step 3 and the records up to then.
    part.mkdir()
    os.link(full / "ckpt_0000003.pt", part / "ckpt_0000003.pt")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(full)[:3]))
    assert pretrain(corpus, part, "--max-steps", 6, "--save-every", 3, "--resume") == 0
    assert [r["loss"] for r in metrics(part)] == [r["loss"] for r in metrics(full)]
    a = torch.load(full / "ckpt_0000006.pt", weights_only=True)["model"]
    b = torch.load(part / "ckpt_0000006.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_training_keeps_float32_master_weights_and_tracks_float32(corpus, tmp_path):
    assert pretrain(corpus, tmp_path / "fp32", "--max-steps", 3) == 0
    assert pretrain(corpus, tmp_path / "bf16", "--max-steps", 3, "--dtype", "bfloat16") == 0
    assert "dtype bfloat16: asked for with --dtype" in (tmp_path / "bf16" / "log.txt").read_text()
    assert "dtype float32" in (tmp_path / "fp32" / "log.txt").read_text()
    for a, b in zip(metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2) and b["loss"] != a["loss"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.1)
    ckpt = torch.load(train.latest_checkpoint(tmp_path / "bf16"), weights_only=True)
    assert all(w.dtype == torch.float32 for w in ckpt["model"].values())  # float32 master weights
    moments = [s[k] for s in ckpt["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)  # AdamW state in float32
    fp32 = torch.load(train.latest_checkpoint(tmp_path / "fp32"), weights_only=True)["model"]
    torch.manual_seed(0)  # the initial weights both runs started from (--seed 0)
    init = MobileLLM(ModelConfig.from_size("toy")).state_dict()
    for k, w in ckpt["model"].items():  # the 3 steps' updates point the same way, up to bf16 rounding
        ours, exact = (w - init[k]).flatten(), (fp32[k] - init[k]).flatten()
        assert torch.nn.functional.cosine_similarity(ours, exact, 0) > 0.99, k
        assert (ours - exact).norm() < 0.1 * exact.norm(), k


def test_activation_checkpointing_gives_the_same_losses(corpus, tmp_path):
    assert pretrain(corpus, tmp_path / "plain", "--max-steps", 2) == 0
    assert pretrain(corpus, tmp_path / "ckpt", "--max-steps", 2, "--activation-checkpointing") == 0
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_keep_last_prunes_old_checkpoints(corpus, tmp_path):
    assert pretrain(corpus, tmp_path, "--max-steps", 4, "--save-every", 1, "--keep-last", 2) == 0
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]


def test_sigint_saves_at_step_boundary_and_resume_matches(corpus, tmp_path):
    flags = [*TINY, "--data", corpus, "--mixture", "arith=1", "--max-steps", 20, "--seq-len", 32,
             "--batch-size", 1, "--total-batch-tokens", 32, "--save-every", 1000]
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out-dir", str(stopped)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    output = line + proc.stdout.read()
    assert proc.wait(timeout=60) == 0, output
    assert "stopped by signal" in output
    step = torch.load(train.latest_checkpoint(stopped), weights_only=True)["step"]
    assert 3 <= step < 20
    assert run(*flags, "--out-dir", stopped, "--resume") == 0
    assert run(*flags, "--out-dir", full) == 0
    assert [r["loss"] for r in metrics(stopped)] == [r["loss"] for r in metrics(full)]


def test_nonfinite_loss_stops_before_the_step_and_keeps_the_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    step_loss = train.micro_step_loss

    def poisoned(*args):
        calls["n"] += 1
        loss, ce, kd = step_loss(*args)
        return (loss * float("nan"), ce, kd) if calls["n"] > 4 else (loss, ce, kd)  # 2 micro-steps per step

    monkeypatch.setattr(train, "micro_step_loss", poisoned)
    assert pretrain(corpus, tmp_path, "--max-steps", 5, "--save-every", 2) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err or "nan" in err
    assert [p.name for p in tmp_path.glob("ckpt_*.pt")] == ["ckpt_0000002.pt"]
    assert torch.load(tmp_path / "ckpt_0000002.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_parallel_micro_batches_equal_one_after_another(corpus, tmp_path, monkeypatch, stage):
    """--parallel-micro 2: four micro-batches, two at a time in threads of one intra-op thread each, give
    the same losses and weights to the bit as the four one after another (gradients summed in order)."""
    flags = ["--batch-size", 1, "--max-steps", 3]  # 256 tokens per step in rows of 64: 4 micro-batches
    if stage == "sft":  # packed conversations: document masks and assistant-only targets
        assert pretrain(corpus, tmp_path / "pt", "--max-steps", 1) == 0
        flags += ["--stage", "sft", "--init-from", tmp_path / "pt", "--mixture", "arith-chat=1"]
    assert pretrain(corpus, tmp_path / "one", *flags) == 0
    seen = []
    grad = torch.autograd.grad

    def spy(*args, **kw):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    torch.set_num_threads(2)  # two cores: a micro-batch thread each
    try:
        assert pretrain(corpus, tmp_path / "two", *flags, "--parallel-micro", 2) == 0
    finally:
        torch.set_num_threads(1)
    assert len(seen) == 3 * 4 and all(name.startswith("micro") and n == 1 for name, n in seen)
    assert len({name for name, _ in seen}) == 2
    assert "micro-batches: 2 at a time, 1 intra-op thread each" in (tmp_path / "two" / "log.txt").read_text()
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [(r["loss"], r["grad_norm"], r["supervised_tokens"]) for r in one] == \
           [(r["loss"], r["grad_norm"], r["supervised_tokens"]) for r in two]
    a = torch.load(tmp_path / "one" / "ckpt_0000003.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt_0000003.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = lambda c: [t for s in c["optimizer"]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))


def test_parallel_micro_is_refused_where_it_cannot_run(corpus, tmp_path, capsys):
    assert pretrain(corpus, tmp_path / "c", "--max-steps", 1, "--parallel-micro", 2, "--compile") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --parallel-micro is for one eager CPU process") and "\n" not in err


def test_sft_trains_on_assistant_tokens_with_document_masks(corpus, tmp_path, monkeypatch):
    assert pretrain(corpus, tmp_path / "pt", "--max-steps", 1) == 0
    seen = []
    forward = MobileLLM.forward

    def spy(self, idx, targets=None, doc_ids=None, **kw):
        if self.training:
            seen.append((targets, doc_ids))
        return forward(self, idx, targets, doc_ids=doc_ids, **kw)

    monkeypatch.setattr(MobileLLM, "forward", spy)
    out = tmp_path / "sft"
    assert run(*TINY, "--stage", "sft", "--init-from", tmp_path / "pt", "--data", corpus, "--mixture",
               "arith-chat=1", "--max-steps", 2, "--long-context", "--seq-len", 128, "--total-batch-tokens", 512,
               "--out-dir", out) == 0
    targets, doc_ids = seen[0]
    assert doc_ids is not None and doc_ids.max() > 0  # several conversations packed in a row
    assert 0 < (targets != -100).float().mean() < 0.6  # prompts and headers carry no loss
    rows = metrics(out)
    assert rows[-1]["supervised_tokens"] < rows[-1]["tokens"] // 2
    base = ModelConfig.from_size("toy")
    _, _, meta = train.load_model(out)
    assert meta["config"]["rope_theta"] == 8 * base.rope_theta  # reasoning SFT: theta x 8


def test_checkpoint_optimizer_carries_the_stage_betas(corpus, tmp_path):
    """AdamW betas as the official scripts run them (0.9, 0.95) pre/mid-training, (0.9, 0.999) SFT; --beta2 wins."""
    sft = ["--stage", "sft", "--mixture", "arith-chat=1"]
    for name, flags, betas in [("pt", ["--mixture", "arith=1"], (0.9, 0.95)), ("sft", sft, (0.9, 0.999)),
                               ("sft-98", [*sft, "--beta2", "0.98"], (0.9, 0.98))]:
        assert run(*TINY, "--data", corpus, "--max-steps", 1, *flags, "--out-dir", tmp_path / name) == 0
        groups = torch.load(train.latest_checkpoint(tmp_path / name), weights_only=True)["optimizer"]["param_groups"]
        assert len(groups) == 2 and all(tuple(g["betas"]) == betas for g in groups), name


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Two chat sources of uneven conversations (25 to ~175 tokens: two to a 64-token row, or one cropped)."""
    root = tmp_path_factory.mktemp("uneven")
    rng = random.Random(2)
    for name, n in (("long-tail", 24), ("small", 9)):
        write_jsonl(root / f"{name}.jsonl", [{"messages": [
            {"role": "user", "content": "1+1" * rng.randint(0, 2)},
            {"role": "assistant", "content": "2" * rng.choice([1, 3, 8, 20, 60, 150])}]} for _ in range(n)])
        data.prepare(name, [str(root / f"{name}.jsonl")], str(root / "data"), tokenizer="toy", workers=1)
    return root / "data"


def rows_of_two_epochs(data_dir, name):
    """Rows of 64 tokens that two epochs of one chat source take, replayed row by row."""
    sampler = data.MixtureSampler(str(data_dir), f"{name}=1", 64, 1)
    while sampler.chat_pos[0] != [2, 0]:
        sampler.skip_rows(1)
    return sampler.row


def test_sft_epochs_serve_every_source_that_many_times(uneven, tmp_path):
    """--epochs 2: two passes over each source however its conversations pack, both sources together; the
    schedule's length is those rows' steps (warmup and decay follow it)."""
    rows = rows_of_two_epochs(uneven, "long-tail") + rows_of_two_epochs(uneven, "small")
    unique = sum(data.Source(str(uneven / n)).n_tokens for n in ("long-tail", "small"))
    assert abs(rows / (2 * unique / 64) - 1) > 0.1  # steps from unique tokens would be far off
    sft = [*TINY, "--stage", "sft", "--data", uneven, "--mixture", "long-tail=1,small=1", "--epochs", 2,
           "--log-every", 1000]
    assert run(*sft, "--batch-size", 1, "--total-batch-tokens", 64, "--out-dir", tmp_path / "one") == 0
    last = metrics(tmp_path / "one")[-1]
    assert last["step"] == rows and last["epochs"] == {"long-tail": 2.0, "small": 2.0}  # one row a step: exact
    assert f"--epochs 2: {rows:,} rows in {rows:,} steps" in (tmp_path / "one" / "log.txt").read_text()
    assert run(*sft, "--batch-size", 2, "--total-batch-tokens", 256, "--out-dir", tmp_path / "four") == 0
    last = metrics(tmp_path / "four")[-1]
    assert last["step"] == -(-rows // 4)  # the last step may take up to 3 rows of the next epoch, of <= 65 tokens
    assert all(2.0 <= e <= 2.0 + 3 * 65 / data.Source(str(uneven / n)).n_tokens for n, e in last["epochs"].items())


def test_sft_loss_all_trains_on_the_whole_conversation(corpus, tmp_path):
    sft = [*TINY, "--stage", "sft", "--data", corpus, "--mixture", "arith-chat=1", "--max-steps", 1]
    assert run(*sft, "--out-dir", tmp_path / "ours") == 0
    assert run(*sft, "--sft-loss", "all", "--out-dir", tmp_path / "all") == 0
    ours, official = metrics(tmp_path / "ours")[0], metrics(tmp_path / "all")[0]
    assert official["supervised_tokens"] > 1.5 * ours["supervised_tokens"]


def test_a_packed_conversation_scores_as_alone_in_its_row():
    """Why packing with document masks matches the official one conversation per row: each conversation sees
    only itself, and RoPE scores depend only on relative positions (the QK-norm is rotation-invariant)."""
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig.from_size("toy")).eval()
    a, b, pad = torch.randint(0, 256, (1, 37)), torch.randint(0, 256, (1, 21)), torch.full((1, 6), 260)
    packed = model(torch.cat([a, b, pad], 1), doc_ids=torch.tensor([[0] * 37 + [1] * 21 + [2] * 6]))
    alone = model(torch.cat([b, pad], 1), doc_ids=torch.tensor([[0] * 21 + [1] * 6]))
    assert torch.allclose(packed[0, 37:58], alone[0, :21], atol=1e-4)
    assert not torch.allclose(model(torch.cat([a, b, pad], 1))[0, 37:58], alone[0, :21], atol=1e-2)  # unmasked


def save_ours(model, run_dir, tokenizer="toy"):
    """A checkpoint of ours holding just a model (as a teacher or an init)."""
    run_dir.mkdir(parents=True)
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tokenizer, "step": 0},
               run_dir / "ckpt_0000000.pt")


def test_distilling_into_a_copy_of_itself_gives_zero_loss_and_gradient(corpus, tmp_path, capsys):
    assert pretrain(corpus, tmp_path / "pt", "--max-steps", 2) == 0
    out = tmp_path / "mt"
    capsys.readouterr()
    kd = [*TINY, "--stage", "midtrain", "--init-from", tmp_path / "pt", "--teacher", tmp_path / "pt",
          "--data", corpus, "--mixture", "arith=1", "--max-steps", 1]
    assert run(*kd, "--out-dir", out) == 0
    first = metrics(out)[0]
    assert abs(first["kd"]) < 1e-6 and first["loss"] == first["kd"] and first["grad_norm"] < 1e-5
    assert first["ce"] > 1.0  # the plain CE is logged too
    ckpt = torch.load(train.latest_checkpoint(out), weights_only=True)
    assert not any("teacher" in k for k in ckpt["model"])
    assert "warning" not in capsys.readouterr().err
    # Longer rows than the teacher trained on: it runs, with a warning naming both lengths.
    assert run(*kd, "--seq-len", 128, "--out-dir", tmp_path / "mt-long") == 0
    err = capsys.readouterr().err
    assert "warning: --teacher" in err and "64-token rows" in err and "--seq-len is 128" in err


def test_teacher_with_another_vocabulary_is_refused(corpus, tmp_path, capsys):
    save_ours(MobileLLM(ModelConfig(**dict(train.asdict(ModelConfig.from_size("toy")), vocab_size=300))),
              tmp_path / "teacher")
    code = run(*TINY, "--stage", "midtrain", "--teacher", tmp_path / "teacher", "--data", corpus,
               "--mixture", "arith=1", "--max-steps", 1, "--out-dir", tmp_path / "mt")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "vocabulary" in err and "\n" not in err


def test_init_from_hugging_face_folder_equals_init_from_our_checkpoint(corpus, tmp_path):
    assert pretrain(corpus, tmp_path / "pt", "--max-steps", 3) == 0
    model, _, _ = train.load_model(tmp_path / "pt")
    model.save_hf(tmp_path / "hf")  # what a released MobileLLM-R1 folder looks like
    sft = [*TINY, "--stage", "sft", "--data", corpus, "--mixture", "arith-chat=1", "--max-steps", 1]
    assert run(*sft, "--init-from", tmp_path / "hf", "--out-dir", tmp_path / "from-hf") == 0
    assert run(*sft, "--init-from", tmp_path / "pt", "--out-dir", tmp_path / "from-ours") == 0
    hf, ours = metrics(tmp_path / "from-hf")[0]["loss"], metrics(tmp_path / "from-ours")[0]["loss"]
    assert hf == pytest.approx(ours, rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--size", "huge"], "invalid choice: 'huge'"),
    (["--mixture", "no-such-preset"], "unknown mixture"),
    (["--data", "/nonexistent/data"], "does not exist"),
    (["--total-batch-tokens", "300"], "not a multiple"),
    (["--size", None], "--size is required"),
    (["--keep-last", "0"], "--keep-last: must be >= 1"),
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--mixture", None], "--mixture"),
])
def test_bad_input_is_one_line_exit_2(corpus, tmp_path, capsys, flags, message):
    argv = [*TINY, "--data", corpus, "--mixture", "arith=1", "--max-steps", 1, "--out-dir", tmp_path / "r"]
    for i in range(0, len(flags), 2):
        j = argv.index(flags[i]) if flags[i] in argv else None
        if j is not None:
            del argv[j:j + 2]
        if flags[i + 1] is not None:
            argv += flags[i:i + 2]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_unknown_stage_exits_2(capsys):
    assert run("--stage", "pretraining", "--data", "d", "--out-dir", "o") == 2


def test_resume_with_other_settings_or_into_a_used_folder_is_refused(corpus, tmp_path, capsys):
    assert pretrain(corpus, tmp_path, "--max-steps", 1) == 0
    assert pretrain(corpus, tmp_path, "--max-steps", 1) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert pretrain(corpus, tmp_path, "--max-steps", 2, "--resume") == 2
    assert "--max-steps 1, now 2" in capsys.readouterr().err


def test_init_from_data_of_another_tokenizer_is_refused(corpus, tmp_path, capsys):
    save_ours(MobileLLM(ModelConfig.from_size("toy")), tmp_path / "init", tokenizer="llama3")
    code = run(*TINY, "--stage", "sft", "--init-from", tmp_path / "init", "--data", corpus,
               "--mixture", "arith-chat=1", "--max-steps", 1, "--out-dir", tmp_path / "r")
    assert code == 2 and "tokenizer" in capsys.readouterr().err


def torchrun(nproc, flags, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *map(str, flags)]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("stage", ["pretrain", "midtrain"])
def test_ddp_two_processes_equal_one_process_with_accumulation(corpus, tmp_path, stage):
    flags = [*TINY, "--data", corpus, "--max-steps", 3, "--total-batch-tokens", 512]
    if stage == "midtrain":  # distillation under DDP: a teacher on every rank, outside DDP
        assert pretrain(corpus, tmp_path / "teacher", "--max-steps", 2) == 0
        flags += ["--stage", "midtrain", "--teacher", tmp_path / "teacher", "--mixture", "arith-chat=1"]
    else:
        flags += ["--mixture", "arith=1"]
    assert run(*flags, "--out-dir", tmp_path / "one") == 0  # 1 process x 4 micro-steps
    torchrun(2, [*flags, "--out-dir", tmp_path / "two"], tmp_path)  # 2 processes x 2 micro-steps
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["served"] == a["served"]


def test_toy_default_runs_the_whole_pipeline(corpus, tmp_path, monkeypatch, capsys):
    """`python train.py`: data if missing, pretrain, SFT, held-out accuracy (tiny settings here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(toydata, "write_toy", lambda out, seed=0: shutil.copytree(corpus, out, dirs_exist_ok=True))
    small = dict(max_steps=2, batch_size=2, seq_len=64, total_batch_tokens=128, log_every=1, eval_every=2)
    monkeypatch.setitem(toydata.TOY_RUN, "pretrain", dict(toydata.TOY_RUN["pretrain"], mixture="arith=1",
                                                                 eval_mixture="arith-chat=1", **small))
    monkeypatch.setitem(toydata.TOY_RUN, "sft", dict(toydata.TOY_RUN["sft"], mixture="arith-chat=1",
                                                            eval_mixture="arith-chat=1", **small))
    monkeypatch.setitem(toydata.TOY_RUN, "max_new_tokens", 8)
    assert run() == 0
    out = capsys.readouterr().out
    assert "accuracy: " in out and "/4 = " in out  # sample.py --eval's last line
    assert train.latest_checkpoint("out/toy") is not None and train.latest_checkpoint("out/toy/pretrain") is not None
    _, _, meta = train.load_model("out/toy")
    assert meta["stage"] == "sft"
    assert run() == 2  # a second `python train.py` does not overwrite the first
    assert "holds an earlier toy run" in capsys.readouterr().err


def test_distilling_from_a_llama_folder_equals_a_naive_kl(corpus, tmp_path, capsys):
    """--teacher a LlamaForCausalLM folder as transformers saves it (RECIPE section 4.5's teacher, tiny, with
    llama3 rope scaling and rows past its original context): the first step's logged KD loss equals
    KL(teacher || student) over the full vocabulary, computed here with transformers' model as teacher."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=rope,
        tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    torch.manual_seed(2)
    save_ours(MobileLLM(ModelConfig.from_size("toy")), tmp_path / "student")
    argv = [*TINY, "--stage", "midtrain", "--init-from", tmp_path / "student", "--teacher", tmp_path / "llama",
            "--data", corpus, "--mixture", "arith=1", "--max-steps", 1, "--out-dir", tmp_path / "mt"]
    assert run(*argv) == 0
    kd = metrics(tmp_path / "mt")[0]["kd"]
    header = (tmp_path / "mt" / "log.txt").read_text()
    assert any("memory/device est." in line and " teacher " in line for line in header.splitlines())
    # The rows the run saw (the sampler is deterministic), the student before its step, the reference teacher.
    args = train.parse_args([str(a) for a in argv])
    sampler = data.MixtureSampler(args.data, args.mixture, args.seq_len, args.batch_size, seed=args.seed)
    student, _, _ = train.load_model(tmp_path / "student")
    teacher = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(args.total_batch_tokens // (args.batch_size * args.seq_len)):
            x, y, doc_ids = sampler.next_batch()
            assert doc_ids is None  # text rows: plain causal attention, as the reference does
            p, q = teacher(x).logits.log_softmax(-1), student(x).log_softmax(-1)
            keep = y != -100
            total += (p.exp() * (p - q)).sum(-1)[keep].sum().item()
            count += keep.sum().item()
    assert kd == pytest.approx(total / count, rel=1e-4) and kd > 0.1
    # A Llama teacher of another vocabulary: one line, exit 2.
    config.vocab_size = 300
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama-300")
    capsys.readouterr()
    argv[argv.index(tmp_path / "llama")] = tmp_path / "llama-300"
    assert run(*argv[:-1], tmp_path / "mt-300") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "vocabulary of 300" in err and "\n" not in err


def test_mismatched_parts_are_one_line_naming_both_sides(corpus, tmp_path, capsys):
    """A run resumed at another size; a Hugging Face init or a teacher whose tokenizer is not the data's."""
    assert pretrain(corpus, tmp_path / "pt", "--max-steps", 1) == 0
    capsys.readouterr()
    assert pretrain(corpus, tmp_path / "pt", "--max-steps", 1, "--resume", "--size", "toy-teacher") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--size toy, now toy-teacher" in err
    argv = [*TINY[2:], "--data", corpus, "--mixture", "arith=1", "--max-steps", 1, "--out-dir", tmp_path / "pt"]
    assert run(*argv, "--resume") == 0  # --size left out: the run's
    wide = MobileLLM(ModelConfig(**dict(train.asdict(ModelConfig.from_size("toy")), vocab_size=300)))
    wide.save_hf(tmp_path / "hf-300")
    assert run(*TINY[2:], "--stage", "sft", "--init-from", tmp_path / "hf-300", "--data", corpus, "--mixture",
               "arith-chat=1", "--max-steps", 1, "--out-dir", tmp_path / "sft") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer 'toy' (272 tokens), the model has 300" in err
    save_ours(MobileLLM(ModelConfig.from_size("toy")), tmp_path / "teacher", tokenizer="other")
    assert run(*TINY, "--stage", "midtrain", "--teacher", tmp_path / "teacher", "--data", corpus, "--mixture",
               "arith=1", "--max-steps", 1, "--out-dir", tmp_path / "mt") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer 'other' but --data" in err and "uses 'toy'" in err


def test_a_run_that_does_not_fit_in_memory_is_refused_unless_forced(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 2**29)  # a machine with 0.5 GiB free
    capsys.readouterr()
    flags = [*TINY, "--data", corpus, "--mixture", "arith=1", "--max-steps", 1, "--seq-len", 1024,
             "--batch-size", 16, "--total-batch-tokens", 16384]
    assert run(*flags, "--out-dir", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs about 1.4 GiB" in err and "has 0.5 GiB" in err
    assert all(k in err for k in ("--batch-size (now 16", "--activation-checkpointing", "--seq-len (now 1024)", "--force"))
    assert not train.latest_checkpoint(tmp_path / "r")
    assert run(*flags, "--force", "--out-dir", tmp_path / "forced") == 0


# A training process (two steps: the second runs with AdamW's moments allocated) that reports its resident memory
# before train.main and at its peak (VmHWM: the high-water
# mark of this process's own pages; ru_maxrss would also count the pages the parent had when it forked us).
MEASURE = """
import json, os, sys
import torch
torch.set_num_threads(1)
import runtime, train
seen, estimate = {}, runtime.memory_estimate
runtime.memory_estimate = lambda *a, **k: seen.update(estimate(*a, **k)) or seen
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS")
train.main(sys.argv[1:])
print(json.dumps({"measured": status("VmHWM") - before, "estimate": sum(seen.values())}))
"""
MEMORY_TOLERANCE = 0.25  # the estimate is within 25% of the measured peak (the OOM refusal relies on it)


def measured_and_estimated(data_dir, mixture, out, *flags):
    res = subprocess.run([sys.executable, "-c", MEASURE, "--data", data_dir, "--mixture", mixture, "--out-dir", out,
                          "--device", "cpu", "--max-steps", "2", "--eval-batches", "1", *map(str, flags)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.splitlines()[-1])
    print(f"measured {r['measured'] / 2**20:.0f} MiB, estimated {r['estimate'] / 2**20:.0f} MiB")
    return r["measured"], r["estimate"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc")
@pytest.mark.parametrize("size, batch, checkpointing", [("toy", 8, False), ("toy-teacher", 4, False),
                                                        pytest.param("toy", 8, True, marks=pytest.mark.slow)])
def test_memory_estimate_matches_the_measured_peak(corpus, tmp_path, size, batch, checkpointing):
    flags = ["--size", size, "--seq-len", 1024, "--batch-size", batch, "--total-batch-tokens", 1024 * batch]
    measured, estimate = measured_and_estimated(corpus, "arith=1", tmp_path / "r", *flags,
                                                *["--activation-checkpointing"] * checkpointing)
    assert abs(measured / estimate - 1) <= MEMORY_TOLERANCE, (measured / 2**20, estimate / 2**20)


@pytest.mark.slow
def test_memory_estimate_at_140m(tmp_path):
    """The paper's smallest model (its 128k vocabulary, 15 layers) at a batch a CPU holds."""
    write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(str(i * j) for j in range(300))} for i in range(400)])
    data.prepare("text", [str(tmp_path / "text.jsonl")], str(tmp_path / "data"), tokenizer="llama3", workers=1)
    measured, estimate = measured_and_estimated(tmp_path / "data", "text=1", tmp_path / "r", "--size", "140m",
                                                "--seq-len", 256, "--batch-size", 2, "--total-batch-tokens", 512)
    assert abs(measured / estimate - 1) <= MEMORY_TOLERANCE, (measured / 2**20, estimate / 2**20)
