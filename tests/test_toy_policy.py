"""The shipped toy policy: loads from HF format, reproduces its reported greedy accuracy; builds are
bit-for-bit reproducible from the seed."""

import dataclasses
import json
import pathlib
import random

import numpy as np
import pytest

from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.tokenization import load_tokenizer
from edu_prm_jax.toy import world as toy
from edu_prm_jax.toy.policy import (
    REPORT,
    ToyPolicyConfig,
    auroc,
    build_toy_policy,
    greedy_decode,
    misread_corpus,
    misread_solution,
)

ASSET = pathlib.Path(__file__).resolve().parents[1] / "edu_prm_jax" / "assets" / "toy_policy"


def test_auroc_hand_worked():
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.5, 0.5, 0.2, 0.7], [True, False, False, True]) == pytest.approx((2 + 1 + 0.5) / 4)


def _problem(text: str) -> dict:
    start, ops = toy.ToyTask.parse_problem(text)
    return toy.render(start, ops)


def test_misread_solution_hand_worked():
    always = ToyPolicyConfig(misread_rate=1.0)
    p = _problem("Start with 6. Add 6. Multiply by 2. What is the result?")
    assert p["answer"] == "24"
    out = misread_solution(p, random.Random(0), always)
    assert out["solution"] == "9 + 9 = 18\n18 * 2 = 36\nThe answer is \\boxed{36}."
    assert out["problem"] == p["problem"] and out["answer"] == "24"  # the gold answer is the problem's own
    assert not toy.ToyTask.check(out["solution"], out["answer"]) and out["misread_count"] == 2
    # A misreading that would leave the toy world's bounds is not made: 7 - 9 < 0.
    q = _problem("Start with 7. Subtract 6. Add 1. What is the result?")
    assert misread_solution(q, random.Random(0), always) is q
    # Problems without the number are untouched, and rate 0 is a clean corpus.
    r = _problem("Start with 3. Add 4. Multiply by 2. What is the result?")
    assert misread_solution(r, random.Random(0), always) is r
    assert misread_corpus([p, q, r], ToyPolicyConfig(misread_rate=0.0), seed=0) == [p, q, r]


def test_misread_rate_is_per_occurrence():
    """Each occurrence is drawn independently: with two 6s, both are misread at rate**2 and neither at (1-rate)**2
    (binomial bounds over 4000 draws); a per-problem draw would give rate and 1 - rate instead."""
    rate, n = 0.3, 4000
    p = _problem("Start with 6. Add 6. Add 1. What is the result?")
    counts = [c.get("misread_count", 0) for c in misread_corpus([p] * n, ToyPolicyConfig(misread_rate=rate), seed=5)]
    for k, expected in ((2, rate**2), (0, (1 - rate) ** 2)):
        assert abs(counts.count(k) / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5, k


def test_misread_corpus_is_the_same_in_every_process():
    """The corpus may not depend on Python's salted str hash: two interpreters with different PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from edu_prm_jax.toy import world as toy; "
            "from edu_prm_jax.toy.policy import ToyPolicyConfig, misread_corpus; "
            "cfg = ToyPolicyConfig(); train = toy.generate_split('train', 500, cfg.toy, 0); "
            "print(hashlib.sha256(json.dumps(misread_corpus(train, cfg, 0)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(digests) == 1


def test_misread_config_is_validated():
    with pytest.raises(ValueError, match="misread_rate"):
        ToyPolicyConfig(misread_rate=-0.1)
    with pytest.raises(ValueError, match="misread_to"):
        ToyPolicyConfig(misread_to=0)


@pytest.fixture(scope="module")
def shipped():
    if not (ASSET / REPORT).is_file():
        pytest.fail(f"{ASSET} has no {REPORT}; build it with python -m edu_prm_jax.toy.policy")
    report = json.loads((ASSET / REPORT).read_text())
    return load_hf_model(ASSET), load_tokenizer(ASSET), report


def test_shipped_policy_reproduces_reported_accuracy(shipped):
    model, tokenizer, report = shipped
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 10 * 1024**2
    cfg = toy.ToyConfig(**report["toy_config"])
    test = toy.generate_split("test", 128, cfg, report["seed"])  # the report's first batch of 128
    gens = greedy_decode(model, tokenizer, [toy.plain_prompt(p["problem"]) for p in test],
                         report["policy_config"]["max_new_tokens"])
    correct = [toy.ToyTask.check(g["text"], p["answer"]) for g, p in zip(gens, test)]
    # Same batch shapes as the build's evaluation: equal up to at most one float-rounding argmax flip.
    assert abs(np.mean(correct[:64]) - report["sample_64_greedy_accuracy"]) <= 1 / 64 + 1e-9
    assert 0.3 <= report["greedy_accuracy"] <= 0.8
    # Answers are decoded text that ToyTask parses: every wrong answer is a real attempt, not garbage.
    assert sum(toy.ToyTask.extract_answer(g["text"]) is not None for g in gens) >= 0.9 * len(gens)


def test_greedy_decode_matches_full_forward_argmax(shipped):
    """The KV-cache decoder against the plain reference: re-run the whole sequence, take the argmax."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model, tokenizer, report = shipped
    cfg = toy.ToyConfig(**report["toy_config"])
    prompts = [toy.plain_prompt(p["problem"]) for p in toy.generate_split("test", 3, cfg, 11)]
    gens = greedy_decode(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    eos = tokenizer.eos_token_ids[0]
    graphdef, state = nnx.split(model)
    width = 96  # one padded shape, so the no-cache forward compiles once; causal masking ignores the pad

    @jax.jit
    def full_forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    for prompt, gen in zip(prompts, gens):
        ids = tokenizer.encode(prompt)
        ref = []
        while len(ref) < 12 and (not ref or ref[-1] != eos):
            seq = ids + ref
            padded = jnp.asarray([seq + [0] * (width - len(seq))])
            # the sampler's distribution excludes the embedding's padding rows beyond the tokenizer's vocabulary
            logits = np.asarray(full_forward(state, padded)[0, len(seq) - 1], np.float64)[: tokenizer.vocab_size]
            ref.append(int(np.argmax(logits)))
            p = np.exp(logits - logits.max())
            p /= p.sum()
            entropy = float(-(p * np.log(np.maximum(p, 1e-300))).sum())
            assert gen["entropies"][len(ref) - 1] == pytest.approx(entropy, rel=1e-3, abs=1e-4)
        assert gen["tokens"] == ref


def test_build_is_bit_for_bit_reproducible(tmp_path):
    tiny = ToyPolicyConfig(n_train=300, n_tokenizer_texts=300, n_test=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, steps=3, batch_rows=4, seq_len=128, warmup_steps=1,
                           max_new_tokens=8)
    a = build_toy_policy(tmp_path / "a", seed=3, cfg=tiny, progress=False)
    b = build_toy_policy(tmp_path / "b", seed=3, cfg=tiny, progress=False)
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = build_toy_policy(tmp_path / "c", seed=4, cfg=dataclasses.replace(tiny), progress=False)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a["final_train_loss"] == b["final_train_loss"] and c["seed"] == 4


def test_build_toy_refuses_a_misread_rate_outside_0_1(tmp_path, capsys):
    """Refused when the config is loaded (configs/ranges.py), before anything is trained or written."""
    from edu_prm_jax import cli

    rc = cli.main(["build-toy", f"--workdir={tmp_path}", "--config.misread_rate=1.5"])
    assert rc == 2 and "config.misread_rate=1.5" in capsys.readouterr().err
    assert not (tmp_path / "toy_policy").exists()
