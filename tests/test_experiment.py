"""`edu-prm experiment`: arms, matched budgets, the cost-to-reach interpolation and the summary, hand-worked."""

import json
import math
import re

import pytest

from edu_prm_jax.commands import experiment
from edu_prm_jax.commands.common.experiment import cost_to_reach, mean_std, reach_lines, summarise
from edu_prm_jax.configs import experiment as experiment_config


def test_ablations_parse_into_typed_overrides_of_the_edu_section():
    config = experiment_config.get_config("paper")
    arms = experiment.plan_arms(config, 512)
    assert [a.name for a in arms[:3]] == ["edu", "shepherd", "omega"]
    ablations = {a.name: a for a in arms if a.group == "ablations"}
    assert experiment.labeller_section(config, ablations["edu tau0.25"]).sampling.tau == 0.25
    assert experiment.labeller_section(config, ablations["edu K3"]).sampling.branch_k == 3
    assert experiment.labeller_section(config, ablations["edu no-symbols"]).sampling.disable_symbols is True
    assert experiment.labeller_section(config, ablations["edu hard-labels"]).target == "hard"
    # one bit in nats
    assert experiment.labeller_section(config, ablations["edu tau1bit"]).sampling.tau == pytest.approx(
        math.log(2), abs=1e-5)
    # the base config is untouched, and every arm (each seed's run dir) has its own slug
    assert config.edu.sampling.tau == 0.5
    assert len({a.slug for a in arms}) == len(arms)


@pytest.mark.parametrize("spec, message", [
    ("tau", "not 'name:field=value"), ("a:sampling.tau", "not field=value"),
    ("a:sampling.tua=1", "sampling.tau"), ("a:target=hard;a:target=soft", "names repeat"),
    ("a:sampling.seed=3", "set by the experiment"), ("a:sampling.branch_k=2.5", "expected an integer"),
    ("a:sampling.disable_symbols=no", "expected true or false"), ("a:sampling.tau=high", "expected a number"),
])
def test_bad_ablations_are_refused_naming_the_entry(spec, message):
    config = experiment_config.get_config()
    config.ablations = spec
    with pytest.raises(ValueError, match=message):
        experiment.plan_arms(config, 8)


def test_matched_budget_arms_buy_questions_at_the_other_labellers_cost():
    config = experiment_config.get_config()
    base = {a.name: a for a in experiment.plan_arms(config, 100)}
    # EDU 50 tokens a question, Math-Shepherd 1000, OmegaPRM 2000: at EDU's cost (5,000 tokens) Math-Shepherd
    # labels 5 questions, OmegaPRM 2 (2.5 rounds to the even 2); EDU at Math-Shepherd's cost (100,000) labels 2,000
    arms = experiment.matched_arms(config, base, {"edu": 50.0, "shepherd": 1000.0, "omega": 2000.0}, 100, 3000)
    got = {a.name: a.questions for a in arms}
    assert got == {"shepherd @ EDU's cost": 5, "edu @ shepherd's cost": 2000, "omega @ EDU's cost": 2,
                   "edu @ omega's cost": 3000}  # 4,000 capped at the 3,000 questions available
    assert {a.group for a in arms} == {"matched budget"}


def test_cost_to_reach_interpolates_in_log_cost():
    # quality 0.6 at cost 100 and 0.8 at cost 10,000: 0.7 is reached halfway in log cost, at 1,000
    assert cost_to_reach([(10_000, 0.8), (100, 0.6)], 0.7) == pytest.approx(1000.0)
    assert cost_to_reach([(100, 0.6), (10_000, 0.8)], 0.5) == 100  # the cheapest point already reaches it
    assert cost_to_reach([(100, 0.6), (10_000, 0.8)], 0.9) is None  # never reached


def test_mean_std_refuses_partial_data():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, None]) is None and mean_std([1.0, float("nan")]) is None and mean_std([]) is None


def test_summary_and_reach_table_from_runs():
    runs = []
    for seed, (edu_q, sh_q) in enumerate([(0.70, 0.60), (0.72, 0.64)]):
        runs.append({"arm": "edu", "group": "labellers", "labeller": "edu", "questions": 10, "seed": seed,
                     "tokens": 1000, "pb_f1_tuned": edu_q})
        runs.append({"arm": "shepherd", "group": "labellers", "labeller": "shepherd", "questions": 10,
                     "seed": seed, "tokens": 20_000, "pb_f1_tuned": sh_q})
        runs.append({"arm": "shepherd @ EDU's cost", "group": "matched budget", "labeller": "shepherd",
                     "questions": 1, "seed": seed, "tokens": 2000, "pb_f1_tuned": 0.5})
    summary = summarise(runs)
    assert summary["edu"]["pb_f1_tuned"] == pytest.approx((0.71, math.sqrt(2e-4)))
    assert summary["shepherd"]["seeds"] == 2
    lines = "\n".join(reach_lines(summary))
    # Math-Shepherd's best (0.62 at 20x EDU's tokens) stays below EDU's 0.71
    assert "| shepherd | toy-processbench F1 (tuned theta) | 0.7 | not reached (best 0.6 at 20.00x) |" in lines
    # at EDU's own cost it would already match: only an upper bound on the ratio can be read off (<= 2x)
    for r in runs:
        if r["arm"] == "shepherd @ EDU's cost":
            r["pb_f1_tuned"] = 0.9
    lines = "\n".join(reach_lines(summarise(runs)))
    assert "| shepherd | toy-processbench F1 (tuned theta) | 0.7 | <= 2.00x |" in lines


def test_experiment_end_to_end_small(tmp_path):
    """EDU and one ablation on 8 toy questions, 1 seed, a few PRM steps, with the prune sweep and MCTS-EDU: the
    results carry each run's label cost as `label` recorded it, the PRM-free baselines equal an independent
    grading of the shared candidates, and a rerun recomputes nothing."""
    from edu_prm_jax import cli
    from edu_prm_jax.io.shards import read_shards
    from edu_prm_jax.toy import world as toy

    work = tmp_path / "exp"
    argv = ["experiment", f"--workdir={work}", "--config.labellers=edu", "--config.seeds=0",
            "--config.train_questions=toy:train:8", "--config.test_questions=toy:test:4", "--config.train.steps=2",
            "--config.train.rows=8", "--config.n_grid=2", "--config.toy_processbench_n=4",
            "--config.ablations=hard:target=hard", "--config.prune_grid=0.2", "--config.mcts=True",
            "--config.mcts_n=2", "--config.max_new_tokens=48"]
    assert cli.main(argv) == 0
    results = json.loads((work / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == ["edu", "edu hard"]
    arms = [experiment.Arm("edu", "edu", 8), experiment.Arm("edu hard", "edu", 8, (("target", "hard"),))]
    for run, arm in zip(results["runs"], arms):
        cost = json.loads((work / "runs" / arm.slug / "s0" / "labels" / "label_stats.json").read_text())["cost"]
        assert run["tokens"] == cost["tokens"] > 0 and run["queries"] == cost["queries"]
        assert 0 <= run["pb_f1_tuned"] <= 100 and 0 <= run["bon_edu2_prm_min"] <= 1
    # greedy accuracy recounted by the toy world's own arithmetic: the boxed number against the chain's value
    (greedy_dir,) = (work / "bon").glob("greedy-*")
    greedy = []
    for t in read_shards(greedy_dir, "trees"):
        start, ops = toy.ToyTask.parse_problem(t["problem"])
        value = start
        for op, b in ops:
            value = toy.apply_op(op, value, b)
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", t["leaves"][0]["text"])
        greedy.append(bool(boxed) and int(boxed[-1]) == value)
    assert results["baselines"]["greedy"] == pytest.approx(sum(greedy) / 4)
    md = (work / "results.md").read_text()
    for section in ("## Labellers", "## Ablations", "## Aggregator", "## P-EDU prune threshold", "## MCTS-EDU"):
        assert section in md, section
    assert (work / "quality_vs_cost.png").stat().st_size > 0 and (work / "bon_vs_tokens.png").stat().st_size > 0
    cached = {p: p.stat().st_mtime_ns for p in work.rglob("metrics.json")} | {
        p: p.stat().st_mtime_ns for p in (work / "mcts").glob("*.json")}
    budgets = {round(results["baselines"]["by_seed"]["0"][f"tokens_{name}2"]) for name in ("ht", "edu")}
    assert len(cached) == 2 + len(budgets)  # two runs' metrics, MCTS at HT@2's and EDU@2's budget
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == cached


def test_prm_free_baselines_on_hand_built_candidates(tmp_path):
    """Majority vote (ties: the first answer seen), pass@N, token cost and greedy on two questions, worked by hand;
    no PRM selector leaks into the PRM-free row."""
    from edu_prm_jax.commands.common.experiment import Evaluator

    def leaf(answer, n_tokens, logprob=-1.0):
        return {"text": f"so \\boxed{{{answer}}}", "token_ids": [1] * n_tokens, "logprobs": [logprob] * n_tokens}

    config = experiment_config.get_config()
    config.n_grid, config.test_questions = "2", "toy:test:2"
    evaluator = Evaluator(config, tmp_path, [0])
    evaluator._candidates = {  # what `sampled` would read from the shards
        "ht_n2_s0": [{"answer": "12", "leaves": [leaf(12, 3), leaf(5, 5, -0.1)]},  # majority tie: 12 first, right
                     {"answer": "7", "leaves": [leaf(3, 4), leaf(3, 4)]}],  # majority 3: wrong; pass@2 wrong
        "edu_n2_s0": [{"answer": "12", "distinct_tokens": 6, "leaves": [leaf(4, 4), leaf(12, 4)]},  # tie: 4, wrong
                      {"answer": "7", "distinct_tokens": 4, "leaves": [leaf(7, 4)]}],
        "greedy": [{"answer": "12", "leaves": [leaf(12, 3)]}, {"answer": "7", "leaves": [leaf(1, 3)]}],
    }
    out = evaluator.baselines()
    row = out["by_seed"][0]
    assert out["greedy"] == 0.5
    assert row["bon_ht2_majority"] == 0.5 and row["bon_ht2_pass@n"] == 0.5
    assert row["bon_edu2_majority"] == 0.5 and row["bon_edu2_pass@n"] == 1.0
    assert row["bon_ht2_policy_logprob"] == 0.0  # the surest HT candidates: 5 (q1) and 3 (q2), both wrong
    assert row["tokens_ht2"] == (3 + 5 + 4 + 4) / 2 and row["tokens_edu2"] == (6 + 4) / 2
    assert not [k for k in row if "prm" in k or "weighted" in k]


def test_number_lists_parse_or_name_the_field():
    from edu_prm_jax.config_utils import parse_number_list

    assert parse_number_list("4, 16,64", "n_grid") == [4, 16, 64]
    assert parse_number_list("0.1,0.3", "prune_grid", float) == [0.1, 0.3]
    assert parse_number_list("", "prune_grid", float, allow_empty=True) == []
    with pytest.raises(ValueError, match="config.n_grid is empty"):
        parse_number_list(" , ", "n_grid")
    with pytest.raises(ValueError, match="config.mcts_n='4,x'"):
        parse_number_list("4,x", "mcts_n")
