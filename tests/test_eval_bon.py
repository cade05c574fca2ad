"""`edu-prm eval-bon` end to end on a tiny random policy and PRM: report files and token accounting."""

import json

import numpy as np
import pytest
from tiny_policy import make_tiny_policy
from tree_reference import distinct_prefixes

from edu_prm_jax import cli
from edu_prm_jax.grading.answers import is_correct
from edu_prm_jax.io.shards import read_shards
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.prm import PRM, save_prm


def test_eval_bon_writes_report_and_counts_tokens(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    save_prm(PRM.from_policy(load_hf_model(policy), head="scalar", seed=1), tmp_path / "w" / "prm" / "hf")
    argv = ["eval-bon", f"--workdir={tmp_path / 'w'}", f"--config.policy={policy}", "--config.questions=toy:test:4",
            "--config.n_grid=1,2", "--config.seeds=0,1", "--config.sampling.max_new_tokens=10",
            "--config.sampling.tau=0.5", "--config.batch_questions=4", "--config.mcts=True"]
    assert cli.main(argv) == 0
    out = tmp_path / "w" / "eval_bon"
    for name in ("report.md", "results.json", "bon_accuracy_vs_n.png", "bon_accuracy_vs_tokens.png"):
        assert (out / name).is_file(), name
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["sampler"], r["n"], r["seed"]) for r in runs} == {
        (s, n, seed) for s in ("ht", "edu", "p-edu", "mcts-edu") for n in (1, 2) for seed in (0, 1)}
    for r in (r for r in runs if r["sampler"] == "mcts-edu"):  # HT's tokens were its budget: a question stops
        budget = next(h["tokens"] for h in runs if (h["sampler"], h["n"], h["seed"]) == ("ht", r["n"], r["seed"]))
        assert 0 < r["tokens"] < round(budget) + 2 * 10  # spending once past it, by <= K paths of <= 10 tokens
    ht_trees = list(read_shards(out / "runs" / "ht_n2_s1", "trees"))
    for n in (1, 2):
        expected = sum(len(leaf["token_ids"]) for t in ht_trees for leaf in t["leaves"][:n]) / len(ht_trees)
        got = next(r["tokens"] for r in runs if (r["sampler"], r["n"], r["seed"]) == ("ht", n, 1))
        assert got == expected
    for n in (1, 2):  # the policy-confidence selector recounted from the leaves' recorded log-probabilities
        picks = [max(t["leaves"][:n], key=lambda leaf: np.mean(leaf["logprobs"])) for t in ht_trees]
        expected = np.mean([is_correct(leaf["text"], t["answer"]) for leaf, t in zip(picks, ht_trees)])
        got = next(r["policy_logprob"] for r in runs if (r["sampler"], r["n"], r["seed"]) == ("ht", n, 1))
        assert got == pytest.approx(expected)
    for r in runs:
        selectors = [k for k in r if k.startswith("prm_") or k in ("majority", "weighted_vote", "policy_logprob")]
        assert r["pass@n"] >= max(r[k] for k in selectors)
    for sampler in ("edu", "p-edu"):  # tree cost recounted from the leaves: distinct prefixes (+ pruned tokens)
        trees = list(read_shards(out / "runs" / f"{sampler}_n2_s0", "trees"))
        got = next(r["candidates"] for r in runs if (r["sampler"], r["n"], r["seed"]) == (sampler, 2, 0))
        assert got == sum(len(t["leaves"]) for t in trees) / len(trees)
        recount = sum(distinct_prefixes(leaf["token_ids"] for leaf in t["leaves"]) + t["pruned_tokens"] for t in trees)
        got = next(r["tokens"] for r in runs if (r["sampler"], r["n"], r["seed"]) == (sampler, 2, 0))
        assert got == recount / len(trees)
