"""Toy arithmetic world: determinism, split disjointness, arithmetic re-checked independently, knobs,
and the SentencePiece tokenizer (digit pieces, special ids, round trip, byte-identical retraining)."""

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import sentencepiece as spm

from edu_prm_jax.toy import world as toy
from edu_prm_jax.toy.world import ToyConfig, ToyTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"^(-?\d+) ([-+*/]) (\d+) = (-?\d+)$")
PROBLEM = re.compile(r"^Start with (\d+)\.(.*) What is the result\?$")
WORD_OP = re.compile(r" (Add|Subtract|Multiply by|Divide by) (\d+)\.")
OPS_BY_WORD = {"Add": "+", "Subtract": "-", "Multiply by": "*", "Divide by": "/"}


def _digest(problems):
    return hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest()


def _bucket(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _reference_check(p, cfg):
    """Re-derive everything from the problem text with plain Python arithmetic."""
    m = PROBLEM.match(p["problem"])
    assert m, p["problem"]
    start = int(m.group(1))
    ops = [(OPS_BY_WORD[w], int(b)) for w, b in WORD_OP.findall(m.group(2))]
    assert "".join(f" {w} {b}." for w, b in WORD_OP.findall(m.group(2))) == m.group(2)
    lines = p["solution"].split("\n")
    assert len(lines) == len(ops) + 1 == p["n_ops"] + 1
    value = start
    for line, (op, b) in zip(lines[:-1], ops):
        s = STEP.match(line)
        assert s, line
        a, sop, sb, c = int(s.group(1)), s.group(2), int(s.group(3)), int(s.group(4))
        assert (a, sop, sb) == (value, op, b), (line, value, op, b)
        if op == "/":
            assert b * c == a, line  # exact division
        else:
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], line
        assert abs(c) < cfg.max_value and (cfg.allow_negative or c >= 0), line
        value = c
    assert lines[-1] == f"The answer is \\boxed{{{value}}}."
    assert p["answer"] == str(value)
    return start, ops


def test_hand_worked_example():
    p = toy.render(23, [("+", 45), ("*", 2), ("-", 7)])
    assert p["problem"] == "Start with 23. Add 45. Multiply by 2. Subtract 7. What is the result?"
    assert p["solution"] == "23 + 45 = 68\n68 * 2 = 136\n136 - 7 = 129\nThe answer is \\boxed{129}."
    assert p["answer"] == "129" and p["n_ops"] == 3
    assert toy.render(84, [("/", 4)])["solution"].split("\n")[0] == "84 / 4 = 21"


def test_deterministic_in_process_and_subprocess():
    cfg = ToyConfig(seed=3)
    a = toy.generate_split("train", 300, cfg)
    b = toy.generate_split("train", 300, cfg)
    assert a == b
    assert toy.generate_split("train", 300, cfg, seed=4) != a
    code = (
        "import hashlib, json\nfrom edu_prm_jax.toy import world as toy\n"
        "p = toy.generate_split('train', 300, toy.ToyConfig(seed=3))\n"
        "print(hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _digest(a)
    corpus = list(toy.toy_corpus(50, cfg))
    assert corpus == list(toy.toy_corpus(50, cfg))
    assert corpus[0] == f"Question: {a[0]['problem']}\nAnswer:\n{a[0]['solution']}<|endoftext|>"


def test_splits_disjoint_and_follow_documented_hash_rule():
    cfg = ToyConfig()
    train = toy.generate_split("train", 3000, cfg, seed=0)
    test = toy.generate_split("test", 1000, cfg, seed=0)
    train_texts, test_texts = {p["problem"] for p in train}, {p["problem"] for p in test}
    assert len(train_texts) == 3000 and len(test_texts) == 1000  # distinct within a split
    assert not train_texts & test_texts
    assert len({p["id"] for p in train + test}) == 4000
    for p in train + test:  # membership is sha256(text)[:8] < test_fraction * 2**64
        assert (_bucket(p["problem"]) < cfg.test_fraction * 2**64) == (p in test)
    # other seeds draw other problems, but the split rule keeps them apart too
    assert not {p["problem"] for p in toy.generate_split("train", 3000, cfg, seed=9)} & test_texts
    with pytest.raises(ValueError, match="split must be"):
        toy.generate_split("validation", 1, cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        ToyConfig(),
        ToyConfig(min_ops=3, max_ops=5, min_operand_digits=2, max_operand_digits=2, operators="+-*/"),
        ToyConfig(min_ops=1, max_ops=2, max_operand_digits=1, max_mul_operand_digits=2, operators="*/",
                  max_value=200, allow_negative=True),
        ToyConfig(operators="-", allow_negative=True, max_value=150),
    ],
)
def test_reference_arithmetic_and_knobs(cfg):
    problems = toy.generate_split("train", 1500, cfg, seed=1) + toy.generate_split("test", 200, cfg, seed=1)
    n_ops_seen = set()
    for p in problems:
        assert set(p) == {"id", "problem", "solution", "answer", "n_ops"}
        start, ops = _reference_check(p, cfg)
        assert cfg.min_ops <= p["n_ops"] <= cfg.max_ops
        n_ops_seen.add(p["n_ops"])
        assert cfg.min_operand_digits <= len(str(start)) <= cfg.max_operand_digits
        for op, b in ops:
            assert op in cfg.operators
            if op in "*/":
                assert 2 <= b < 10**cfg.max_mul_operand_digits
            else:
                assert cfg.min_operand_digits <= len(str(b)) <= cfg.max_operand_digits
        assert ToyTask.check(p["solution"], p["answer"])
        assert ToyTask.first_error_step(p["problem"], p["solution"]) == -1
    assert n_ops_seen == set(range(cfg.min_ops, cfg.max_ops + 1))
    if cfg.allow_negative and cfg.operators == "-":
        assert any(int(p["answer"]) < 0 for p in problems)


def _brute_force_problems(cfg):
    """All problem texts of a config, by plain enumeration (independent of the DP and the sampler)."""
    first = max(1, 10 ** (cfg.min_operand_digits - 1))
    add_operands = range(first, 10**cfg.max_operand_digits)
    steps = [(op, b) for op in cfg.operators
             for b in (range(2, 10**cfg.max_mul_operand_digits) if op in "*/" else add_operands)]
    words = {"+": "Add", "-": "Subtract", "*": "Multiply by", "/": "Divide by"}
    texts = []
    for n in range(cfg.min_ops, cfg.max_ops + 1):
        for start in add_operands:
            for chain in itertools.product(steps, repeat=n):
                v, ok = start, True
                for op, b in chain:
                    if op == "/" and (v == 0 or v % b):
                        ok = False
                        break
                    v = {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]
                    if not (abs(v) < cfg.max_value and (cfg.allow_negative or v >= 0)):
                        ok = False
                        break
                if ok:
                    body = "".join(f" {words[op]} {b}." for op, b in chain)
                    texts.append(f"Start with {start}.{body} What is the result?")
    return texts


def test_problem_space_size_matches_brute_force():
    cfg = ToyConfig(min_ops=2, max_ops=3, max_operand_digits=1, operators="+-*/", max_value=50)
    texts = _brute_force_problems(cfg)
    assert len(set(texts)) == len(texts)
    assert toy.problem_space_size(cfg) == len(texts)
    cfg = ToyConfig(min_ops=1, max_ops=2, min_operand_digits=2, max_operand_digits=2, operators="+-",
                    max_value=120, allow_negative=True)
    assert toy.problem_space_size(cfg) == len(_brute_force_problems(cfg))


def test_small_space_is_exhausted_exactly():
    cfg = ToyConfig(min_ops=1, max_ops=1, max_operand_digits=1, operators="+-*/", max_value=40)
    texts = _brute_force_problems(cfg)
    test_texts = {t for t in texts if _bucket(t) < cfg.test_fraction * 2**64}
    train_texts = set(texts) - test_texts
    assert 0 < len(test_texts) < len(train_texts)
    assert {p["problem"] for p in toy.generate_split("train", len(train_texts), cfg)} == train_texts
    assert {p["problem"] for p in toy.generate_split("test", len(test_texts), cfg)} == test_texts
    with pytest.raises(ValueError, match=f"found only {len(test_texts)} of {len(test_texts) + 1}"):
        toy.generate_split("test", len(test_texts) + 1, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="min_ops"):
        ToyConfig(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="operators"):
        ToyConfig(operators="+^")
    with pytest.raises(ValueError, match="test_fraction"):
        ToyConfig(test_fraction=0.0)


def test_toy_task_check_and_first_error():
    p = toy.render(23, [("+", 45), ("*", 2), ("-", 7)])
    assert ToyTask.check(p["solution"], 129) and ToyTask.check(p["solution"], "129")
    assert not ToyTask.check(p["solution"], 128)
    assert not ToyTask.check("23 + 45 = 68", 129)  # no boxed answer
    assert not ToyTask.check("The answer is \\boxed{12x}.", 12)
    assert ToyTask.check("\\boxed{5} then \\boxed{-7}", -7)  # last box wins
    assert ToyTask.extract_answer("The answer is \\boxed{ 42 }.") == 42
    bad_second = "23 + 45 = 68\n68 * 2 = 126\n126 - 7 = 119\nThe answer is \\boxed{119}."
    assert ToyTask.first_error_step(p["problem"], bad_second) == 1
    assert ToyTask.first_error_step(p["problem"], "23+45=68\n 68 * 2 = 136") == -1  # spacing, prefix
    assert ToyTask.first_error_step(p["problem"], "23 + 45 = 69") == 0
    assert ToyTask.first_error_step(p["problem"], p["solution"] + "\nextra") == 4
    assert ToyTask.parse_problem(p["problem"]) == (23, [("+", 45), ("*", 2), ("-", 7)])
    assert ToyTask.parse_step("136 - 7 = 129") == (136, "-", 7, 129)
    assert ToyTask.parse_step("The answer is 3") is None
    with pytest.raises(ValueError, match="not a toy problem"):
        ToyTask.parse_problem("What is 2 + 2?")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    texts = list(toy.toy_corpus(2000, ToyConfig(operators="+-*/")))
    a = toy.train_toy_tokenizer(texts, tmp_path_factory.mktemp("tok_a"), vocab_size=256)
    b = toy.train_toy_tokenizer(iter(texts), tmp_path_factory.mktemp("tok_b"), vocab_size=256)
    return texts, a, b


def test_tokenizer_reproducible_and_config(tokenizer_dirs):
    _, a, b = tokenizer_dirs
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    eos = "<|endoftext|>"
    assert cfg == {"eos_token": eos, "pad_token": eos, "edu_prm_chat_template": "plain"}
    assert not [f for f in os.listdir(a) if f.startswith(".")]  # no temp files left behind


def test_tokenizer_digits_specials_round_trip(tokenizer_dirs):
    texts, a, _ = tokenizer_dirs
    sp = spm.SentencePieceProcessor(model_file=str(a / "tokenizer.model"))
    assert sp.get_piece_size() <= 256
    for d in "0123456789":
        assert sp.encode(d, out_type=str) == [d]
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n"):
        ids = sp.encode(special)
        assert len(ids) == 1 and ids[0] != sp.unk_id() and sp.id_to_piece(ids[0]) == special
    pieces_seen = set()
    for text in texts[:500] + [f"Question: {p}\nAnswer:\n" for p in ("Start with 907. Divide by 3.",)]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids
        assert sp.decode(ids) == text
        pieces = sp.encode(text, out_type=str)
        pieces_seen.update(pieces)
        for piece in pieces:  # a digit never shares a piece with anything else
            assert not any(c.isdigit() for c in piece) or (len(piece) == 1 and piece.isdigit())
    assert sp.encode(texts[0])[-1] == sp.piece_to_id("<|endoftext|>")
    assert set("0123456789") <= pieces_seen
