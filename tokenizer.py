"""
Tokenizers and the chat format (RECIPE section 3): every tokenizer is a tiktoken Encoding.

    from tokenizer import get_tokenizer, render_chat
    enc = get_tokenizer("llama3")        # the Llama-3.1 BPE, 128,256 ids (llama-models package ranks)
    enc = get_tokenizer("toy")           # 256 bytes + 16 specials, for laptop runs
    enc = get_tokenizer("MobileLLM-R1-950M")   # a released folder's tokenizer.json
    ids, mask = render_chat([{"role": "user", "content": "2+2?"}], enc, add_generation_prompt=True)
"""

import base64
import importlib.util
import json
import os
from functools import lru_cache
from hashlib import sha256

import tiktoken


class TokenizerError(Exception):
    """A tokenizer the user named cannot be built (missing package, file, or token): one line."""


# -----------------------------------------------------------------------------
# Tokenizers (RECIPE section 3)

LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
# The 256 special tokens after the 128,000 ranks, Llama-3.1 names in id order (<|begin_of_text|> = 128000,
# <|eot_id|> = 128009). Newer llama-models releases rename two reserved ones (<|step_id|>, <|image|>).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_SPECIALS))]
# The toy vocabulary: 256 byte tokens, then the first 16 Llama-3 special tokens in the same order,
# so the same roles have the same names and the vocabulary is 272 (model.py's toy vocab_size).
TOY_SPECIALS = LLAMA3_SPECIALS[:16]
BOS, EOS, PAD, START_HEADER, END_HEADER, EOM, EOT = (LLAMA3_SPECIALS[i] for i in (0, 1, 4, 6, 7, 8, 9))


def _gpt2_bytes_to_unicode():
    """GPT-2's byte -> printable character table, used by Hugging Face tokenizer.json vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to chr(256), chr(257), ... in byte order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_tiktoken_ranks(path):
    """A tiktoken ranks file: one "base64(token bytes) rank" per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _read_tokenizer_json(path):
    """Ranks, special tokens and split pattern from a Hugging Face byte-level BPE tokenizer.json.
    Its vocab maps GPT-2 byte-to-unicode strings to ids, and for a tiktoken-born BPE the id IS the rank."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path} is not a BPE tokenizer.json; pass a Llama-3 tokenizer.json or tokenizer.model")
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    byte_of = {ch: b for b, ch in _gpt2_bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[ch] for ch in token): i for token, i in model["vocab"].items() if token not in specials}
    except KeyError:
        raise TokenizerError(f"{path} is not a byte-level (GPT-2 byte-to-unicode) BPE, so not a tiktoken tokenizer")
    pattern = LLAMA3_PATTERN  # the checkpoint's own Split regex, when it has one, takes precedence
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            pattern = p["pattern"]["Regex"]
            break
    return ranks, specials, pattern


def _encoding(name, ranks, specials, pattern):
    enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    # A fingerprint of everything that decides the ids: prepared shards record it, so data made with
    # one tokenizer is never silently mixed with another (the name alone can differ for the same one).
    h = sha256(pattern.encode())
    h.update(b"".join(len(t).to_bytes(2, "little") + t for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])))
    h.update(json.dumps(sorted(specials.items())).encode())
    enc.fingerprint = h.hexdigest()[:16]
    return enc


@lru_cache(maxsize=8)
def get_tokenizer(name_or_path="llama3"):
    """tiktoken Encoding for "llama3" (the llama-models package's ranks), "toy" (bytes + specials),
    a path to a tiktoken tokenizer.model, or a checkpoint folder / file with a tokenizer.json."""
    if name_or_path == "toy":
        ranks = {bytes([b]): b for b in range(256)}
        return _encoding("toy", ranks, {t: 256 + i for i, t in enumerate(TOY_SPECIALS)}, LLAMA3_PATTERN)
    path = name_or_path
    if name_or_path == "llama3":
        spec = importlib.util.find_spec("llama_models")  # locate the package without importing it
        if spec is None:
            raise TokenizerError("tokenizer llama3 needs the llama-models package: pip install --no-deps llama-models")
        path = os.path.join(spec.submodule_search_locations[0], "llama3", "tokenizer.model")
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise TokenizerError(f"no tokenizer at {path}: use llama3, toy, a tokenizer.model or a folder with tokenizer.json")
    if path.endswith(".json"):
        ranks, specials, pattern = _read_tokenizer_json(path)
    else:
        ranks = _read_tiktoken_ranks(path)
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        pattern = LLAMA3_PATTERN
    return _encoding(name_or_path, ranks, specials, pattern)


def special_id(enc, token):
    try:
        return enc.encode_single_token(token)
    except KeyError:
        raise TokenizerError(f"tokenizer {enc.name} has no {token} token; use a Llama-3 tokenizer or toy")


def bos_id(enc): return special_id(enc, BOS)
def eot_id(enc): return special_id(enc, EOT)
def pad_id(enc): return special_id(enc, PAD)
def stop_ids(enc): return [special_id(enc, t) for t in (EOS, EOM, EOT)]  # RECIPE section 3


# -----------------------------------------------------------------------------
# Chat format and answers (RECIPE sections 3 and 6)

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
ROLES = ("system", "user", "assistant")


def render_chat(messages, enc, add_generation_prompt=False):
    """BOS, then per turn <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>.
    Returns (ids, mask): mask is true only on assistant content and its <|eot_id|>, the tokens SFT
    learns. Header, role and content are encoded separately (as llama-models' ChatFormat does), and
    content with encode_ordinary, so text that spells a special token stays text."""
    def header(role):
        return [special_id(enc, START_HEADER), *enc.encode_ordinary(role), special_id(enc, END_HEADER),
                *enc.encode_ordinary("\n\n")]
    ids, mask = [bos_id(enc)], [False]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TokenizerError(f"bad chat message {str(m)[:80]!r}: need {{'role': one of {ROLES}, 'content': str}}")
        h, body = header(m["role"]), enc.encode_ordinary(m["content"]) + [eot_id(enc)]
        ids += h + body
        mask += [False] * len(h) + [m["role"] == "assistant"] * len(body)
    if add_generation_prompt:
        h = header("assistant")
        ids, mask = ids + h, mask + [False] * len(h)
    return ids, mask
