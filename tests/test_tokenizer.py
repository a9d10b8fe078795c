"""tokenizer.py against Hugging Face: tiktoken tokenizers (llama3 ranks, toy, tokenizer.json) give the ids
Hugging Face `tokenizers` gives for any text, the tokenizer.json we write loads in transformers with the
same ids and a chat template that renders like render_chat, and the chat format itself."""

import json
import os
import random

import pytest

import tokenizer

transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken, Tokenizer  # noqa: E402  (installed with transformers)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say WE'VE done it, didn't we?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint(fib(10))\n",
    "1234567890 3.14159 -42 2025-09-30 1,000,000 0x1F 12345678901234567890",
    "héllo wörld, naïve café; 日本語のテキスト, Ελληνικά, русский, עברית,\n🎉🚀 emoji 👩‍👩‍👧",
    "a   b\t\t c\n\n\n  d    \r\n\r\n e\u00a0f \u2003 g  \n",
    "<think>\n7+5+0=12\n</think>\n\\boxed{1,234}  x^2 + y_1 = \\frac{a}{b}",
    "", " ", "\n", "    leading and trailing    ",
]


def random_texts(n, seed=0):
    """Random strings mixing ASCII, digits, whitespace runs, accents, CJK and emoji."""
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r",
             "'.,;:!?()[]{}<>/\\|-_=+*&^%$#@\"", "éèàüößçñøå", "日本語中文한국어", "😀🎉🚀👍", "ΑΒΓαβγжзи"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 80))) for _ in range(n)]


# -----------------------------------------------------------------------------
# Tokenizers

@pytest.fixture(scope="module")
def llama():
    # llama-models is in requirements-dev.txt: without it these tests fail (the error says how to fix).
    return tokenizer.get_tokenizer("llama3")


@pytest.fixture(scope="module")
def hf_llama(llama):
    """The Hugging Face `tokenizers` implementation built from the same ranks by transformers'
    TikTokenConverter (its ranks reader is swapped for ours: tiktoken's would write a cache file)."""
    TikTokenConverter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):
            return tokenizer._read_tiktoken_ranks(path)

    package = os.path.dirname(tokenizer.importlib.util.find_spec("llama_models").origin)
    model_file = os.path.join(package, "llama3", "tokenizer.model")
    converter = Converter(vocab_file=model_file, pattern=tokenizer.LLAMA3_PATTERN, extra_special_tokens=tokenizer.LLAMA3_SPECIALS)
    return converter.converted()


def test_llama3_special_ids(llama):
    # RECIPE section 3
    assert llama.n_vocab == 128_256
    assert [tokenizer.bos_id(llama), tokenizer.eot_id(llama), tokenizer.pad_id(llama)] == [128000, 128009, 128004]
    assert [llama.encode_single_token(t) for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                   "<|eom_id|>", "<|python_tag|>", "<|reserved_special_token_247|>")] \
        == [128001, 128006, 128007, 128008, 128010, 128255]
    assert tokenizer.stop_ids(llama) == [128001, 128008, 128009]
    assert len(llama.encode_ordinary("<think>")) == 3 and len(llama.encode_ordinary("</think>")) == 3


def test_llama3_matches_hf_tokenizers(llama, hf_llama):
    texts = TEXTS + random_texts(300)
    hf = [e.ids for e in hf_llama.encode_batch(texts, add_special_tokens=False)]
    assert [llama.encode_ordinary(t) for t in texts] == hf
    specials = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi 123<|eot_id|><|finetune_right_pad_id|>"
    assert llama.encode(specials, allowed_special="all") == hf_llama.encode(specials, add_special_tokens=False).ids
    assert llama.decode(llama.encode_ordinary(TEXTS[3])) == TEXTS[3]


def test_tokenizer_json_route_matches_model_route(llama, hf_llama, tmp_path):
    hf_llama.save(str(tmp_path / "tokenizer.json"))  # what a released checkpoint folder carries
    from_json = tokenizer.get_tokenizer(str(tmp_path))
    assert from_json.n_vocab == llama.n_vocab and from_json.fingerprint == llama.fingerprint
    texts = TEXTS + random_texts(100, seed=1)
    assert [from_json.encode_ordinary(t) for t in texts] == [llama.encode_ordinary(t) for t in texts]
    assert tokenizer.stop_ids(from_json) == tokenizer.stop_ids(llama)


def test_llama3_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    tokenizer.get_tokenizer.cache_clear()
    with pytest.raises(tokenizer.TokenizerError, match="pip install --no-deps llama-models"):
        tokenizer.get_tokenizer("llama3")
    monkeypatch.undo()
    tokenizer.get_tokenizer.cache_clear()
    with pytest.raises(tokenizer.TokenizerError, match="no tokenizer at"):
        tokenizer.get_tokenizer("/nonexistent/tokenizer.model")


def test_toy_tokenizer():
    enc = tokenizer.get_tokenizer("toy")
    assert enc.n_vocab == 272 and enc.name == "toy"
    assert [tokenizer.bos_id(enc), tokenizer.pad_id(enc), tokenizer.eot_id(enc)] == [256, 260, 265]
    assert tokenizer.stop_ids(enc) == [257, 264, 265]
    for t in TEXTS + random_texts(50):
        assert enc.encode_ordinary(t) == list(t.encode("utf-8")) and enc.decode(enc.encode_ordinary(t)) == t
    assert enc.encode_ordinary("<|eot_id|>") == list(b"<|eot_id|>")  # text that spells a special stays text


# -----------------------------------------------------------------------------
# Chat format

CONVERSATION = [{"role": "system", "content": tokenizer.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": "What is 12+30?"},
                {"role": "assistant", "content": "<think>\n2+0=2\n1+3=4\n</think>\n\\boxed{42}"},
                {"role": "user", "content": "And <|eot_id|> twice?"},
                {"role": "assistant", "content": "\\boxed{84}"}]


@pytest.mark.parametrize("name", ["toy", "llama3"])
def test_render_chat(name, request):
    enc = request.getfixturevalue("llama") if name == "llama3" else tokenizer.get_tokenizer(name)
    ids, mask = tokenizer.render_chat(CONVERSATION, enc)
    assert len(ids) == len(mask) and ids[0] == tokenizer.bos_id(enc) and ids[-1] == tokenizer.eot_id(enc)
    expected = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in CONVERSATION)
    assert enc.decode(ids) == expected
    assert ids.count(tokenizer.eot_id(enc)) == len(CONVERSATION)  # the user's "<|eot_id|>" text is not the token
    supervised = enc.decode([t for t, m in zip(ids, mask) if m])
    assert supervised == "".join(m["content"] + "<|eot_id|>" for m in CONVERSATION if m["role"] == "assistant")
    prompt, pmask = tokenizer.render_chat(CONVERSATION[:2], enc, add_generation_prompt=True)
    assert enc.decode(prompt).endswith("What is 12+30?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not any(pmask)
    with pytest.raises(tokenizer.TokenizerError, match="role"):
        tokenizer.render_chat([{"role": "robot", "content": "x"}], enc)


def with_specials(texts, specials, seed=0):
    """Each text with special-token strings spliced in at random places (Hugging Face matches them first)."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        for _ in range(rng.randint(0, 3)):
            i = rng.randint(0, len(t))
            t = t[:i] + rng.choice(specials) + t[i:]
        out.append(t)
    return out


def test_added_tokens_inside_the_bpe_range_match_hf(hf_llama, tmp_path):
    """The released MobileLLM-R1 tokenizer.json lists vocabulary id 127999 (the bytes of "锦", spelled
    "éĶ¦" byte-to-unicode) as an added special token too: text "锦" is still that BPE token, and the
    literal text "éĶ¦" is the added token, in Hugging Face and so in ours."""
    hf = Tokenizer.from_str(hf_llama.to_str())
    hf.add_special_tokens([AddedToken("éĶ¦", normalized=False, special=True)])
    assert hf.token_to_id("éĶ¦") == 127999
    hf.save(str(tmp_path / "tokenizer.json"))
    enc = tokenizer.get_tokenizer(str(tmp_path))
    assert enc.encode_ordinary("锦") == [127999] == hf.encode("锦", add_special_tokens=False).ids
    specials = ["éĶ¦", "锦", "<|eot_id|>", "<|begin_of_text|>", "<|reserved_special_token_7|>", "<|start_header_id|>"]
    texts = with_specials(TEXTS + random_texts(200, seed=2), specials)
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [enc.encode(t, allowed_special="all") for t in texts] == expected
    assert enc.decode(enc.encode_ordinary(TEXTS[3] + "锦")) == TEXTS[3] + "锦"


@pytest.mark.parametrize("name", ["toy", "llama3"])
def test_written_tokenizer_loads_in_transformers_with_the_same_ids(name, request, hf_llama, tmp_path):
    """write_hf_tokenizer: merges derived from the ranks make Hugging Face's BPE give tiktoken's ids,
    reading the file back gives the same tokenizer, and AutoTokenizer's chat template is render_chat."""
    enc = request.getfixturevalue("llama") if name == "llama3" else tokenizer.get_tokenizer(name)
    tokenizer.write_hf_tokenizer(enc, str(tmp_path), 4096)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    specials = sorted(enc.special_tokens_set)[:20]
    texts = with_specials(TEXTS + random_texts(200, seed=3), specials, seed=1)
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == \
        [enc.encode(t, allowed_special="all") for t in texts]
    assert hf.encode(TEXTS[0]).ids == [tokenizer.bos_id(enc)] + enc.encode_ordinary(TEXTS[0])  # BOS, as data.py
    assert hf.decode(enc.encode_ordinary(TEXTS[3])) == TEXTS[3]
    if name == "llama3":  # the same merge list as transformers' own converter writes
        assert json.loads(hf.to_str())["model"]["merges"] == json.loads(hf_llama.to_str())["model"]["merges"]
    assert tokenizer.get_tokenizer(str(tmp_path)).fingerprint == enc.fingerprint
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conversation in (CONVERSATION[:2], CONVERSATION[:3] + [{"role": "user", "content": "Now 7*8? é"}]):
        ids = auto.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == tokenizer.render_chat(conversation, enc, add_generation_prompt=True)[0]
    assert auto.apply_chat_template(CONVERSATION[:3], tokenize=True, return_dict=False) == \
        tokenizer.render_chat(CONVERSATION[:3], enc)[0]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == \
        (tokenizer.bos_id(enc), tokenizer.eot_id(enc), tokenizer.pad_id(enc))


def test_tokenizer_json_that_tiktoken_cannot_reproduce_is_refused(tmp_path):
    toy = tokenizer.get_tokenizer("toy")
    tokenizer.write_hf_tokenizer(toy, str(tmp_path), 64)
    good = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = good["model"]["vocab"]
    merged = {**vocab, "ab": 300, "cd": 301}
    cases = [
        (dict(good, normalizer={"type": "NFC"}), "normalizer"),
        (dict(good, pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer"),
        (dict(good, added_tokens=[dict(good["added_tokens"][0], lstrip=True)]), "lstrip"),
        # merges out of id order: their ids are not tiktoken ranks
        (dict(good, model=dict(good["model"], vocab=merged, merges=[["c", "d"], ["a", "b"]])), "not in the order"),
    ]
    for i, (tj, needle) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
        with pytest.raises(tokenizer.TokenizerError, match=needle):
            tokenizer.get_tokenizer(str(folder))
    ordered = dict(good, model=dict(good["model"], vocab=merged, merges=[["a", "b"], ["c", "d"]]))
    (tmp_path / "tokenizer.json").write_text(json.dumps(ordered), encoding="utf-8")
    assert tokenizer.get_tokenizer(str(tmp_path)).encode_ordinary("abcd") == [300, 301]
