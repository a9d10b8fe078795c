"""Tests for data.py: chat and text shards, answers, and the MixtureSampler's shares, determinism,
resumption and rank split (the tokenizers are tested in test_tokenizer.py). Hermetic: everything in tmp_path."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import data
import tokenizer
import toydata
import grading
import sample
from data import DataError

# -----------------------------------------------------------------------------
# Chat format and answers

CONVERSATION = [{"role": "system", "content": tokenizer.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": "What is 12+30?"},
                {"role": "assistant", "content": "<think>\n2+0=2\n1+3=4\n</think>\n\\boxed{42}"},
                {"role": "user", "content": "And <|eot_id|> twice?"},
                {"role": "assistant", "content": "\\boxed{84}"}]


def test_load_eval_set(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "1+1", "answer": 2}\n\n{"question": "2+2", "answer": "4"}\n')
    assert sample.load_eval_set(str(path)) == [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    path.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "result": "4"}\n')
    with pytest.raises(sample.SampleError, match="eval.jsonl:2: .* lacks an answer \\(it has 'question', 'result'\\)"):
        sample.load_eval_set(str(path))
    path.write_text('["1+1", "2"]\n')
    with pytest.raises(sample.SampleError, match="lacks a question and an answer \\(it has a JSON list\\)"):
        sample.load_eval_set(str(path))


def test_input_that_is_not_utf8_is_repaired_and_counted(tmp_path, capsys):
    """Latin-1 text (a common mislabelled export): each bad byte becomes U+FFFD, and the summary line says how many."""
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 na\u00efve"}\n{"text": "ok"}\n'.encode("latin-1"))
    (tmp_path / "page.txt").write_bytes(b"\xff\xfe broken start, then fine")
    meta = data.prepare("mixed", [str(tmp_path / "latin1.jsonl"), str(tmp_path / "page.txt")], str(tmp_path / "out"),
                        tokenizer="toy", workers=1)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert meta["replaced_bytes"] == 4 and "4 bytes that were not UTF-8 replaced by U+FFFD" in summary
    src = data.Source(str(tmp_path / "out" / "mixed"))
    first = tokenizer.get_tokenizer("toy").decode(src.doc(0)[0][1:].tolist())
    assert first == "caf\ufffd na\ufffdve"


def test_a_binary_input_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", "s", "--input", str(tmp_path / "good.jsonl"), str(tmp_path / "image.txt"),
                   "--out", str(tmp_path / "out"), "--tokenizer", "toy", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "image.txt is a binary file" in err
    assert not (tmp_path / "out" / "s").exists()


# -----------------------------------------------------------------------------
# Shards

def other_tokenizer(tmp_path):
    """A second tokenizer, built in the test: a tiktoken ranks file of the 256 bytes (+ Llama-3 specials)."""
    path = tmp_path / "other.model"
    path.write_text("".join(f"{tokenizer.base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return str(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_prepare_text(tmp_path):
    enc = tokenizer.get_tokenizer("toy")
    docs = ["first document", "second one\nwith two lines", "ünïcödé ✓"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    (tmp_path / "b.txt").write_text("a whole file\n\nis one document\n")
    out = str(tmp_path / "out")
    meta = data.prepare("web", [a, str(tmp_path / "b.txt")], out, "toy", workers=1)
    assert (meta["kind"], meta["n_docs"], meta["tokenizer"], meta["vocab_size"]) == ("text", 4, "toy", 272)
    src = data.Source(os.path.join(out, "web"))
    for d, text in enumerate(docs + ["a whole file\n\nis one document\n"]):
        tokens, mask = src.doc(d)
        assert tokens.tolist() == [tokenizer.bos_id(enc)] + enc.encode_ordinary(text) and mask is None
    n_a = sum(len(enc.encode_ordinary(t)) + 1 for t in docs)  # one shard per input file
    assert meta["n_tokens"] == n_a + 1 + len("a whole file\n\nis one document\n")
    header = np.fromfile(os.path.join(out, "web", "shard_00000.bin"), dtype="<u8", count=5)
    assert header.tolist() == [data.MAGIC, data.VERSION, 272, n_a, int(enc.fingerprint, 16)]
    assert sorted(os.listdir(out)) == ["web"]  # no temporary folder left behind


def test_prepare_rerun_workers_and_tokenizer_guard(tmp_path, capsys):
    files = [write_jsonl(tmp_path / f"f{i}.jsonl", [{"text": f"doc {i}.{j} " * (j + 1)} for j in range(20)])
             for i in range(3)]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    data.prepare("s", files, one, "toy", workers=1)
    data.prepare("s", files, two, "toy", workers=2)  # a process pool: same bytes as in-process
    for name in sorted(os.listdir(os.path.join(one, "s"))):
        with open(os.path.join(one, "s", name), "rb") as f1, open(os.path.join(two, "s", name), "rb") as f2:
            assert f1.read() == f2.read(), name
    before = os.stat(os.path.join(one, "s", "meta.json")).st_mtime_ns
    capsys.readouterr()
    data.prepare("s", files, one, "toy", workers=1)
    assert "up to date" in capsys.readouterr().out
    assert os.stat(os.path.join(one, "s", "meta.json")).st_mtime_ns == before
    with pytest.raises(DataError, match="one source, one tokenizer"):
        data.prepare("s", files, one, other_tokenizer(tmp_path), workers=1)
    data.prepare("s", files[:2], one, "toy", workers=1)  # other inputs: rebuilt in place
    assert data.Source(os.path.join(one, "s")).meta["n_docs"] == 40


def test_prepare_chat(tmp_path):
    enc = tokenizer.get_tokenizer("toy")
    convs = [CONVERSATION, CONVERSATION[1:3]]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in convs])
    meta = data.prepare("sft", [path], str(tmp_path), "toy", workers=1)
    assert (meta["kind"], meta["field"], meta["n_docs"]) == ("chat", "messages", 2)
    src = data.Source(str(tmp_path / "sft"))
    for d, conv in enumerate(convs):
        ids, mask = tokenizer.render_chat(conv, enc)
        tokens, stored_mask = src.doc(d)
        assert tokens.tolist() == ids and stored_mask.astype(bool).tolist() == mask


def test_prepare_finds_the_document_field(tmp_path):
    """No --field: text, content, raw_content (the official loader's order), then messages."""
    enc = tokenizer.get_tokenizer("toy")
    cases = [("starcoder", {"content": "def f(): pass", "max_stars_count": 3}, "content"),
             ("redpajama", {"raw_content": "a web page", "meta": {}}, "raw_content"),
             ("both", {"raw_content": "raw", "content": "used", "id": 1}, "content"),
             ("all", {"messages": "ignored", "raw_content": "raw", "text": "used"}, "text"),
             ("chat", {"messages": CONVERSATION, "id": 7}, "messages")]
    for source, record, field in cases:
        meta = data.prepare(source, [write_jsonl(tmp_path / f"{source}.jsonl", [record])], str(tmp_path), "toy")
        assert meta["field"] == field, source
        tokens, _ = data.Source(str(tmp_path / source)).doc(0)
        expected = tokenizer.render_chat(record[field], enc)[0] if field == "messages" else \
            [tokenizer.bos_id(enc)] + enc.encode_ordinary(record[field])
        assert tokens.tolist() == expected, source
    with pytest.raises(DataError, match="no field 'text'; pick the document field with --field"):
        data.prepare("none", [write_jsonl(tmp_path / "none.jsonl", [{"body": "x"}])], str(tmp_path), "toy")


def test_prepare_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"content": "no text field"}])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="does not exist"):
        data.prepare("s", [str(tmp_path / "missing.jsonl")], out, "toy")
    with pytest.raises(DataError, match="is empty"):
        data.prepare("s", [str(tmp_path / "empty.jsonl")], out, "toy")
    with pytest.raises(DataError, match="bad.jsonl:2: no field 'text'"):
        data.prepare("s", [good, bad], out, "toy", workers=1)
    assert not os.path.exists(out) or os.listdir(out) == []  # nothing half-written left behind
    with pytest.raises(DataError, match="not a list of messages"):
        data.prepare("s", [write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}, {"messages": "oops"}])], out, "toy")
    parquet = tmp_path / "x.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["from parquet"]}), str(parquet))
        assert data.prepare("pq", [str(parquet)], out, "toy")["n_docs"] == 1
    except ImportError:
        parquet.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            data.prepare("pq", [str(parquet)], out, "toy")


def test_damaged_shards_fail_loudly(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "some text " * 10}] * 5)
    data.prepare("toy-src", [path], str(tmp_path), "toy")
    data.prepare("other-src", [path], str(tmp_path), other_tokenizer(tmp_path))
    shard = tmp_path / "toy-src" / "shard_00000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-4])
    with pytest.raises(DataError, match="shard_00000.bin is truncated.*`python data.py prepare --source toy-src"):
        data.Source(str(tmp_path / "toy-src"))
    shard.write_bytes((tmp_path / "other-src" / "shard_00000.bin").read_bytes())
    with pytest.raises(DataError, match="made with another tokenizer"):
        data.Source(str(tmp_path / "toy-src"))
    data.prepare("toy-src", [path], str(tmp_path), "toy")  # re-running prepare repairs it
    assert shard.read_bytes() == good
    with pytest.raises(DataError, match="share one tokenizer"):
        data.MixtureSampler(str(tmp_path), "toy-src=1,other-src=1", 8, 2)


# -----------------------------------------------------------------------------
# MixtureSampler

@pytest.fixture(scope="module")
def mixdir(tmp_path_factory):
    """Three toy sources of very different document lengths, each with its own alphabet so a row's
    source can be told from its tokens: short (1-4 letters of abc), long (200-600 of xyz), chat."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    short = [{"text": "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))} for _ in range(400)]
    long = [{"text": "".join(rng.choice("xyz") for _ in range(rng.randint(200, 600)))} for _ in range(20)]
    chat = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "7" * rng.choice([1, 5, 20, 90])}]} for i in range(60)]
    for name, recs in (("short", short), ("long", long), ("chat", chat)):
        data.prepare(name, [write_jsonl(root / f"{name}.jsonl", recs)], str(root / "data"), "toy", workers=1)
    return str(root / "data")


def row_source(row):
    letters = set(bytes(t for t in row if t < 256).decode())
    return "long" if letters & set("xyz") else "short" if letters & set("abc") else "chat"


def full_rows(x, y):
    return torch.cat([x, y[:, -1:].clamp(min=0)], dim=1)  # last target only to tell sources apart


def test_token_shares_match_weights(mixdir):
    weights = {"short": 0.5, "long": 0.3, "chat": 0.2}
    sampler = data.MixtureSampler(mixdir, ",".join(f"{k}={v}" for k, v in weights.items()), seq_len=7, batch_size=100)
    counts = {k: 0 for k in weights}
    for _ in range(200):  # 20,000 rows
        x, y, doc_ids = sampler.next_batch()
        assert x.shape == y.shape == doc_ids.shape == (100, 7)
        assert x.dtype == y.dtype == torch.long and doc_ids.dtype == torch.int32
        for row in x.tolist():
            counts[row_source(row)] += 1
    served = sampler.served
    for k, w in weights.items():
        assert abs(counts[k] / 20_000 - w) < 0.01 and served[k] == counts[k] * 8
        assert abs(served[k] / sum(served.values()) - w) < 0.01


def test_resume_continues_the_exact_stream(mixdir):
    make = lambda: data.MixtureSampler(mixdir, "short=2,long=1,chat=1", seq_len=32, batch_size=3, seed=7)
    a = make()
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON types: fits any checkpoint format
    expected = [a.next_batch() for _ in range(6)]
    b = make()
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    c = data.MixtureSampler(mixdir, "short=2,long=1,chat=1", seq_len=32, batch_size=3, seed=8)
    assert not torch.equal(c.next_batch()[0], make().next_batch()[0])  # the seed matters
    with pytest.raises(DataError, match="another mixture"):
        c.load_state_dict(state)


def test_ranks_split_the_global_stream(mixdir):
    mix = "short=1,long=1,chat=1"
    single = data.MixtureSampler(mixdir, mix, seq_len=16, batch_size=4)
    ranks = [data.MixtureSampler(mixdir, mix, seq_len=16, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for step in range(8):
        if step == 4:  # resume the 2-rank run from the 1-rank run's state: the stream is world-size free
            for r in ranks:
                r.load_state_dict(single.state_dict())
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert ranks[0].state_dict() == ranks[1].state_dict()
        for i in range(3):  # global rows 0, 1, 2, 3 of the batch: ranks 0, 1, 0, 1
            interleaved = torch.stack([parts[j % 2][i][j // 2] for j in range(4)])
            assert torch.equal(interleaved, whole[i])
        assert not torch.equal(parts[0][0], parts[1][0])


def test_text_rows_are_the_permuted_concatenation(mixdir):
    sampler = data.MixtureSampler(mixdir, "long=1", seq_len=63, batch_size=10)
    src = sampler.sources[0]
    stream = []
    while len(stream) < 2 * src.n_tokens:
        x, y, doc_ids = sampler.next_batch()
        assert doc_ids is None and (y >= 0).all()
        stream += full_rows(x, y).flatten().tolist()
    for epoch in range(2):
        perm = sampler._epoch(0, epoch)[0]
        expected = np.concatenate([src.doc(d)[0] for d in perm]).tolist()
        assert stream[epoch * src.n_tokens:(epoch + 1) * src.n_tokens] == expected
    assert sampler._epoch(0, 0)[0].tolist() != sampler._epoch(0, 1)[0].tolist()  # reshuffled each epoch
    assert sampler.epochs()["long"] == pytest.approx(sampler.served["long"] / src.n_tokens)


def test_chat_rows_pack_whole_conversations(mixdir):
    seq_len = 100  # conversations of 28-117 tokens: some rows hold several, some one cropped
    sampler = data.MixtureSampler(mixdir, "chat=1", seq_len=seq_len, batch_size=1)
    src = sampler.sources[0]
    order = sampler._epoch(0, 0)[0]  # the epoch's conversations, in the order they are packed
    pad = tokenizer.pad_id(tokenizer.get_tokenizer("toy"))
    k = 0
    while sampler.chat_pos[0][0] == 0:  # one epoch
        x, y, doc_ids = sampler.next_batch()
        row, ids = full_rows(x, y)[0].tolist(), doc_ids[0].tolist()
        supervised = [False] + (y[0] != -100).tolist()  # row position i is a target of position i - 1
        assert ids == sorted(ids) and ids[0] == 0
        for d in range(ids[-1] + 1):
            positions = [i for i, v in enumerate(ids) if v == d]
            tokens = [row[i] for i in positions]
            if tokens[0] == pad:  # the padding, its own document: no loss
                assert set(tokens) == {pad} and not any(supervised[i] for i in positions)
                continue
            if positions[-1] == seq_len - 1 and row[-1] != pad:  # the row's last token (a target only)
                positions, tokens = positions + [seq_len], tokens + [row[-1]]
            conv, mask = (a.tolist() for a in src.doc(order[k]))
            k += 1
            # whole conversations in order; a too-long one alone in its row, cropped
            assert tokens == conv or (d == 0 and len(tokens) == seq_len + 1 and tokens == conv[:seq_len + 1])
            assert [supervised[i] for i in positions[1:]] == [bool(m) for m in mask[1:len(positions)]]
    assert k == len(order) and sampler.epochs()["chat"] == 1.0


def test_chat_loss_mask_on_assistant_tokens(mixdir):
    sampler = data.MixtureSampler(mixdir, "chat=1", seq_len=200, batch_size=2)
    enc = tokenizer.get_tokenizer("toy")
    x, y, doc_ids = sampler.next_batch()
    for b in range(2):
        targets = [t for t in y[b].tolist() if t != -100]
        text = enc.decode(targets)
        assert set(text.replace("<|eot_id|>", "")) == {"7"} and text.endswith("<|eot_id|>")


@pytest.fixture(scope="module")
def sftdir(tmp_path_factory):
    """Two chat sources of uneven conversation lengths (25 to ~175 tokens: two to a 64-token row, or one
    cropped), of different sizes, and a text source."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(1)
    for name, n in (("chat-a", 70), ("chat-b", 25)):
        convs = [{"messages": [{"role": "user", "content": "q" * rng.randint(0, 3)},
                               {"role": "assistant", "content": "7" * rng.choice([1, 3, 8, 20, 60, 150])}]}
                 for _ in range(n)]
        data.prepare(name, [write_jsonl(root / f"{name}.jsonl", convs)], str(root / "data"), "toy", workers=1)
    data.prepare("text", [write_jsonl(root / "text.jsonl", [{"text": "abc" * 40}] * 5)], str(root / "data"), "toy")
    return str(root / "data")


def replayed_rows(data_dir, name, seq_len, epochs):
    """Rows a sampler of one chat source serves until it has served `epochs` whole epochs (the slow way)."""
    sampler = data.MixtureSampler(data_dir, f"{name}=1", seq_len, 1)
    while sampler.chat_pos[0] != [epochs, 0]:
        sampler.skip_rows(1)
    return sampler.row


def test_epochs_serve_every_source_exactly_that_many_times(sftdir):
    lengths = {n: data.Source(os.path.join(sftdir, n)).docs[:, 2] for n in ("chat-a", "chat-b")}
    assert lengths["chat-a"].min() <= 32 and lengths["chat-a"].max() > 2 * 65  # two to a row, or one cropped
    sampler = data.MixtureSampler(sftdir, "chat-a=1,chat-b=5,text=1", seq_len=64, batch_size=1, epochs=2)
    rows = dict(zip(sampler.names, sampler.epoch_rows))
    for name in ("chat-a", "chat-b"):  # each epoch packs another order: counted exactly, not from token counts
        assert rows[name] == replayed_rows(sftdir, name, 64, 2)
        assert abs(rows[name] / (2 * lengths[name].sum() / 65) - 1) > 0.05  # what unique tokens / row size say
    assert rows["text"] == -(-2 * sampler.sources[2].n_tokens // 65)
    # the given weights (1, 5, 1) give way to each source's share of the rows: all reach 2 epochs together
    assert sampler.mixture == pytest.approx({n: r / sum(rows.values()) for n, r in rows.items()})
    half = sum(rows.values()) // 2
    sampler.skip_rows(half)
    assert all(abs(e - 1) < 0.08 for e in sampler.epochs().values()), sampler.epochs()
    sampler.skip_rows(sum(rows.values()) - half)
    assert sampler.epochs()["chat-a"] == sampler.epochs()["chat-b"] == 2.0
    assert 2.0 <= sampler.epochs()["text"] < 2.0 + 65 / sampler.sources[2].n_tokens
    assert dict(zip(sampler.names, sampler.rows.tolist())) == rows
    # a fraction of an epoch: the rows until that share of the source's tokens is served
    part = data.MixtureSampler(sftdir, "chat-a=1", seq_len=64, batch_size=1, epochs=1.3)
    part.skip_rows(part.epoch_rows[0] - 1)
    assert part.epochs()["chat-a"] < 1.3
    part.skip_rows(1)
    assert 1.3 <= part.epochs()["chat-a"] < 1.3 + 3 * 65 / part.sources[0].n_tokens


def test_sft_loss_all_supervises_every_conversation_token_but_its_first(sftdir):
    enc = tokenizer.get_tokenizer("toy")
    bos, pad = tokenizer.bos_id(enc), tokenizer.pad_id(enc)
    ours = data.MixtureSampler(sftdir, "chat-a=1", seq_len=64, batch_size=16)
    official = data.MixtureSampler(sftdir, "chat-a=1", seq_len=64, batch_size=16, sft_loss="all")
    for _ in range(3):
        (x, y, doc_ids), (x2, y2, doc_ids2) = ours.next_batch(), official.next_batch()
        assert torch.equal(x, x2) and torch.equal(doc_ids, doc_ids2)  # the same rows, packed alike
        targets, y2 = x[:, 1:], y2[:, :-1]  # the targets but the last, whose token x does not show
        assert doc_ids.max() > 0  # rows holding several conversations
        # every target but padding and each conversation's BOS (which nothing predicts in a row of its own)
        assert torch.equal(y2 == -100, (targets == pad) | (targets == bos))
        assert torch.equal(y2[y2 != -100], targets[y2 != -100])
        y = y[:, :-1]
        assert ((y != -100) & (y2 == -100)).sum() == 0 and (y2 != -100).sum() > 1.5 * (y != -100).sum()


def test_presets_and_bad_mixtures(mixdir, tmp_path, capsys):
    assert sum(data.PRESETS["pretrain-phase1"].values()) == pytest.approx(100, abs=0.02)
    assert len(data.PRESETS["pretrain-phase1"]) == 7 and len(data.PRESETS["pretrain-phase2"]) == 14
    assert "benchmark-train-sets" not in data.PRESETS["midtrain-phase1"]
    assert data.PRESETS["midtrain-phase2"]["benchmark-train-sets"] == 0.97
    assert all(name == name.lower() and " " not in name for name in data.MIXTURE_TABLE)
    # one name per corpus: RedPajama's StackExchange is not Dolmino's, the Nemotron SFT files are not Nemotron's code
    pretrain = set(data.PRESETS["pretrain-phase1"]) | set(data.PRESETS["pretrain-phase2"])
    midtrain = set(data.PRESETS["midtrain-phase1"]) | set(data.PRESETS["midtrain-phase2"])
    assert pretrain & midtrain == {"starcoder", "wiki"}  # the same dataset in both stages
    assert "RedPajama" in data.MIXTURE_TABLE["redpajama-stackexchange"][0]
    assert "dolmino" in data.MIXTURE_TABLE["dolmino-stackexchange"][0]
    assert "Llama-Nemotron-Post-Training" in data.MIXTURE_TABLE["nemotron-sft-code"][0]
    assert data.MIXTURE_TABLE["nemotron-pretraining-code"][0] == "nvidia/Nemotron-Pretraining-Code-v1"
    assert data.PRESETS["general-sft"] == {"tulu-3-sft-olmo-2": 866e3}
    reasoning = data.PRESETS["reasoning-sft"]
    assert sorted(reasoning.values()) == [803e3, 2.16e6, 3.2e6]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "trace"}] * 4)
    data.prepare("toy-traces", [path], str(tmp_path), "toy")
    with pytest.raises(DataError, match="not prepared in .*: toy-facts"):
        data.MixtureSampler(str(tmp_path), "toy", 8, 2)
    capsys.readouterr()
    sampler = data.MixtureSampler(str(tmp_path), "toy", 8, 2, renormalize=True)
    assert sampler.mixture == {"toy-traces": 1.0} and "warning" in capsys.readouterr().err
    for bad, msg in [("short=0", "must be positive"), ("short=-1,long=1", "must be positive"), ("short=x", "numeric"),
                     ("short=1,nosuch=1", "not prepared.*nosuch"), ("nosuch", "unknown mixture"),
                     ("short=1,short=2", "twice")]:
        with pytest.raises(DataError, match=msg):
            data.MixtureSampler(mixdir, bad, 8, 2)


def test_write_toy_with_a_generator(tmp_path, monkeypatch, capsys):
    """write_toy's contract with toydata.py: generate(seed) -> text_sources, chat_sources, eval."""
    def generate(seed, with_trace=True):
        rng = random.Random(seed)
        qs = [f"{rng.randint(100, 999)}+{rng.randint(100, 999)}" for _ in range(30)]
        answer = (lambda q: f"{q}={eval(q)}") if with_trace else (lambda q: str(eval(q)))
        sft = [[{"role": "user", "content": q}, {"role": "assistant", "content": answer(q)}] for q in qs[:20]]
        traces = [f"{q}=\\boxed{{{eval(q)}}}" for q in qs[:20]]
        return {"text_sources": {"toy-traces": traces, "toy-facts": ["7*8=56"] * 5},
                "chat_sources": {"toy-sft": sft},
                "eval": [{"question": q, "answer": str(eval(q))} for q in qs[20:]]}
    monkeypatch.setattr(toydata, "generate", generate)
    out = str(tmp_path / "toy")
    toydata.write_toy(out, seed=3)
    assert len(sample.load_eval_set(os.path.join(out, "eval.jsonl"))) == 10
    assert data.Source(os.path.join(out, "toy-sft")).kind == "chat"
    sampler = data.MixtureSampler(out, "toy", seq_len=16, batch_size=2)
    assert sampler.tokenizer == "toy" and sampler.vocab_size == 272
    capsys.readouterr()
    toydata.write_toy(out, seed=3)
    assert "nothing to do" in capsys.readouterr().out
    # The no-trace ablation is another corpus: asking for it rebuilds instead of reusing this one.
    toydata.write_toy(out, seed=3, with_trace=False)
    assert "nothing to do" not in capsys.readouterr().out
    assert "+" not in open(os.path.join(out, "raw", "toy-sft.jsonl")).read().split('"assistant"')[1][:40]


def test_write_toy_with_toydata(tmp_path):
    """The real generator (toydata.py) end to end: the toy preset and the SFT set are servable, and no
    eval question appears in the training data."""
    out = str(tmp_path / "toy")
    info = toydata.write_toy(out, seed=0)
    assert {"toy-traces", "toy-facts", "toy-sft", "toy-heldout", "toy-heldout-sft"} <= set(info["sources"])
    x, y, doc_ids = data.MixtureSampler(out, "toy", seq_len=256, batch_size=4).next_batch()
    assert doc_ids is None and x.max() < 272
    x, y, doc_ids = data.MixtureSampler(out, "toy-sft=1", seq_len=256, batch_size=4).next_batch()
    assert doc_ids is not None and (y != -100).any()
    questions = {r["question"] for r in sample.load_eval_set(os.path.join(out, "eval.jsonl"))}
    # Training problems: the first line of every worked trace and the user turn of every conversation.
    # (A sub-step of a longer training problem, e.g. the partial product 93*3 of 93*37, may coincide
    # with a held-out question; the held-out question itself is never trained on.)
    raw = os.path.join(out, "raw")
    trained = {json.loads(line)["text"].split("\n")[0] for line in open(os.path.join(raw, "toy-traces.jsonl"))}
    trained |= {m["content"] for line in open(os.path.join(raw, "toy-sft.jsonl"))
                for m in json.loads(line)["messages"] if m["role"] == "user"}
    leaked = questions & trained
    assert questions and not leaked
    # The held-out loss sets are exactly the eval problems, worked, with the eval answers boxed.
    evals = sample.load_eval_set(os.path.join(out, "eval.jsonl"))
    chats = [json.loads(line)["messages"] for line in open(os.path.join(raw, "toy-heldout-sft.jsonl"))]
    texts = [json.loads(line)["text"] for line in open(os.path.join(raw, "toy-heldout.jsonl"))]
    assert [m[1]["content"] for m in chats] == [t.split("\n")[0] for t in texts] == [r["question"] for r in evals]
    assert [grading.extract_answer(m[2]["content"]) for m in chats] == [r["answer"] for r in evals]
    assert [grading.extract_answer(t) for t in texts] == [r["answer"] for r in evals]
    x, y, doc_ids = data.MixtureSampler(out, "toy-heldout-sft=1", seq_len=512, batch_size=4).next_batch()
    assert doc_ids is not None and (y != -100).any()


# -----------------------------------------------------------------------------
# The command line: one line `error: ...`, exit code 2, no traceback

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_mix_json(mixdir):
    r = run_cli("mix", "--data", mixdir, "--mixture", "short=3,long=1", "--rows", "1000", "--seq-len", "7", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == {"short", "long"} and set(report["short"]) == {"tokens", "share", "weight", "epochs"}
    assert report["short"]["tokens"] == 750 * 8 and report["long"]["weight"] == 0.25


def test_cli_mix_lists_what_a_preset_needs(sftdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        data.main(["mix", "--data", str(tmp_path), "--mixture", "reasoning-sft"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and err.count("\n") == 1 and "not prepared" in err
    lines = out.splitlines()
    assert len(lines) == 3 and all("missing" in line for line in lines)
    assert "nvidia/OpenMathReasoning" in lines[0] and "51.92%" in lines[0]  # 3.2M of 6.163M samples
    chat = write_jsonl(tmp_path / "tulu.jsonl", [{"messages": CONVERSATION}] * 3)
    data.prepare("tulu-3-sft-olmo-2", [chat], str(tmp_path), "toy")
    capsys.readouterr()
    data.main(["mix", "--data", str(tmp_path), "--mixture", "general-sft", "--rows", "10", "--seq-len", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["tulu-3-sft-olmo-2", "100.00%", "prepared", "allenai/tulu-3-sft-olmo-2-mixture-0225"]
    assert lines[2].split()[:2] == ["tulu-3-sft-olmo-2", f"{10 * 65:,}"]  # then what 10 rows serve


@pytest.mark.parametrize("case", ["missing", "no-field", "truncated", "bad-weight", "other-tokenizer"])
def test_cli_errors(case, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}] * 3)
    prep = ["prepare", "--source", "s", "--out", str(tmp_path), "--tokenizer", "toy", "--input"]
    mix = ["mix", "--data", str(tmp_path), "--rows", "10", "--mixture"]
    if case in ("truncated", "bad-weight", "other-tokenizer"):
        data.prepare("s", [good], str(tmp_path), "toy")
    if case == "truncated":
        shard = tmp_path / "s" / "shard_00000.bin"
        shard.write_bytes(shard.read_bytes()[:-8])
    args = {"missing": prep + [str(tmp_path / "nope.jsonl")], "no-field": prep + [good, "--field", "body"],
            "truncated": mix + ["s=1"], "bad-weight": mix + ["s=-0.5"],
            "other-tokenizer": prep[:-2] + [other_tokenizer(tmp_path), "--input", good]}[case]
    with pytest.raises(SystemExit) as exit:
        data.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert {"missing": "nope.jsonl does not exist", "no-field": "good.jsonl:1: no field 'body'",
            "truncated": "is truncated", "bad-weight": "must be positive",
            "other-tokenizer": "one source, one tokenizer"}[case] in lines[0]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = run_cli("prepare", "--source", "s", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: input {tmp_path / 'nope.jsonl'} does not exist"]
