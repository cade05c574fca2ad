"""OmegaPRM search (labeling/omega.py) with a scripted policy: binary search, Q + U selection, emitted labels,
lockstep batching, limits and undecided verdicts, each checked against a case worked by hand in the comments.

Toy tokenizer: token texts TEXTS; a line step ends after a token containing "\\n" ("a"+"\\n", "b"+"\\n", "c\\n").
Judge: the last line of decode(prefix) + rollout text; containing "?" -> undecided, ending in the gold "A" ->
correct, else wrong. The scripted policy answers each prompt (question token + state prefix ids) from a table
keyed on the question token and the prefix, and records every call.
"""

import dataclasses
import random
import zlib

import pytest

from edu_prm_jax.labeling.mc import JudgedTree
from edu_prm_jax.labeling.omega import LabelCost, OmegaConfig, label_omega, rollout_length, selection_score
from edu_prm_jax.records.trees import step_spans
from edu_prm_jax.sampling.engine import Leaf

#        0    1    2     3      4    5    6    7    8    9    10   11
TEXTS = ["a", "b", "\n", "c\n", "A", "B", "?", "Q", "R", "d", "S", "T"]
K = 4


def decode(ids):
    return "".join(TEXTS[i] for i in ids)


def judge(text, gold):
    last = text.split("\n")[-1]
    return None if "?" in last else last.endswith(gold)


@dataclasses.dataclass
class Sample:
    token_ids: list
    text: str


class Policy:
    """scripts: question token -> {state prefix: [k continuation id lists]}. `as_leaf` returns Leaf objects."""

    def __init__(self, scripts, as_leaf=False):
        self.scripts, self.as_leaf, self.calls = scripts, as_leaf, []

    def __call__(self, prompts):
        self.calls.append([tuple(p) for p in prompts])
        out = []
        for p in prompts:
            conts = self.scripts[p[0]][tuple(p[1:])]
            if self.as_leaf:
                out.append([Leaf(slot=j, parent_slot=-1, fork_pos=0, token_ids=list(c), entropies=[], logprobs=[],
                                 anchors=[], stop_reason="eos", text=decode(c)) for j, c in enumerate(conts)])
            else:
                out.append([Sample(list(c), decode(c)) for c in conts])
        return out


def question(token):
    return JudgedTree(leaves=[], correct=[], prompt_ids=[token], gold="A")


def run(scripts, tokens, as_leaf=False, **cfg):
    policy = Policy(scripts, as_leaf)
    result = label_omega([question(t) for t in tokens], TEXTS, rollout=policy, decode=decode, judge=judge,
                         config=OmegaConfig(k=K, **cfg))
    return result, policy.calls


def nodes(tree):
    return [(n.prefix, n.kind, n.mc) for n in tree.nodes]


def labels(paths):
    return [(tuple(p.token_ids), p.labels.spans, p.labels.values) for p in paths]


# Scenario 1. Root rollouts:
#   W  = a\n b\n c\n dB   ids (0,2 | 1,2 | 3 | 9,5): 4 line steps, 4 words, wrong
#   C1 = c\n A (3,4) correct;  C2 = a\n A (0,2,4) correct;  W2 = d\n d\n d\n d\n B: 5 words, wrong
#   MC(root) = 2/4 = 0.5 -> C1, C2 become solution nodes; W, W2 enter the pool; W (shorter) has the larger Q.
# Binary search on W, steps 0..3: mid = 1 -> state a\nb\n = (0,2,1,2): every rollout wrong, MC 0 -> left half
#   [0, 0]: mid = 0 -> state a\n = (0,2): 1 of 4 right ("dA"), MC 0.25 -> right half [1, 0]: empty, done.
#   The first wrong step of W is its step 2 ("b\n"); (0,2,1,2) is added with MC 0 (the negative label).
SCRIPT_1 = {
    (): [(0, 2, 1, 2, 3, 9, 5), (3, 4), (0, 2, 4), (9, 2, 9, 2, 9, 2, 9, 2, 5)],
    (0, 2, 1, 2): [(5,), (9, 5), (3, 5), (1, 5)],
    (0, 2): [(9, 4), (5,), (9, 5), (3, 5)],
}
ALL_RIGHT = {(): [(4,), (3, 4), (4,), (9, 4)]}  # MC(root) = 1: nothing to search
ALL_WRONG = {(): [(5,), (3, 5), (5,), (0, 2, 5)]}  # MC(root) = 0: nothing to search, nothing emitted


def test_binary_search_finds_the_first_wrong_step():
    result, calls = run({7: SCRIPT_1}, [7], max_search_count=1)
    assert calls == [[(7,)], [(7, 0, 2, 1, 2)], [(7, 0, 2)]]  # root, then the midpoint (step 2), then step 1
    (tree,) = result.trees
    assert nodes(tree) == [((), "root", 0.5), ((3, 4), "solution", 1.0), ((0, 2, 4), "solution", 1.0),
                           ((0, 2, 1, 2), "state", 0.0), ((0, 2), "state", 0.25), ((0, 2, 9, 4), "solution", 1.0)]
    assert tree.searches == 1 and tree.stop == "search_count"
    # parents from prefixes: a\n (0,2) is the parent of the first-error state and of both solutions through it
    assert [n.parent for n in tree.nodes] == [-1, 0, 4, 4, 0, 4]
    bad = [p for p in result.paths[0] if p.token_ids == [0, 2, 1, 2]][0]
    assert bad.labels.spans == [(0, 2), (2, 4)] and bad.labels.values == [0.25, 0.0]  # step 2 is the first error
    assert bad.labels.node_leaves == [4, 4] and bad.labels.node_correct == [1, 0] and not bad.labels.correct
    # judged on decode(prefix) + rollout text: "a\n" + "dA" is the one right answer at (0,2)
    assert tree.nodes[4].correct == 1 and tree.nodes[4].rollouts == 4


def test_emitted_labels_with_reused_states_and_final_nodes():
    # Root rollouts: W (4 words), W3 = a\n b\n dB (3 words, wrong), C1 (right), W2 (5 words): MC(root) = 1/4.
    script = {(): [(0, 2, 1, 2, 3, 9, 5), (0, 2, 1, 2, 9, 5), (3, 4), (9, 2, 9, 2, 9, 2, 9, 2, 5)],
              (0, 2, 1, 2): SCRIPT_1[(0, 2, 1, 2)], (0, 2): SCRIPT_1[(0, 2)]}
    # search 1: W3 (shortest). mid=1 -> (0,2,1,2) MC 0 -> mid=0 -> (0,2) MC 1/4; pool += B, dB, c\nB of (0,2)
    # search 2: N = root 2 (1 estimate + 1 selection), (0,2,1,2) 1, (0,2) 1, sum 4. Q+U (L=500, c=0.125):
    #   W at root: 0.5^0.75*0.9^(4/500) + 0.125*2/3 = 0.59410 + 0.08333;  B at (0,2): 0.5^0.75*0.9^(1/500) +
    #   0.125*2/2 = 0.59448 + 0.125 -> B. One line = the whole rollout: final node (0,2,5), value 0, no rollouts.
    # search 3: sum N = 5, N(0,2) = 2: W 0.59410 + 0.125*sqrt(5)/3 = 0.68727; dB 0.59448 + 0.09317 = 0.68765
    #   -> dB: final node (0,2,9,5).
    # search 4: sum N = 6, N(0,2) = 3: W 0.59410 + 0.125*sqrt(6)/3 = 0.69616; c\nB 0.5^0.75*0.9^(2/500) +
    #   0.125*sqrt(6)/4 = 0.59435 + 0.07655 = 0.67090 -> W: mid=1 -> (0,2,1,2) is known (MC 0, reused) ->
    #   mid=0 -> (0,2) known (MC 1/4) -> done, no rollouts.
    result, calls = run({8: script}, [8], max_search_count=4)
    assert calls == [[(8,)], [(8, 0, 2, 1, 2)], [(8, 0, 2)]]  # searches 2-4 sample nothing
    (tree,) = result.trees
    assert tree.searches == 4 and tree.rollouts == 12 and tree.stop == "search_count"
    assert nodes(tree)[5:] == [((0, 2, 5), "final", 0.0), ((0, 2, 9, 5), "final", 0.0)]
    assert labels(result.paths[0]) == [
        ((3, 4), [(0, 2)], [1.0]),
        ((0, 2, 1, 2), [(0, 2), (2, 4)], [0.25, 0.0]),
        ((0, 2, 9, 4), [(0, 2), (2, 4)], [0.25, 1.0]),
        ((0, 2, 5), [(0, 2), (2, 3)], [0.25, 0.0]),
        ((0, 2, 9, 5), [(0, 2), (2, 4)], [0.25, 0.0]),
    ]
    final = result.paths[0][3]
    assert final.slot == 3 and final.labels.node_leaves == [4, 1] and final.labels.node_correct == [1, 0]
    assert final.labels.node_rollouts == [4, 0] and final.labels.correct is False
    assert [p.labels.correct for p in result.paths[0]] == [True, False, True, False, False]
    # the Leaf view gives the same spans through records.trees.step_spans (what commands/label.py cuts by)
    leaf = final.leaf()
    assert step_spans(len(leaf.token_ids), leaf.anchors) == final.labels.spans and leaf.slot == 3


def test_selection_score_by_hand():
    cfg = OmegaConfig(length_scale=10.0)
    # Q = 0.5^(1-0.5) * 0.9^(3/10) = 0.685106, U = 0.125*sqrt(3)/(1+2) = 0.072169
    assert selection_score(0.5, 3, 2, 3, cfg) == pytest.approx(0.757275, abs=1e-6)
    # Q = 0.5^(1-0.25) * 0.9^(2/10) = 0.582205, U = 0.125*sqrt(3)/(1+1) = 0.108253
    assert selection_score(0.25, 2, 1, 3, cfg) == pytest.approx(0.690458, abs=1e-6)
    assert selection_score(0.25, 2, 1, 0, cfg) == pytest.approx(0.582205 + 0.125 / 2, abs=1e-6)  # sum 0 -> 1
    s = Sample([9, 2, 9, 2, 9, 5], "d\nd\ndB")
    assert rollout_length(s, "words") == 3 and rollout_length(s, "tokens") == 6


@pytest.mark.parametrize("c_puct, second", [(0.125, (8, 1, 2, 1, 2)), (0.5, (8, 0, 2, 1, 2))])
def test_q_plus_u_picks_the_hand_computed_pair(c_puct, second):
    # Root: Wa = a\n B (2 words), Wb = b\n b\n dB (3 words), two right answers: MC(root) = 0.5.
    # Search 1: same U for both -> the shorter Wa. mid=0 -> (0,2): 1 of 4 right, MC 0.25, pool += E1 = b\n B
    #   (2 words), E2 (3 words), E3 (4 words); mid=1 = the whole of Wa: final node, value 0.
    # Search 2: N(root) = 2, N(0,2) = 1, sum 3; L = 10.
    #   c = 0.125: Wb 0.685106 + 0.125*sqrt3/3 = 0.757275 > E1 0.582205 + 0.125*sqrt3/2 = 0.690458 -> Wb
    #   c = 0.5:   Wb 0.685106 + 0.288675 = 0.973781 < E1 0.582205 + 0.433013 = 1.015218      -> E1
    #   Wb's first midpoint is b\nb\n = (1,2,1,2); E1's is (0,2) + b\n = (0,2,1,2).
    script = {(): [(0, 2, 5), (1, 2, 1, 2, 9, 5), (4,), (3, 4)],
              (0, 2): [(4,), (1, 2, 5), (9, 2, 9, 2, 9, 5), (3, 3, 3, 9, 5)],
              (1, 2, 1, 2): [(5,)] * K, (1, 2): [(5,)] * K, (0, 2, 1, 2): [(4,), (5,), (5,), (5,)]}
    result, calls = run({8: script}, [8], max_search_count=2, length_scale=10.0, c_puct=c_puct)
    assert calls[1] == [(8, 0, 2)] and calls[2] == [second]
    assert result.trees[0].nodes[0].visits == 2 + (c_puct == 0.125)  # 1 estimate + 1 or 2 selections


def test_lockstep_batching_one_call_per_round():
    # q7 and q10 follow scenario 1 (3 estimations each), q11 stops after its root (MC 1): 3 rounds.
    result, calls = run({7: SCRIPT_1, 10: SCRIPT_1, 11: ALL_RIGHT}, [7, 10, 11], as_leaf=True, max_search_count=1)
    assert calls == [[(7,), (10,), (11,)], [(7, 0, 2, 1, 2), (10, 0, 2, 1, 2)], [(7, 0, 2), (10, 0, 2)]]
    assert all(len({p[0] for p in call}) >= 2 for call in calls)  # every call serves several questions
    assert result.cost.calls == len(calls) == 3
    assert result.cost.queries == 4 * 7  # 7 requests of k = 4
    # tokens: root of scenario 1: 7+2+3+9, (0,2,1,2): 1+2+2+2, (0,2): 2+1+2+2; ALL_RIGHT root: 1+2+1+2
    assert result.cost.tokens == 2 * (21 + 7 + 7) + 6
    alone, _ = run({7: SCRIPT_1}, [7], max_search_count=1)
    assert labels(result.paths[0]) == labels(alone.paths[0]) == labels(result.paths[1])  # batching changes nothing
    # MC(root) = 1: each distinct right rollout is a one-step path with value 1 ((4,) came twice: one node)
    assert labels(result.paths[2]) == [((4,), [(0, 1)], [1.0]), ((3, 4), [(0, 2)], [1.0]), ((9, 4), [(0, 2)], [1.0])]
    assert result.trees[2].stop == "pool"


def test_search_count_and_budget_stop_the_search():
    result, calls = run({7: SCRIPT_1}, [7], max_search_count=0)
    assert len(calls) == 1 and result.trees[0].stop == "search_count" and result.trees[0].searches == 0
    # no search: each right root rollout is one edge root -> solution (a\n is no node yet)
    assert labels(result.paths[0]) == [((3, 4), [(0, 2)], [1.0]), ((0, 2, 4), [(0, 3)], [1.0])]
    result, calls = run({7: SCRIPT_1}, [7], max_search_count=20, rollout_budget=4)
    assert len(calls) == 1 and result.trees[0].stop == "budget"  # 4 root rollouts: budget spent
    # budget 5: 4 < 5 so one search starts and runs to its end (12 rollouts), then the budget stops the next one
    # although the pool still holds W2 and the three wrong rollouts of (0,2)
    result, calls = run({7: SCRIPT_1}, [7], max_search_count=20, rollout_budget=5)
    assert len(calls) == 3 and result.trees[0].stop == "budget" and result.trees[0].searches == 1
    assert result.cost == LabelCost(tokens=35, queries=12, calls=3)
    for script in (ALL_RIGHT, ALL_WRONG):  # MC(root) in {0, 1}: the pool stays empty
        result, calls = run({7: script}, [7])
        assert len(calls) == 1 and result.trees[0].stop == "pool" and result.trees[0].searches == 0
    assert result.paths == [[]]  # all wrong: no path


def test_undecided_verdicts_are_left_out():
    # Root: a\n dB (wrong), A (right), ? and d? (undecided): MC = 1/2 of 2 decided, 2 undecided.
    # The search on a\n dB: mid=0 -> (0,2): A right, B wrong, ? and d? undecided -> MC 1/2; mid=1 -> final.
    script = {(): [(0, 2, 9, 5), (4,), (6,), (9, 6)], (0, 2): [(4,), (6,), (5,), (9, 6)]}
    result, calls = run({7: script}, [7], max_search_count=1)
    root = result.trees[0].nodes[0]
    assert (root.mc, root.decided, root.correct, root.undecided) == (0.5, 2, 1, 2)
    path = result.paths[0][-1]
    assert path.token_ids == [0, 2, 9, 5] and path.labels.values == [0.5, 0.0]
    assert path.labels.node_leaves == [2, 1] and path.labels.node_correct == [1, 0]
    assert path.labels.node_rollouts == [2, 0] and path.labels.node_undecided == [2, 0]
    # a state whose verdicts are all undecided has no MC: not added, and its search stops there
    script[(0, 2)] = [(6,), (9, 6), (6,), (6,)]
    result, calls = run({7: script}, [7], max_search_count=1)
    assert calls == [[(7,)], [(7, 0, 2)]]
    assert [n.prefix for n in result.trees[0].nodes] == [(), (4,)] and labels(result.paths[0]) == [
        ((4,), [(0, 1)], [1.0])]
    # an all-undecided root: no value, nothing searched, nothing emitted
    result, calls = run({7: {(): [(6,)] * K}}, [7])
    assert result.trees[0].nodes[0].mc is None and result.paths == [[]] and len(calls) == 1


class RandomPolicy:
    """Any prompt -> k continuations of 1-4 random lines ending in A (right), B (wrong) or ? (undecided), drawn
    from a generator seeded by the prompt ids (zlib.crc32: the same prompt always gets the same samples)."""

    def __init__(self):
        self.calls, self.tokens = [], 0

    def __call__(self, prompts):
        self.calls.append([tuple(p) for p in prompts])
        out = []
        for p in prompts:
            rng = random.Random(zlib.crc32(bytes(p)))
            conts = []
            for _ in range(K):
                ids = [t for _ in range(rng.randint(0, 3)) for t in (rng.choice([0, 1, 9]), 2)]
                ids.append(rng.choices([4, 5, 6], weights=[4, 5, 1])[0])
                conts.append(Sample(ids, decode(ids)))
            self.tokens += sum(len(c.token_ids) for c in conts)
            out.append(conts)
        return out


def test_deterministic_and_cost_matches_what_the_policy_returned():
    qs = [question(t) for t in (7, 8, 10, 11, 12)]
    cfg = OmegaConfig(k=K, max_search_count=6, rollout_budget=40)
    runs = []
    for _ in range(2):
        policy = RandomPolicy()
        runs.append((label_omega(qs, TEXTS, rollout=policy, decode=decode, judge=judge, config=cfg), policy))
    (a, pa), (b, pb) = runs
    assert a == b and pa.calls == pb.calls  # same rollouts -> the same requests, trees, labels and cost
    assert a.cost == LabelCost(tokens=pa.tokens, queries=K * sum(len(c) for c in pa.calls), calls=len(pa.calls))
    assert len(pa.calls) > 2 and any(len(c) > 1 for c in pa.calls)
    for tree, paths in zip(a.trees, a.paths):
        assert tree.searches <= 6
        for p in paths:  # spans tile the path's ids, every step has a value in [0, 1]
            assert p.labels.spans[0][0] == 0 and p.labels.spans[-1][1] == len(p.token_ids)
            assert all(s1[1] == s2[0] for s1, s2 in zip(p.labels.spans, p.labels.spans[1:]))
            assert all(0.0 <= v <= 1.0 for v in p.labels.values) and p.labels.labelled


@pytest.mark.parametrize("field, value", [("k", 0), ("k", 2.0), ("alpha", 0.0), ("beta", 1.5), ("c_puct", -1.0),
                                          ("length_scale", 0.0), ("length_unit", "chars"), ("max_search_count", -1),
                                          ("rollout_budget", True)])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"OmegaConfig.{field}"):
        OmegaConfig(**{field: value})


def test_bad_rollout_output_and_questions():
    with pytest.raises(ValueError, match="OmegaConfig.k = 4"):
        label_omega([question(7)], TEXTS, rollout=lambda ps: [[Sample([4], "A")]] * len(ps), decode=decode,
                    judge=judge, config=OmegaConfig(k=K))
    with pytest.raises(ValueError, match="2 results for 1 prompts"):
        label_omega([question(7)], TEXTS, rollout=lambda ps: [[], []], decode=decode, judge=judge)
    with pytest.raises(ValueError, match="question 0: no gold"):
        label_omega([JudgedTree([], [], [7])], TEXTS, rollout=Policy({}), decode=decode)
