"""Undecided answer checks (a check out of its CPU bound) are left out of Monte Carlo counts, never counted as
wrong; a step with only undecided verdicts below it has no label; `edu-prm label` and Best-of-N report them.

Values are worked by hand on the trees of test_mc_labels.py; the real checker is driven undecided with a CPU
bound far below what its symbolic check needs (1e-4 s)."""

import functools
import json
import shutil

import pytest
from test_label_command import policy, samples  # noqa: F401 - module fixtures: a tiny policy and its EDU trees

from edu_prm_jax import cli
from edu_prm_jax.evaluation import candidates
from edu_prm_jax.evaluation.bon import select_all
from edu_prm_jax.grading import answers
from edu_prm_jax.io.shards import read_shards
from edu_prm_jax.labeling.mc import JudgedTree, add_rollouts, apply_target, count_tree, label_paths, label_trees
from edu_prm_jax.labeling.shepherd import label_shepherd
from edu_prm_jax.sampling.engine import Leaf


def leaf(slot, token_ids, anchors, parent=-1, fork=0):
    return Leaf(slot=slot, parent_slot=parent, fork_pos=fork, token_ids=token_ids, entropies=[], logprobs=[],
                anchors=anchors, stop_reason="answer")


# A forks at index 2 into B; B forks at index 3 into C. Nodes: (1,2) has A, B, C below; (1,2,6) has B, C.
TREE = [leaf(0, [1, 2, 3, 4, 5], [2]), leaf(1, [1, 2, 6, 7], [2, 3], 0, 2), leaf(2, [1, 2, 6, 8, 9], [2, 3], 1, 3)]


def test_undecided_leaf_is_left_out_of_the_counts():
    a, b, c = label_paths(TREE, [True, None, False])
    # node (1,2): A correct, C wrong, B undecided -> 1/2 (counting B as wrong would give 1/3)
    assert a.values == [0.5, 1.0] and a.node_leaves == [2, 1] and a.node_undecided == [1, 0]
    # node (1,2,6): C wrong, B undecided -> 0/1; B's own last step has no label
    assert b.values == [0.5, 0.0, None] and not b.labelled and b.correct is None and b.node_undecided == [1, 1, 1]
    assert c.values == [0.5, 0.0, 0.0] and c.labelled and c.node_leaves == [2, 1, 1]
    assert apply_target(c.values, "edu") == ([0.5, 0.0, 0.0], ["soft", "hard", "hard"])
    with pytest.raises(ValueError, match="no MC value"):
        apply_target(b.values, "edu")


def test_a_node_with_only_undecided_leaves_has_no_value():
    a, b, c = label_paths(TREE, [True, None, None])
    assert a.values == [1.0, 1.0]  # node (1,2): only A is decided
    assert b.values == [1.0, None, None] and c.values == [1.0, None, None]  # (1,2,6): nothing decided below
    assert b.node_leaves == [1, 0, 0] and b.node_undecided == [2, 2, 1]
    counts = count_tree(TREE, [True, None, None])
    assert (counts[(1, 2)].leaves, counts[(1, 2)].undecided) == (1, 2)


def test_undecided_rollouts_are_counted_apart():
    counts = count_tree(TREE, [True, False, False])
    add_rollouts(counts, (1, 2, 6), [True, None, None])
    node = counts[(1, 2, 6)]
    assert (node.leaves, node.rollouts, node.rollouts_correct, node.rollouts_undecided) == (2, 1, 1, 2)
    assert counts[(1, 2)].rollouts == 1 and counts[(1, 2)].rollouts_undecided == 2  # the ancestor too
    # through label_trees, with a judge that cannot decide completions containing "?"
    replies = {(9, 1, 2, 6): [r"\boxed{5}", r"\boxed{?}"]}
    judge = lambda text, gold: None if "?" in text else r"\boxed{5}" in text  # noqa: E731
    tree = JudgedTree(TREE, [True, False, False], prompt_ids=[9], gold="5")
    (a, b, c), = label_trees([tree], min_leaves=3, rollout=lambda ps: [replies[tuple(p)] for p in ps],
                             decode=lambda ids: "", judge=judge)
    # (1,2,6): B, C wrong + 1 correct rollout of 2 (one undecided) -> 1/3; ancestor (1,2): (1 + 1) / (3 + 1)
    assert b.values == [pytest.approx(2 / 4), pytest.approx(1 / 3), 0.0]
    assert b.node_leaves == [4, 3, 1] and b.node_rollouts == [1, 1, 0] and b.node_undecided == [1, 1, 0]


def test_shepherd_step_with_only_undecided_completions_has_no_label():
    texts = ["1", " +", " 2", " = 3", "\n", "So", r" \boxed{3}"]
    l0 = leaf(0, [0, 1, 2, 3, 4, 5, 6], [])  # two line steps
    replies = {(42, 0, 1, 2, 3, 4): ["? a", "? b"]}
    judge = lambda text, gold: None if "?" in text else r"\boxed{3}" in text  # noqa: E731
    (p0,), = label_shepherd([JudgedTree([l0], [True], [42], gold="3")], texts,
                            rollout=lambda ps: [replies[tuple(p)] for p in ps],
                            decode=lambda ids: "".join(texts[i] for i in ids), judge=judge)
    assert p0.values == [None, 1.0] and p0.node_leaves == [0, 1] and p0.node_undecided == [2, 0]


def test_real_checker_out_of_its_cpu_bound_is_excluded_not_false():
    gold = r"\frac{1}{2}"
    texts = [r"so $\boxed{0.5}$", r"so $\boxed{\sin\frac{\pi}{6}}$", r"so $\boxed{3}$"]  # right, right, wrong
    starved = [answers.solution_verdict(t, gold, timeout_s=1e-4) for t in texts]
    assert starved == [True, None, False]  # numbers are decided exactly without sympy; the sine needs it
    a, b, c = label_paths(TREE, starved)
    assert a.values == [0.5, 1.0] and not b.labelled and c.values == [0.5, 0.0, 0.0]
    decided = [answers.solution_verdict(t, gold) for t in texts]  # the default bound decides the sine
    assert decided == [True, True, False]
    a, b, c = label_paths(TREE, decided)
    assert a.values == [pytest.approx(2 / 3), 1.0] and b.values == [pytest.approx(2 / 3), 0.5, 1.0]


def test_label_command_excludes_and_reports_an_undecided_leaf(policy, samples, tmp_path, monkeypatch):  # noqa: F811
    src = tmp_path / "samples"
    shutil.copytree(samples, src)
    paths = sorted(src.glob("trees-*.jsonl"))
    recs = [json.loads(x) for x in paths[-1].read_text().splitlines()]
    target = recs[-1]  # a question whose leaves the samples fixture did not touch
    assert len(target["leaves"]) >= 2
    target["leaves"][1]["text"] += r" so the answer is $\boxed{9^{9^{9^{9}}}}$"  # never finishes in sympy
    paths[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    # a small CPU bound keeps the test short; the default bound gives the same verdict after 2 + 8 s of CPU
    monkeypatch.setattr(answers, "solution_verdict", functools.partial(answers.solution_verdict, timeout_s=0.05))
    out = tmp_path / "labels"
    assert cli.main(["label", f"--workdir={tmp_path}", f"--config.policy={policy}", f"--config.samples={src}",
                     f"--config.output={out}", "--config.tfds=False"]) == 0
    trees = list(read_shards(src, "trees"))
    records = list(read_shards(out, "steps"))
    bad_id = f"{target['id']}/{target['leaves'][1]['slot']}"
    assert len(records) == sum(len(t["leaves"]) for t in trees) - 1 and bad_id not in {r["id"] for r in records}
    stats = json.loads((out / "label_stats.json").read_text())
    assert (stats["undecided"], stats["undecided_leaves"], stats["undecided_rollouts"],
            stats["unlabelled_paths"]) == (1, 1, 0, 1)
    summaries = list(read_shards(out, "undecided"))
    assert [u["undecided_leaves"] for u in summaries if u["undecided_leaves"]] == [[bad_id]]
    # the other leaves of that tree count only decided leaves below each node
    bad_ids = target["leaves"][1]["token_ids"]
    shared_nodes = 0
    for r in records:
        if r["question_id"] != str(target["id"]):
            assert "node_undecided" not in r["provenance"]
            continue
        ends, pos = [], 0
        for s in r["step_ids"]:
            pos += len(s)
            ends.append(pos)
        ids = [t for s in r["step_ids"] for t in s]
        below = [sum(x["token_ids"][:e] == ids[:e] for x in target["leaves"]) for e in ends[:-1]]
        shares = [int(bad_ids[:e] == ids[:e]) for e in ends[:-1]]
        assert r["provenance"]["node_leaves"][:-1] == [n - k for n, k in zip(below, shares)]
        assert r["provenance"].get("node_undecided", [0] * len(ends))[:-1] == shares
        shared_nodes += sum(shares)
    assert shared_nodes >= 1  # some labelled step had the undecided leaf below it


def test_best_of_n_counts_an_undecided_candidate(monkeypatch):
    monkeypatch.setattr(candidates, "answers_verdict", functools.partial(answers.answers_verdict, timeout_s=1e-4))
    leaves = [{"slot": k, "token_ids": [], "anchors": [], "text": t, "logprobs": []}
              for k, t in enumerate([r"\boxed{\cos\frac{\pi}{3}}", r"\boxed{0.5}", r"\boxed{2}"])]
    records = [{"id": "q", "answer": r"\frac12", "prompt_ids": [1], "leaves": leaves}]
    (cands,) = candidates.score_records(None, records, "anchors")  # no leaf has steps: the PRM is not called
    assert [(c.correct, c.undecided) for c in cands] == [(False, True), (True, False), (False, False)]
    assert candidates.count_undecided([cands]) == 1
    assert select_all(cands)["pass@n"] is True
