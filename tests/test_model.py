"""model.py against the reference: transformers' Llama4ForCausalLM with the same weights."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import hf
import model as model_module
from model import MobileLLM, ModelConfig, ModelError

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent


def reference_model(c, seed):
    torch.manual_seed(seed)
    ref = hf.reference_model(c, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing or misplaced norm shows up
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ref


def ours_from(ref, c):
    model = MobileLLM(c).eval()
    state = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("rope_") for k in missing)
    return model


# (n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, rope_theta): GQA groups 1 to 4, head_dim != 64.
CONFIGS = [
    (2, 96, 4, 4, 24, 160, 1e4),
    (3, 64, 6, 3, 16, 128, 1e6),
    (2, 80, 6, 2, 40, 96, 8e6),
    (2, 48, 8, 2, 8, 64, 5e5),
]


@pytest.mark.parametrize("n_layer,d_model,n_head,n_kv_head,head_dim,ffn_dim,theta", CONFIGS)
def test_logits_and_loss_match_reference(n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, theta):
    c = ModelConfig(vocab_size=211, n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head,
                    head_dim=head_dim, ffn_dim=ffn_dim, rope_theta=theta, max_seq_len=128)
    ref = reference_model(c, seed=n_head)
    model = ours_from(ref, c)
    idx = torch.randint(0, c.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(idx, labels=idx)
        logits = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        _, chunked = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    assert logits.shape == (2, 77, c.vocab_size)
    assert (logits - out.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    assert abs(chunked.item() - out.loss.item()) <= 1e-5


def test_ignore_index_and_sum_reduction():
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=50, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                    max_seq_len=64)
    model = MobileLLM(c)
    idx = torch.randint(0, 50, (2, 10))
    targets = torch.randint(0, 50, (2, 10))
    targets[0, :4] = -100
    logits, mean = model(idx, targets)
    _, total = model(idx, targets, loss_reduction="sum")
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert torch.allclose(total, expected, rtol=1e-5)
    assert torch.allclose(mean, expected / keep.sum(), rtol=1e-5)


def test_parameter_counts_on_meta_device():
    expected = {"140m": 140_248_512, "360m": 359_431_168, "950m": 949_685_760}
    for size, count in expected.items():
        with torch.device("meta"):
            model = MobileLLM(ModelConfig.from_size(size))
        assert model.num_params() == count, size
        assert model.lm_head_weight is model.embed_tokens.weight
        assert model.config.vocab_size == 128256


def test_context_settings_and_unknown_size():
    base, long = ModelConfig.from_size("950m"), ModelConfig.from_size("950m", long_context=True)
    assert (base.max_seq_len, base.rope_theta) == (4096, 1e6)
    assert (long.max_seq_len, long.rope_theta) == (32768, 8e6)
    with pytest.raises(ModelError, match="unknown model size '2b'.*140m"):
        ModelConfig.from_size("2b")


def test_flops_per_token():
    c = ModelConfig.from_size("140m")
    with torch.device("meta"):
        model = MobileLLM(c)
    assert model.estimate_flops_per_token(2048) == 6 * 140_248_512 + 12 * 15 * 9 * 64 * 2048


def test_hf_folder_round_trip_and_sharded_index(tmp_path):
    c = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=96,
                    rope_theta=8e6, max_seq_len=64)
    ref = reference_model(c, seed=1)
    idx = torch.randint(0, 300, (1, 20))
    expected = ref(idx).logits
    ref.save_pretrained(tmp_path / "hf")
    model = MobileLLM.from_hf(tmp_path / "hf")
    assert model.config.rope_theta == 8e6 and model.config.max_seq_len == 64
    assert (model(idx) - expected).abs().max() <= 1e-5
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert (MobileLLM.from_hf(tmp_path / "sharded")(idx) - expected).abs().max() <= 1e-5
    model.save_hf(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (back(idx).logits - expected).abs().max() <= 1e-5


def test_from_hf_bad_folders(tmp_path):
    c = ModelConfig(vocab_size=100, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                    max_seq_len=32)
    with pytest.raises(ModelError, match="no config.json"):
        MobileLLM.from_hf(tmp_path)
    MobileLLM(c).save_hf(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported"):
        MobileLLM.from_hf(other)

    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    missing = dict(tensors)
    missing.pop("model.layers.0.self_attn.k_proj.weight")
    save_file(missing, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight is missing"):
        MobileLLM.from_hf(tmp_path / "m")

    bad = dict(tensors)
    bad["model.layers.0.feed_forward.up_proj.weight"] = torch.zeros(65, 32)
    save_file(bad, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelError, match=r"up_proj\.weight has shape \(65, 32\).*\(64, 32\)"):
        MobileLLM.from_hf(tmp_path / "m")

    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        MobileLLM.from_hf(tmp_path / "m")

    cfg["moe_layers"] = [0]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="mixture-of-experts"):
        MobileLLM.from_hf(tmp_path / "m")


def test_greedy_generation_cache_equals_no_cache_and_reference():
    c = ModelConfig(vocab_size=128, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=128,
                    rope_theta=1e4, max_seq_len=128)
    ref = reference_model(c, seed=3)
    model = ours_from(ref, c)
    prompt = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 70)
    uncached = model.generate(prompt, 70, use_cache=False)
    assert cached.shape == (2, 79)
    assert torch.equal(cached, uncached)
    expected = ref.generate(prompt, max_new_tokens=70, do_sample=False, min_new_tokens=70,
                            attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(cached, expected)


def test_stop_ids_num_samples_and_sampling():
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, ffn_dim=64,
                    max_seq_len=64)
    model = MobileLLM(c).eval()
    prompt = torch.randint(0, 64, (1, 5))
    greedy = model.generate(prompt, 20)
    stop = greedy[0, 5 + 6].item()  # the 7th generated token (or earlier, if it occurs before)
    first = (greedy[0, 5:] == stop).nonzero()[0].item()
    stopped = model.generate(prompt, 20, stop_ids=[stop])
    assert stopped.shape[1] == 5 + first + 1 and stopped[0, -1].item() == stop
    # One prefill, then num_samples rows: greedy rows are identical, top_k=1 / tiny top_p are greedy.
    many = model.generate(prompt, 20, num_samples=3)
    assert many.shape == (3, 25) and (many == greedy).all()
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(prompt, 20, temperature=0.7, top_p=1e-6, seed=0), greedy)
    a = model.generate(prompt, 20, temperature=1.0, num_samples=4, seed=5)
    b = model.generate(prompt, 20, temperature=1.0, num_samples=4, seed=5)
    assert torch.equal(a, b) and not (a == a[0]).all()
    with pytest.raises(ModelError, match="temperature"):
        model.generate(prompt, 5, temperature=-1)
    with pytest.raises(ModelError, match="top_p"):
        model.generate(prompt, 5, temperature=1, top_p=1.5)
    with pytest.raises(ModelError, match="context"):
        model.generate(torch.zeros(1, 64, dtype=torch.long), 5)


def test_packed_documents_do_not_see_each_other():
    """Logits of a packed row with doc_ids equal those of each document run on its own."""
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, ffn_dim=64,
                    max_seq_len=64)
    model = MobileLLM(c).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 12))
    # RoPE positions continue across the packed row; relative positions within a document are what
    # attention sees, and QK-norm comes after RoPE, so each document's result is position-invariant.
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-4)
        assert not torch.allclose(model(packed)[:, 7:], model(b), atol=1e-3)


def test_bf16_autocast_and_bf16_weights_match_float32_within_bf16_tolerance():
    """Training under bf16 autocast (float32 weights) and inference with bf16 weights stay within
    bf16 rounding of the float32 model: forward, loss (dense and chunked), every gradient, and the
    parameters and their gradients stay float32 under autocast (master weights)."""
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=96, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=128,
                    max_seq_len=64)
    model = MobileLLM(c)
    idx = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, 1)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])

    def run(autocast, return_logits):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets, doc_ids=doc_ids, return_logits=return_logits)
        loss.backward()
        return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    logits32, loss32, grads32 = run(False, True)
    for return_logits in (True, False):
        logits, loss, grads = run(True, return_logits)
        assert loss.dtype == torch.float32 and abs(loss.item() - loss32.item()) < 2e-2 * loss32.item()
        if return_logits:
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits.float(), logits32, atol=3e-2, rtol=3e-2)
        for name, g in grads.items():
            assert g.dtype == torch.float32 and model.get_parameter(name).dtype == torch.float32, name
            scale = grads32[name].abs().max().item()
            torch.testing.assert_close(g, grads32[name], atol=5e-2 * scale, rtol=0, msg=name)
    model.eval()
    with torch.no_grad():
        logits32 = model(idx)
        model.to(torch.bfloat16)
        logits = model(idx)
    assert logits.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32  # exact angles
    torch.testing.assert_close(logits.float(), logits32, atol=6e-2, rtol=5e-2)
    assert (logits.float().argmax(-1) == logits32.argmax(-1)).float().mean() > 0.9


# -------------------------------------------------------------------------------------------------
# Llama 3.x (LlamaForCausalLM), the mid-training teacher (RECIPE section 4.5): rotate-half RoPE, no QK-norm,
# "llama3" rope scaling, untied head; the same MobileLLM class with three config switches.

def llama_reference(n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, theta, scaling, tie, vocab=256,
                    max_pos=256, seed=0, init=0.02):
    rope = {"rope_type": "llama3", "rope_theta": theta, **scaling} if scaling else {"rope_type": "default", "rope_theta": theta}
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=ffn_dim, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, head_dim=head_dim, max_position_embeddings=max_pos,
        rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tie, initializer_range=init,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")  # no eos: generate runs to the end
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ref


# The real teacher's scaling (factor 8, low 1, high 4) with the original context cut from 8192 to 64 so
# that short test rows run past it and every band occurs: wavelengths kept, interpolated and stretched.
SCALED = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
# (n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, theta, scaling, tied): GQA groups 1 to 4.
LLAMA_CONFIGS = [
    (2, 64, 4, 4, 16, 128, 5e5, SCALED, False),
    (2, 96, 6, 3, 16, 160, 5e5, dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0,
                                      original_max_position_embeddings=48), False),
    (3, 48, 6, 2, 8, 96, 1e4, None, True),
    (2, 64, 8, 2, 16, 128, 5e5, SCALED, False),
]


@pytest.mark.parametrize("n_layer,d_model,n_head,n_kv_head,head_dim,ffn_dim,theta,scaling,tie", LLAMA_CONFIGS)
def test_llama_folder_matches_reference(tmp_path, n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, theta,
                                        scaling, tie):
    """Logits within 1e-4 over 100 positions (past original_max_position_embeddings), and 70 greedy tokens
    identical to transformers' generate, from a folder LlamaForCausalLM.save_pretrained wrote."""
    ref = llama_reference(n_layer, d_model, n_head, n_kv_head, head_dim, ffn_dim, theta, scaling, tie, seed=n_head,
                          init=0.2)  # larger than 0.02 so greedy decoding varies instead of repeating a token
    ref.save_pretrained(tmp_path)
    model = MobileLLM.from_hf(tmp_path).eval()
    c = model.config
    assert (c.qk_norm, c.rope_interleaved, c.tie_embeddings, c.rope_scaling) == (False, False, tie, scaling)
    if scaling:  # the test covers all three bands of the rule
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        ratio = model_module.llama3_inv_freq(inv, **scaling) / inv
        assert (ratio == 1).any() and (ratio == 1 / scaling["factor"]).any()
        assert ((ratio < 1) & (ratio > 1 / scaling["factor"])).any()
    idx = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :8]
    ours = model.generate(prompt, 70)
    theirs = ref.generate(prompt, max_new_tokens=70, min_new_tokens=70, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(ours, theirs) and len(set(ours[0, 8:].tolist())) >= 8


def test_llama_folder_loads_into_the_tensors_as_read(tmp_path, monkeypatch):
    """No second copy of the weights: the model's parameters are the tensors read from the file (meta
    device, then assign), in float32 and in bfloat16, so an 8B teacher costs its size once."""
    import hf
    ref = llama_reference(*LLAMA_CONFIGS[0])
    ref.save_pretrained(tmp_path)
    read = {}

    def recording(*args, **kwargs):
        tensors = real(*args, **kwargs)
        read.update(tensors)
        return tensors

    real = hf.read_safetensors
    monkeypatch.setattr(hf, "read_safetensors", recording)
    for dtype in (torch.float32, torch.bfloat16):
        read.clear()
        model = MobileLLM.from_hf(tmp_path, dtype=dtype)
        pointers = {t.untyped_storage().data_ptr() for t in read.values()}
        params = dict(model.named_parameters())
        assert len(params) == len(read) and all(p.dtype == dtype for p in params.values())
        assert all(p.untyped_storage().data_ptr() in pointers for p in params.values())
        assert not any(t.is_meta for t in [*params.values(), *model.buffers()])
        assert model.rope_cos.dtype == torch.float32  # rope tables stay float32 whatever the weights


def test_llama_layout_saves_as_llama_for_causal_lm(tmp_path):
    ref = llama_reference(*LLAMA_CONFIGS[1], seed=2)
    ref.save_pretrained(tmp_path / "ref")
    model = MobileLLM.from_hf(tmp_path / "ref")
    model.save_hf(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 256, (1, 90))
    with torch.no_grad():
        assert (back(idx).logits - ref(idx).logits).abs().max() <= 1e-5
    again = MobileLLM.from_hf(tmp_path / "ours")
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_unsupported_llama_folders_are_one_line(tmp_path, capsys):
    """A rope type other than default / llama3, or biases: sample.py --hf says so in one line, exit 2."""
    import sample
    ref = llama_reference(*LLAMA_CONFIGS[2])
    ref.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' progress bar
    config = json.loads((tmp_path / "config.json").read_text())
    cases = [({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
             ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
             ({"mlp_bias": True}, "MLP biases")]
    for change, needle in cases:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(SystemExit) as e:
            sample.main(["--hf", str(tmp_path), "--prompt", "hi", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and needle in err and "\n" not in err, err


# -------------------------------------------------------------------------------------------------
# Export: `python model.py export RUN_DIR OUT_DIR` writes a folder that works where a released one does

def run_of_ours(folder, tokenizer_name, vocab_size):
    """A checkpoint in train.py's format whose greedy reply ends with <|eot_id|> after a few tokens: the
    tied <|eot_id|> row is made twice the row of the sixth token greedy decoding would pick."""
    import tokenizer
    enc = tokenizer.get_tokenizer(tokenizer_name)
    c = ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, ffn_dim=64,
                    max_seq_len=256)
    torch.manual_seed(0)
    model = MobileLLM(c).eval()
    prompt = torch.tensor([tokenizer.render_chat(CHAT, enc, add_generation_prompt=True)[0]])
    sixth = model.generate(prompt, 6)[0, -1]
    with torch.no_grad():
        model.embed_tokens.weight[tokenizer.eot_id(enc)] = 2 * model.embed_tokens.weight[sixth]
    folder.mkdir()
    torch.save({"model": model.state_dict(), "config": asdict(c), "step": 1, "tokenizer": tokenizer_name},
               folder / "ckpt_0000001.pt")
    return model, enc, prompt


CHAT = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 12+30? Answer in one word, é."}]


@pytest.mark.parametrize("name,vocab_size", [("toy", 272), ("llama3", 128256)])
def test_export_works_in_transformers_and_round_trips(name, vocab_size, tmp_path, capsys):
    import hf
    import tokenizer
    model, enc, prompt = run_of_ours(tmp_path / "run", name, vocab_size)
    out = tmp_path / "export"
    if name == "toy":  # the one-line command, as a user runs it
        proc = subprocess.run([sys.executable, "model.py", "export", str(tmp_path / "run"), str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {out}"), proc.stderr
    else:
        hf.main(["export", str(tmp_path / "run"), str(out)])
    assert set(os.listdir(out)) == hf.EXPORT_FILES
    config = json.loads((out / "config.json").read_text())
    stops = tokenizer.stop_ids(enc)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tokenizer.bos_id(enc), stops, tokenizer.pad_id(enc))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
    auto = transformers.AutoTokenizer.from_pretrained(out)
    ids = auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == prompt[0].tolist()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = reference.generate(prompt, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = model.generate(prompt, 40, stop_ids=stops)
    assert theirs[0, -1].item() == tokenizer.eot_id(enc) and theirs.size(1) < prompt.size(1) + 40  # stopped there
    assert torch.equal(ours, theirs)
    back = MobileLLM.from_hf(out)
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    # An earlier export is replaced; a folder holding anything else is refused in one line, exit 2.
    capsys.readouterr()
    hf.main(["export", str(tmp_path / "run"), str(out)])
    assert set(os.listdir(out)) == hf.EXPORT_FILES and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        hf.main(["export", str(tmp_path / "run"), str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "holds other files" in err and "\n" not in err
    assert (out / "notes.txt").read_text() == "mine"


def test_llama_3_1_8b_instruct_config_is_the_teacher(tmp_path):
    """The mid-training teacher's config.json as published (transformers 4 layout, RECIPE section 4.5) maps to
    rotate-half RoPE, no QK-norm, llama3 scaling and an untied head; 8.03B parameters on the meta device."""
    import hf
    published = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(published))
    config, model_type = hf.read_config(str(tmp_path))
    assert model_type == "llama" and config == ModelConfig(
        vocab_size=128256, n_layer=32, d_model=4096, n_head=32, n_kv_head=8, head_dim=128, ffn_dim=14336,
        rope_theta=5e5, max_seq_len=131072, norm_eps=1e-5, tie_embeddings=False, qk_norm=False, rope_interleaved=False,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
    with torch.device("meta"):
        teacher = MobileLLM(config)
    assert teacher.num_params() == 8_030_261_248


@pytest.mark.parametrize("mv", [True, False])
def test_single_bf16_row_linear_matches_the_matmul(monkeypatch, mv):
    """Decoding one token with bf16 weights goes through torch.mv where it was measured faster (model.linear),
    else the matmul: the same values either way."""
    monkeypatch.setitem(model_module._MV_FASTER, "cpu", mv)
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 64, generator=g).bfloat16(), torch.randn(1, 1, 64, generator=g).bfloat16()
    with torch.no_grad():
        out = model_module.linear(x, w)
        assert out.shape == (1, 1, 300) and out.dtype == torch.bfloat16 and len(calls) == mv
        torch.testing.assert_close(out.float(), torch.nn.functional.linear(x, w).float(), atol=0.05, rtol=0.02)
        rows = torch.randn(3, 64, generator=g).bfloat16()  # several rows: the matmul itself
        assert torch.equal(model_module.linear(rows, w), torch.nn.functional.linear(rows, w))
    xg = x.float().requires_grad_()  # with gradients: always the matmul (autograd, autocast)
    assert torch.equal(model_module.linear(xg, w.float()), torch.nn.functional.linear(xg, w.float()))
    assert len(calls) == mv


def test_mv_choice_is_measured_once_per_device():
    model_module._MV_FASTER.pop("cpu", None)
    first = model_module.mv_is_faster(torch.device("cpu"))
    assert model_module._MV_FASTER == {"cpu": first} and model_module.mv_is_faster(torch.device("cpu")) is first
    assert model_module.mv_is_faster(torch.device("meta")) is False
