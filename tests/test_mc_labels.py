"""MC step labels on hand-built trees and Math-Shepherd line steps with a stub rollout; values worked by hand."""

import pytest

from edu_prm_jax.labeling.mc import JudgedTree, apply_target, count_tree, label_paths, label_trees
from edu_prm_jax.labeling.shepherd import label_shepherd, line_step_spans
from edu_prm_jax.records.trees import step_spans
from edu_prm_jax.sampling.engine import Leaf


def leaf(slot, token_ids, anchors, parent=-1, fork=0):
    return Leaf(slot=slot, parent_slot=parent, fork_pos=fork, token_ids=token_ids, entropies=[], logprobs=[],
                anchors=anchors, stop_reason="answer")


# Tree 1: A forks at index 2 into B; B forks at index 3 into C.
#   node (1,2): A, B, C below, only A correct -> v = 1/3 (soft)
#   node (1,2,6): B, C below, both wrong -> v = 0 (hard 0)
TREE1 = [leaf(0, [1, 2, 3, 4, 5], [2]), leaf(1, [1, 2, 6, 7], [2, 3], 0, 2), leaf(2, [1, 2, 6, 8, 9], [2, 3], 1, 3)]
CORRECT1 = [True, False, False]
# Tree 3: the root forks at index 0 (Y); X forks at index 2 (Z). Node (20,21): X, Z both correct -> v = 1.
TREE3 = [leaf(0, [20, 21, 22], [0, 2]), leaf(1, [23, 24], [0], 0, 0), leaf(2, [20, 21, 25], [0, 2], 0, 2)]
CORRECT3 = [True, False, True]


def test_step_spans_cut_before_anchors_and_drop_empty_spans():
    assert step_spans(5, [2]) == [(0, 2), (2, 5)]
    assert step_spans(5, [0, 3, 3, 5]) == [(0, 3), (3, 5)]  # anchor at 0 / repeated / at the end: no empty step
    assert step_spans(4, []) == [(0, 4)]
    assert step_spans(0, [0]) == []
    assert step_spans(3, [0, 3, 1]) == [(0, 1), (1, 3)]  # unsorted boundaries


def test_tree_with_a_one_third_node_and_an_all_wrong_subtree():
    paths = label_paths(TREE1, CORRECT1)
    a, b, c = paths
    assert a.spans == [(0, 2), (2, 5)] and a.values == [pytest.approx(1 / 3), 1.0]
    assert b.spans == [(0, 2), (2, 3), (3, 4)] and b.values == [pytest.approx(1 / 3), 0.0, 0.0]
    assert c.spans == [(0, 2), (2, 3), (3, 5)] and c.values == [pytest.approx(1 / 3), 0.0, 0.0]
    assert a.node_leaves == [3, 1] and a.node_correct == [1, 1]
    assert b.node_leaves == [3, 2, 1] and b.node_correct == [1, 0, 0]
    labels, kinds = apply_target(b.values, "edu")
    assert kinds == ["soft", "hard", "hard"] and labels[0] == pytest.approx(1 / 3)
    assert apply_target(b.values, "soft") == (labels, kinds)
    # Math-Shepherd hard target: 1[v > 0] turns the 1/3 node into a positive label
    assert apply_target(b.values, "hard") == ([1.0, 0.0, 0.0], ["hard"] * 3)
    assert apply_target(a.values, "hard") == ([1.0, 1.0], ["hard", "hard"])


def test_root_level_all_correct_subtree_and_anchor_at_zero():
    x, y, z = label_paths(TREE3, CORRECT3)
    assert x.spans == [(0, 2), (2, 3)] and x.values == [1.0, 1.0]
    assert y.spans == [(0, 2)] and y.values == [0.0]  # the anchor at 0 gives no empty first step
    assert z.values == [1.0, 1.0] and z.node_leaves == [2, 1]
    assert apply_target(x.values, "edu") == ([1.0, 1.0], ["hard", "hard"])
    assert apply_target([0.0, 0.5], "hard") == ([0.0, 1.0], ["hard", "hard"])
    with pytest.raises(ValueError, match="target"):
        apply_target([0.5], "bogus")


def test_count_tree_checks_lengths():
    with pytest.raises(ValueError, match="correctness"):
        count_tree(TREE1, [True])


def _fake_decode(ids):
    return " ".join(str(i) for i in ids)


def test_extra_rollouts_count_for_the_node_and_its_ancestors():
    calls = []
    replies = {(9, 1, 2): [r"\boxed{5}", r"\boxed{4}"], (9, 1, 2, 6): [r"so \boxed{5}", r"\boxed{5}"]}

    def rollout(prompts):
        calls.append([tuple(p) for p in prompts])
        return [replies[tuple(p)] for p in prompts]

    tree = JudgedTree(TREE1, CORRECT1, prompt_ids=[9], gold="5")
    # m = 3: only node (1,2,6) (2 leaves) gets rollouts: 2 of 2 correct -> (0+2)/(2+2); ancestor (1,2): 3/5
    (a, b, c), = label_trees([tree], min_leaves=3, rollout=rollout, decode=_fake_decode)
    assert calls == [[(9, 1, 2, 6)]]
    assert b.values == [pytest.approx(3 / 5), pytest.approx(1 / 2), 0.0]
    assert b.node_leaves == [5, 4, 1] and b.node_rollouts == [2, 2, 0] and b.node_correct == [3, 2, 0]
    assert a.values == [pytest.approx(3 / 5), 1.0]  # leaf nodes keep their own correctness
    # m = 4: (1,2) also gets rollouts (1 of 2 correct); a descendant's rollouts do not reach it twice
    calls.clear()
    (a, b, c), = label_trees([tree], min_leaves=4, rollout=rollout, decode=_fake_decode)
    assert calls == [[(9, 1, 2), (9, 1, 2, 6)]]
    assert b.values == [pytest.approx((1 + 1 + 2) / (3 + 2 + 2)), pytest.approx(2 / 4), 0.0]
    assert b.node_leaves == [7, 4, 1] and b.node_rollouts == [4, 2, 0]  # (1,2)'s rollouts skip its descendant
    # without a rollout function nothing can be added
    with pytest.raises(ValueError, match="rollout"):
        label_trees([tree], min_leaves=3)
    assert label_trees([tree], min_leaves=0)[0][1].values == [pytest.approx(1 / 3), 0.0, 0.0]


# A fake tokenizer: id -> decoded text; "\n" inside a token ends a line step after that token.
TEXTS = ["1", " +", " 2", " = 3", "\n", "So", r" \boxed{3}", ".\n", "x"]


def test_line_step_spans_split_after_newline_tokens():
    assert line_step_spans([0, 1, 2, 3, 4, 5, 6], TEXTS) == [(0, 5), (5, 7)]
    assert line_step_spans([0, 3, 7, 5, 4], TEXTS) == [(0, 3), (3, 5)]  # ".\n" ends a step; trailing "\n" too
    assert line_step_spans([5, 6], TEXTS) == [(0, 2)]
    with pytest.raises(ValueError, match="outside"):
        line_step_spans([0, 99], TEXTS)


def test_shepherd_labels_with_a_stub_rollout():
    text = lambda ids: "".join(TEXTS[i] for i in ids)
    l0 = leaf(0, [0, 1, 2, 3, 4, 5, 6], [])  # "1 + 2 = 3\nSo \boxed{3}"  (correct)
    l1 = leaf(1, [0, 1, 2, 3, 4, 8, 4, 5, 6], [])  # same first line, then "x\n", then the answer (say wrong)
    prompt = [42]
    replies = {  # 3 of 4 completions after line 1 are correct; none after "x\n"
        (42, 0, 1, 2, 3, 4): ["So \\boxed{3}", "\\boxed{3}", "\\boxed{4}", "So \\boxed{3}."],
        (42, 0, 1, 2, 3, 4, 8, 4): ["\\boxed{7}", "none", "\\boxed{2}", "\\boxed{6}"],
    }
    calls = []

    def rollout(prompts):
        calls.append([tuple(p) for p in prompts])
        return [replies[tuple(p)] for p in prompts]

    (p0, p1), = label_shepherd([JudgedTree([l0, l1], [True, False], prompt, gold="3")], TEXTS, rollout=rollout,
                               decode=text)
    assert calls == [[(42, 0, 1, 2, 3, 4), (42, 0, 1, 2, 3, 4, 8, 4)]]  # the shared first line rolled out once
    assert p0.spans == [(0, 5), (5, 7)] and p0.values == [0.75, 1.0]
    assert p1.spans == [(0, 5), (5, 7), (7, 9)] and p1.values == [0.75, 0.0, 0.0]
    assert p1.node_leaves == [4, 4, 1] and p1.node_correct == [3, 0, 0] and p1.node_rollouts == [4, 4, 0]
    assert apply_target(p1.values, "hard") == ([1.0, 0.0, 0.0], ["hard"] * 3)  # hard = any completion correct
    assert apply_target(p1.values, "soft") == ([0.75, 0.0, 0.0], ["soft", "hard", "hard"])
