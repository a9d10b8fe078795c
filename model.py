"""
MobileLLM-R1: the architecture in one file (arXiv 2509.24945; RECIPE section 2).

A dense Llama-4-text decoder: pre-norm blocks of grouped-query attention with interleaved RoPE and a
weightless QK RMS-norm, then a SwiGLU MLP; input and output embeddings are tied. Module names follow
Hugging Face's Llama4ForCausalLM (minus its "model." prefix) so the released checkpoints load with no
renaming: `MobileLLM.from_hf(folder)` and `model.save_hf(folder, tokenizer)` (the folder code is in hf.py).
Three config switches make the same class a Llama 3.x, the mid-training teacher (RECIPE section 4.5):
no QK-norm, rotate-half RoPE, "llama3" rope scaling, and an untied head.

    from model import MobileLLM, ModelConfig
    model = MobileLLM(ModelConfig.from_size("140m"))
    logits = model(idx)                     # (B, T, vocab)
    logits, loss = model(idx, targets)      # targets == -100 are ignored
    out = model.generate(idx, 128)          # greedy, with a preallocated KV cache

A run of ours as a complete Hugging Face folder (weights, config, generation config, tokenizer.json and
tokenizer_config.json with the chat template), for transformers, llama.cpp's converter and sample.py --hf:
    python model.py export out/toy out/toy-hf
"""

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from checkpoint import latest_checkpoint, read_checkpoint  # sample.py and the tests reach them here too


class ModelError(Exception):
    """A problem the user can fix (bad size name, bad checkpoint folder): printed as one line."""


@dataclass
class ModelConfig:
    vocab_size: int = 128256
    n_layer: int = 15
    d_model: int = 576
    n_head: int = 9
    n_kv_head: int = 3
    head_dim: int = 64
    ffn_dim: int = 2048
    rope_theta: float = 1e6
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # What a Llama-3 teacher (RECIPE section 4.5) does differently; the defaults are MobileLLM-R1 (section 2).
    qk_norm: bool = True  # weightless RMS-norm of q and k after RoPE; Llama 3 has none
    rope_interleaved: bool = True  # RoPE pairs dims (2i, 2i+1); False: Llama's rotate-half pairs (i, i + D/2)
    # Llama 3.1's "llama3" frequency scaling, None for none: a dict of factor, low_freq_factor,
    # high_freq_factor and original_max_position_embeddings (Hugging Face's names).
    rope_scaling: dict | None = None

    @classmethod
    def from_size(cls, name, long_context=False):
        """The paper's sizes (RECIPE section 2) plus laptop configs; long_context: see long_context()."""
        if name not in SIZES:
            raise ModelError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}")
        config = cls(**SIZES[name])
        return config.long_context() if long_context else config

    def long_context(self):
        """The context extension before reasoning SFT (RECIPE section 4): rope theta multiplied by
        LONG_CONTEXT_THETA_FACTOR and the context raised to LONG_CONTEXT_LEN; no rope scaling. A
        config already at the long context (a post-trained checkpoint) is returned unchanged."""
        if self.max_seq_len >= LONG_CONTEXT_LEN:
            return self
        return replace(self, rope_theta=self.rope_theta * LONG_CONTEXT_THETA_FACTOR, max_seq_len=LONG_CONTEXT_LEN)


# The context extension (RECIPE section 4): 4k base models -> 32k post-trained models, theta x 8.
LONG_CONTEXT_THETA_FACTOR = 8
LONG_CONTEXT_LEN = 32768

# Table: MobileLLM-R1 architectures (RECIPE section 2). vocab 128,256, tied embeddings, base context
# 4k at theta 1e6. The toy configs use the byte-level toy tokenizer (data.py) and train on a CPU.
SIZES = {
    "toy": dict(vocab_size=272, n_layer=4, d_model=192, n_head=6, n_kv_head=3, head_dim=32,
                ffn_dim=512, rope_theta=1e4, max_seq_len=1024),
    "toy-teacher": dict(vocab_size=272, n_layer=6, d_model=320, n_head=10, n_kv_head=5, head_dim=32,
                        ffn_dim=864, rope_theta=1e4, max_seq_len=1024),
    "140m": dict(n_layer=15, d_model=576, n_head=9, n_kv_head=3, ffn_dim=2048),
    "360m": dict(n_layer=15, d_model=1024, n_head=16, n_kv_head=4, ffn_dim=4096),
    "950m": dict(n_layer=22, d_model=1536, n_head=24, n_kv_head=6, ffn_dim=6144),
}


def rms_norm(x, eps):
    # Normalise in float32 and cast back before any weight is applied, as the reference does.
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def linear(x, weight):
    """x @ weight.T. One bf16 row (decoding a token) goes through torch.mv where that kernel is the faster
    one on this CPU (mv_is_faster): 1.5-1.7x the bytes/s of the matmul kernel on one 2-core machine, half
    of it on another (an AMD EPYC with AVX512-BF16), so it is measured, not assumed."""
    if x.dtype == weight.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and not torch.is_grad_enabled() \
            and mv_is_faster(x.device):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


_MV_FASTER = {}  # device type -> bool, measured once per process


def mv_is_faster(device):
    """Whether torch.mv beats F.linear for one bf16 row here: timed once (a few ms) on a 2048 x 576 weight,
    the 140m model's MLP shape; only ever True on a CPU."""
    if device.type != "cpu":
        return False
    if device.type not in _MV_FASTER:
        w, x = torch.randn(2048, 576, dtype=torch.bfloat16), torch.randn(1, 576, dtype=torch.bfloat16)

        def best(fn, reps=20):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)
        _MV_FASTER[device.type] = best(lambda: torch.mv(w, x[0])) < best(lambda: F.linear(x, w))
    return _MV_FASTER[device.type]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = rms_norm(x, self.eps) * self.weight
        device = y.device.type
        if torch.is_autocast_enabled(device):
            # every consumer is a projection in autocast's dtype: cast once here, not once per matmul
            y = y.to(torch.get_autocast_dtype(device))
        return y


def rope_tables(head_dim, max_seq_len, theta, device=None, scaling=None):
    """cos and sin of pos * theta^(-2i/head_dim), (max_seq_len, head_dim/2), float32; `scaling` is a
    ModelConfig.rope_scaling dict (Llama 3.1's frequencies) or None."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, **scaling)
    angles = torch.arange(max_seq_len, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's rope scaling: wavelengths longer than original / low_freq_factor are stretched by
    `factor`, those shorter than original / high_freq_factor kept, and those between interpolated."""
    wavelen = 2 * math.pi / inv_freq
    long_wave = original_max_position_embeddings / low_freq_factor
    short_wave = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > long_wave, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where((wavelen >= short_wave) & (wavelen <= long_wave), smoothed, scaled)


def apply_rope(x, cos, sin, interleaved=True):
    """RoPE, computed and returned in float32. x: (B, T, H, D); cos, sin: (T, D/2). Interleaved
    (MobileLLM-R1): dims (2i, 2i+1) form one complex number, multiplied by cos + i sin of angle i;
    one complex multiply is the same arithmetic as the four real ones, in one kernel. The
    split-halves (rotate_half) form would not match the released weights, but it is Llama 3's:
    dims i and i + D/2 form the pair."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if not interleaved:
        first, second = x.float().chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim).
    pad (B,): how many positions each row is left-padded by, None when no row is (a batch of prompts
    of different lengths, right-aligned): padded keys are masked out and each row's RoPE positions
    start at its first real token, so a row computes what it would alone."""

    def __init__(self, config, batch_size, max_len, device, dtype, pad=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already written
        self.pad = pad if pad is not None and bool(pad.any()) else None

    def update(self, layer, k, v):
        """Write k, v (B, KV, T, D) at the current position; return the keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def positions(self, T):
        """RoPE positions (B, T) of the next T tokens of each padded row (padding clamped to 0)."""
        written = torch.arange(self.pos, self.pos + T, device=self.pad.device)
        return (written[None] - self.pad[:, None]).clamp(min=0)

    def key_doc_ids(self, end):
        """(B, end): 1 for a row's real keys, 0 for its padding. As attention's doc_ids, a real token
        never sees padding (and a padding query sees only padding, so no row of the softmax is empty)."""
        return (torch.arange(end, device=self.pad.device)[None] >= self.pad[:, None]).long()

    def repeat(self, n):
        """Each row repeated n times (prefill a prompt once, then sample n continuations)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)


def left_pad(prompts, pad_id=0):
    """Token lists of any lengths -> (idx (B, T) right-aligned, lengths (B,)), for generate(lengths=)."""
    T = max(map(len, prompts))
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return idx, torch.tensor([len(p) for p in prompts], dtype=torch.long)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps, self.qk_norm, self.rope_interleaved = config.norm_eps, config.qk_norm, config.rope_interleaved
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        B, T, _ = x.shape
        q = linear(x, self.q_proj.weight).view(B, T, self.n_head, self.head_dim)
        k = linear(x, self.k_proj.weight).view(B, T, self.n_kv_head, self.head_dim)
        v = linear(x, self.v_proj.weight).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        if self.qk_norm:  # after RoPE, the weightless QK-norm (RMS over each head's dims), as in the reference
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)  # float32 in: no rounding in between
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        backend = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            if cache.pad is not None:  # left-padded rows: their padding is a document of its own
                doc_ids, backend = cache.key_doc_ids(k.size(2)), "sdpa"
        # Query head j reads kv head j // (n_head / n_kv_head): kernels.attention handles the grouping.
        y = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids, backend=backend)
        return linear(y.transpose(1, 2).reshape(B, T, -1), self.o_proj.weight)


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x):
        return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight), self.down_proj.weight)  # SwiGLU


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class MobileLLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # Tied: logits = h @ E^T. An untied head exists only for foreign checkpoints that have one.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (train.py flag)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, scaling=config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts weights; the rope tables stay float32 (bf16 cos/sin would
        # be off by up to ~4e-3, position after position): recomputed on the new device.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            c = self.config
            self.rope_cos, self.rope_sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta,
                                                       self.rope_cos.device, c.rope_scaling)
        return self

    @staticmethod
    def _init_weights(module):
        # N(0, 0.02) for linear and embedding weights; norm weights start at 1 (RECIPE section 2).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def estimate_flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward) for MFU: 6N for the weight matmuls (N includes
        the tied output projection, which is a matmul; the embedding lookup is free but is the same
        matrix), plus 12 * layers * heads * head_dim * seq_len for the attention scores and weighted
        sum (PaLM appendix B; the causal mask's halving is not subtracted, as is customary)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, eps, device_type)

    def forward_hidden(self, idx, doc_ids=None, cache=None):
        """Final-normed hidden states (B, T, d_model). doc_ids (B, T) keeps packed documents apart."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        padded = cache is not None and cache.pad is not None
        # A padded batch runs until its last row is done: rows already past the context (stream yields
        # -1 for them) are clamped to its last position; only a batch with no row left inside fails.
        end = int(cache.positions(T)[:, -1].min()) + 1 if padded else start + T
        if end > self.config.max_seq_len:
            raise ModelError(f"sequence of {end} tokens exceeds the model's context of "
                             f"{self.config.max_seq_len}: shorten the input")
        if padded:  # per-row positions (B, T, head_dim / 2)
            positions = cache.positions(T).clamp(max=self.config.max_seq_len - 1)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.embed_tokens(idx)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def head(self, h):
        """Hidden states -> logits: the tied output projection, logits = h @ E^T (RECIPE section 2)."""
        return linear(h, self.lm_head_weight)

    def forward(self, idx, targets=None, doc_ids=None, cache=None, last_only=False, return_logits=True,
                loss_reduction="mean"):
        """model(idx) -> logits (B, T, vocab); last_only: logits of the last position only (B, vocab).
        With a KVCache, the tokens continue the cached sequence and are written into it.
        model(idx, targets) -> (logits, loss), loss over targets != -100. With return_logits=False the
        loss is computed chunk by chunk (kernels.linear_cross_entropy) without ever holding the logits,
        and (None, loss) is returned."""
        h = self.forward_hidden(idx, doc_ids, cache)
        if targets is None:
            return self.head(h[:, -1] if last_only else h)
        if not return_logits:
            # recompute=False: gradients made in the forward, 3 vocabulary-sized matmuls instead of 4
            return None, kernels.linear_cross_entropy(h, self.lm_head_weight, targets, reduction=loss_reduction,
                                                      recompute=False)
        logits = self.head(h)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=loss_reduction)
        return logits, loss

    # ----------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def stream(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=None,
               num_samples=1, seed=None, use_cache=True, lengths=None):
        """Yield the next token of every row, (B * num_samples,), one step at a time. The prompt is
        prefilled once into a preallocated KV cache, then repeated for num_samples continuations.
        Rows that produced a stop id keep repeating it; the stream ends when every row has stopped.
        lengths (B,): prompts of different lengths, left-padded (left_pad): row b's prompt is its last
        lengths[b] tokens, and it generates what it would alone; a row that reaches the context
        while others go on yields -1 from then on."""
        if temperature < 0:
            raise ModelError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ModelError(f"top_p must be in (0, 1], got {top_p}")
        B, T = idx.shape
        lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths).cpu()
        if int(lengths.max()) >= self.config.max_seq_len:
            raise ModelError(f"prompt of {int(lengths.max())} tokens does not fit the model's context of "
                             f"{self.config.max_seq_len}: shorten it")
        if int(lengths.max()) > T or int(lengths.min()) < 1 or (not use_cache and bool((lengths < T).any())):
            raise ValueError(f"lengths must be in [1, {T}] (and padded rows need the cache), got {lengths.tolist()}")
        # Each row's own budget: max_new_tokens, or what is left of the context after its prompt.
        budget = (self.config.max_seq_len - lengths).clamp(max=max_new_tokens).repeat_interleave(num_samples)
        budget = budget.to(idx.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=idx.device)
        cache = None
        if use_cache:
            dtype = self.embed_tokens.weight.dtype
            cache = KVCache(self.config, B, T + int(budget.max()), idx.device, dtype, pad=(T - lengths).to(idx.device))
            logits = self(idx, cache=cache, last_only=True)
            cache.repeat(num_samples)
        else:
            logits = self(idx, last_only=True)
        logits = logits.repeat_interleave(num_samples, dim=0)
        seq = idx.repeat_interleave(num_samples, dim=0)
        finished = torch.zeros(seq.size(0), dtype=torch.bool, device=idx.device)
        last = torch.zeros(seq.size(0), dtype=torch.long, device=idx.device)
        for step in range(int(budget.max())):
            token = sample_token(logits.float(), temperature, top_k, top_p, generator)
            token = torch.where(budget > step, torch.where(finished, last, token), -1)
            finished |= torch.isin(token, stop) | (budget <= step + 1)
            last = token
            yield token
            if bool(finished.all()):
                return
            if use_cache:
                logits = self(token.clamp(min=0)[:, None], cache=cache, last_only=True)
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                logits = self(seq, last_only=True)

    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=None,
                 num_samples=1, seed=None, use_cache=True, lengths=None):
        """Prompt (B, T) -> (B * num_samples, T + new) token ids; temperature 0 is greedy. lengths:
        see stream (prompts of different lengths in one batch)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_ids,
                               num_samples, seed, use_cache, lengths))
        prompt = idx.repeat_interleave(num_samples, dim=0)
        return torch.cat([prompt] + [t[:, None] for t in new], dim=1)

    # ----------------------------------------------------------------------------------------------
    # Hugging Face interop (hf.py): Llama4ForCausalLM and LlamaForCausalLM folders

    @classmethod
    def from_hf(cls, path, device="cpu", dtype=None):
        """Load a Hugging Face folder: MobileLLM-R1 as released (Llama4ForCausalLM), a Llama-3.x
        LlamaForCausalLM such as the mid-training teacher, or one that save_hf wrote; single or sharded
        safetensors, read straight into the model's parameters on `device` (dtype default float32)."""
        import hf
        return hf.load(path, device, dtype)

    def save_hf(self, path, tokenizer=None):
        """Write a folder that transformers' AutoModelForCausalLM loads; with a tokenizer (name or
        Encoding) also its stop ids, tokenizer.json and chat template. Atomic: never half-written."""
        import hf
        hf.save(self, path, tokenizer)


def adamw(module, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    """AdamW with weight decay on 2-D weights only: never on norm weights (RECIPE section 4)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # Fused on CPU too (torch >= 2.4; HF's Trainer default): the foreach kernels allocate
    # model-sized temporaries and cost ~0.85 s per 140m step on one CPU thread, fused ~0.11 s.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))


def sample_token(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row from (B, vocab) logits: argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # drop tokens after the nucleus is full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def config_from_dict(d):
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ModelError(f"unknown model config fields {sorted(unknown)}: checkpoint from another version?")
    return ModelConfig(**d)


# -----------------------------------------------------------------------------
# Our checkpoints (train.py writes run_dir/ckpt_{step:07d}.pt, checkpoint.py reads the files) and Hugging Face
# folders, one loader

def model_from_checkpoint(ckpt, file):
    """The model a checkpoint of ours holds; a ModelError naming the file when it holds none that fits."""
    try:
        model = MobileLLM(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, IndexError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise ModelError(f"{file} is not a model checkpoint of ours, or its weights do not fit its config ({reason})")
    return model


def load_model(path, device="cpu", dtype=None):
    """(model, tokenizer name, meta) from our checkpoint file or run folder, or a Hugging Face folder.
    meta is the checkpoint without weights and optimizer (config, step, args, stage, ...)."""
    path = Path(path)
    if (path / "config.json").is_file():
        model = MobileLLM.from_hf(str(path), device=device, dtype=dtype)
        tokenizer = str(path) if (path / "tokenizer.json").is_file() else "llama3"
        return model, tokenizer, {"config": asdict(model.config), "path": str(path), "format": "hf"}
    ckpt, file = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, file)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    model = model.to(device) if dtype is None else model.to(device, dtype)
    return model, ckpt["tokenizer"], dict(meta, path=str(file), format="ours")


def parse_args(argv=None):
    """The command line of `python model.py export RUN_DIR OUT_DIR` (hf.py does the work)."""
    import hf
    return hf.parse_args(argv)


if __name__ == "__main__":
    from hf import main
    main()
