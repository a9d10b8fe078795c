"""
Checkpoint files of a run folder: run_dir/ckpt_{step:07d}.pt, each written atomically (never a half-written
file under a checkpoint's name, whatever kills the process or fills the disk), the last K kept, and read
back skipping a damaged newest one. train.py writes and resumes them; model.py's load_model reads them.

    save_checkpoint(rt, args, model, optimizer, sampler, step)   # train.py, at a step boundary
    ckpt, file = read_checkpoint("out/run")                      # the newest readable checkpoint
"""

import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written, or a resume that does not fit it: one line, exit 2."""


# Flags that may differ when resuming: they change how the run executes, not what it computes.
RESUMABLE = {"resume", "out_dir", "device", "dtype", "compile", "activation_checkpointing", "batch_size", "force",
             "parallel_micro", "log_every", "eval_every", "eval_batches", "save_every", "keep_last", "init_from"}


def checkpoints(run_dir):
    """The run's ckpt_*.pt files, oldest first (the zero-padded step sorts them)."""
    return sorted(Path(run_dir).glob("ckpt_*.pt"))


def latest_checkpoint(run_dir):
    """Path of the newest ckpt_*.pt in run_dir, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename onto path: a reader sees the
    old file or the complete new one. A failed write (disk full, file-size limit) removes the temporary
    file and raises CheckpointError; whatever was at path stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden, and no ckpt_*.pt: never taken for one
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError after the OSError
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError) and not (isinstance(e, RuntimeError) and "enforce fail" in str(e)):
            raise  # not a failed write: a bug
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else "write failed"
        raise CheckpointError(f"could not write {path} ({reason}): free disk space (or raise the file-size limit) "
                              "and continue with --resume from the previous checkpoint, which is intact")


def save_checkpoint(rt, args, model, optimizer, sampler, step):
    """Rank 0 writes the file, with every rank's RNG states. The sampler's state is the same on all
    ranks (each does the bookkeeping of the whole global stream), so rank 0's is enough."""
    rngs = rt.rng_states()
    if not rt.master:
        return
    ckpt = {"model": model.state_dict(), "config": asdict(model.config), "optimizer": optimizer.state_dict(),
            "step": step, "sampler": sampler.state_dict(), "rng": rngs, "args": vars(args),
            "tokenizer": sampler.tokenizer, "stage": args.stage}
    atomic_save(ckpt, Path(args.out_dir) / f"ckpt_{step:07d}.pt")
    for old in checkpoints(args.out_dir)[:-args.keep_last]:
        old.unlink()


def _load(file):
    """The checkpoint dict in file, or a CheckpointError naming the file and why it cannot be read."""
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, overwritten or foreign: any failure to unpickle
        raise CheckpointError(f"cannot read checkpoint {file} ({type(e).__name__}): is it one of ours?")
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise CheckpointError(f"{file} is not a model checkpoint of ours (no model weights and config)")
    return ckpt


def read_checkpoint(path, set_aside=False):
    """(checkpoint dict, file) from a ckpt_*.pt file, or from a run folder its newest readable checkpoint:
    a damaged newer one (truncated, overwritten) is named in a warning and skipped, and with set_aside
    renamed to *.damaged so that nothing takes it for the newest again."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}: pass a ckpt_*.pt file, a run folder holding one, "
                                  "or a Hugging Face folder with config.json")
        return _load(path), path
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint in {path}: pass a run folder of train.py, a ckpt_*.pt file "
                              "or a Hugging Face folder with config.json")
    for k, file in enumerate(reversed(found)):
        try:
            ckpt = _load(file)
        except CheckpointError as e:
            if k == len(found) - 1:
                raise CheckpointError(f"{e}; no readable checkpoint in {path} (all {len(found)} damaged)")
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"warning: {e}; skipping it, using the one before", file=sys.stderr)
                if set_aside:
                    os.replace(file, file.with_name(file.name + ".damaged"))
            continue
        return ckpt, file


def remove_partial_files(run_dir):
    """Temporary files of a save that was killed midway (SIGKILL, power cut): never checkpoints."""
    for tmp in Path(run_dir).glob(".ckpt_*.pt.tmp-*"):
        tmp.unlink(missing_ok=True)


def check_same_run(saved, args):
    """--resume continues the run in its folder only with the settings it was started with; a flag left
    out (None) takes the run's value."""
    for k, v in vars(args).items():
        if v is None and saved.get(k) is not None:
            setattr(args, k, saved[k])
        elif k not in RESUMABLE and saved.get(k) != v:
            flag = "--" + k.replace("_", "-")
            raise CheckpointError(f"--resume: {args.out_dir} was trained with {flag} {saved.get(k)}, now {v}; "
                                  "resume with the same settings or use another --out-dir")
