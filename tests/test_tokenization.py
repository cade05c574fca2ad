"""Tokenizer loading, chat templates and the anchor symbol set, checked against transformers/sentencepiece."""

import json
import string
import unicodedata

import numpy as np
import pytest

from edu_prm_jax.sampling.symbols import is_symbol_text, symbol_token_mask
from edu_prm_jax.tokenization import load_tokenizer, render_chat

CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Step 1: 1234567 + 89 = 1234656, and 3.14159 * 10^{20}.<|im_end|><|endoftext|>",
    "So $\\frac{1}{2} + \\boxed{x^2}$ and \\( \\sqrt{3}\\,\\text{cm} \\) or \\[ a_{n+1} = 2a_n \\]",
    "def f(x):\n\treturn x  +  1\n\n\n\tpass\r\n\r\n# done\t\t\n",
    "a    b     \n   c  \n\n\n   d      ",
    "你好，世界！数学题：求解方程 x² = 4。",
    "مرحبا بالعالم، ما هو ٣ + ٤؟",
    "नमस्ते दुनिया, गणित १२३",
    "I ❤️ math 🧮🎉👍🏽 and 👨‍👩‍👧",
    "café naïve Ångström",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",  # NFD: the NFC normalizer composes these
    "I'm sure it's what we'll do; they'd've said THEY'RE DON'T you'VE",
    "ends with spaces   ",
    "",
]
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@pytest.fixture(scope="module")
def qwen_dir(shared_data):
    return shared_data / "qwen2_tokenizer"


@pytest.fixture(scope="module")
def ours(qwen_dir):
    return load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def hf(qwen_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_dir))


# ----------------------------------------------------------------------------------- Qwen byte-level BPE


def test_qwen_ids_match_transformers(ours, hf):
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)


def test_qwen_decode_round_trip(ours, hf):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
        assert ours.decode(ids) == hf.decode(ids), repr(text)
    nfd = "cafe\u0301"
    assert ours.decode(ours.encode(nfd)) == "café" != nfd


def test_qwen_special_tokens(ours):
    for text, tid in SPECIALS.items():
        assert ours.encode(text) == [tid]
        assert ours.token_to_id(text) == tid
        assert ours.id_to_piece(tid) == text
    # Qwen2.5's added tokens beyond the three the shared config declares, at their published ids.
    assert ours.encode("<tool_call>x</tool_call>") == [151657, 87, 151658]
    assert ours.encode("<|file_sep|>") == [151664]
    assert ours.encode("<|video_pad|>") == [151656]
    assert ours.vocab_size == 151665
    assert ours.eos_token_ids == [151645, 151643]
    assert ours.pad_token_id == 151643
    # special=true tokens are skipped, the 8 special=false ones (tool/fim markup) are text.
    ids = ours.encode("<|im_start|>hi<|video_pad|><tool_call><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "hi<tool_call>"


def test_qwen_decoded_token_texts(ours, hf):
    texts = ours.decoded_token_texts()
    assert len(texts) == ours.vocab_size
    for i in (0, 10, 220, 271, 279, 1124, 37018, 44292, 100000, 151642, 151644):
        assert texts[i] == hf.decode([i]), i
    assert texts[279] == " the" and texts[271] == "\n\n"


def test_tokenizer_json_round_trip(ours, tmp_path):
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.vocab_size == ours.vocab_size
    for text in CORPUS + ["<tool_call>f(x)</tool_call><|fim_pad|>"]:
        assert reloaded.encode(text) == ours.encode(text), repr(text)
    assert reloaded.eos_token_ids == [151645, 151643]  # no config: ChatML markup still gives both stops
    assert reloaded.chat_preset == "qwen2.5"
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("<|im_end|>") == [151645]


# -------------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    sentences = [
        "the cat sat on the mat", "two plus two is four", "the answer is 42", "x squared plus one",
        "we add the numbers and divide by two", "Question: what is three times five? Answer: fifteen.",
    ] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "tokenizer"), vocab_size=80,
        model_type="unigram", hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"edu_prm_chat_template": "plain"}))
    return folder


def test_sentencepiece_matches_processor(sp_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert tok.vocab_size == ref.get_piece_size()
    for text in ("the cat sat on the mat", "two plus two is four", "the answer is 42", "x squared"):
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        tid = ref.piece_to_id(special)
        assert tid != ref.unk_id() and tok.token_to_id(special) == tid
        assert tid in tok.encode(f"the {special} cat")
        assert tok.encode(special).count(tid) == 1
    ids = tok.encode("<|im_start|>the cat<|im_end|>")
    assert ids.count(tok.token_to_id("<|im_start|>")) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "the cat"
    assert tok.token_to_id("no-such-piece") is None
    assert tok.eos_token_ids == [tok.token_to_id("<|endoftext|>"), ref.eos_id()]
    assert tok.chat_preset == "plain"
    assert tok.apply_chat_template("two plus two?") == "Question: two plus two?\nAnswer:\n"
    assert len(tok.decoded_token_texts()) == tok.vocab_size


# ------------------------------------------------------------------------------------------ chat templates


def test_chat_template_matches_transformers(ours, hf):
    assert ours.chat_preset == "qwen2"  # recognised from the config's Qwen2-Instruct jinja template
    q = "What is $\\frac{1}{2}+\\frac{1}{3}$?"
    cases = [
        ([{"role": "user", "content": q}], ours.apply_chat_template(q)),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
         ours.apply_chat_template(q, system="Be brief.")),
    ]
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": q}]
    cases.append((turns, render_chat(turns, "qwen2")))
    for messages, got in cases:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == want
    assert ours.encode_chat(q) == hf.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=False)


def test_chat_presets_hand_written():
    q = "1+1?"
    assert render_chat([{"role": "user", "content": q}], "qwen2.5") == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat([{"role": "user", "content": q}], "qwen2.5-math", add_generation_prompt=False) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
        "<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n")
    assert render_chat([{"role": "user", "content": q}], "plain") == "Question: 1+1?\nAnswer:\n"
    with pytest.raises(ValueError, match="unknown chat preset"):
        render_chat([{"role": "user", "content": q}], "llama")
    with pytest.raises(ValueError, match="message 0"):
        render_chat([{"role": "robot", "content": q}], "qwen2")


# -------------------------------------------------------------------------------------------- symbol mask


def test_symbol_mask_hand_picked(ours):
    mask = symbol_token_mask(ours)
    assert mask.shape == (ours.vocab_size,) and mask.dtype == bool

    def single(text):
        ids = ours.encode(text)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    for text in ["+", ")", "\\(", "\\)", "\\[", "}", "$", "\\\\", " (", "=", "，", "×", " ", "\n\n"]:
        assert mask[single(text)], repr(text)
    for text in ["7", "x", " the", "frac", "€", "<|im_end|>", "<|endoftext|>"]:
        assert not mask[single(text)], repr(text)
    # Qwen splits "\frac" into "\" + "frac": the backslash is a symbol, the command name is not.
    backslash, frac = ours.encode("\\frac")
    assert mask[backslash] and not mask[frac]
    assert not mask[ours.token_to_id("\\d")]  # backslash + letter piece: content
    assert not is_symbol_text("\\frac") and not is_symbol_text("\\cdot")


def test_symbol_mask_never_digits_or_words(ours):
    mask = symbol_token_mask(ours)
    texts = ours.decoded_token_texts()
    has_alnum = np.array([any(ch.isalnum() for ch in t) for t in texts])
    assert not np.any(mask & has_alnum)
    for ch in string.punctuation:
        assert mask[ours.token_to_id(ch)], ch
    for ch in string.ascii_letters + string.digits:
        assert not mask[ours.token_to_id(ch)], ch
    assert 100 < mask.sum() < 0.2 * ours.vocab_size


def test_symbol_mask_options(ours):
    padded = symbol_token_mask(ours, size=151936)
    assert padded.shape == (151936,) and not padded[ours.vocab_size:].any()
    assert np.array_equal(padded[: ours.vocab_size], symbol_token_mask(ours))
    assert not symbol_token_mask(ours, disable=True).any()
    euro = ours.encode("€")[0]
    assert symbol_token_mask(ours, extra_symbols="€")[euro]
    with pytest.raises(ValueError, match="smaller than the tokenizer vocabulary"):
        symbol_token_mask(ours, size=1000)


# -------------------------------------------------------------------------------------------------- errors


def test_tiny_bpe_and_bad_config(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("abab") == [2, 2] and tok.vocab_size == 3
    assert tok.chat_preset == "plain" and tok.eos_token_ids == []
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*'eos_token'"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"merges\.txt:2"):
        load_tokenizer(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(FileNotFoundError, match=r"missing merges\.txt") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
