"""`edu-prm eval-bon`: Best-of-N accuracy and token cost of HT, EDU and P-EDU sampling with a PRM.

Every sampling run is cached as tree shards under <workdir>/eval_bon/runs/<sampler>_n<N>_s<seed>, so a rerun
resumes. HT draws max(N) samples once per seed and evaluates its first N for each N; EDU and P-EDU build a
tree with leaf budget M = N for each N. Greedy EDU (the default) is deterministic, so its trees are built once
and shared by all seeds (their spread is then 0 by construction: the report says so).
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from absl import logging

from edu_prm_jax import distributed, parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.commands.common.builders import checkpoint_dtype, decode_params, sampler_options, sampling_fingerprint
from edu_prm_jax.commands.common.paths import prm_dir
from edu_prm_jax.config_utils import parse_number_list
from edu_prm_jax.evaluation.bon import SELECTORS, selector_accuracies
from edu_prm_jax.evaluation.candidates import count_undecided, score_records
from edu_prm_jax.evaluation.mcts import MCTSConfig, mcts_edu
from edu_prm_jax.evaluation.report import write_bon_report
from edu_prm_jax.grading.answers import solution_verdict
from edu_prm_jax.io import storage
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.records.trees import read_tree_shards
from edu_prm_jax.sampling.engine import Sampler
from edu_prm_jax.sampling.shards import sample_to_shards
from edu_prm_jax.toy.defaults import load_questions, resolve_policy

DESCRIPTION = "Best-of-N: HT vs EDU (vs P-EDU) sampling, PRM aggregators, votes, pass@N and token cost."


def require_gold(questions: list[dict], spec: str) -> None:
    """Accuracy needs a gold answer for every question: without one every selector would score 0% from nothing,
    so refuse, naming the questions that lack it (before any model loads)."""
    if not questions:
        raise ValueError(f"questions={spec!r}: no questions")
    missing = [str(q["id"]) for q in questions if q.get("answer") in (None, "")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"questions={spec!r}: {len(missing)} of {len(questions)} questions have no gold answer "
                         f"({shown}); Best-of-N accuracy needs one per question")


def mcts_runs(config: ml_collections.ConfigDict, model: Any, prm: Any, tokenizer: Any, questions: list[dict],
              runs: list[dict[str, Any]], mesh: Any, rules: Any, s: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """MCTS-EDU with the PRM at the token budget of each HT run (same N, same seed), as Best-of-N result rows
    (sampler "mcts-edu"; every selector applied to the terminal leaves the search found)."""
    prompts = [tokenizer.apply_chat_template(q["problem"]) for q in questions]
    golds = [str(q["answer"]) for q in questions]
    out = []
    for ht in [r for r in runs if r["sampler"] == "ht"]:
        results = mcts_edu(model, prm, tokenizer, prompts, golds, budget_tokens=max(1, round(ht["tokens"])),
                           params=decode_params(s, seed=ht["seed"]),
                           config=MCTSConfig(c_uct=config.mcts_c, aggregator=config.aggregator), mesh=mesh,
                           rules=rules, **sampler_options(s))
        acc = selector_accuracies([r.candidates for r in results])  # prm_<aggregator>: the search's own pick
        out.append({"sampler": "mcts-edu", "n": ht["n"], "seed": ht["seed"],
                    "tokens": sum(r.tokens_spent for r in results) / len(results),
                    "candidates": sum(len(r.candidates) for r in results) / len(results), **acc})
    return out


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    questions = load_questions(config.questions, limit=config.limit)
    require_gold(questions, config.questions)
    n_grid, seeds = parse_number_list(config.n_grid, "n_grid"), parse_number_list(config.seeds, "seeds")
    mesh = parallel.local_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)  # this host's devices
    rules = parallel.rules_from_config(config.mesh.rules)
    policy_dir = resolve_policy(config.policy)
    model = load_model(policy_dir, dtype=config.dtype, param_dtype=checkpoint_dtype(policy_dir), mesh=mesh,
                       rules=rules)  # weights in their saved dtype (wider would change no number)
    tokenizer = load_tokenizer(config.tokenizer or policy_dir)
    prm_path = prm_dir(workdir, config.prm)
    prm = load_prm(prm_path, mesh, param_dtype=checkpoint_dtype(prm_path), dtype=config.dtype, rules=rules)
    if config.p_edu and prm.head_spec.inserts_separator:
        raise ValueError("config.p_edu=True needs a PRM that scores each step at its last token (P-EDU reads the "
                         f"policy's tokens as generated); {prm_path} has the {prm.head_spec.name} head, which "
                         "inserts a separator: pass --config.p_edu=False")
    weights = sorted(prm_path.glob("*.safetensors"))
    prm_identity = [str(storage.resolved(prm_path))] + [
        "{}:{}:{}".format(w.name, *storage.size_and_mtime_ns(w)) for w in weights]
    out = workdir / "eval_bon"
    s = config.sampling

    def sampled(name: str, seed: int, prm_model: Any = None, **override: Any) -> list[dict]:
        params = decode_params(s, seed=seed, **override)
        sampler = Sampler(model, tokenizer, params, mesh=mesh, batch_questions=config.batch_questions,
                          prompt_bucket=config.prompt_bucket, prm=prm_model, rules=rules, **sampler_options(s))
        run_dir = out / "runs" / name
        fingerprint = {**sampling_fingerprint(policy_dir, config.dtype, s),
                       "prm": prm_identity if prm_model is not None else None}
        sample_to_shards(sampler, questions, run_dir, config.num_shards, desc=name, fingerprint=fingerprint)
        return [tree.to_json() for tree in read_tree_shards(run_dir)]

    greedy = sampled("greedy", 0, mode="greedy", num_leaves=1)
    greedy_verdicts = [solution_verdict(r["leaves"][0]["text"], r["answer"]) for r in greedy if r["leaves"]]
    greedy_acc = sum(v is True for v in greedy_verdicts) / len(greedy)  # undecided: not correct, reported below
    undecided = {"greedy": greedy_verdicts.count(None)}
    scored: dict[str, dict[str, float]] = {}  # run name -> accuracies (greedy EDU trees are shared by seeds)
    runs: list[dict[str, Any]] = []
    edu_seeds = seeds[:1] if s.edu_greedy else seeds
    samplers = ["edu", "p-edu"] if config.p_edu else ["edu"]
    for seed in seeds:
        ht = sampled(f"ht_n{max(n_grid)}_s{seed}", seed, mode="ht", num_leaves=max(n_grid),
                     temperature=config.ht_temperature)
        ht_cands = score_records(prm, ht, "high_entropy")
        for n in n_grid:
            acc = selector_accuracies([c[:n] for c in ht_cands])
            tokens = sum(sum(len(leaf["token_ids"]) for leaf in r["leaves"][:n]) for r in ht) / len(ht)
            candidates = sum(len(r["leaves"][:n]) for r in ht) / len(ht)
            runs.append({"sampler": "ht", "n": n, "seed": seed, "tokens": tokens, "candidates": candidates, **acc,
                         "undecided": count_undecided([c[:n] for c in ht_cands])})
        for name in samplers:
            for n in n_grid:
                tree_seed = seed if seed in edu_seeds else edu_seeds[0]
                run_name = f"{name}_n{n}_s{tree_seed}"
                trees = sampled(run_name, tree_seed, prm_model=prm if name == "p-edu" else None,
                                mode="edu", num_leaves=n, prune_below=config.prune_below)
                if run_name not in scored:
                    cands = score_records(prm, trees, "anchors")
                    scored[run_name] = {**selector_accuracies(cands), "undecided": count_undecided(cands)}
                acc = scored[run_name]
                tokens = sum(r["distinct_tokens"] for r in trees) / len(trees)
                candidates = sum(len(r["leaves"]) for r in trees) / len(trees)  # a tree may not fill its budget
                runs.append({"sampler": name, "n": n, "seed": seed, "tokens": tokens, "candidates": candidates,
                             **acc})
    if config.mcts:  # MCTS-EDU at HT's token cost for each N: its own line in the table and plots
        runs += mcts_runs(config, model, prm, tokenizer, questions, runs, mesh, rules, s)
    notes = ("HT candidates are split into steps at their high-entropy positions (the policy's in-graph "
             "entropy of the sampled tokens); EDU leaves at their anchors. An EDU tree has at most N leaves but "
             "fewer when too few positions exceed tau: compare its token cost with HT at the same number of "
             "candidates (column 'candidates / question'), not only at the same N. ")
    if s.edu_greedy:
        notes += "EDU/P-EDU trees are greedy between anchors, hence identical across seeds (std 0). "
    if config.mcts:
        notes += ("MCTS-EDU (`evaluation/mcts.py`) searches with the PRM under a budget of distinct generated tokens "
                  "equal to HT's mean tokens per question at each N (and seed); its candidates are the terminal "
                  "leaves it found, and its N is the HT run whose budget it had. ")
    sampled_once = [r["undecided"] for r in runs if r["sampler"] == "ht" and r["n"] == max(n_grid)]
    undecided["candidates"] = sum(sampled_once) + sum(int(v["undecided"]) for v in scored.values())
    notes += (f"Answer checks left undecided (out of their CPU bound; counted as not correct): {undecided['greedy']} "
              f"greedy solutions and {undecided['candidates']} distinct sampled candidates (per run: field "
              "'undecided' of results.json).")
    if distributed.is_lead():  # multi-host: every process computed the same runs; process 0 writes the report
        text = write_bon_report(runs, out, SELECTORS, f"prm_{config.aggregator}", greedy_acc, notes)
        logging.info("Best-of-N report: %s\n%s", out / "report.md", text)
    distributed.barrier("eval-bon: report written")
