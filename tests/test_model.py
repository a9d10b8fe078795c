"""model.py against the reference: transformers' Llama4ForCausalLM with the same weights."""

import json
import os

import pytest
import torch

from model import MobileLLM, ModelConfig, ModelError

transformers = pytest.importorskip("transformers")


def hf_config(c):
    """The dense Llama4TextConfig that is MobileLLM-R1 (RECIPE section 2)."""
    L = c.n_layer
    return transformers.Llama4TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=L,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        intermediate_size=c.ffn_dim, intermediate_size_mlp=c.ffn_dim, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, moe_layers=[],
        no_rope_layers=[1] * L, layer_types=["full_attention"] * L, tie_word_embeddings=True,
        use_qk_norm=True, attn_implementation="eager")


def reference_model(c, seed):
    torch.manual_seed(seed)
    ref = transformers.Llama4ForCausalLM(hf_config(c)).eval()
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
