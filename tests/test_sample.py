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
    """Prompts of different lengths, several per left-padded batch, samples as consecutive rows: the same
    tokens as generating each prompt alone (catches row-order, padding and cache-expansion mistakes)."""
    model, enc = MobileLLM.from_hf(str(hf_dir)).eval(), tokenizer.get_tokenizer(str(hf_dir))
    args = sample.parse_args(["--num-samples", "2", "--batch-size", "4", "--max-new-tokens", "12", "--system", ""])
    questions = ["12+34", "Tom has 3 apples and buys 4 more at the market. How many now?", "90+12", "1"]
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


def test_eval_records_of_math_gsm8k_and_aime(tmp_path, capsys):
    """The official data files' fields: MATH problem + solution (its box is the answer), GSM8K
    question + '#### 42', AIME problem + an integer answer; a record missing either is one line."""
    path = tmp_path / "eval.jsonl"
    records = [{"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{3}{4}}$."},
               {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"}, {"problem": "AIME", "answer": 204}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = sample.load_eval_set(str(path))
    assert [r["question"] for r in got] == ["Find x.", "How many?", "AIME"]
    assert [sample.grade(c, r["answer"]) for c, r in zip(["\\boxed{0.75}", "so 7", "\\boxed{204}"], got)] == [True] * 3
    make_checkpoint(tmp_path / "run")
    path.write_text(json.dumps({"problem": "x", "answer_text": "1"}) + "\n")
    expect_user_error(["--ckpt", str(tmp_path / "run"), "--eval-file", str(path)], capsys, "eval.jsonl:1")
    path.write_text("\n")
    expect_user_error(["--ckpt", str(tmp_path / "run"), "--eval-file", str(path)], capsys, "no eval records")


def test_protocols_set_prompt_and_sampling():
    """--protocol official is the official harness's settings, ours the toy default; explicit flags win."""
    ours, official = sample.parse_args([]), sample.parse_args(["--protocol", "official"])
    assert (ours.system, ours.temperature, ours.top_p, ours.max_new_tokens, ours.seed) == \
        (tokenizer.DEFAULT_SYSTEM_PROMPT, 0.0, None, 1024, 0)
    assert (official.system, official.temperature, official.top_p, official.max_new_tokens, official.seed) == \
        ("", 0.6, 0.95, 30000, 0)
    quick = sample.parse_args(["--protocol", "official", "--max-new-tokens", "4096", "--temperature", "0"])
    assert (quick.max_new_tokens, quick.temperature, quick.top_p) == (4096, 0.0, 0.95)
    enc = tokenizer.get_tokenizer("toy")
    ids = sample.chat_ids(enc, sample.messages_for("  What is 2+2? ", official), 512, official)
    assert ids == tokenizer.render_chat([{"role": "user", "content": "What is 2+2?"}], enc, add_generation_prompt=True)[0]


# A Llama-3-style template that adds a default system prompt when the conversation has none, as a
# released checkpoint's template may.
DEFAULT_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n"
    "Please reason step-by-step and put your final answer within \\\\boxed{}.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["ours", "default-system"])
def test_official_prompt_is_the_checkpoints_chat_template(tmp_path, template):
    """Under --protocol official a folder's chat template renders the prompt: the same ids as
    transformers' apply_chat_template (its default system prompt included), and for a folder that
    `python model.py export` wrote, the same ids as our render_chat."""
    transformers = pytest.importorskip("transformers")
    enc = tokenizer.get_tokenizer("toy")
    tokenizer.write_hf_tokenizer(enc, str(tmp_path), 256)
    if template == "default-system":
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = DEFAULT_SYSTEM_TEMPLATE
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    enc = tokenizer.get_tokenizer(str(tmp_path))
    enc.chat_template = sample.read_chat_template(str(tmp_path))
    args = sample.parse_args(["--protocol", "official"])
    messages = sample.messages_for("What is 17+25?\n", args)
    ours = sample.chat_ids(enc, messages, 512, args)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert ("step-by-step" in enc.decode(ours)) == (template == "default-system")
    if template == "ours":
        assert ours == tokenizer.render_chat(messages, enc, add_generation_prompt=True)[0]


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


def varied_model(max_seq_len=256):
    """A tiny random model whose greedy continuations vary (weights wider than the 0.02 init)."""
    config = ModelConfig(vocab_size=272, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=128,
                         max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = MobileLLM(config).eval()
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return model


def alone(model, prompt, new, stops=()):
    out = model.generate(torch.tensor([prompt]), new, stop_ids=sorted(stops))[0, len(prompt):].tolist()
    return sample.cut_at_stop(out, set(stops))


def test_left_padded_batch_equals_one_prompt_at_a_time():
    """Prompts of 1 to 150 tokens in one left-padded batch: every row's greedy tokens equal its run
    alone, with rows that stop early (a stop id) next to rows that run the full length."""
    from model import left_pad
    model = varied_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 150, 7, 64, 23, 3)]
    free = [alone(model, p, 20) for p in prompts]
    stop = free[0][4]  # row 0 stops at its fifth token; the others wherever this token comes, if ever
    stops = {stop, 271}
    expected = [alone(model, p, 20, stops) for p in prompts]
    assert len(expected[0]) == 5 and max(map(len, expected)) == 20 and len(set(map(len, expected))) > 1
    idx, lengths = left_pad(prompts)
    gen = model.generate(idx, 20, stop_ids=sorted(stops), lengths=lengths)[:, idx.size(1):].tolist()
    assert [sample.cut_at_stop(row, stops) for row in gen] == expected
    # Samples of padded prompts: consecutive rows, each greedy row again equal to the prompt alone.
    gen = model.generate(idx, 20, stop_ids=sorted(stops), lengths=lengths, num_samples=2)[:, idx.size(1):].tolist()
    assert [sample.cut_at_stop(row, stops) for row in gen] == [e for e in expected for _ in range(2)]


def test_padded_row_stops_at_its_own_context():
    """A long prompt reaches the context before a short one: it gets the tokens it would get alone,
    then -1 while the short row goes on."""
    from model import left_pad
    model = varied_model(max_seq_len=48)
    prompts = [list(range(40, 84)), [5, 6, 7]]  # 44 tokens: 4 new before the context of 48
    idx, lengths = left_pad(prompts)
    gen = model.generate(idx, 30, lengths=lengths)[:, idx.size(1):].tolist()
    assert gen[0][:4] == alone(model, prompts[0], 30) and set(gen[0][4:]) == {-1}
    assert gen[1] == alone(model, prompts[1], 30) and len(gen[1]) == 30
