"""MCTS-EDU (evaluation/mcts.py) against hand-worked trees, transformers' own logits, an unstopped EDU run, an
independent distinct-token count and a plain PRM forward; and one small search with the shipped toy policy."""

import dataclasses
import math

import jax
import numpy as np
import pytest
import torch
from hf_reference import make_peaked_qwen2
from tree_reference import distinct_prefixes

from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.evaluation.bon import prm_best
from edu_prm_jax.evaluation.mcts import (
    MCTSConfig,
    Node,
    backup,
    children_from_leaves,
    exhausted,
    mcts_edu,
    node_value,
    select_leaf,
    uct,
)
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.prm import PRM
from edu_prm_jax.sampling.decode import DecodeParams, ExpansionParams, Tables, decode
from edu_prm_jax.sampling.engine import Leaf, slots_to_leaves
from edu_prm_jax.sampling.stopping import build_stop_tables
from edu_prm_jax.sampling.symbols import symbol_token_mask
from edu_prm_jax.toy.defaults import load_questions, resolve_policy

# ------------------------------------------------------------------------------ hand-worked selection/backup


def _node(parent, value, visits, value_sum, children=(), stop="anchor"):
    return Node(parent=parent, token_ids=[], anchors=[], logprobs=[], stop_reason=stop, value=value, visits=visits,
                value_sum=value_sum, children=list(children), expanded=bool(children))


def _hand_tree():
    """root(0) -> A(1), B(2); A -> A1(3), A2(4). Values A 0.7, B 0.5, A1 0.9, A2 0.8, each backed up once through
    its ancestors: N(A) = 3, W(A) = 0.7 + 0.9 + 0.8 = 2.4 (Q 0.8); N(root) = 4, W(root) = 2.4 + 0.5 = 2.9."""
    return [_node(-1, math.nan, 4, 2.9, [1, 2], stop=""), _node(0, 0.7, 3, 2.4, [3, 4]), _node(0, 0.5, 1, 0.5),
            _node(1, 0.9, 1, 0.9), _node(1, 0.8, 1, 0.8)]


def test_uct_selection_on_a_hand_worked_tree():
    nodes = _hand_tree()
    # c = 1: UCT(A) = 0.8 + sqrt(ln 4 / 3) = 1.4797780, UCT(B) = 0.5 + sqrt(ln 4 / 1) = 1.6774100 -> B
    assert uct(nodes, 1, 1.0) == pytest.approx(1.4797780, abs=1e-7)
    assert uct(nodes, 2, 1.0) == pytest.approx(1.6774100, abs=1e-7)
    assert select_leaf(nodes, 1.0) == 2
    # c = 0.5: UCT(A) = 0.8 + 0.5 sqrt(ln 4 / 3) = 1.1398890 > UCT(B) = 0.5 + 0.5 sqrt(ln 4) = 1.0887050 -> A;
    # in A (N = 3): UCT(A1) = 0.9 + 0.5 sqrt(ln 3) = 1.4240735 > UCT(A2) = 0.8 + 0.5 sqrt(ln 3) = 1.3240735 -> A1
    assert uct(nodes, 1, 0.5) == pytest.approx(1.1398890, abs=1e-7)
    assert uct(nodes, 2, 0.5) == pytest.approx(1.0887050, abs=1e-7)
    assert uct(nodes, 3, 0.5) == pytest.approx(1.4240735, abs=1e-7)
    assert uct(nodes, 4, 0.5) == pytest.approx(1.3240735, abs=1e-7)
    assert select_leaf(nodes, 0.5) == 3
    assert select_leaf(nodes, 0.0) == 3  # c = 0 is greedy on Q: A (0.8) over B (0.5), then A1 (0.9) over A2 (0.8)
    # nodes already picked this round are skipped, and so is a subtree with no other open node
    assert select_leaf(nodes, 0.5, {3}) == 4
    assert select_leaf(nodes, 0.5, {3, 4}) == 2
    assert select_leaf(nodes, 0.5, {2, 3, 4}) is None
    # a terminal node is never selected again; a subtree of terminal nodes is exhausted
    nodes[3].stop_reason = "answer"
    assert select_leaf(nodes, 0.5) == 4
    nodes[4].stop_reason = "eos"
    assert exhausted(nodes, 1) and not exhausted(nodes)
    assert select_leaf(nodes, 0.5) == 2
    nodes[2].stop_reason = "max_new_tokens"
    assert exhausted(nodes) and select_leaf(nodes, 0.5) is None


def test_mean_backup_on_a_hand_worked_tree():
    nodes = _hand_tree()
    nodes += [_node(3, 0.2, 0, 0.0), _node(3, 0.6, 0, 0.0)]  # A1 expanded into children valued 0.2 and 0.6
    nodes[3].children, nodes[3].expanded = [5, 6], True
    backup(nodes, 5, 0.2)
    backup(nodes, 6, 0.6)
    # A1: N = 1 + 2 = 3, W = 0.9 + 0.2 + 0.6 = 1.7; A: N = 5, W = 2.4 + 0.8 = 3.2 (Q 0.64);
    # root: N = 6, W = 2.9 + 0.8 = 3.7, Q = mean(0.7, 0.5, 0.9, 0.8, 0.2, 0.6) = 0.6166667; B unchanged
    expected = {0: (6, 3.7), 1: (5, 3.2), 2: (1, 0.5), 3: (3, 1.7), 4: (1, 0.8), 5: (1, 0.2), 6: (1, 0.6)}
    for i, (n, w) in expected.items():
        assert nodes[i].visits == n and nodes[i].value_sum == pytest.approx(w, abs=1e-12), i
    assert nodes[0].q == pytest.approx(0.6166667, abs=1e-7) and nodes[1].q == pytest.approx(0.64, abs=1e-12)
    # the exploration bonus moves: UCT(A) = 0.64 + 0.5 sqrt(ln 6 / 5) = 0.9393125 < UCT(B) = 0.5 + 0.5 sqrt(ln 6)
    # = 1.1692831, so c = 0.5 now picks B (it picked A1 before the backup)
    assert uct(nodes, 1, 0.5) == pytest.approx(0.9393125, abs=1e-7)
    assert uct(nodes, 2, 0.5) == pytest.approx(1.1692831, abs=1e-7)
    assert select_leaf(nodes, 0.5) == 2


def test_node_value_and_config_checks():
    assert node_value([0.9, 0.3, 0.7], "step") == 0.7  # the newest step
    assert node_value([0.9, 0.3, 0.7], "path_min") == 0.3
    assert node_value([], "step") == 0.0
    with pytest.raises(ValueError, match="MCTSConfig.value"):
        MCTSConfig(value="mean")
    with pytest.raises(ValueError, match="MCTSConfig.c_uct"):
        MCTSConfig(c_uct=-1.0)
    with pytest.raises(ValueError, match="MCTSConfig.aggregator"):
        MCTSConfig(aggregator="max")
    with pytest.raises(ValueError, match="mode must be 'edu'"):
        ExpansionParams(mode="greedy", num_leaves=1)


def test_children_from_hand_built_leaves():
    node = Node(parent=0, token_ids=[5, 6], anchors=[], logprobs=[-0.5, -0.5], stop_reason="anchor")

    def leaf(slot, ids, fork_pos, stop):  # slot 0 forked at 2 into slots 1 and 2 (all carry anchor 2)
        return Leaf(slot, 0 if slot else -1, fork_pos, ids, [0.0] * len(ids), [-0.1] * len(ids), [2], stop)

    leaves = [leaf(0, [10, 11, 12, 13], 0, "anchor"), leaf(1, [10, 11, 20, 21, 22, 23, 24, 25], 2, "eos"),
              leaf(2, [10, 11, 30], 2, "anchor")]
    # cap 8: the node has 2 tokens, so 6 more per path; slot 1 (8 new tokens) is cut to 6 and ends there
    new = children_from_leaves(node, leaves, max_new_tokens=8)
    got = [(parent, n.token_ids, n.anchors, n.stop_reason) for parent, n in new]
    assert got == [(0, [5, 6, 10, 11], [2], "anchor"),  # the greedy stem before the fork: its own node
                   (1, [5, 6, 10, 11, 12, 13], [2, 4], "anchor"),
                   (1, [5, 6, 10, 11, 20, 21, 22, 23], [2, 4], "max_new_tokens"),
                   (1, [5, 6, 10, 11, 30], [2, 4], "anchor")]
    assert new[2][1].logprobs == [-0.5, -0.5] + [-0.1] * 6
    # cost: 2 (stem) + 2 + 4 + 1 = 9 = distinct prefixes of the new tokens
    assert sum(len(n.token_ids) - 2 - (2 if p else 0) for p, n in new) == 9
    assert distinct_prefixes([n.token_ids[2:] for _, n in new]) == 9
    # cap 3: one token left, before the fork: slot 0 alone, cut and terminal, its anchor dropped
    assert [(p, n.token_ids, n.anchors, n.stop_reason) for p, n in children_from_leaves(node, leaves, 3)] == \
        [(0, [5, 6, 10], [2], "max_new_tokens")]
    # cap 5: slot 2's path ends exactly at the cap before its next anchor: no token left, so it is terminal
    assert children_from_leaves(node, leaves, 5)[-1][1].stop_reason == "max_new_tokens"
    # a fork at the root's first position: the paths are the root's children, no stem
    root = Node(parent=-1, token_ids=[], anchors=[], logprobs=[], stop_reason="")
    first = [Leaf(0, -1, 0, [7, 8], [0, 0], [0, 0], [0], "eos"), Leaf(1, 0, 0, [9], [0], [0], [0], "anchor")]
    assert [(p, n.token_ids, n.anchors, n.stop_reason) for p, n in children_from_leaves(root, first, 10)] == \
        [(0, [7, 8], [], "eos"), (0, [9], [], "anchor")]


# ---------------------------------------------------------------------------------- the in-graph anchor stop

V = 48
EOS = V - 1


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A random tiny Qwen2 whose LM head is scaled up, so entropies range from near 0 to near log V."""
    d = tmp_path_factory.mktemp("peaked_mcts")
    make_peaked_qwen2(d, vocab=V, seed=3)
    return load_hf_model(d)


def test_anchor_stop_ends_each_path_at_its_next_anchor(peaked_model):
    """ExpansionParams vs the same EDU run without the stop (max_anchors = 1, so a path may fork once): every
    path must equal the unstopped one up to its first `high_entropy` position after its fork and end there
    (reason "anchor"), or, when there is none, equal it entirely."""
    symbols = np.zeros(V, bool)
    symbols[::5] = True
    tables = Tables.build(build_stop_tables([f"t{i}" for i in range(V)], V, [EOS]), symbols, V, V)
    q_n, k = 8, 3
    prompts = np.random.default_rng(11).integers(0, V - 1, (q_n, 6)).astype(np.int32)
    base = dict(mode="edu", num_leaves=k, branch_k=k, max_anchors=1, max_new_tokens=16, tau=0.6)
    args = (tables, prompts, np.full(q_n, 6), np.arange(q_n))
    free = decode(DecodeParams(**base), peaked_model, *args)
    stopped = decode(ExpansionParams(**base), peaked_model, *args)
    seen = {"cut": 0, "forked": 0, "fork_at_0": 0}
    for q in range(q_n):
        free_leaves, stop_leaves = slots_to_leaves(free, q * k, k), slots_to_leaves(stopped, q * k, k)
        assert [f.slot for f in free_leaves] == [s.slot for s in stop_leaves]
        for f, s in zip(free_leaves, stop_leaves):
            fork = f.anchors[0] if f.anchors else -1  # slot 0's anchor; its children inherit it
            later = [t for t in f.high_entropy if t > fork]
            if later:
                assert s.token_ids == f.token_ids[:later[0]] and s.stop_reason == "anchor"
                seen["cut"] += 1
            else:
                assert s.token_ids == f.token_ids and s.stop_reason == f.stop_reason
            assert (s.anchors, s.fork_pos, s.parent_slot) == (f.anchors, f.fork_pos, f.parent_slot)
            seen["forked"] += bool(f.anchors)
            seen["fork_at_0"] += f.anchors == [0]
    assert all(seen.values()), seen  # the prompts exercise a cut, a fork, and a fork at the first position


# ------------------------------------------------------------------------------- a small search, toy policy


@pytest.fixture(scope="module")
def toy_search():
    policy_dir = resolve_policy("toy")
    model, tokenizer = load_model(policy_dir), load_tokenizer(policy_dir)
    prm = PRM.from_policy(model, head="scalar", seed=0)  # the policy's backbone and a random scalar head
    questions = load_questions("toy:test:3")
    prompts = [tokenizer.apply_chat_template(q["problem"]) for q in questions]
    golds = [q["answer"] for q in questions]
    params = DecodeParams(max_new_tokens=48, tau=0.1, branch_k=3)
    config = MCTSConfig(c_uct=1.0, batch_nodes=4, prompt_bucket=64)
    budget = 60
    run = lambda **kw: mcts_edu(model, prm, tokenizer, prompts, golds, budget_tokens=budget,  # noqa: E731
                                params=params, config=dataclasses.replace(config, **kw))
    return dict(model=model, tokenizer=tokenizer, prm=prm, prompts=prompts, params=params, budget=budget,
                results=run(), run=run, policy_dir=policy_dir)


def test_toy_search_budget_cost_and_answer(toy_search):
    params, budget = toy_search["params"], toy_search["budget"]
    results = toy_search["results"]
    assert len(results) == 3 and any(len(r.nodes) > 3 for r in results)
    for r in results:
        # cost: every generated token once, the same unit as EDU's distinct_tokens (independent count)
        assert r.tokens_spent == sum(r.round_tokens) == distinct_prefixes(n.token_ids for n in r.nodes)
        # the bound: a question takes part in a round only while it is under budget, and one round is one
        # expansion here (expansions_per_round = 1) of at most K paths of at most max_new_tokens tokens
        assert sum(r.round_tokens[:-1]) < budget
        assert r.round_tokens[-1] <= params.branch_k * params.max_new_tokens
        assert r.tokens_spent >= budget or r.exhausted
        terminal = [i for i, n in enumerate(r.nodes) if n.terminal]
        assert r.terminal_nodes == terminal and len(r.candidates) == len(terminal)
        assert all(len(n.token_ids) <= params.max_new_tokens for n in r.nodes)
        assert r.chosen is prm_best(r.candidates, "min") and (r.chosen is None) == (not terminal)
        for i, n in enumerate(r.nodes):  # mean backup: N and W of a node are its own plus its children's
            below = [r.nodes[c] for c in n.children]
            own = 0 if i == 0 else 1
            assert n.visits == own + sum(c.visits for c in below)
            assert n.value_sum == pytest.approx((0 if i == 0 else n.value) + sum(c.value_sum for c in below))


def test_toy_search_expansions_fork_the_top_k_tokens_at_the_anchor(toy_search):
    """Children share their parent's tokens and differ at the fork, which is the policy's top-K at the parent's
    end (transformers' own float32 logits on prompt + parent); the parent's end qualifies as an anchor; an open
    child ends at its first qualifying position after the fork. Entropies within 1e-3 of tau are not judged."""
    from transformers import AutoModelForCausalLM

    tok, params = toy_search["tokenizer"], toy_search["params"]
    hf = AutoModelForCausalLM.from_pretrained(toy_search["policy_dir"], torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    symbols = symbol_token_mask(tok, size=toy_search["model"].cfg.vocab_size)

    def logits(ids):  # [len(ids), V] float64: the row at j predicts token j + 1
        with torch.no_grad():
            return hf(torch.as_tensor([ids])).logits[0].double().numpy()

    def qualifies(z):
        z = z - z.max()
        p = np.exp(z) / np.exp(z).sum()
        h = -(p * np.log(np.where(p > 0, p, 1))).sum()
        return None if abs(h - params.tau) < 1e-3 else bool(h > params.tau and not symbols[int(np.argmax(z))])

    forks = 0
    for r, prompt in zip(toy_search["results"], toy_search["prompts"]):
        prompt_ids = tok.encode(prompt)
        for n in r.nodes:
            if len(n.children) < 2:
                continue
            d = len(n.token_ids)
            kids = [r.nodes[c] for c in n.children]
            assert all(c.token_ids[:d] == n.token_ids for c in kids)
            z = logits(prompt_ids + n.token_ids)[-1]
            top = list(np.argsort(-z, kind="stable")[:params.branch_k])
            assert [c.token_ids[d] for c in kids] == top  # slot order: top-1, top-2, ...
            assert qualifies(z) is not False
            forks += 1
            for c in kids:
                z_path = logits(prompt_ids + c.token_ids)[len(prompt_ids) - 1:]  # row j: position j's choice
                inside = [qualifies(z_path[j]) for j in range(d + 1, len(c.token_ids))]
                assert True not in inside  # no anchor strictly inside the new step
                if c.stop_reason == "anchor":
                    assert qualifies(z_path[len(c.token_ids)]) is not False
    assert forks > 0


def test_toy_search_values_are_the_prm_score_of_the_newest_step(toy_search):
    """A node's value is sigmoid(PRM logit) at its last token (the scalar head reads a step at its last
    token), from one plain causal PRM forward of prompt + path, right-padded (later tokens cannot change it)."""
    prm, tok = toy_search["prm"], toy_search["tokenizer"]
    rows, nodes = [], []
    for r, prompt in zip(toy_search["results"], toy_search["prompts"]):
        ids = tok.encode(prompt)
        for n in r.nodes[1:]:
            rows.append(ids + n.token_ids)
            nodes.append(n)
    width = max(len(x) for x in rows)
    z = np.asarray(prm(jax.numpy.asarray([x + [0] * (width - len(x)) for x in rows])))
    for n, x, row in zip(nodes, rows, z):
        assert n.value == pytest.approx(1 / (1 + np.exp(-float(row[len(x) - 1]))), abs=1e-5)
        assert n.value == n.step_scores[-1]
    assert nodes


def test_toy_search_is_deterministic_and_expands_several_nodes_per_round(toy_search):
    again = toy_search["run"]()
    for a, b in zip(toy_search["results"], again):
        assert [n.token_ids for n in a.nodes] == [n.token_ids for n in b.nodes]
        assert [n.value for n in a.nodes] == [n.value for n in b.nodes]
        assert a.tokens_spent == b.tokens_spent
    budget, params = toy_search["budget"], toy_search["params"]
    wide = toy_search["run"](expansions_per_round=2)
    for r in wide:
        assert r.tokens_spent == sum(r.round_tokens) == distinct_prefixes(n.token_ids for n in r.nodes)
        assert sum(r.round_tokens[:-1]) < budget
        assert r.round_tokens[-1] <= 2 * params.branch_k * params.max_new_tokens
    assert any(len(r.round_tokens) < len(a.round_tokens) for r, a in zip(wide, again))  # fewer, wider rounds
