"""
Hugging Face folders in and out of model.py's one MobileLLM class: config.json mapping, safetensors
reading without a second copy of the weights, and a complete export (weights, config, generation
config, tokenizer and chat template) that transformers, llama.cpp's converter and sample.py load.

Two architectures map onto the class (RECIPE sections 2 and 4.5):
- Llama4ForCausalLM (model_type llama4_text): MobileLLM-R1 as released: interleaved RoPE, QK-norm, tied head.
- LlamaForCausalLM (model_type llama): Llama 3.x, the mid-training teacher: rotate-half RoPE, no
  QK-norm, "llama3" rope scaling, untied head; its MLP is called `mlp` where Llama 4 says `feed_forward`.

    python model.py export out/toy out/toy-hf     # our run folder (newest checkpoint) -> Hugging Face folder
"""

import json
import os
import shutil
import sys
import tempfile

import torch

from checkpoint import CheckpointError
from model import MobileLLM, ModelConfig, ModelError, load_model, rope_tables
from runtime import ArgumentParser, name_or_path, path
from tokenizer import TokenizerError, get_tokenizer, write_hf_tokenizer, bos_id, pad_id, stop_ids

# Per model_type: what config.json means when it omits a field (transformers' defaults, except the
# tied head of llama4_text: the released MobileLLM-R1 files carry no lm_head.weight).
DEFAULTS = {"llama4_text": dict(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
            "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)}
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# The files save() writes: a folder holding only these is an earlier export and may be replaced.
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def read_config(path):
    """(ModelConfig, model_type) from a folder's config.json, refusing what the model does not cover."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelError(f"{path} is not a folder: pass a Hugging Face model folder holding config.json")
    if not os.path.isfile(config_path):
        raise ModelError(f"no config.json in {path}: pass a Hugging Face model folder "
                         "(e.g. facebook/MobileLLM-R1-950M as downloaded)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {config_path}: {e}")
    hf = hf.get("text_config", hf)  # a multimodal Llama 4 wrapper keeps the decoder here
    model_type = {"llama4": "llama4_text"}.get(hf.get("model_type"), hf.get("model_type"))
    if model_type not in DEFAULTS:
        raise ModelError(f"{config_path}: model_type {hf.get('model_type')!r} is not supported; expected a "
                         "MobileLLM-R1 / Llama4ForCausalLM (llama4_text) or Llama-3 LlamaForCausalLM (llama) checkpoint")
    defaults = DEFAULTS[model_type]
    rope = dict(hf.get("rope_scaling") or {})  # transformers 4 layout, rope_theta at the top level
    rope.update(hf.get("rope_parameters") or {})  # transformers 5 layout
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = [
        (bool(hf.get("moe_layers")), "mixture-of-experts layers (moe_layers) are not supported"),
        (any(v != 1 for v in hf.get("no_rope_layers") or [1]), "layers without RoPE (no_rope_layers) are not supported"),
        (hf.get("attention_bias", False) or hf.get("mlp_bias", False), "attention or MLP biases are not supported"),
        (hf.get("hidden_act", "silu") != "silu", f"activation {hf.get('hidden_act')!r} is not supported (silu is)"),
        (any(t != "full_attention" for t in hf.get("layer_types") or []), "non-full attention layers are not supported"),
        (rope_type not in ("default", "llama3"), f"rope type {rope_type!r} is not supported (default and llama3 are)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ModelError(f"{config_path}: {what}; this model covers dense MobileLLM-R1 and Llama 3.x checkpoints")
    try:
        scaling = {k: rope[k] for k in LLAMA3_SCALING} if rope_type == "llama3" else None
        heads = hf["num_attention_heads"]
        config = ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn_dim=hf.get("intermediate_size_mlp") or hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))),
            max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
            tie_embeddings=hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
            qk_norm=model_type == "llama4_text" and hf.get("use_qk_norm", True),
            rope_interleaved=model_type == "llama4_text", rope_scaling=scaling)
    except KeyError as e:
        raise ModelError(f"{config_path}: required field {e.args[0]!r} is missing")
    return config, model_type


def hf_names(model, model_type):
    """Our state-dict name -> the checkpoint's tensor name (rope tables are recomputed, not stored)."""
    names = {}
    for name in model.state_dict():
        hf_name = name if name == "lm_head.weight" else "model." + name
        names[name] = hf_name.replace(".feed_forward.", ".mlp.") if model_type == "llama" else hf_name
    return names


def safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ModelError(f"no model.safetensors (or model.safetensors.index.json) in {path}: download the weights too")
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise ModelError(f"{os.path.join(path, name)} is listed in the index but missing: download it")
    return [os.path.join(path, name) for name in files]


def read_safetensors(path, names, device="cpu", dtype=torch.float32):
    """{name: tensor} for the given tensor names of a folder's safetensors (single or sharded), each
    read straight onto `device` and cast to `dtype` one at a time: at most one tensor exists twice."""
    from safetensors import SafetensorError, safe_open
    tensors = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name in names:
                        tensors[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{file} is not a readable safetensors file ({e}): download it again")
    return tensors


def tensor_shapes(path):
    """{name: shape} from the safetensors headers alone."""
    from safetensors import SafetensorError, safe_open
    shapes = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{file} is not a readable safetensors file ({e}): download it again")
    return shapes


def load(path, device="cpu", dtype=None):
    """MobileLLM from a Hugging Face folder. The model is built on the meta device and its parameters
    become the tensors as read (load_state_dict(assign=True)), so an 8B teacher costs its own size once."""
    path = str(path)
    config, model_type = read_config(path)
    with torch.device("meta"):
        model = MobileLLM(config)
    names = hf_names(model, model_type)
    expected = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = tensor_shapes(path)
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)  # some writers store the tied head too; it is the embedding
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ModelError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all): not a dense "
                         f"{'Llama' if model_type == 'llama' else 'MobileLLM-R1 / Llama4ForCausalLM'} checkpoint")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ModelError(f"{path}: tensor {missing[0]} is missing ({len(missing)} in all): "
                         "the weights are incomplete or do not match config.json")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ModelError(f"{path}: tensor {name} has shape {shape}, config.json implies {expected[name]}")
    tensors = read_safetensors(path, set(expected), device, dtype or torch.float32)
    model.load_state_dict({k: tensors[names[k]] for k in names}, assign=True)
    # Rope tables are buffers outside the state dict: computed here, float32 whatever the weights' dtype.
    model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, device,
                                                 config.rope_scaling)
    return model


def hf_config(c, enc=None, dtype=torch.float32):
    """config.json of a ModelConfig for transformers' Llama4ForCausalLM (MobileLLM-R1's layout) or LlamaForCausalLM
    (rotate-half RoPE without QK-norm, as Llama 3), with the tokenizer's bos / stop / pad ids when one is given."""
    if not c.rope_interleaved and c.qk_norm:
        raise ModelError("rotate-half RoPE with QK-norm has no Hugging Face class: it cannot be saved as one")
    rope = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if enc is not None:
        ids = {"bos_token_id": bos_id(enc), "eos_token_id": stop_ids(enc), "pad_token_id": pad_id(enc)}
    common = {
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": rope,
        "rope_parameters": {"rope_theta": c.rope_theta, **(rope or {"rope_type": "default"})},
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
        "torch_dtype": str(dtype).split(".")[-1], **ids,
    }
    if not c.rope_interleaved:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False, **common}
    L = c.n_layer  # Llama 4 leftovers that make the reference class a dense model (RECIPE section 2)
    return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **common,
            "intermediate_size_mlp": c.ffn_dim, "use_qk_norm": c.qk_norm, "moe_layers": [],
            "no_rope_layers": [1] * L, "layer_types": ["full_attention"] * L, "attn_temperature_tuning": False,
            # llama.cpp reads "dense" from these, not from moe_layers: no MoE layer step (it refuses 0 experts)
            "num_local_experts": 1, "num_experts_per_tok": 1, "interleave_moe_layer_step": 0}


def reference_model(c, attn_implementation="sdpa", **overrides):
    """transformers' own model of a ModelConfig, randomly initialised: the numerical reference of the parity
    tests and bench.py (transformers is a test-time dependency, imported here only)."""
    import transformers
    config = {**hf_config(c), **overrides}
    cls = transformers.LlamaForCausalLM if config["model_type"] == "llama" else transformers.Llama4ForCausalLM
    return cls(cls.config_class(**config, attn_implementation=attn_implementation))


def save(model, path, tokenizer=None):
    """Write a Hugging Face folder: config.json + model.safetensors, and with a tokenizer (a name for
    tokenizer.get_tokenizer, or an Encoding) also generation_config.json (stop ids), tokenizer.json and
    tokenizer_config.json with the chat template. Everything is written into a temporary folder next to
    `path` and renamed into place, so `path` is never half-written. A `path` holding anything but an
    earlier export is refused."""
    from safetensors.torch import save_file
    enc = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if enc is not None and enc.n_vocab > model.config.vocab_size:
        raise ModelError(f"the tokenizer has {enc.n_vocab} tokens, the model {model.config.vocab_size}: "
                         "they do not belong together")
    path = os.path.abspath(path)
    if os.path.exists(path) and not (os.path.isdir(path) and set(os.listdir(path)) <= EXPORT_FILES):
        raise ModelError(f"{path} exists and holds other files: export into a new or empty folder")
    config = hf_config(model.config, enc, model.embed_tokens.weight.dtype)
    names = hf_names(model, config["model_type"])
    tensors = {names[k]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-hf-")
    old = None
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if enc is not None:
            generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation, f, indent=2)
            write_hf_tokenizer(enc, tmp, model.config.max_seq_len)
        if os.path.isdir(path) and os.listdir(path):  # an earlier export: moved aside, then removed
            old = tempfile.mkdtemp(dir=parent, prefix=".old-hf-")
            os.replace(path, os.path.join(old, "export"))
        os.replace(tmp, path)  # rename(2) onto a missing or empty folder is atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def parse_args(argv=None):
    p = ArgumentParser(prog="model.py", description="Hugging Face export of a model of ours.")
    commands = p.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a complete Hugging Face folder: weights, config, generation "
                                 "config, tokenizer.json and tokenizer_config.json with the chat template")
    model = name_or_path([], ["ckpt_*.pt", "config.json"], "a run folder, ckpt_*.pt or Hugging Face folder")
    export.add_argument("src", metavar="RUN_DIR", type=model, help="run folder of ours (its newest checkpoint), "
                        "a ckpt_*.pt file, or a Hugging Face folder")
    export.add_argument("out", metavar="OUT_DIR", type=path("new"),
                        help="a new or empty folder (or an earlier export, replaced)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer, meta = load_model(args.src)
        save(model, args.out, tokenizer)
    except (ModelError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {model.num_params():,} parameters, tokenizer {tokenizer}, from {meta['path']}")
