"""
The workloads bench.py measures. Each builder returns {side: a call to time or measure} for the sides
asked for ("ours", "reference", and bf16 variants such as "reference bf16"); when several sides are
built they share weights and inputs, so the two implementations do exactly the same work.

    train       forward, backward, clip, AdamW step: ours vs transformers' Llama4ForCausalLM
    generate    greedy decoding with the KV cache, 128 new tokens after 64
    attention   kernels.attention (its automatic backend) vs torch SDPA, causal or with a dense document mask
    loss        kernels.linear_cross_entropy vs logits + F.cross_entropy
    sampler     data.MixtureSampler vs nanoGPT's get_batch
    eval        sample.py's batched --eval-file path vs one prompt at a time
    mixing      mixing.py's scoring pass (ours only: the paper's code is unreleased)
"""

import argparse
import copy
import contextlib
import io
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import data
import hf
import kernels
from model import MobileLLM, ModelConfig, adamw
from runtime import DTYPES

SIDES = ("ours", "reference")
# (batch, seq) of the training step: 140m as fits a CPU, toy as train.py's toy preset
TRAIN_SHAPES = {"140m": (2, 256), "toy": (16, 256)}
PROMPT, NEW_TOKENS = 64, 128  # generation: 128 new tokens after a 64-token prompt
ATTN_HEADS = (9, 3, 64)  # query heads, kv heads, head_dim of the 140m model (RECIPE section 2)
ATTN_DOCS = 8  # documents packed in one attention sequence
CUDA_SIZES = ("140m", "360m", "950m")
CUDA_SHAPE = (16, 2048)  # per-GPU batch of pre-training (RECIPE section 4)

EVAL_PROMPTS, EVAL_BATCH, EVAL_NEW = 32, 16, 128  # eval batched: prompts, rows per batch, new tokens


def build_models(size, sides, device="cpu"):
    """{"ours": ..., "reference": ...} for the sides named (a side "reference bf16" is the reference)."""
    config = ModelConfig.from_size(size)
    torch.manual_seed(0)
    models = {}
    if any(side.startswith("reference") for side in sides):
        models["reference"] = hf.reference_model(config).to(device)
    if any(side.startswith("ours") for side in sides):
        models["ours"] = MobileLLM(config).to(device)
        if "reference" in models:  # same weights: HF names are ours with a "model." prefix
            state = {k.removeprefix("model."): v for k, v in models["reference"].state_dict().items()
                     if k != "lm_head.weight"}
            models["ours"].load_state_dict(state, strict=False)  # rope tables are computed, not loaded
    return config, models


def build_train(size, batch, seq, dtypes, sides=None, device="cpu", compile=False):
    """A training step per side; dtypes {side: "float32" or "bfloat16"}: bfloat16 is autocast with
    float32 weights and AdamW state (train.py's --dtype bfloat16; HF Trainer's bf16=True)."""
    sides = sides or tuple(dtypes)
    config, models = build_models(size, sides, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device)
    idx, targets = x[:, :-1], x[:, 1:]
    fns = {}
    for side in sides:
        model = models[side.split()[0]]
        model.train()
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtypes[side] == "bfloat16")
        if side.startswith("ours"):
            optimizer = model.configure_optimizer(1e-4, 0.1, device_type=device)
            forward = torch.compile(model) if compile else model
            loss_of = lambda fwd=forward: fwd(idx, targets, return_logits=False)[1]
        else:
            # HF's Trainer defaults to optim="adamw_torch_fused" with torch >= 2.8 (also on CPU).
            optimizer = adamw(model, 1e-4, 0.1, device_type=device)  # the same AdamW as ours
            forward = torch.compile(model) if compile else model
            # labels are shifted inside (loss on T - 1 positions); no KV cache is kept in training
            loss_of = lambda fwd=forward: fwd(input_ids=idx, labels=idx, use_cache=False).loss

        def step(model=model, optimizer=optimizer, loss_of=loss_of, autocast=autocast):
            with autocast:
                loss = loss_of()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # RECIPE section 4
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        fns[side] = step
    return fns


def build_generate(size, dtypes):
    """Greedy generation per side, weights in dtypes[side] (as sample.py and HF's torch_dtype load
    them); returns (fns, bytes read per generated token per side)."""
    config, models = build_models(size, dtypes)
    idx = torch.randint(0, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    fns, read = {}, {}
    for side, dtype in dtypes.items():
        model = models[side.split()[0]]
        if DTYPES[dtype] != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(DTYPES[dtype])
        model.eval()
        if side.startswith("ours"):
            fns[side] = lambda m=model: m.generate(idx, NEW_TOKENS)
        else:
            model.generation_config.eos_token_id = None  # always 128 new tokens, as ours without stop ids
            model.generation_config.pad_token_id = 0
            fns[side] = lambda m=model: m.generate(idx, max_new_tokens=NEW_TOKENS, do_sample=False)
        read[side] = bytes_per_token(model, config, DTYPES[dtype].itemsize)
    return fns, read


def bytes_per_token(model, config, itemsize):
    """Bytes a decoding step must read: every weight once (the tied embedding as the output head; the
    input lookup is one row) plus the KV cache at the mean context length of the run."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    context = PROMPT + NEW_TOKENS / 2
    cache = 2 * config.n_layer * config.n_kv_head * config.head_dim * context * itemsize
    return weights + cache


def build_attention(T, docs, varied=False, backend=None, sides=SIDES):
    """Forward + backward of one attention call at the 140m head shapes, B = 1. docs = 0: causal
    only; else `docs` documents packed in the sequence (the reference gets a dense mask), of equal
    lengths, or varied: lengths in proportion 1 : 2 : ... : docs. Ours: kernels.attention's automatic
    choice, or `backend`."""
    H, KV, D = ATTN_HEADS
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(1, KV, T, D, generator=g, requires_grad=True)
    v = torch.randn(1, KV, T, D, generator=g, requires_grad=True)
    dout = torch.randn(1, H, T, D, generator=g)
    doc_ids = (torch.arange(T) * docs // T)[None] if docs else None
    if docs and varied:
        ends = torch.tensor([T * n * (n + 1) // (docs * (docs + 1)) for n in range(1, docs + 1)])
        doc_ids = torch.searchsorted(ends, torch.arange(T), right=True)[None]
    # The dense (T, T) mask is built once, outside the measured call: the reference is not charged for it.
    mask = (doc_ids[0, :, None] == doc_ids[0, None, :]).tril() if docs else None

    def run(attend):
        attend().backward(dout)
        q.grad = k.grad = v.grad = None
    fns = {
        "ours": lambda: run(lambda: kernels.attention(q, k, v, causal=True, doc_ids=doc_ids, backend=backend)),
        "reference": lambda: run(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)),
    }
    return {side: fns[side] for side in sides}


def build_loss(batch, seq, recompute=True, sides=SIDES):
    """Output projection + cross-entropy, forward + backward, at the 140m shapes (d 576, vocab 128,256).
    recompute: kernels' two modes (recompute chunk logits in the backward, or grads in the forward)."""
    config = ModelConfig.from_size("140m")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, config.d_model, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(config.vocab_size, config.d_model, generator=g)).requires_grad_()
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=g)

    def run(loss_of):
        loss_of().backward()
        h.grad = w.grad = None
    fns = {
        "ours": lambda: run(lambda: kernels.linear_cross_entropy(h, w, targets, recompute=recompute)),
        # what HF's loss does: full logits, upcast to float32, then cross-entropy
        "reference": lambda: run(lambda: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), targets.flatten())),
    }
    return {side: fns[side] for side in sides}


def build_eval_batched():
    """sample.generate_batched on a toy model: `ours` batches EVAL_BATCH prompts, `reference` runs one
    at a time (the same prompts; the generated tokens are identical, tests/test_sample.py)."""
    import sample
    from tokenizer import get_tokenizer
    torch.manual_seed(0)
    model, enc = MobileLLM(ModelConfig.from_size("toy")).eval(), get_tokenizer("toy")
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(8, 200, EVAL_PROMPTS).long()[torch.randperm(EVAL_PROMPTS, generator=g)]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths.tolist()]

    def run(batch_size):
        args = argparse.Namespace(batch_size=batch_size, num_samples=1, max_new_tokens=EVAL_NEW,
                                  temperature=0.0, top_k=None, top_p=None, seed=0)
        return lambda: sample.generate_batched(model, enc, prompts, args)
    return {"ours": run(EVAL_BATCH), "reference": run(1)}


SAMPLER_SEQ, SAMPLER_BATCH, SAMPLER_BATCHES = 2048, 8, 40  # sampler: rows of 2048 + 1 tokens, batches per call


def build_sampler(n_docs):
    """MixtureSampler over two prepared sources of n_docs documents each (100 to 3,000 words) vs nanoGPT's
    get_batch (uniform random offsets into one memory-mapped shard, no mixture, no document ids)."""
    seq, batch = SAMPLER_SEQ, SAMPLER_BATCH
    tmp = tempfile.TemporaryDirectory()  # removed when the calls below are garbage
    rng = np.random.default_rng(0)
    words = ["carry", "digit", "sum", "step", "answer", "think", "7", "42", "+", "="]
    for source in ("a", "b"):
        path = os.path.join(tmp.name, f"{source}.jsonl")
        with open(path, "w") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(100, 3000)))}) + "\n")
        with contextlib.redirect_stdout(io.StringIO()):  # keep the table's output clean
            data.prepare(source, [path], os.path.join(tmp.name, "data"), tokenizer="toy", workers=1)
    sampler = data.MixtureSampler(os.path.join(tmp.name, "data"), "a=0.7,b=0.3", seq, batch)
    shard = os.path.join(tmp.name, "data", "a", "shard_00000.bin")
    tokens = np.memmap(shard, dtype=np.uint32, mode="r", offset=data.HEADER_BYTES)

    def nanogpt_batch():
        ix = torch.randint(len(tokens) - seq - 1, (batch,))
        rows = [torch.from_numpy(tokens[i:i + seq + 1].astype(np.int64)) for i in ix.tolist()]
        return torch.stack([r[:-1] for r in rows]), torch.stack([r[1:] for r in rows])
    return {"ours": lambda tmp=tmp: [sampler.next_batch() for _ in range(SAMPLER_BATCHES)],
            "reference": lambda: [nanogpt_batch() for _ in range(SAMPLER_BATCHES)]}


MIXING_DOCS = 2  # documents of 2,048 tokens per call


def build_mixing(size, dtype):
    """mixing.py's scoring pass, as `mixing.py weights/filter` stream it: per 2,048-token document, the
    gradient of the measured layer (the default: the tied matrix's output use; forward and backward) and
    its benefit on one probe. Ours only."""
    import mixing
    from runtime import Runtime
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig.from_size(size)).eval().requires_grad_(False)
    params = list(mixing.DEFAULT_PARAMS)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, model.config.vocab_size, 2049).astype(np.uint32), None) for _ in range(MIXING_DOCS)]
    dirs, rt = [[torch.randn(model.lm_head_weight.numel())]], Runtime("cpu", dtype)
    return {"ours": lambda: mixing.benefits(model, params, dirs, docs, rt, mixing.tqdm(disable=True))}


# the workloads bench.py's memory child can build by name (their arguments are JSON)
BUILDERS = {"train": build_train, "attention": build_attention, "loss": build_loss}
