"""The EDU anchor rule, branch candidates, fork priority and the fork plan, on tiny hand-built arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edu_prm_jax.sampling.anchors import anchor_qualifies, branch_candidates, fork_plan, fork_priority

T, F = True, False


def _symbols(vocab, *ids):
    mask = np.zeros(vocab, bool)
    mask[list(ids)] = True
    return jnp.asarray(mask)


def _plan(candidates, priority, used, topk, branch_k):
    """fork_plan on one question ([M] inputs, topk [M, K]); numpy [M] outputs."""
    plan = fork_plan(jnp.asarray([candidates]), jnp.asarray([priority], jnp.float32), jnp.asarray([used]),
                     jnp.asarray([topk], jnp.int32), branch_k)
    return {name: np.asarray(getattr(plan, name))[0] for name in ("source", "child_token", "is_child", "is_anchor")}


# ------------------------------------------------------------------------------------------- anchor_qualifies


def test_threshold_is_strictly_greater():
    entropy = jnp.asarray([0.5, 1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 3.0], jnp.float32)
    got = anchor_qualifies(entropy, jnp.zeros(4, jnp.int32), 1.0, _symbols(8))
    assert np.asarray(got).tolist() == [F, F, T, T]  # H == tau is not an anchor


def test_traced_tau_gives_the_same_answer_under_jit():
    entropy = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
    rule = jax.jit(lambda tau: anchor_qualifies(entropy, jnp.zeros(3, jnp.int32), tau, _symbols(4)))
    assert np.asarray(rule(jnp.float32(1.0))).tolist() == [F, F, T]
    assert np.asarray(rule(jnp.float32(0.5))).tolist() == [F, T, T]


def test_a_symbol_top1_never_qualifies_whatever_the_entropy():
    entropy = jnp.full((4,), 9.0, jnp.float32)
    top1 = jnp.asarray([3, 5, 7, 5], jnp.int32)
    assert np.asarray(anchor_qualifies(entropy, top1, 1.0, _symbols(8, 5))).tolist() == [T, F, T, F]
    assert np.asarray(anchor_qualifies(entropy, top1, 1.0, _symbols(8))).tolist() == [T, T, T, T]  # empty set


def test_the_rule_is_the_conjunction_of_threshold_and_symbol_set():
    """Against a plain numpy statement of METHOD.md's rule, with entropies that hit tau exactly."""
    rng = np.random.default_rng(0)
    vocab, tau = 10, 1.25
    entropy = rng.choice([0.0, 0.75, tau, 1.5, 4.0], size=200).astype(np.float32)
    top1 = rng.integers(0, vocab, 200)
    symbols = rng.random(vocab) < 0.3
    got = np.asarray(anchor_qualifies(jnp.asarray(entropy), jnp.asarray(top1, jnp.int32), tau,
                                      jnp.asarray(symbols)))
    want = np.array([h > tau and not symbols[t] for h, t in zip(entropy, top1, strict=True)])
    np.testing.assert_array_equal(got, want)
    higher = np.asarray(anchor_qualifies(jnp.asarray(entropy), jnp.asarray(top1, jnp.int32), 2.0,
                                         jnp.asarray(symbols)))
    assert not (higher & ~got).any()  # raising tau never creates an anchor


# ------------------------------------------------------------------------------------- candidates and priority


def test_max_anchors_caps_each_path():
    active = jnp.asarray([T, T, T, F, T])
    qualifies = jnp.asarray([T, T, F, T, T])
    n_anchors = jnp.asarray([1, 2, 0, 0, 3], jnp.int32)
    got = branch_candidates(active, qualifies, n_anchors, max_anchors=2)
    # slot 0: under the cap; 1: at the cap; 2: no anchor here; 3: finished; 4: over the cap
    assert np.asarray(got).tolist() == [T, F, F, F, F]
    assert np.asarray(branch_candidates(active, qualifies, n_anchors, max_anchors=4)).tolist() == [T, T, F, F, T]


def test_fork_priority_fixed_is_slot_order_budget_is_entropy():
    entropy = jnp.asarray([0.5, 2.0, 1.5], jnp.float32)
    slot = jnp.asarray([0, 1, 2], jnp.int32)
    assert np.asarray(fork_priority(entropy, slot, "fixed")).tolist() == [0.0, -1.0, -2.0]
    np.testing.assert_array_equal(np.asarray(fork_priority(entropy, slot, "budget")), np.asarray(entropy))


# ---------------------------------------------------------------------------------------------- fork_plan

ENTROPY = [0.5, 2.0, 1.5, 0.0]  # slot 1 is the most uncertain, then slot 2, then slot 0
SLOTS = np.arange(4)
TOPK = [[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]]  # [M, K]: top-1, top-2, top-3 of each slot


@pytest.mark.parametrize("mode, winner", [("fixed", 0), ("budget", 1)])
def test_one_free_slot_three_candidates(mode, winner):
    """Slots 0-2 run and all qualify, slot 3 is free: fixed gives it to slot 0, budget to slot 1 (highest H)."""
    prio = np.asarray(fork_priority(jnp.asarray(ENTROPY), jnp.asarray(SLOTS), mode))
    plan = _plan([T, T, T, F], prio, [T, T, T, F], [row[:2] for row in TOPK], branch_k=2)
    assert plan["source"].tolist() == [0, 1, 2, winner]
    assert plan["is_child"].tolist() == [F, F, F, T]
    assert plan["child_token"][3] == TOPK[winner][1]  # the child emits the winner's runner-up
    assert plan["is_anchor"].tolist() == [s == winner for s in range(4)]


@pytest.mark.parametrize("mode, order", [("fixed", [0, 1]), ("budget", [1, 0])])
def test_two_free_slots_go_in_priority_order(mode, order):
    """Slots 0 and 1 fork into free slots 2 and 3: the higher-priority one takes the lower free slot."""
    prio = np.asarray(fork_priority(jnp.asarray(ENTROPY), jnp.asarray(SLOTS), mode))
    plan = _plan([T, T, F, F], prio, [T, T, F, F], [row[:2] for row in TOPK], branch_k=2)
    assert plan["source"].tolist() == [0, 1, *order]
    assert plan["child_token"].tolist()[2:] == [TOPK[s][1] for s in order]
    assert plan["is_anchor"].tolist() == [T, T, F, F]


def test_budget_ties_go_to_the_lower_slot():
    plan = _plan([T, T, T, F], [1.5, 2.0, 2.0, 0.0], [T, T, T, F], [row[:2] for row in TOPK], branch_k=2)
    assert plan["source"].tolist() == [0, 1, 2, 1]


def test_three_children_per_anchor_and_a_partial_fork_when_slots_run_out():
    """K=3 with 3 free slots and two candidates: the first (budget: slot 1) gets 2 children, slot 0 only its
    top-2 (it still forks, and keeps its top-1)."""
    plan = _plan([T, T, F, F, F], [1.2, 3.0, 0, 0, 0], [T, T, F, F, F], TOPK + [[50, 51, 52]], branch_k=3)
    assert plan["source"].tolist() == [0, 1, 1, 1, 0]
    assert plan["child_token"].tolist() == [0, 0, 21, 22, 11]
    assert plan["is_anchor"].tolist() == [T, T, F, F, F]


def test_free_slots_between_used_ones_are_found():
    """A slot freed in the middle (a pruned path) is reused; no candidate means no fork."""
    plan = _plan([F, F, T, F], [0, 0, 1, 0], [F, T, T, F], [row[:2] for row in TOPK], branch_k=2)
    assert plan["source"].tolist() == [2, 1, 2, 3]  # slot 0 is the first free slot
    none = _plan([F, F, F, F], [0, 0, 0, 0], [T, F, F, F], [row[:2] for row in TOPK], branch_k=2)
    assert none["source"].tolist() == [0, 1, 2, 3] and not none["is_child"].any() and not none["is_anchor"].any()


@pytest.mark.parametrize("branch_k", [2, 3])
def test_fork_plan_invariants_on_random_pools(branch_k):
    """Properties any correct plan has: children only in free slots, each anchor gets its runners-up in order,
    as many forks as the free slots allow, and nobody is passed over by a lower-priority candidate."""
    rng = np.random.default_rng(branch_k)
    q_n, m_n, children = 16, 6, branch_k - 1
    plan_fn = jax.jit(fork_plan, static_argnums=4)
    for _ in range(10):
        used = rng.random((q_n, m_n)) < 0.5
        candidates = used & (rng.random((q_n, m_n)) < 0.7)
        priority = rng.choice([0.0, 1.0, 2.0, 3.0], size=(q_n, m_n)).astype(np.float32)  # with ties
        topk = rng.integers(0, 100, (q_n, m_n, branch_k)).astype(np.int32)
        plan = plan_fn(jnp.asarray(candidates), jnp.asarray(priority), jnp.asarray(used), jnp.asarray(topk),
                       branch_k)
        source, child_token, is_child, is_anchor = (np.asarray(x) for x in
                                                    (plan.source, plan.child_token, plan.is_child, plan.is_anchor))
        for q in range(q_n):
            n_free, n_cand = int((~used[q]).sum()), int(candidates[q].sum())
            assert not (is_child[q] & used[q]).any(), "a child took a slot that holds a path"
            assert not (is_anchor[q] & ~candidates[q]).any(), "a non-candidate forked"
            assert (source[q][~is_child[q]] == np.arange(m_n)[~is_child[q]]).all()
            assert is_child[q].sum() == min(n_free, n_cand * children)
            assert is_anchor[q].sum() == min(n_cand, -(-n_free // children))
            kids = {}
            for s in np.flatnonzero(is_child[q]):
                assert is_anchor[q, source[q, s]], "a child's source is not an anchor"
                kids.setdefault(int(source[q, s]), []).append(int(child_token[q, s]))
            for parent, tokens in kids.items():  # runners-up 1, 2, ... in free-slot order
                assert tokens == topk[q, parent, 1:1 + len(tokens)].tolist()
            for a in np.flatnonzero(candidates[q] & ~is_anchor[q]):  # passed over: everyone forking outranks it
                for b in np.flatnonzero(is_anchor[q]):
                    assert priority[q, b] > priority[q, a] or (priority[q, b] == priority[q, a] and b < a)
