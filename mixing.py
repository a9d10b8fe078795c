"""
Find the data mixture the way the paper did (RECIPE section 7): probe each capability, measure what each
source does for it, and turn that into mixture weights or filtered data.

The demonstration, python mixing.py (~25 min on one CPU thread): a toy corpus of sources of uneven value, leave-one-out,
influence weights, pre-training on uniform / derived / hand-set weights, SFT, accuracy, two rounds of filtering.
Leave-one-out (Eq. 1): one run on all sources, one per left-out source, same budget and seed:
    python mixing.py loo --data data/toy-mix --sources worked-addsub,worked-mul,drills,errors,off-task \
        --probe add=data/toy-mix/probe-add --probe mul=data/toy-mix/probe-mul --steps 200 --size toy --out out/loo
Influence weights (Eqs. 2, 5, 6) from one or more checkpoints (a run folder: all its checkpoints), then train on them:
    python mixing.py weights --data data/toy-mix --sources worked-addsub,worked-mul,drills,errors,off-task \
        --probe add=data/toy-mix/probe-add --ckpt out/loo/all --json out/weights.json
    python train.py --size toy --data data/toy-mix --mixture @out/weights.json --out-dir out/derived
Mid-training filter (Eqs. 7-8): a new prepared source with the documents of positive benefit only:
    python mixing.py filter --data data/toy-mix --source pool --probe add=data/toy-mix/probe-add \
        --ckpt out/derived --out data/toy-mix/pool-r1
A probe is NAME=DIR[:SOURCE] (a source folder, or a data folder and a source); under torchrun ranks share the scoring:
    torchrun --standalone --nproc_per_node 8 mixing.py weights --data data/pretrain --sources fineweb-edu,wiki \
        --probe math=data/probes/math --ckpt out/specialist-math --json out/weights.json
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import grading
import kernels
import sample
import toydata
import train
from model import SIZES, ModelError, latest_checkpoint, load_model
from runtime import ArgumentParser, DeviceError, Runtime, device_name, matching, name_or_path, number, path
from tokenizer import TokenizerError

# The measured parameters (RECIPE section 7: "the embedding and output layers"; ours are one tied matrix E, RECIPE
# section 2). Default OUTPUT: E's output use alone, dL/dE through logits = h E^T (no backward pass). Its whole
# gradient (--params embed_tokens.weight) adds the input use, whose rows move with everything downstream; it made the
# planted-error source look helpful (RESULTS.md). Named parameters can be added: each a DataInf layer, own damping.
OUTPUT = "output"
DEFAULT_PARAMS = (OUTPUT,)
# Damping lambda_l = DAMPING * mean_i ||g_il||^2, a deliberate departure from DataInf's 0.1 * mean_i ||g_il||^2 / d_l
# (--datainf-damping), at which the closed form (a mean of rank-one inverses) ranks documents unlike the exact damped
# inverse: rank correlation 0.32-0.90 on toy models, >= 0.98 at 0.2 x mean ||g||^2 (RECIPE section 7.1).
DAMPING, DATAINF_DAMPING = 0.2, 0.1


class MixingError(Exception):
    """A problem the user can fix (missing probe, unknown source, foreign checkpoint): one line, exit 2."""


# -------------------------------------------------------------------------------------------------
# Documents, probes and checkpoints

class DocSet:
    """Documents of prepared sources addressed 0..len-1, without a Python object per document (pools are big)."""

    def __init__(self, parts):
        self.parts = [(src, np.asarray(ix, dtype=np.int64)) for src, ix in parts]
        self.ends = np.cumsum([len(ix) for _, ix in self.parts])

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i):
        p = int(np.searchsorted(self.ends, i, side="right"))
        src, ix = self.parts[p]
        return src.doc(int(ix[i - (self.ends[p] - len(ix))]))


def open_source(folder, what):
    if data.read_meta(folder) is None:
        problem = "is not a prepared source (no meta.json)" if os.path.isdir(folder) else "does not exist"
        raise MixingError(f"{what}: {folder} {problem}; prepare it with `python data.py prepare`")
    src = data.Source(folder)
    if len(src.docs) == 0:
        raise MixingError(f"{what}: {folder} holds no documents; give a probe set with documents")
    return src


def parse_probe(spec):
    """NAME=DIR[:SOURCE] -> (name, [Source]). DIR alone: a prepared source folder, or a folder whose
    prepared sources together form the probe set (a held-out folder)."""
    name, eq, where = spec.partition("=")
    if not eq or not name or not where:
        raise MixingError(f"--probe {spec!r}: write NAME=DIR or NAME=DIR:SOURCE")
    folder, _, source = where.rpartition(":") if ":" in where and not os.path.isdir(where) else (where, "", "")
    if source:
        return name, [open_source(os.path.join(folder, source), f"--probe {name}")]
    if data.read_meta(folder) is not None or not os.path.isdir(folder):
        return name, [open_source(folder, f"--probe {name}")]
    subs = sorted(d for d in os.listdir(folder) if data.read_meta(os.path.join(folder, d)) is not None)
    if not subs:
        raise MixingError(f"--probe {name}: {folder} is empty (no prepared source in it); prepare one into it")
    return name, [open_source(os.path.join(folder, d), f"--probe {name}") for d in subs]


def open_sources(data_dir, names):
    if not os.path.isdir(data_dir):
        raise MixingError(f"--data {data_dir} does not exist; prepare sources into it with `python data.py prepare`")
    prepared = sorted(d for d in os.listdir(data_dir) if data.read_meta(os.path.join(data_dir, d)) is not None)
    unknown = [n for n in names or [] if n not in prepared]
    if unknown or not names:
        raise MixingError(f"unknown source {', '.join(unknown) or '(none given)'} in {data_dir}; prepared: "
                          f"{', '.join(prepared) or 'none'}")
    return {n: data.Source(os.path.join(data_dir, n)) for n in names}


def sample_docs(src, n, seed):
    """A seeded sample of n documents of a source (all of them when n is 0 or larger than the source)."""
    k = len(src.docs) if n <= 0 or n >= len(src.docs) else n
    rng = np.random.default_rng([seed, len(src.docs)])
    return np.sort(rng.choice(len(src.docs), k, replace=False)) if k < len(src.docs) else np.arange(k)


def checkpoint_files(specs):
    """--ckpt values -> [(file, step)] in step order; a run folder gives all its checkpoints."""
    files = []
    for path in map(Path, specs):
        if not (path.is_file() or latest_checkpoint(path) is not None):
            raise MixingError(f"--ckpt {path}: no checkpoint there; give a run folder of train.py or a ckpt_*.pt file")
        files += [path] if path.is_file() else sorted(path.glob("ckpt_*.pt"))
    return sorted(((f, int(f.stem.split("_")[-1]) if f.stem.startswith("ckpt_") else i + 1)
                   for i, f in enumerate(files)), key=lambda fs: fs[1])


def load_scorer(file, sources, rt, param_names):
    """The checkpoint's model on the device, all parameters frozen but the measured subset."""
    model, tokenizer, meta = load_model(file, rt.device)
    src = sources[0]
    foreign = meta["format"] == "ours" and tokenizer != src.meta["tokenizer"]
    if model.config.vocab_size < src.meta["vocab_size"] or foreign:
        raise MixingError(f"checkpoint {file} has a vocabulary of {model.config.vocab_size} ({tokenizer}), the data "
                          f"{src.meta['vocab_size']} ({src.meta['tokenizer']}): use a model of the data's tokenizer")
    named = dict(model.named_parameters()) | {OUTPUT: model.lm_head_weight}
    if any(n not in named for n in param_names):
        raise MixingError(f"--params {','.join(param_names)}: no such parameter; e.g. {', '.join(list(named)[-4:])}")
    model.eval().requires_grad_(False)
    for n in set(param_names) - {OUTPUT}:
        named[n].requires_grad_(True)
    return model, list(param_names)


# -------------------------------------------------------------------------------------------------
# Per-document gradients and the DataInf closed form (RECIPE section 7, Eq. 2)

def doc_tensors(tokens, mask, max_len, device):
    """(x, y) of one document, cropped to the context; y = -100 where nothing is supervised."""
    t = torch.as_tensor(np.asarray(tokens[:max_len + 1], dtype=np.int64), device=device)[None]
    x, y = t[:, :-1], t[:, 1:].clone()
    if mask is not None:
        y[0, ~torch.as_tensor(np.asarray(mask[1:max_len + 1], dtype=bool), device=device)] = -100
    return x, y


def doc_gradient(model, params, tokens, mask, rt):
    """Flat float32 gradients of the document's mean token loss on params (names, or OUTPUT), and its
    supervised tokens (or None, 0)."""
    x, y = doc_tensors(tokens, mask, model.config.max_seq_len, rt.device)
    n = int((y != -100).sum())
    if n == 0:
        return None, 0
    w_out = model.lm_head_weight
    if not w_out.requires_grad:  # not named itself: its output use alone, through a detached copy
        w_out = w_out.detach().requires_grad_()
    with rt.autocast():  # bf16 on CUDA
        loss = kernels.linear_cross_entropy(model.forward_hidden(x), w_out, y, recompute=False)
    named = dict(model.named_parameters()) | {OUTPUT: w_out}
    return [g.float().flatten() for g in torch.autograd.grad(loss, [named[p] for p in params])], n


def each_gradient(model, params, docs, rt, bar):
    """(global index, gradients, tokens) for this rank's share of docs: rank r takes r, r + W, ..."""
    for i in range(rt.rank, len(docs), rt.world_size):
        g, n = doc_gradient(model, params, *docs[i], rt)
        bar.update(min(rt.world_size, len(docs) - i))
        if g is not None:
            yield i, g, n


def directions(model, params, probes, hessian, rt, bar, damping=DAMPING, per_dim=False):
    """h[c][l] ~ H_l^-1 v_cl for each probe c and layer l, DataInf's closed form (RECIPE section 7, Eq. 2):
    v_cl the mean probe gradient, per-sample gradients g_il of the Hessian sample, H_l = mean g g^T + lambda_l I,
        lambda_l = damping mean_i ||g_il||^2 (/ d_l if per_dim: DataInf's rule),
        c_i = <v_l, g_il> / (lambda_l + ||g_il||^2),
        h_l = (1 / (n lambda_l)) sum_i (v_l - c_i g_il) = v_l / lambda_l - sum_i c_i g_il / (n lambda_l),
    i.e. the mean over samples of the exactly inverted (g_i g_i^T + lambda I): each by Sherman-Morrison."""
    named, dev = dict(model.named_parameters()) | {OUTPUT: model.lm_head_weight}, rt.device
    dims = [named[p].numel() for p in params]
    v = []
    for docs in probes:
        acc = [torch.zeros(d, device=dev) for d in dims] + [torch.zeros(1, device=dev)]
        for _, g, _ in each_gradient(model, params, docs, rt, bar):
            for a, gl in zip(acc, g):
                a += gl
            acc[-1] += 1
        acc = [rt.all_sum(a) for a in acc]
        v.append([a / acc[-1].clamp(min=1) for a in acc[:-1]])
    n, P, L = len(hessian), len(probes), len(params)
    norms = torch.zeros(n, L, dtype=torch.float64, device=dev)  # ||g_il||^2
    dots = torch.zeros(n, P, L, dtype=torch.float64, device=dev)  # <v_cl, g_il>
    valid = torch.zeros(n, dtype=torch.float64, device=dev)
    for i, g, _ in each_gradient(model, params, hessian, rt, bar):
        valid[i] = 1
        for l, gl in enumerate(g):
            norms[i, l] = torch.dot(gl, gl)
            for c in range(P):
                dots[i, c, l] = torch.dot(v[c][l], gl)
    norms, dots, valid = (rt.all_sum(t) for t in (norms, dots, valid))
    n_valid = valid.sum().clamp(min=1)
    lam = damping * norms.sum(0) / n_valid / (torch.tensor(dims, dtype=torch.float64, device=dev) if per_dim else 1)
    coef = dots / (lam + norms)[:, None, :] * valid[:, None, None]  # c_i, per probe and layer
    acc = [[torch.zeros(d, dtype=torch.float64, device=dev) for d in dims] for _ in range(P)]
    for i, g, _ in each_gradient(model, params, hessian, rt, bar):  # the second pass: sum_i c_i g_il
        for c in range(P):
            for l, gl in enumerate(g):
                acc[c][l].add_(gl, alpha=coef[i, c, l].item())
    for a in (a for per_probe in acc for a in per_probe):
        rt.all_sum(a)  # in place
    return [[(v[c][l].double() / lam[l] - acc[c][l] / (n_valid * lam[l])).float() for l in range(L)]
            for c in range(P)]


def benefits(model, params, dirs, docs, rt, bar):
    """(scores (n, probes), tokens (n,)) of every document, all ranks combined. Sign: the benefit
    b(x) = + g_probe^T H^-1 g_x is POSITIVE when training on x LOWERS the probe loss (a step -eta H^-1 g_x
    changes it by -eta b(x)); minus Eq. 2 as printed, which is the sign the paper keeps (RECIPE section 7)."""
    scores = torch.zeros(len(docs), len(dirs), dtype=torch.float64, device=rt.device)
    tokens = torch.zeros(len(docs), dtype=torch.float64, device=rt.device)
    for i, g, n in each_gradient(model, params, docs, rt, bar):
        tokens[i] = n
        for c, h in enumerate(dirs):
            scores[i, c] = sum(torch.dot(hl, gl).double() for hl, gl in zip(h, g))
    scores, tokens = rt.all_sum(scores), rt.all_sum(tokens)
    return scores.cpu().numpy(), tokens.cpu().numpy()


def joint_benefit(ckpts, sources, probes, docs, hessian, rt, param_names=DEFAULT_PARAMS, desc="score",
                  damping=DAMPING, per_dim=False):
    """Eq. 5: per-document benefit (n, probes), summed over checkpoints with alpha_t proportional to the
    checkpoint's step t (normalised to sum 1); and the documents' supervised tokens."""
    alpha = np.array([step for _, step in ckpts], dtype=np.float64) / sum(step for _, step in ckpts)
    total = None
    work = len(ckpts) * (sum(len(p) for p in probes) + 2 * len(hessian) + len(docs))
    bar = tqdm(total=work, desc=desc, unit="doc", disable=not rt.master or None, dynamic_ncols=True)
    for a, (file, _) in zip(alpha, ckpts):
        model, params = load_scorer(file, sources, rt, param_names)
        dirs = directions(model, params, probes, hessian, rt, bar, damping, per_dim)
        scores, tokens = benefits(model, params, dirs, docs, rt, bar)
        total = a * scores if total is None else total + a * scores
    bar.close()
    return total, tokens


@torch.no_grad()
def probe_loss(model, docs, rt):
    """Token-weighted mean loss over a probe set: E_z l(z; theta) of Eq. 1."""
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for i in range(rt.rank, len(docs), rt.world_size):
        x, y = doc_tensors(*docs[i], model.config.max_seq_len, rt.device)
        with rt.autocast():
            _, loss = model(x, y, return_logits=False, loss_reduction="sum")
        total += torch.stack([loss.double(), (y != -100).sum().double()])
    total = rt.all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def final_probe_losses(run_or_ckpt, probes, rt):
    model = load_model(run_or_ckpt, rt.device)[0]
    return {p: probe_loss(model, docs, rt) for p, docs in probes.items()}


# -------------------------------------------------------------------------------------------------
# The three commands

def probe_sets(args):
    if not (probes := dict(parse_probe(s) for s in args.probe or [])):
        raise MixingError("give at least one --probe NAME=DIR[:SOURCE]")
    return {name: DocSet([(s, sample_docs(s, args.probe_docs, args.seed)) for s in srcs])
            for name, srcs in probes.items()}


def train_flags(args, mixture, out_dir, seed, steps, points=3, init_from=None, stage="pretrain", lr=None):
    """train.py's command line for one run of the tool (printed, so any run can be redone by hand)."""
    flags = ["--stage", stage, "--data", args.data, "--mixture", mixture, "--max-steps", steps, "--seed", seed,
             "--out-dir", out_dir, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
             "--total-batch-tokens", args.batch_size * args.seq_len, "--lr", lr or args.lr, "--warmup-steps",
             min(args.warmup, steps // 4), "--save-every", max(1, -(-steps // points)), "--keep-last", points,
             "--log-every", steps, "--eval-batches", 1, "--device", args.device]
    flags += ["--init-from", init_from] if init_from else ["--size", args.size]
    return [str(f) for f in flags]


def run_training(flags, rt):
    """train.py's entry point; a run whose final checkpoint is there already is reused."""
    args = train.parse_args(flags)
    last = latest_checkpoint(args.out_dir)
    if last is not None and int(last.stem.split("_")[-1]) == args.max_steps:
        return
    if rt.master:
        print(f"== python train.py {' '.join(flags)}", flush=True)
    train.train(args, rt)


def loo(args, rt):
    """Eq. 1: one run on all sources (every token equally likely: weights = token counts, so no document
    repeats before the others are used) and one without each source; same steps, seed, everything else.
    Delta L(source, probe) = probe loss without - probe loss with, at each checkpoint: > 0 = the source helps."""
    sources = open_sources(args.data, args.sources)
    probes = probe_sets(args)
    runs = {"all": list(sources)} | {f"without-{n}": [m for m in sources if m != n] for n in sources}
    losses = {}
    for run, names in runs.items():
        mixture = ",".join(f"{n}={sources[n].n_tokens}" for n in names)
        run_training(train_flags(args, mixture, os.path.join(args.out, run), args.seed, args.steps, args.points), rt)
        losses[run] = {step: final_probe_losses(file, probes, rt)
                       for file, step in checkpoint_files([os.path.join(args.out, run)])}
    steps = sorted(losses["all"])
    delta = {n: {p: {s: losses[f"without-{n}"][s][p] - losses["all"][s][p] for s in steps} for p in probes}
             for n in sources}
    report = {"steps": steps, "delta": delta, "loss": losses, "sources": list(sources), "probes": list(probes)}
    if rt.master:
        print("\nleave-one-out: Delta L = probe loss without the source - with it (> 0: the source helps)")
        print(f"{'source':<18}{'step':>7}" + "".join(f"{p:>11}" for p in probes))
        for n in sources:
            for s in steps:
                print(f"{n:<18}{s:>7}" + "".join(f"{delta[n][p][s]:>+11.4f}" for p in probes))
        write_json(os.path.join(args.out, "loo.json"), report)
        print(f"wrote {os.path.join(args.out, 'loo.json')}")
    return report


def weights(args, rt):
    """Eqs. 5-6: rho_g = token-weighted mean joint benefit over a sample of source g's documents,
    w_g = rho_g / sum rho. A source of negative rho (training on it raises the probe losses, on average)
    gets weight 0, i.e. it is left out of the mixture; the paper does not say what it does (RECIPE section 7)."""
    sources, probes, ckpts = open_sources(args.data, args.sources), probe_sets(args), checkpoint_files(args.ckpt)
    parts = [(s, sample_docs(s, args.docs, args.seed)) for s in sources.values()]
    share = max(1, args.hessian_docs // len(parts))  # the Hessian sample: an equal share of every source
    hessian = DocSet([(s, sample_docs(s, share, args.seed + 1)) for s in sources.values()])
    scores, tokens = joint_benefit(ckpts, list(sources.values()), list(probes.values()), DocSet(parts), hessian, rt,
                                   args.params, "score", args.damping, args.datainf_damping)
    per_probe, start = {p: {} for p in probes}, 0
    for name, (_, ix) in zip(sources, parts):
        sl, start = slice(start, start + len(ix)), start + len(ix)
        for c, p in enumerate(probes):  # Eq. 6 per probe: sum_i I(x_i) s_i / N_g
            per_probe[p][name] = float((scores[sl, c] * tokens[sl]).sum() / max(tokens[sl].sum(), 1))
    rho = {n: float(np.mean([per_probe[p][n] for p in probes])) for n in sources}  # probes uniformly (Eq. 5)
    positive = {n: max(r, 0.0) for n, r in rho.items()}
    if sum(positive.values()) <= 0:
        raise MixingError("no source has a positive benefit on the probes: no mixture to derive; check the probes")
    w = {n: r / sum(positive.values()) for n, r in positive.items()}
    mixture = ",".join(f"{n}={x:.6f}" for n, x in w.items() if x > 0)
    out = {"format": data.WEIGHTS_FORMAT, "weights": w, "rho": rho, "per_probe": per_probe, "mixture": mixture,
           "checkpoints": [str(f) for f, _ in ckpts], "params": list(args.params),
           "docs": {n: len(ix) for n, (_, ix) in zip(sources, parts)}, "hessian_docs": len(hessian),
           "damping": args.damping, "damping_rule": "datainf" if args.datainf_damping else "mean_norm",
           "sign": "positive benefit = training on the source lowers the probe loss"}
    if rt.master:
        print(f"{'source':<18}{'weight':>9}{'rho':>12}" + "".join(f"{p:>12}" for p in probes))
        for n in sources:
            print(f"{n:<18}{w[n]:>9.2%}{rho[n]:>12.4g}" + "".join(f"{per_probe[p][n]:>12.4g}" for p in probes))
        if args.json:
            write_json(args.json, out)
            print(f"wrote {args.json}; train on it with --mixture @{args.json}")
    return out


def filter_source(args, rt):
    """Eqs. 7-8: score every document of the source with the current model(s); keep those with positive
    joint benefit (mean over probes, alpha over checkpoints) as a new prepared source."""
    src, probes = open_sources(args.data, [args.source])[args.source], probe_sets(args)
    out = Path(args.out)
    if not out.name or out.resolve() == (Path(args.data) / args.source).resolve():
        raise MixingError(f"--out {args.out}: give a new source folder, not the source being filtered")
    docs = DocSet([(src, np.arange(len(src.docs)))])
    hessian = DocSet([(src, sample_docs(src, args.hessian_docs, args.seed))])
    scores, _ = joint_benefit(checkpoint_files(args.ckpt), [src], list(probes.values()), docs, hessian, rt,
                              args.params, f"filter {args.source}", args.damping, args.datainf_damping)
    keep = np.flatnonzero(scores.mean(1) > 0)  # Eq. 7: D_t = {x : I(x; theta_t) > 0}
    if rt.master:
        print(f"kept {len(keep):,} of {len(docs):,} documents of {args.source} ({len(keep) / len(docs):.1%})"
              + (f" in {out}" if len(keep) else ": nothing left to mid-train on, no source written"))
        if len(keep):
            write_source(src, keep, out, {"filtered_from": str(Path(args.data) / args.source), "ckpt": args.ckpt})
    if rt.ddp:
        dist.barrier()  # the new source is complete before any rank trains on it
    return keep


def write_source(src, keep, folder, origin):
    """A prepared source of src's documents `keep`, written with data.py's shard writer (same format, at most
    data.SHARD_TOKENS per shard) in a hidden folder renamed into place: nothing half-written looks prepared."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta, docs, shards = dict(src.meta), [], []
        enc = SimpleNamespace(n_vocab=meta["vocab_size"], fingerprint=meta["tokenizer_fingerprint"])
        writer = data._ShardWriter(str(tmp / "part"), enc, src.kind)
        for d in keep:
            writer.add(*src.doc(int(d)))
        writer.close()
        for k, (part, lengths) in enumerate(writer.parts):
            for ext in (".bin", ".mask") if src.kind == "chat" else (".bin",):
                os.rename(part + ext, tmp / f"shard_{k:05d}{ext}")
            lengths = np.asarray(lengths, dtype=np.int64)
            docs.append(np.stack([np.full_like(lengths, k), np.cumsum(lengths) - lengths, lengths], axis=1))
            shards.append({"file": f"shard_{k:05d}.bin", "n_tokens": int(lengths.sum())})
        np.save(tmp / "docs.npy", docs := np.concatenate(docs))
        meta.update(source=folder.name, n_tokens=int(docs[:, 2].sum()), n_docs=len(docs), shards=shards,
                    inputs=[origin])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # an older output of the same name
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)  # atomic: a reader never sees half a file


# -------------------------------------------------------------------------------------------------
# The demonstration: python mixing.py

DEMO_DIR, DEMO_OUT = "data/toy-mix", "out/mixing"
DEMO_SOURCES = ["worked-addsub", "worked-mul", "drills", "errors", "off-task"]
# The hand-set toy mixture (data.PRESETS["toy"]: 90% worked problems, 10% drill sheets) on these sources.
DEMO_HAND_SET = "worked-addsub=0.45,worked-mul=0.45,drills=0.1"
# The toy solves problems only once it copies the question's operands into the trace (~3M tokens), too many for six
# runs from scratch: so pre-training has the recipe's two phases (RECIPE section 5.1), phase 1 shared (uniform).
DEMO = dict(loo_steps=200, phase1_steps=700, pretrain_steps=250, batch_size=16, sft_steps=60, midtrain_steps=60,
            seeds=(0, 1), eval_problems=0)


def sft_accuracy(run_dir, pre_dir, args, rt, seed):
    """The toy run's SFT (toydata.TOY_RUN, shortened) on top of a pre-trained model, then greedy accuracy
    on held-out problems the probes do not contain."""
    sft = dict(toydata.TOY_RUN["sft"], max_steps=DEMO["sft_steps"], save_every=DEMO["sft_steps"],
               eval_every=0, log_every=DEMO["sft_steps"], eval_mixture="toy-sft=1", eval_batches=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sft.items()]
    run_training(flags + [f"--data={args.data}", f"--out-dir={run_dir}", f"--init-from={pre_dir}",
                          f"--seed={seed}", f"--device={args.device}"], rt)
    sargs = sample.parse_args(["--ckpt", str(run_dir), "--eval", str(DEMO["eval_problems"]), "--max-new-tokens", "300",
                               "--eval-file", os.path.join(args.data, "eval.jsonl"), "--device", str(rt.device)])
    (model, enc), problems = sample.load(sargs, rt.device), sample.eval_problems(sargs)
    texts, _, _ = sample.generate_batched(model, enc, [sample.chat_ids(enc, sample.messages_for(
        p["question"], sargs), model.config.max_seq_len, sargs) for p in problems], sargs)
    return sum(grading.grade(t[0], p["answer"]) for t, p in zip(texts, problems)) / len(problems)


def demo(rt):
    t0 = time.time()
    if rt.master and toydata.write_mixing_toy(DEMO_DIR):
        shutil.rmtree(DEMO_OUT, ignore_errors=True)  # runs on an older corpus are not reused
    if rt.ddp:
        dist.barrier()  # the corpus is written before any rank reads it
    base = ["--data", DEMO_DIR, "--sources", ",".join(DEMO_SOURCES), "--size", "toy", "--batch-size", "4",
            "--probe-docs", "24"] + [f for k in toydata.KINDS for f in ("--probe", f"{k}={DEMO_DIR}/probe-{k}")]
    out = Path(DEMO_OUT)
    say = print if rt.master else (lambda *a, **k: None)

    def command(*argv):  # each step is a command of this tool: print it, then parse it
        say(f"\n== python mixing.py {' '.join(map(str, argv))}")
        return parse_args([str(a) for a in argv])
    report = loo(command("loo", *base, "--steps", DEMO["loo_steps"], "--out", out / "loo"), rt)
    args = command("weights", *base, "--docs", 64, "--hessian-docs", 128, "--ckpt", out / "loo" / "all", "--json",
                   out / "weights.json")
    derived = weights(args, rt)
    lowest = min(derived["rho"], key=derived["rho"].get)
    say(f"sanity check: the planted-error source has the lowest benefit: {lowest == 'errors'} (lowest: {lowest})")
    mixtures = {"uniform": ",".join(f"{n}=1" for n in DEMO_SOURCES), "derived": f"@{out}/weights.json",
                "hand-set": DEMO_HAND_SET}
    say("\n== 3. pre-training phase 1 (shared, uniform), phase 2 with each mixture (same budget), the same SFT")
    results, probes = {}, probe_sets(args)  # the same documents as the probes of loo and weights
    pt, phase1 = SimpleNamespace(**{**vars(args), "batch_size": DEMO["batch_size"]}), out / "pretrain-phase1"
    run_training(train_flags(pt, mixtures["uniform"], str(phase1), 0, DEMO["phase1_steps"], points=1), rt)
    for name, mixture in mixtures.items():
        for seed in DEMO["seeds"]:
            pre = out / f"pretrain-{name}-s{seed}"
            run_training(train_flags(pt, mixture, str(pre), seed, DEMO["pretrain_steps"], 1, init_from=phase1), rt)
            acc = sft_accuracy(out / f"sft-{name}-s{seed}", pre, args, rt, seed)
            results.setdefault(name, []).append({"seed": seed, "probe_loss": final_probe_losses(pre, probes, rt),
                                                 "accuracy": acc})
    say("\n== 4. mid-training filter, two rounds (filter -> mid-train -> filter -> mid-train) vs no filtering")
    filt, start, steps = {}, out / "pretrain-derived-s0", DEMO["midtrain_steps"]
    current = start
    for r in (1, 2):
        if not len(kept := filter_source(command("filter", *base, "--source", "pool", "--hessian-docs", 128, "--ckpt",
                                                 current, "--out", f"{DEMO_DIR}/pool-r{r}"), rt)):
            break
        run_dir = out / f"midtrain-filtered-r{r}"
        run_training(train_flags(args, f"pool-r{r}=1", str(run_dir), 0, steps, 1, init_from=current,
                                 stage="midtrain", lr=args.lr / 3), rt)
        filt[r] = {"kept": int(len(kept)), "probe_loss": final_probe_losses(run_dir, probes, rt)}
        current = run_dir
    plain = out / "midtrain-unfiltered"
    run_training(train_flags(args, "pool=1", str(plain), 0, 2 * steps, 1, init_from=start, stage="midtrain",
                             lr=args.lr / 3), rt)
    unfiltered = final_probe_losses(plain, probes, rt)
    if not rt.master:
        return
    kinds = list(probes)
    losses = lambda pl: "".join(f"{pl[k]:>9.4f}" for k in kinds) + f"{np.mean(list(pl.values())):>9.4f}"  # noqa: E731
    print(f"\n{'mixture':<10}{'seed':>5}" + "".join(f"{k:>9}" for k in kinds) + f"{'mean':>9}{'accuracy':>10}")
    for name, rows in results.items():
        for r in rows + [{"seed": "mean", "probe_loss": {k: np.mean([x["probe_loss"][k] for x in rows]) for k in kinds},
                          "accuracy": np.mean([x["accuracy"] for x in rows])}]:
            print(f"{name:<10}{r['seed']:>5}" + losses(r["probe_loss"]) + f"{r['accuracy']:>10.1%}")
    print(f"\n{'mid-training':<26}" + "".join(f"{k:>9}" for k in kinds) + f"{'mean':>9}")
    for label, pl in [(f"filtered round {r} ({filt[r]['kept']} kept)", filt[r]["probe_loss"]) for r in filt] \
            + [("unfiltered (same steps)", unfiltered)]:
        print(f"{label:<26}" + losses(pl))
    write_json(str(out / "demo.json"), {"loo": report["delta"], "weights": derived, "pretrain": results,
                                        "filter": filt, "unfiltered": unfiltered, "minutes": (time.time() - t0) / 60})
    print(f"\ndemo done in {(time.time() - t0) / 60:.1f} min; results in {out}/demo.json")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")  # none: the demonstration
    count, at_least_0 = number(int, at_least=1), number(int, at_least=0)
    names = matching(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "comma-separated names")
    common = ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, type=path("dir"), help="prepared data folder")
    common.add_argument("--probe", action="append", metavar="NAME=DIR[:SOURCE]", type=matching(r"[^=]+=.+", "NAME=DIR"),
                        help="a capability's probe set: prepared source folder, held-out folder, or DIR:SOURCE")
    common.add_argument("--probe-docs", type=at_least_0, default=64, help="documents per probe set (0: all)")
    common.add_argument("--seed", type=at_least_0, default=0, help="seed of the document samples and of training")
    common.add_argument("--device", default="auto", type=device_name, help="auto, cuda, mps or cpu")
    common.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 if native")
    common.add_argument("--sources", type=names, help="comma-separated sources")
    scoring = ArgumentParser(add_help=False)
    scoring.add_argument("--ckpt", action="append", required=True, metavar="RUN_OR_CKPT",
                         type=name_or_path([], ["ckpt_*.pt"], "a checkpoint or run folder"),
                         help="checkpoint file, or run folder (all its checkpoints); repeatable")
    scoring.add_argument("--hessian-docs", type=count, default=256, help="documents for the damped Hessian")
    scoring.add_argument("--damping", type=number(float, above=0), help=f"lambda_l = DAMPING x mean ||g_l||^2 "
                         f"(default {DAMPING}); with --datainf-damping / d_l (default {DATAINF_DAMPING})")
    scoring.add_argument("--datainf-damping", action="store_true", help="DataInf's (the paper's) damping rule")
    scoring.add_argument("--params", type=names, default=",".join(DEFAULT_PARAMS),
                         help=f"measured layers: {OUTPUT} (the tied matrix's output use) and/or parameter names")
    q = sub.add_parser("loo", parents=[common], help="leave-one-out runs (Eq. 1)")
    q.add_argument("--steps", type=count, required=True, help="optimizer steps of every run")
    q.add_argument("--points", type=count, default=3, help="checkpoints (evenly spaced) at which Delta L is reported")
    q.add_argument("--out", required=True, type=path("new"), help="folder of the runs and loo.json")
    q = sub.add_parser("weights", parents=[common, scoring], help="influence-based mixture weights (Eqs. 2, 5, 6)")
    q.add_argument("--docs", type=at_least_0, default=128, help="documents sampled per source (0: all)")
    q.add_argument("--json", type=path("file"), help="write the weights here (train.py / data.py mix --mixture @FILE)")
    q = sub.add_parser("filter", parents=[common, scoring], help="keep the documents of positive benefit (Eqs. 7-8)")
    q.add_argument("--source", required=True, type=names, help="the source to filter")
    q.add_argument("--out", required=True, type=path("new"), help="the new source folder (its name: the new source's)")
    runs = (("--batch-size", count, 8, "rows per step"), ("--seq-len", count, 256, "tokens per row"),
            ("--lr", number(float, above=0), 3e-3, "peak learning rate"), ("--warmup", at_least_0, 20, "warmup steps"))
    for q in sub.choices.values():  # the training runs of loo and of the demonstration
        q.add_argument("--size", choices=list(SIZES), default="toy", help="training runs: model size")
        for flag, kind, default, text in runs:
            q.add_argument(flag, type=kind, default=default, help=f"training runs: {text}")
    args = p.parse_args(argv)
    for name in [n for n in ("sources", "params") if getattr(args, n, None)]:  # comma-separated lists
        setattr(args, name, getattr(args, name).split(","))
    if hasattr(args, "damping") and args.damping is None:
        args.damping = DATAINF_DAMPING if args.datainf_damping else DAMPING
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.command is None:
            demo(Runtime())
        else:
            {"loo": loo, "weights": weights, "filter": filter_source}[args.command](args, Runtime(args.device, args.dtype))
        if dist.is_initialized():
            dist.barrier()
    except (MixingError, ModelError, data.DataError, TokenizerError, DeviceError, train.TrainError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
