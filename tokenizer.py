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
# What Hugging Face's ByteLevel pre-tokenizer splits with when no Split step comes first (GPT-2's regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
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


def _split_pattern(tj, path):
    """The regex that splits text before BPE: a Split step then a regex-free ByteLevel (Llama 3), or a
    ByteLevel alone with GPT-2's regex. Anything else has no tiktoken equivalent and is refused."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if steps else {}
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space", True):
        if len(steps) == 1 and last.get("use_regex", True):
            return GPT2_PATTERN
        split = steps[0] if len(steps) == 2 else {}
        if (split.get("type") == "Split" and "Regex" in split.get("pattern", {}) and not split.get("invert")
                and split.get("behavior") == "Isolated" and not last.get("use_regex", True)):
            return split["pattern"]["Regex"]
    raise TokenizerError(f"{path}: pre-tokenizer {json.dumps(pre)[:100]} has no tiktoken equivalent; "
                         "pass a Llama-3 style byte-level BPE tokenizer.json")


def _read_tokenizer_json(path):
    """Ranks, special tokens and split pattern from a Hugging Face byte-level BPE tokenizer.json, such
    that tiktoken's encode(text, allowed_special="all") gives the ids Hugging Face's gives for any text.
    Its vocab maps GPT-2 byte-to-unicode strings to ids, and for a tiktoken-born BPE the id IS the rank
    (checked: the merges must come in the order of the ids they make). Every added token is a special
    token, matched in the text before BPE as Hugging Face does, even where its id is also a vocabulary
    entry (the released MobileLLM-R1 tokenizer.json lists id 127999 as both): the entry stays a rank."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path} is not a BPE tokenizer.json; pass a Llama-3 tokenizer.json or tokenizer.model")
    added = tj.get("added_tokens", [])
    odd = [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")]
    unsupported = [(tj.get("normalizer") is not None, "a normalizer"), (bool(odd), f"added token {odd[:1]} with lstrip, "
                   "rstrip or single_word"), (model.get("byte_fallback") or model.get("continuing_subword_prefix")
                   or model.get("end_of_word_suffix") or model.get("dropout"), "a BPE option tiktoken lacks")]
    for bad, what in unsupported:
        if bad:
            raise TokenizerError(f"{path} has {what}: no tiktoken equivalent; pass a Llama-3 style tokenizer.json")
    pattern = _split_pattern(tj, path)
    byte_of = {ch: b for b, ch in _gpt2_bytes_to_unicode().items()}
    vocab = model["vocab"]
    try:
        ranks = {bytes(byte_of[ch] for ch in token): i for token, i in vocab.items()}
    except KeyError:
        raise TokenizerError(f"{path} is not a byte-level (GPT-2 byte-to-unicode) BPE, so not a tiktoken tokenizer")
    made = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in model.get("merges", [])]
    if any(m is None for m in made) or any(a > b for a, b in zip(made, made[1:])):
        raise TokenizerError(f"{path}: its merges are not in the order of the token ids, so the ids are not "
                             "tiktoken ranks; pass a tokenizer.json converted from tiktoken ranks (as Llama 3's)")
    return ranks, {t["content"]: t["id"] for t in added}, pattern


def bpe_merges(ranks):
    """A merge list under which Hugging Face's BPE reproduces tiktoken's ranks: every split of a token
    into two tokens, ordered by the merged token's rank (tiktoken merges the lowest-ranked pair first)."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in merges]


def write_hf_tokenizer(enc, folder, max_seq_len):
    """tokenizer.json and tokenizer_config.json (special tokens, chat template) in `folder`, so that
    transformers' AutoTokenizer encodes like `enc` and apply_chat_template renders like render_chat."""
    chars = _gpt2_bytes_to_unicode()
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    ranks, specials = enc._mergeable_ranks, enc._special_tokens  # tiktoken's documented way to extend an Encoding
    bos = bos_id(enc)
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        # Like Llama 3's: encoding a text (add_special_tokens) prepends BOS, as every document has (data.py).
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {BOS: {"id": BOS, "ids": [bos], "tokens": [BOS]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a whole piece in the vocabulary is one token, as in tiktoken
                  "vocab": {spell(t): i for t, i in sorted(ranks.items(), key=lambda x: x[1])},
                  "merges": [[spell(a), spell(b)] for a, b in bpe_merges(ranks)]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT, "pad_token": PAD,
              "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
              "model_input_names": ["input_ids", "attention_mask"]}
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


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


# render_chat's format as a Jinja chat template (tokenizer_config.json), for transformers' apply_chat_template.
# The same ids as render_chat when a message's content neither starts with whitespace (which the BPE
# would join to the header's "\n\n") nor spells a special token (text there, a token here).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{{{{ '{START_HEADER}' + message['role'] + '{END_HEADER}\\n\\n' + message['content'] + '{EOT}' }}}}"
    f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{START_HEADER}assistant{END_HEADER}\\n\\n' }}}}{{% endif %}}")
