"""
The data: uint32 token shards and the token-weighted MixtureSampler that serves training rows in the
proportions of the paper's mixture tables (RECIPE section 5). Tokenizers and the chat format are in
tokenizer.py, the toy corpus in toydata.py.

    python data.py toy                                   # the embedded toy corpus -> data/toy
    python data.py prepare --source fineweb-edu --input shards/*.jsonl --out data --tokenizer llama3
    python data.py mix --data data --mixture pretrain-phase1 --rows 100000 --seq-len 2048   # needs, serves

Layout of a data folder: one folder per source, DIR/NAME/ holding
    shard_00000.bin ...  64-byte header (8 little-endian uint64: magic, format version, vocab size,
                         token count, tokenizer fingerprint, 0, 0, 0) followed by uint32 tokens
    shard_00000.mask ... chat sources only: one uint8 loss-mask byte per token (1 = supervised)
    docs.npy             int64 (n_docs, 3): shard number, first token, length of every document
    meta.json            tokenizer, vocab size, n_tokens, n_docs, kind "text"|"chat", inputs
meta.json is written last and the folder renamed into place: a folder with a meta.json is complete.
Every document starts with BOS (RECIPE section 4); chat conversations are rendered with render_chat.
Inputs: .jsonl (field `text`, `content`, `raw_content`, or `messages` for chat; --field picks another),
.txt (the whole file is one document), .parquet (needs pyarrow).
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import zlib
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from inputs import INPUT_SUFFIXES, REPLACED, DataError, check_input, detect_field_and_kind, read_records
from runtime import ArgumentParser, checked, matching, name_or_path, number, path
from tokenizer import TokenizerError, bos_id, get_tokenizer, pad_id, render_chat


# -----------------------------------------------------------------------------
# Shards: python data.py prepare

MAGIC, VERSION, HEADER_BYTES = 250924945, 1, 64  # magic: the paper's arXiv id
SHARD_TOKENS = 1 << 28  # at most 1 GiB of tokens per shard; a shard holds whole documents
SOURCE_NAME, SOURCE_RULE = r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, '-', '_' or '.'"
TOKENIZERS = "llama3, toy, a tokenizer.model or a tokenizer.json folder"


class _ShardWriter:
    """Streams one input file's documents into part files of at most SHARD_TOKENS tokens."""

    def __init__(self, prefix, enc, kind):
        self.prefix, self.enc, self.kind, self.parts, self.f = prefix, enc, kind, [], None

    def add(self, ids, mask=None):
        if self.f is None or (self.n and self.n + len(ids) > SHARD_TOKENS):
            self.close()
            name = f"{self.prefix}_{len(self.parts):04d}"
            self.parts.append((name, []))
            self.f, self.n = open(name + ".bin", "wb"), 0
            self.f.write(b"\0" * HEADER_BYTES)
            self.mf = open(name + ".mask", "wb") if self.kind == "chat" else None
        np.asarray(ids, dtype=np.uint32).tofile(self.f)
        if self.mf:
            np.asarray(mask, dtype=np.uint8).tofile(self.mf)
        self.parts[-1][1].append(len(ids))
        self.n += len(ids)

    def close(self):
        if self.f is not None:
            self.f.seek(0)  # the header goes in last: it says how many tokens follow
            np.array([MAGIC, VERSION, self.enc.n_vocab, self.n, int(self.enc.fingerprint, 16), 0, 0, 0],
                     dtype="<u8").tofile(self.f)
            self.f.close()
            if self.mf:
                self.mf.close()
            self.f = None


def _tokenize_file(job):
    """Worker: tokenize one input file into part files; returns [(part path, doc lengths)], bytes replaced."""
    path, prefix, field, kind, tokenizer = job
    REPLACED[0] = 0
    enc = get_tokenizer(tokenizer)
    writer = _ShardWriter(prefix, enc, kind)
    for loc, value in read_records(path, field):
        if kind == "text":
            if not isinstance(value, str):
                raise DataError(f"{loc}: field '{field}' is not a string, but this source is text")
            writer.add([bos_id(enc)] + enc.encode_ordinary(value))
        else:
            if not isinstance(value, list):
                raise DataError(f"{loc}: field '{field}' is not a list of messages, but this source is chat")
            try:
                writer.add(*render_chat(value, enc))
            except TokenizerError as e:
                raise DataError(f"{loc}: {e}")
    writer.close()
    if not writer.parts:
        raise DataError(f"input {path} holds no documents")
    return writer.parts, REPLACED[0]


def _check_shard(path, meta, n_tokens):
    """A shard's header and size must agree with meta.json, else one line saying how to repair it."""
    fix = f"re-run `python data.py prepare --source {meta['source']} ...` to rebuild it"
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size < HEADER_BYTES:
        raise DataError(f"{path} is missing or truncated; {fix}")
    magic, version, vocab, n, fp = np.fromfile(path, dtype="<u8", count=5)
    if magic != MAGIC or version != VERSION:
        raise DataError(f"{path} is not a format-{VERSION} token shard (bad magic/version); {fix}")
    if f"{int(fp):016x}" != meta["tokenizer_fingerprint"] or vocab != meta["vocab_size"]:
        raise DataError(f"{path} was made with another tokenizer than {meta['tokenizer']} of its meta.json; {fix}")
    if n != n_tokens or size != HEADER_BYTES + 4 * n:
        raise DataError(f"{path} is truncated: header says {n} tokens, meta.json {n_tokens}, "
                        f"the file holds {(size - HEADER_BYTES) // 4}; {fix}")
    mask = path[:-4] + ".mask"
    if meta["kind"] == "chat" and (not os.path.isfile(mask) or os.path.getsize(mask) != n):
        raise DataError(f"{mask} is missing or truncated; {fix}")


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise DataError(f"{path} is damaged: prepare the source {os.path.basename(folder)} again")


def prepare(source, inputs, out_dir, tokenizer="llama3", field=None, workers=None):
    """Tokenize input files into DIR/SOURCE; skips the work when the same inputs are already there."""
    if not re.fullmatch(SOURCE_NAME, source):
        raise DataError(f"source name {source!r}: use {SOURCE_RULE}")
    for path in inputs:
        check_input(path)
    enc = get_tokenizer(tokenizer)
    field, kind = detect_field_and_kind(inputs[0], field)
    folder = os.path.join(out_dir, source)
    stamp = [{"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
             for p, st in ((p, os.stat(p)) for p in inputs)]
    old = read_meta(folder)
    if old is not None:
        if old["tokenizer_fingerprint"] != enc.fingerprint:
            raise DataError(f"{folder} holds tokens of tokenizer {old['tokenizer']}, not {tokenizer}: one source, one "
                            f"tokenizer; pick another --source name or --out folder, or delete {folder}")
        if old["inputs"] == stamp and old["field"] == field:
            try:
                for s in old["shards"]:
                    _check_shard(os.path.join(folder, s["file"]), old, s["n_tokens"])
                print(f"{folder} is up to date ({old['n_tokens']:,} tokens); nothing to do")
                return old
            except DataError:
                pass  # damaged: rebuild below
    # Build in a hidden temporary folder and rename it into place when complete: an interrupted run
    # leaves no folder with a meta.json, so nothing half-written looks prepared.
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{source}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        jobs = [(p, os.path.join(tmp, f"part_{i:05d}"), field, kind, tokenizer) for i, p in enumerate(inputs)]
        workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        bar = tqdm(total=len(jobs), desc=f"prepare {source}", unit="file", disable=None)
        parts, replaced = [], 0
        # --workers 1 runs in this process (and keeps tests free of process start-up)
        # workers ignore Ctrl-C: the parent alone stops (one line, nothing renamed into place)
        with multiprocessing.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 1 \
                else nullcontext() as pool:
            for result, bad in (pool.imap if pool else map)(_tokenize_file, jobs):  # input order: any --workers
                parts, replaced = parts + result, replaced + bad
                bar.update()
        bar.close()
        docs, shards = [], []
        for k, (part, lengths) in enumerate(parts):
            os.rename(part + ".bin", os.path.join(tmp, f"shard_{k:05d}.bin"))
            if kind == "chat":
                os.rename(part + ".mask", os.path.join(tmp, f"shard_{k:05d}.mask"))
            lengths = np.asarray(lengths, dtype=np.int64)
            starts = np.cumsum(lengths) - lengths
            docs.append(np.stack([np.full_like(lengths, k), starts, lengths], axis=1))
            shards.append({"file": f"shard_{k:05d}.bin", "n_tokens": int(lengths.sum())})
        docs = np.concatenate(docs)
        np.save(os.path.join(tmp, "docs.npy"), docs)
        meta = dict(source=source, kind=kind, field=field, tokenizer=tokenizer, tokenizer_fingerprint=enc.fingerprint,
                    vocab_size=enc.n_vocab, bos_id=bos_id(enc), pad_id=pad_id(enc), n_tokens=int(docs[:, 2].sum()),
                    n_docs=len(docs), format_version=VERSION, shards=shards, inputs=stamp, replaced_bytes=replaced)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):
            trash = os.path.join(out_dir, f".{source}.old-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{folder}: {meta['n_docs']:,} {kind} documents, {meta['n_tokens']:,} tokens"
          + (f"; {replaced:,} bytes that were not UTF-8 replaced by U+FFFD" if replaced else ""))
    return meta


class Source:
    """A prepared source, memory-mapped: tokens of document d are tokens(d)."""

    def __init__(self, folder):
        meta = read_meta(folder)
        if meta is None:
            raise DataError(f"{folder} is not a prepared source (no meta.json); run `python data.py prepare`")
        self.name, self.meta, self.kind, self.n_tokens = meta["source"], meta, meta["kind"], meta["n_tokens"]
        self.tokens, self.masks = [], []
        for s in meta["shards"]:
            path = os.path.join(folder, s["file"])
            _check_shard(path, meta, s["n_tokens"])
            self.tokens.append(np.memmap(path, dtype=np.uint32, mode="r", offset=HEADER_BYTES, shape=(s["n_tokens"],)))
            if self.kind == "chat":
                self.masks.append(np.memmap(path[:-4] + ".mask", dtype=np.uint8, mode="r", shape=(s["n_tokens"],)))
        self.docs = np.load(os.path.join(folder, "docs.npy"), mmap_mode="r")
        if len(self.docs) != meta["n_docs"]:
            raise DataError(f"{folder}/docs.npy does not match meta.json; re-run `python data.py prepare --source ...`")

    def doc(self, d):
        shard, start, length = self.docs[d]
        tokens = self.tokens[shard][start:start + length]
        return tokens, (self.masks[shard][start:start + length] if self.kind == "chat" else None)


# -----------------------------------------------------------------------------
# Mixtures (RECIPE section 5) and the sampler

# Table: data mixtures, percent of sampled tokens (RECIPE section 5): source: dataset as the official README links
# it (Hugging Face id, subset or file; Dolmino's folders not named), unique tokens (B), pretrain phase 1, phase 2,
# midtrain phase 1, phase 2. One name, one corpus (RECIPE section 5.3): RedPajama's StackExchange is not Dolmino's,
# nor are the Nemotron SFT files (flattened to text in an unpublished way) Nemotron's pre-training code. Mid-training
# ratios are measured AFTER influence-based sub-sampling (RECIPE section 7; mixing.py): unfiltered, not the paper's.
NEMOTRON_SFT = "nvidia/Llama-Nemotron-Post-Training-Dataset SFT/"
MIXTURE_TABLE = {
    "starcoder":                 ("bigcode/starcoderdata", 263.8, 10.66, 0.52, 6.90, 9.70),
    "openwebmath":               ("open-web-math/open-web-math", 12.6, 6.93, 23.33, None, None),
    "fineweb-edu":               ("HuggingFaceFW/fineweb-edu", 1300, 63.75, 54.83, None, None),
    "wiki":                      ("allenai/dolmino-mix-1124 data/wiki", 3.7, 5.03, 0.14, 2.66, 0.47),
    "arxiv":                     ("togethercomputer/RedPajama-Data-1T urls/arxiv.txt", 28, 6.36, 1.32, None, None),
    "redpajama-stackexchange":   ("RedPajama-Data-1T stackexchange.jsonl", 19.6, 5.03, 0.86, None, None),
    "algebraic-stack":           ("EleutherAI/proof-pile-2 algebraic-stack", 12.6, 2.25, 1.26, None, None),
    "nemotron-sft-science":      (NEMOTRON_SFT + "science/science.jsonl", 2, None, 0.03, None, None),
    "nemotron-sft-code":         (NEMOTRON_SFT + "code/code_v1.1.jsonl", 16, None, 0.72, None, None),
    "nemotron-sft-math":         (NEMOTRON_SFT + "math/math_v1.1.jsonl", 15, None, 3.01, None, None),
    "cosmopedia":                ("HuggingFaceTB/cosmopedia", 25, None, 2.70, None, None),
    "natural-reasoning":         ("facebook/natural_reasoning", 1.8, None, 3.18, None, None),
    "finemath-3plus":            ("HuggingFaceTB/finemath finemath-3plus", 34, None, 8.01, None, None),
    "pes2o":                     ("allenai/peS2o", 50, None, 0.08, None, None),
    "dclm":                      ("allenai/dolmino-mix-1124 DCLM Baseline", None, None, None, 37.03, 6.51),
    "flan":                      ("allenai/dolmino-mix-1124 FLAN", None, None, None, 4.10, 0.72),
    "dolmino-pes2o":             ("allenai/dolmino-mix-1124 peS2o", None, None, None, 11.41, 2.01),
    "dolmino-stackexchange":     ("allenai/dolmino-mix-1124 StackExchange", None, None, None, 2.12, 2.00),
    "dolmino-math":              ("allenai/dolmino-mix-1124 Math", None, None, None, 11.63, 29.10),
    "nemotron-pretraining-code": ("nvidia/Nemotron-Pretraining-Code-v1", None, None, None, 20.69, 29.10),
    "nemotron-cc-math":          ("nvidia/Nemotron-CC-Math-v1", None, None, None, 3.45, 19.40),
    "benchmark-train-sets":      ("train splits of mandarjoshi/trivia_qa rc, allenai/openbookqa main, openai/gsm8k main, "
                                  "google/boolq, allenai/ai2_arc, NQ-open, PIQA", None, None, None, 0.0, 0.97),
}
# Table: SFT data (RECIPE section 5.4): source: dataset, samples (official README; paper v1 Table 5: 3.2M / 802K /
# 2.2M), preset. Under --epochs, train.py's SFT default, every source is served E times whatever the weights. The
# reasoning-SFT script reads a local `dataset_chatml_format`: its splits and conversion to `messages` are unpublished.
SFT_TABLE = {
    "tulu-3-sft-olmo-2":       ("allenai/tulu-3-sft-olmo-2-mixture-0225", 866e3, "general-sft"),
    "openmathreasoning":       ("nvidia/OpenMathReasoning (split not named)", 3.2e6, "reasoning-sft"),
    "openscience-reasoning-2": ("nvidia/OpenScienceReasoning-2 (split not named)", 803e3, "reasoning-sft"),
    "opencode-reasoning-2":    ("nvidia/OpenCodeReasoning-2 (split not named)", 2.16e6, "reasoning-sft"),
}
PRESETS = {phase: {name: row[2 + i] for name, row in MIXTURE_TABLE.items() if row[2 + i]}
           for i, phase in enumerate(("pretrain-phase1", "pretrain-phase2", "midtrain-phase1", "midtrain-phase2"))}
PRESETS.update({p: {n: r[1] for n, r in SFT_TABLE.items() if r[2] == p} for p in ("general-sft", "reasoning-sft")})
PRESETS["toy"] = {"toy-traces": 0.9, "toy-facts": 0.1}  # not from the paper: the laptop run's sources (toydata.py)


WEIGHTS_FORMAT = "mixing.py weights 1"  # the "format" of the weights files that --mixture @FILE reads


def mixture_weights(mixture):
    """A preset name, "a=0.7,b=0.3" or "@FILE" (written by `python mixing.py weights --json FILE`, RECIPE section 7)
    -> {source: weight}, not yet normalised."""
    if mixture.startswith("@"):
        try:
            with open(mixture[1:]) as f:
                saved = json.load(f)
            weights = {WEIGHTS_FORMAT: saved["weights"]}[saved["format"]]  # KeyError: another file's format
            mixture = ",".join(f"{n}={float(w)!r}" for n, w in weights.items() if w > 0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"--mixture {mixture}: not a weights file of `python mixing.py weights --json FILE`")
    if "=" in mixture:
        weights = {}
        for item in mixture.split(","):
            name, _, w = (part.strip() for part in item.partition("="))
            try:
                w = float(w)
            except ValueError:
                raise DataError(f"mixture item {item!r} has no numeric weight; write NAME=WEIGHT,NAME=WEIGHT")
            if not (w > 0 and np.isfinite(w)):
                raise DataError(f"mixture weight {name}={w:g} must be positive; leave a source out instead")
            if name in weights:
                raise DataError(f"mixture names source {name} twice")
            weights[name] = w
    elif mixture in PRESETS:
        weights = dict(PRESETS[mixture])
    else:
        raise DataError(f"unknown mixture {mixture!r}: use a preset ({', '.join(PRESETS)}) or NAME=WEIGHT,NAME=WEIGHT")
    return weights

# argparse type of the --mixture flags: the syntax checked before any work (an @FILE when it is read)
mixture_arg = checked(lambda text: text.startswith("@") or mixture_weights(text), DataError, "no-such-preset")


def resolve_mixture(data_dir, mixture, renormalize=False):
    """A mixture (mixture_weights) -> {source: weight} over prepared sources, weights summing to 1."""
    weights = mixture_weights(mixture)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder {data_dir} does not exist; prepare sources into it with `python data.py prepare`")
    missing = [name for name in weights if read_meta(os.path.join(data_dir, name)) is None]
    if missing:
        msg = f"mixture {mixture} names sources not prepared in {data_dir}: {', '.join(missing)}"
        if not renormalize or len(missing) == len(weights):
            raise DataError(f"{msg}; prepare them with `python data.py prepare --source NAME ...`"
                            + ("" if renormalize else ", or renormalize over the prepared ones (--renormalize)"))
        print(f"warning: {msg}; renormalizing the weights over the other sources", file=sys.stderr)
        weights = {name: w for name, w in weights.items() if name not in missing}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class MixtureSampler:
    """Training rows of seq_len + 1 tokens from a weighted mixture of prepared sources.

    Global row i of the stream is a deterministic function of (seed, i); the rows of each round of
    world_size rows are dealt to ranks 0..W-1, so rank r serves rows r, r+W, r+2W, ... and a global batch
    is the same set of rows whatever W is. Every rank runs the cheap bookkeeping of all rows and reads
    only its own, so all ranks hold the same state after each batch (saving rank 0's is enough, and a
    run may resume on another number of ranks). Within a source, documents follow a seeded permutation
    per epoch. Text sources: documents are concatenated and the stream is cut into rows (RECIPE section
    4). Chat sources: whole conversations are packed into a row (a too-long one alone, cropped), the
    rest padded, with per-token document ids for attention masking and the loss mask of render_chat
    (sft_loss "assistant") or of every token but each conversation's first ("all").
    """

    def __init__(self, data_dir, mixture, seq_len, batch_size, rank=0, world_size=1, seed=0, renormalize=False,
                 epochs=None, sft_loss="assistant"):
        assert 0 <= rank < world_size and seq_len > 0 and batch_size > 0 and sft_loss in ("assistant", "all")
        self.mixture = resolve_mixture(data_dir, mixture, renormalize)
        self.names = list(self.mixture)
        self.weights = np.array([self.mixture[n] for n in self.names])
        self.sources = [Source(os.path.join(data_dir, n)) for n in self.names]
        if len({s.meta["tokenizer_fingerprint"] for s in self.sources}) > 1:
            used = ", ".join(f"{s.name} ({s.meta['tokenizer']})" for s in self.sources)
            raise DataError(f"the sources of a mixture must share one tokenizer: {used}; prepare all with one")
        meta = self.sources[0].meta
        self.tokenizer, self.vocab_size, self.pad_id = meta["tokenizer"], meta["vocab_size"], meta["pad_id"]
        self.seq_len, self.batch_size, self.seed, self.sft_loss = seq_len, batch_size, seed, sft_loss
        self.rank, self.world_size, self.row = rank, world_size, 0  # row: the next global row
        self.rows = np.zeros(len(self.sources), dtype=np.int64)  # rows served per source
        self.chat_pos = [[0, 0] for _ in self.sources]  # chat sources: (epoch, next conversation in its permutation)
        self._perms, self.epoch_rows = {}, None
        if epochs is not None:
            # SFT runs E epochs (RECIPE sections 4.1, 4.6): the official script makes E passes over one dataset of all
            # its SFT data, serving each source in proportion to its size. Here that size is the rows E epochs of a
            # source fill once packed (replayed exactly); the scheduler keeps every source within a row of weight x
            # rows, so all advance together and after sum(epoch_rows) rows each has served exactly E epochs.
            self.epoch_rows = [self._rows_for_epochs(s, epochs) for s in range(len(self.sources))]
            self.weights = np.array(self.epoch_rows) / sum(self.epoch_rows)
            self.mixture = dict(zip(self.names, self.weights.tolist()))

    def _epoch(self, s, e):
        """Source s's document permutation in epoch e, the end offset of each document in that order, and for a
        chat source the packing: where each row of the epoch stops, counted in conversations."""
        if (s, e) not in self._perms:
            src = self.sources[s]
            # keyed by the source name, so adding a source to the mixture leaves the others' orders alone
            perm = np.random.default_rng([self.seed, zlib.crc32(src.name.encode()), e]).permutation(len(src.docs))
            lengths = src.docs[perm, 2]
            ends, stops = np.cumsum(lengths), None
            if src.kind == "chat":  # a row: as many whole conversations as fit in seq_len + 1 tokens, at least one
                # (cropped); following[i]: where the row that starts at conversation i stops
                following = np.maximum(np.searchsorted(ends, ends - lengths + self.seq_len + 1, side="right"),
                                       np.arange(1, len(perm) + 1))
                stops = [int(following[0])]
                while stops[-1] < len(perm):
                    stops.append(int(following[stops[-1]]))
                stops = np.array(stops)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != s or k[1] >= e - 1}
            self._perms[(s, e)] = perm, ends, stops
        return self._perms[(s, e)]

    def _rows_for_epochs(self, s, epochs):
        """Rows that serve source s `epochs` times: chat sources as packed, epoch by epoch; text by their tokens."""
        src = self.sources[s]
        if src.kind == "text":
            return math.ceil(epochs * src.n_tokens / (self.seq_len + 1))
        rows = 0
        for e in range(math.ceil(epochs)):
            _, ends, stops = self._epoch(s, e)
            part = epochs - e  # the last epoch may be partial: rows until the tokens served reach that fraction
            rows += len(stops) if part >= 1 else int(np.searchsorted(ends[stops - 1], part * src.n_tokens)) + 1
        return rows

    def _advance(self):
        """Schedule the next global row: choose its source, move that source's pointer, return a ticket
        from which any rank can read the row."""
        # Token-weighted mixing (RECIPE section 4). The official loader draws each row's source at random
        # with probability = weight. We give the row to the source furthest behind its target, weight *
        # rows: the zero-variance version of that draw. A source is chosen only while behind, so it is
        # never a row ahead, hence never more than (sources - 1) rows behind (about one in practice); as
        # every row holds seq_len + 1 tokens, token shares match the weights to ~1/rows whatever the
        # document lengths, where random draws over 20,000 rows wander ~0.3% (one std) per source.
        s = int(np.argmax(self.weights * (self.row + 1) - self.rows))
        if self.sources[s].kind == "text":
            ticket = (s, int(self.rows[s]))
        else:
            e, pos = self.chat_pos[s]
            perm, _, stops = self._epoch(s, e)
            n = int(stops[np.searchsorted(stops, pos, side="right")]) - pos
            ticket = (s, e, pos, n)
            self.chat_pos[s] = [e + 1, 0] if pos + n == len(perm) else [e, pos + n]
        self.rows[s] += 1
        self.row += 1
        return ticket

    def _text_row(self, s, k):
        """Row k of text source s: tokens k*(seq_len+1) ... of its endless, epoch-by-epoch permuted stream."""
        src, n = self.sources[s], self.seq_len + 1
        out, filled = np.empty(n, dtype=np.uint32), 0
        e, offset = divmod(k * n, src.n_tokens)
        while filled < n:
            if offset == src.n_tokens:
                e, offset = e + 1, 0
            perm, ends, _ = self._epoch(s, e)
            j = int(np.searchsorted(ends, offset, side="right"))
            tokens, _ = src.doc(perm[j])
            skip = offset - (ends[j] - len(tokens))
            take = min(len(tokens) - skip, n - filled)
            out[filled:filled + take] = tokens[skip:skip + take]
            filled, offset = filled + take, offset + take
        return out, None, None

    def _chat_row(self, s, e, pos, count):
        src, n = self.sources[s], self.seq_len + 1
        docs = [src.doc(d) for d in self._epoch(s, e)[0][pos:pos + count]]
        tokens = np.concatenate([t for t, _ in docs])[:n]
        # sft_loss "all" (the official SFT, RECIPE section 4.6): every token but the conversation's first (BOS), which
        # nothing predicts in a row of its own; so no conversation is trained to predict the next one's start
        mask = np.concatenate([m.astype(bool) if self.sft_loss == "assistant" else np.arange(len(t)) > 0
                               for t, m in docs])[:n]
        doc_ids = np.concatenate([np.full(len(t), i, dtype=np.int32) for i, (t, _) in enumerate(docs)])[:n]
        pad = n - len(tokens)  # padding: pad id, no loss, its own document id so it attends to no conversation
        return (np.concatenate([tokens, np.full(pad, self.pad_id, dtype=np.uint32)]),
                np.concatenate([mask, np.zeros(pad, dtype=bool)]),
                np.concatenate([doc_ids, np.full(pad, count, dtype=np.int32)]))

    def next_batch(self):
        """(x, y, doc_ids) for this rank: x, y LongTensors (B, seq_len), y = -100 where not supervised;
        doc_ids (B, seq_len) int32 when the mixture has a chat source (text rows: all 0), else None."""
        mine = [self._advance() for _ in range(self.batch_size * self.world_size)][self.rank::self.world_size]
        rows = [self._text_row(*t) if len(t) == 2 else self._chat_row(*t) for t in mine]
        tokens = np.stack([t for t, _, _ in rows]).astype(np.int64)
        x, y = torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())
        for i, (_, mask, _) in enumerate(rows):
            if mask is not None:
                y[i, torch.from_numpy(~mask[1:])] = -100
        if all(s.kind == "text" for s in self.sources):
            return x, y, None
        doc_ids = np.stack([np.zeros(len(t), dtype=np.int32) if ids is None else ids for t, _, ids in rows])
        return x, y, torch.from_numpy(doc_ids[:, :-1].copy())

    def skip_rows(self, n):
        """Advance the global stream by n rows without reading them (python data.py mix)."""
        for _ in range(n):
            self._advance()

    @property
    def served(self):
        """Tokens served per source so far, all ranks together (chat rows count their padding)."""
        return {name: int(r) * (self.seq_len + 1) for name, r in zip(self.names, self.rows)}

    def epochs(self):
        """Passes over each source's unique tokens so far (the paper resamples ~2T unique tokens to 4.2T)."""
        out = {}
        for s, (name, src) in enumerate(zip(self.names, self.sources)):
            if src.kind == "text":
                out[name] = float(self.rows[s] * (self.seq_len + 1) / src.n_tokens)
            else:
                e, pos = self.chat_pos[s]
                out[name] = e + (float(self._epoch(s, e)[1][pos - 1] / src.n_tokens) if pos else 0.0)
        return out

    def state_dict(self):
        return {"row": self.row, "rows": dict(zip(self.names, self.rows.tolist())),
                "chat_pos": {n: list(p) for n, p in zip(self.names, self.chat_pos)}, "mixture": self.mixture,
                "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state):
        saved = state["mixture"]
        same_mixture = list(saved) == self.names and np.allclose(list(saved.values()), self.weights)
        if not same_mixture or state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise DataError("the data state in this checkpoint was saved for another mixture, seq_len or seed; "
                            "resume with the same data settings, or start a new stage without it")
        self.row = state["row"]
        self.rows = np.array([state["rows"][n] for n in self.names], dtype=np.int64)
        self.chat_pos = [list(state["chat_pos"][n]) for n in self.names]


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    count, seed, folder = number(int, at_least=1), number(int, at_least=0), path("new")
    p = sub.add_parser("prepare", help="tokenize files into DIR/SOURCE").add_argument
    p("--source", required=True, type=matching(SOURCE_NAME, SOURCE_RULE), help="source name, e.g. fineweb-edu (the "
      "mixture tables' names)")
    p("--input", required=True, nargs="+", type=path("file", INPUT_SUFFIXES), help=".jsonl, .txt (one document per "
      "file) or .parquet files")
    p("--out", default="data", type=folder, help="data folder")
    p("--tokenizer", default="llama3", type=name_or_path(["llama3", "toy"], ["tokenizer.json"], TOKENIZERS),
      help=TOKENIZERS)
    p("--field", default=None, help="jsonl/parquet field (default: text, content, raw_content, messages)")
    p("--workers", type=count, default=None, help="processes (default: one per CPU, at most one per file)")
    p = sub.add_parser("toy", help="write the embedded synthetic reasoning corpus").add_argument
    p("--out", default="data/toy", type=folder, help="data folder")
    p("--seed", type=seed, default=0, help="generator seed")
    p("--no-trace", action="store_true", help="answers without the trace (the ablation: same problems)")
    p = sub.add_parser("mix", help="show what a mixture serves").add_argument
    p("--data", default="data", type=path("dir"), help="data folder")
    p("--mixture", required=True, type=mixture_arg,
      help=f"preset ({', '.join(PRESETS)}), NAME=WEIGHT,... or @FILE (mixing.py weights)")
    p("--rows", type=count, default=20_000, help="global rows to serve")
    p("--seq-len", type=count, default=2048, help="tokens per row, plus one")
    p("--seed", type=seed, default=0, help="sampler seed")
    p("--renormalize", action="store_true", help="drop sources that are not prepared, with a warning")
    p("--json", action="store_true", help="print JSON")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.source, args.input, args.out, args.tokenizer, args.field, args.workers)
        elif args.command == "toy":
            import toydata  # the toy corpus generator imports this module
            toydata.write_toy(args.out, args.seed, with_trace=not args.no_trace)
        else:
            needs = {} if args.json else PRESETS.get(args.mixture, {})  # a preset's sources: share, prepared, dataset
            for name, w in needs.items():
                ready = "prepared" if read_meta(os.path.join(args.data, name)) else "missing"
                dataset = {**MIXTURE_TABLE, **SFT_TABLE}.get(name, ("the toy corpus: python data.py toy",))[0]
                print(f"{name:<26}{w / sum(needs.values()):>7.2%}  {ready:<9} {dataset}")
            sampler = MixtureSampler(args.data, args.mixture, args.seq_len, 1, seed=args.seed,
                                     renormalize=args.renormalize)
            sampler.skip_rows(args.rows)  # what that many rows serve: per source tokens, share, weight, epochs
            served, epochs = sampler.served, sampler.epochs()
            report = {name: {"tokens": served[name], "share": served[name] / sum(served.values()),
                             "weight": sampler.mixture[name], "epochs": epochs[name]} for name in sampler.names}
            if args.json:
                print(json.dumps(report, indent=1))
                return
            print(f"{'source':<26}{'tokens':>16}{'share':>9}{'weight':>9}{'epochs':>10}")
            for name, r in report.items():
                print(f"{name:<26}{r['tokens']:>16,}{r['share']:>9.2%}{r['weight']:>9.2%}{r['epochs']:>10.3f}")
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no source was left half-written (a source's folder appears only when complete)",
              file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full disk, a folder that is not writable: the environment, not a bug
        print(f"error: {f'{e.filename}: {e.strerror}' if e.filename else f'{e}: is the disk full?'}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
