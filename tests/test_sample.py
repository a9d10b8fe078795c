"""sample.py: greedy tokens equal transformers' generate on a Hugging Face folder, batched scoring
equals one-by-one generation, streaming text equals the decoded ids, and user errors are one line."""

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

import data
import hf
import tokenizer
import sample
from model import MobileLLM, ModelConfig

ACCURACY_LINE = re.compile(r"^accuracy: (\d+)/(\d+) = (\d+\.\d)%$")


def byte_to_unicode():
    """GPT-2's printable stand-in for every byte, as Hugging Face byte-level vocabularies spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_tokenizer_json(folder):
    """The toy tokenizer (256 byte ranks + the special tokens) as a Hugging Face tokenizer.json."""
    toy = tokenizer.get_tokenizer("toy")
    chars = byte_to_unicode()
    specials = [(name, toy.encode_single_token(name)) for name in toy.special_tokens_set]
    tj = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": name, "special": True, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False} for name, i in sorted(specials, key=lambda x: x[1])],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {chars[b]: b for b in range(256)}, "merges": []},
    }
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    return toy.n_vocab


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama4ForCausalLM saved by transformers, with a tokenizer.json (RECIPE section 2)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    n_vocab = write_tokenizer_json(folder)
    c = ModelConfig(vocab_size=n_vocab, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=128,
                    max_seq_len=256, rope_theta=10000.0)
    torch.manual_seed(0)  # initializer_range larger than 0.02 so greedy decoding varies instead of repeating a token
    hf.reference_model(c, initializer_range=0.3).save_pretrained(folder)
    return folder


def run_main(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main(argv)
    return capsys.readouterr()


def expect_user_error(argv, capsys, needle):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    # the one error line; the start-up line naming the dtype (printed once the model loaded) aside
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("dtype "))
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_hf_greedy_tokens_equal_transformers_generate(hf_dir):
    """`python sample.py --hf DIR` (a real subprocess) streams the same greedy tokens as transformers."""
    from transformers import Llama4ForCausalLM
    cmd = [sys.executable, str(REPO / "sample.py"), "--hf", str(hf_dir), "--prompt", "What is 17+25? é",
           "--max-new-tokens", "32", "--temperature", "0", "--device", "cpu", "--print-ids"]
    proc = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=120)  # bytes: keep any \r as is
    assert proc.returncode == 0, proc.stderr.decode()
    streamed, ids_line = proc.stdout.decode("utf-8").rsplit("\n", 2)[:2]
    out = json.loads(ids_line)
    ours = out["ids"][0]

    enc = tokenizer.get_tokenizer(str(hf_dir))
    stops = tokenizer.stop_ids(enc)
    reference = Llama4ForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([out["prompt_ids"]])
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=stops,
                                    pad_token_id=stops[0])[0, prompt.size(1):].tolist()
    assert len(ours) >= 16  # a run that stopped at once would prove little
    assert ours == theirs
    # The streamed text (decoded byte by byte, across split UTF-8 characters) is the decoded reply.
    assert streamed == enc.decode([t for t in ours if t not in stops])


def test_batched_scoring_equals_one_by_one(hf_dir):
    """Prompts grouped by length, several per batch, samples as consecutive rows: the same tokens as
    generating each prompt alone (catches row-order and cache-expansion mistakes)."""
    model, enc = MobileLLM.from_hf(str(hf_dir)).eval(), tokenizer.get_tokenizer(str(hf_dir))
    args = sample.parse_args(["--num-samples", "2", "--batch-size", "4", "--max-new-tokens", "12", "--system", ""])
    questions = ["12+34", "56+78", "90+12", "123*45"]  # three of one length (two batches), one other
    prompts = [sample.chat_ids(enc, sample.messages_for(q, args), model.config.max_seq_len) for q in questions]
    texts, n_tokens, _ = sample.generate_batched(model, enc, prompts, args)
    stops = set(tokenizer.stop_ids(enc))
    for prompt, got in zip(prompts, texts):
        alone = model.generate(torch.tensor([prompt]), 12, stop_ids=sorted(stops))[0, len(prompt):].tolist()
        assert got == [sample.decode(enc, sample.cut_at_stop(alone, stops), stops)] * 2
    assert n_tokens > 0


@pytest.mark.parametrize("color", [False, True])
def test_reply_printer_splits_tags_and_characters(color):
    """Fed one byte-token at a time (é is two tokens, each tag seven or eight), the output is the text,
    with the trace dimmed on a terminal."""
    enc = tokenizer.get_tokenizer("toy")
    text = "a<b <think>\n12é+3\n</think>\n\\boxed{15} <thi"
    printer = sample.ReplyPrinter(enc, color)
    out = "".join(printer.feed(t) for t in enc.encode_ordinary(text)) + printer.flush()
    assert len(enc.encode_ordinary("é")) == 2
    if color:
        assert out == "a<b \033[2m<think>\n12é+3\n</think>\033[0m\n\\boxed{15} <thi"
    else:
        assert out == text


def test_scoring_reads_last_box_and_gsm8k_answers():
    assert sample.gold_answer("Natalia sold 48 + 24 = 72 clips.\n#### 72") == "72"
    assert sample.is_correct("<think>\\boxed{7}</think> so \\boxed{1,234}", "#### 1234")
    assert sample.is_correct("\\boxed{1234.0}", "1234")
    assert not sample.is_correct("\\boxed{1234}</think> \\boxed{7}", "1234")  # the last box counts
    assert not sample.is_correct("no box: 1234", "1234")


def make_checkpoint(folder):
    """A tiny checkpoint in train.py's format, for the scoring path end to end."""
    config = ModelConfig(vocab_size=272, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16,
                         ffn_dim=64, max_seq_len=512)
    torch.manual_seed(0)
    ckpt = {"model": MobileLLM(config).state_dict(), "config": asdict(config), "step": 1, "tokenizer": "toy",
            "stage": "sft"}
    os.makedirs(folder, exist_ok=True)
    torch.save(ckpt, os.path.join(folder, "ckpt_0000001.pt"))


def test_eval_file_end_to_end(tmp_path, capsys):
    make_checkpoint(tmp_path / "run")
    records = [{"question": "12+34", "answer": "46"}, {"question": "5*6", "answer": "30"},
               {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    argv = ["--ckpt", str(tmp_path / "run"), "--eval-file", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "6",
            "--temperature", "0.6", "--top-p", "0.95", "--num-samples", "2", "--device", "cpu"]
    lines = run_main(argv, capsys).out.strip().splitlines()
    m = ACCURACY_LINE.match(lines[-1])
    assert m and int(m.group(2)) == 6, lines[-1]  # 3 problems x 2 samples
    assert any("tokens/s" in line for line in lines)
    lines = run_main(argv[:-8] + ["--eval", "2", "--device", "cpu"], capsys).out.strip().splitlines()
    assert ACCURACY_LINE.match(lines[-1]).group(2) == "2"


def test_chat_keeps_history(hf_dir, capsys, monkeypatch):
    argv = ["--hf", str(hf_dir), "--chat", "--max-new-tokens", "4", "--print-ids", "--system", "", "--device", "cpu"]
    out = run_main(argv, capsys, stdin="hi\nagain\n", monkeypatch=monkeypatch).out  # then EOF ends the chat
    turns = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(turns) == 2
    first, second = turns[0]["prompt_ids"], turns[1]["prompt_ids"]
    assert second[:len(first)] == first and len(second) > len(first) + len("again")


def test_bad_input_is_one_line(hf_dir, tmp_path, capsys):
    hf = ["--hf", str(hf_dir), "--device", "cpu"]
    expect_user_error(hf + ["--prompt", "x" * 300], capsys, "context is 256")
    expect_user_error(hf + ["--prompt", "hi", "--temperature", "-0.5"], capsys, "--temperature")
    expect_user_error(hf + ["--prompt", "hi", "--top-p", "0"], capsys, "--top-p")
    expect_user_error(hf + ["--prompt", "hi", "--top-p", "1.5"], capsys, "--top-p")
    expect_user_error(["--ckpt", str(tmp_path / "nowhere")], capsys, "nowhere")
    expect_user_error(["--hf", str(tmp_path)], capsys, "config.json")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text('{"model_type": "qwen2"}')
    expect_user_error(["--hf", str(tmp_path / "qwen")], capsys, "qwen2")
    (tmp_path / "ckpt_0000001.pt").write_bytes(b"not a checkpoint")
    expect_user_error(["--ckpt", str(tmp_path)], capsys, "ckpt_0000001.pt")


def test_foreign_checkpoint_is_one_line(tmp_path, capsys):
    """A readable torch file that is not one of our checkpoints (train.load_model must say so)."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    expect_user_error(["--ckpt", str(tmp_path / "foreign.pt")], capsys, "foreign.pt")
    make_checkpoint(tmp_path / "run")  # ours, but with weights that do not fit its config
    ckpt = torch.load(tmp_path / "run" / "ckpt_0000001.pt")
    ckpt["config"]["d_model"] = 48
    torch.save(ckpt, tmp_path / "run" / "ckpt_0000001.pt")
    expect_user_error(["--ckpt", str(tmp_path / "run")], capsys, "ckpt_0000001.pt")


def test_no_checkpoint_says_how_to_make_one(tmp_path):
    """A bare `python sample.py` before any training: one line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, str(REPO / "sample.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "python train.py" in proc.stderr, proc.stderr


def test_llama_folder_chats_and_evaluates(tmp_path, capsys, monkeypatch):
    """--hf a Llama-3 LlamaForCausalLM folder (the mid-training teacher's architecture, RECIPE section 4.5, with
    its tokenizer.json): the same greedy tokens as transformers, a chat, and a scored eval file."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, rope_parameters=rope,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    toy = tokenizer.get_tokenizer("toy")
    tokenizer.write_hf_tokenizer(toy, str(tmp_path), 256)
    hf = ["--hf", str(tmp_path), "--device", "cpu", "--max-new-tokens", "24", "--print-ids"]
    out = json.loads(run_main(hf + ["--prompt", "What is 17+25?"], capsys).out.strip().splitlines()[-1])
    stops = tokenizer.stop_ids(toy)
    prompt = torch.tensor([out["prompt_ids"]])
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=stops,
                                    pad_token_id=stops[0], attention_mask=torch.ones_like(prompt))
    assert out["ids"][0] == theirs[0, prompt.size(1):].tolist() and len(out["ids"][0]) >= 8
    turns = run_main(hf + ["--chat"], capsys, stdin="hi\nagain\n", monkeypatch=monkeypatch).out
    assert len([line for line in turns.splitlines() if line.startswith("{")]) == 2
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in [("1+2", "3"), ("2*4", "8")])
    lines = run_main(hf[:-1] + ["--eval-file", str(tmp_path / "eval.jsonl")], capsys).out.strip().splitlines()
    assert ACCURACY_LINE.match(lines[-1]) and ACCURACY_LINE.match(lines[-1]).group(2) == "2"
