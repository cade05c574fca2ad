"""MCTS-EDU: PRM-guided tree search at inference whose nodes are EDU anchor-delimited prefixes (METHOD.md).

Nodes. A node is the question prompt plus generated tokens that end just before an anchor (a position where
`sampling.anchors.anchor_qualifies` holds: the next token would open a new step), or a terminal path (it ended
at EOS, a closed \\boxed{...} answer, a stop string or `max_new_tokens`). The root is the bare prompt. Every
node's tokens end at a step end, so its steps are its tokens cut at its anchors, exactly as an EDU leaf's.

Expansion reuses the sampler's in-graph fork (`sampling.decode.ExpansionParams`): from the node's prefix, EDU
sampling with num_leaves = branch_k = K and max_anchors = 1 decodes to the next anchor (greedy between anchors by
default), forks the top-K tokens there, and each of the K paths stops just before ITS next anchor (stop reason
"anchor", the one new in-graph stop, off in plain sampling) or ends. The K paths become the children; a path
that ended is a terminal child. When the fork is not at the node's first position (the root, whose first
position is rarely an anchor) the greedy stem before it becomes a node of its own with the K children below it,
so every node is an anchor-delimited prefix and every generated token belongs to exactly one node. A path that
reaches no anchor before it ends gives a single terminal child. The expansions of all questions' selected nodes
are one batched decode (`Sampler.sample_trees`, `batch_nodes` prefixes per call); the prefix is prefilled again
at every expansion (no KV cache is kept between rounds). Paths are capped at `max_new_tokens` generated tokens in
total: a child running past its share is cut there on the host and is terminal ("max_new_tokens"), which is
what an in-graph per-row cap would give, since what comes before the cut does not depend on what comes after.

Evaluation: the new nodes of a round are scored by `evaluation.candidates.score_records` (the PRM's step-end
scores of the node's path, cut at its anchors, as Best-of-N scores EDU leaves); a node's value is the score of
its newest step (`value="step"`, the default) or the min over its path's steps (`value="path_min"`).

Selection and backup: from the root, descend to the child with the highest UCT = Q + c * sqrt(ln N_parent /
N_child) (ties: the earlier child, i.e. the higher-ranked token) until an unexpanded open node. Q = W / N is the
mean of the values backed up through the node: each new node's value is added once to it and to each ancestor,
so N(node) counts the nodes evaluated in its subtree (itself included; the root has no value of its own) and Q
is their mean value. A terminal node, and a node whose children are all exhausted, is exhausted and never
selected again (so every round spends tokens); when the root is exhausted the search of that question ends.
With `expansions_per_round` E > 1 a question expands up to E distinct nodes per round: each later selection
skips the subtrees whose every open node is already selected this round.

Budget: `budget_tokens` generated tokens per question, counted as EDU counts a tree's `distinct_tokens` (each
generated token once; a node holds only the tokens below its parent, so the count is the sum over nodes). A
question takes part in a round only while it has spent less than its budget, and a round's expansions run to the
end, so the bound that holds is: tokens spent before its last round < budget_tokens, i.e. tokens_spent <
budget_tokens + (the tokens of its last round's E expansions); each expansion generates at most K paths of at
most `max_new_tokens` tokens. Fully explored trees stop early (`MCTSResult.exhausted`).

Answer: the terminal leaf with the best aggregated PRM step scores (`aggregator`, default min; `bon.prm_best`,
the earlier leaf on ties) among the terminal leaves found. A question with no terminal leaf has no answer and
counts as wrong: its best partial path is never graded, since a prefix cut mid-solution is not a solution.
`MCTSResult.candidates` (every terminal leaf, in creation order) lets any Best-of-N selector run on the search's
leaves (`bon.select_all`). Deterministic given the seed: randomness (only with edu_greedy=False) is keyed by the
sampler's (seed, node key, slot, step), node keys by CRC-32 of (question position, node index).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.evaluation.bon import prm_best
from edu_prm_jax.evaluation.candidates import GradedCandidate, score_records
from edu_prm_jax.sampling.decode import DecodeParams, ExpansionParams
from edu_prm_jax.sampling.engine import Leaf, Sampler
from edu_prm_jax.scoring.aggregate import AGGREGATORS

VALUES = ("step", "path_min")
OPEN, ROOT = "anchor", ""  # stop reasons of nodes that can be expanded; any other reason is terminal


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """Search settings of `mcts_edu` (the sampler's settings come as `DecodeParams`)."""

    c_uct: float = 1.0  # exploration constant c in UCT = Q + c * sqrt(ln N_parent / N_child); >= 0
    value: str = "step"  # a new node's value: "step" (PRM score of its newest step) or "path_min" (min over steps)
    aggregator: str = "min"  # final answer: the terminal leaf with the best aggregated step scores (min/last/...)
    expansions_per_round: int = 1  # nodes a question expands per round (later picks skip pending subtrees); >= 1
    batch_nodes: int = 16  # node prefixes decoded together in one call (the last call of a round padded); >= 1
    prompt_bucket: int = 32  # prefixes right-padded to a multiple of this many tokens (one compile per bucket)
    score_batch_size: int = 32  # PRM scoring batch (examples per forward)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.c_uct) and self.c_uct >= 0):
            raise ValueError(f"MCTSConfig.c_uct must be a finite number >= 0, got {self.c_uct!r}")
        if self.value not in VALUES:
            raise ValueError(f"MCTSConfig.value must be one of {VALUES}, got {self.value!r}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"MCTSConfig.aggregator must be one of {tuple(AGGREGATORS)}, got {self.aggregator!r}")
        for name in ("expansions_per_round", "batch_nodes", "prompt_bucket", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MCTSConfig.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclasses.dataclass
class Node:
    """One node of a question's search tree (node 0 is the root)."""

    parent: int  # index of the parent node; -1 for the root
    token_ids: list[int]  # generated tokens from the question start (prompt excluded); extends the parent's
    anchors: list[int]  # step boundaries on the path (generated-token indices), as an EDU leaf's `anchors`
    logprobs: list[float]  # temperature-1 log-probability of each generated token
    stop_reason: str  # "" root, "anchor" open (ends just before an anchor), else terminal (decode.STOP_NAMES)
    text: str = ""  # the decoded generated text
    step_scores: list[float] = dataclasses.field(default_factory=list)  # PRM score at each step end of the path
    value: float = math.nan  # the node's evaluation when it was created (NaN for the root)
    visits: int = 0  # N: values backed up through this node
    value_sum: float = 0.0  # W: their sum
    children: list[int] = dataclasses.field(default_factory=list)
    expanded: bool = False
    candidate: GradedCandidate | None = None  # a terminal node's graded Best-of-N candidate

    @property
    def terminal(self) -> bool:
        return self.stop_reason not in (OPEN, ROOT)

    @property
    def q(self) -> float:
        """Q = W / N, the mean backed-up value (0 before any visit)."""
        return self.value_sum / self.visits if self.visits else 0.0


@dataclasses.dataclass
class MCTSResult:
    """The search of one question."""

    index: int  # position of the question in the input
    chosen: GradedCandidate | None  # the answer (best terminal leaf by `aggregator`); None: no terminal leaf
    candidates: list[GradedCandidate]  # every terminal leaf's candidate, in creation order
    terminal_nodes: list[int]  # the node index of each candidate
    nodes: list[Node]  # the whole search tree
    tokens_spent: int  # distinct generated tokens (sum over nodes of the tokens below their parent)
    round_tokens: list[int]  # tokens spent in each round the question took part in (they sum to tokens_spent)
    exhausted: bool  # every path of the tree ended before the budget was spent

    @property
    def correct(self) -> bool:
        """The chosen answer is correct; False without a terminal leaf (and for an undecided check)."""
        return bool(self.chosen is not None and self.chosen.correct)


# ------------------------------------------------------------------------------------ selection and backup


def uct(nodes: Sequence[Node], child: int, c: float) -> float:
    """UCT of `child`: Q + c * sqrt(ln N_parent / N_child) (Kocsis & Szepesvari 2006, UCB1 applied to trees).
    An unvisited child scores +inf."""
    node = nodes[child]
    if node.visits == 0:
        return math.inf
    parent_visits = nodes[node.parent].visits
    return node.q + c * math.sqrt(math.log(max(parent_visits, 1)) / node.visits)


def select_leaf(nodes: Sequence[Node], c: float, pending: frozenset[int] | set[int] = frozenset()) -> int | None:
    """The node to expand next: from the root, the highest-UCT child (the earlier on ties) among those with an
    open, unexpanded node below them that is not in `pending`, down to such a node. None when there is none
    (the tree is exhausted, or every open node is pending)."""
    memo: dict[int, bool] = {}

    def available(i: int) -> bool:
        if i not in memo:
            node = nodes[i]
            if node.terminal:
                memo[i] = False
            elif not node.expanded:
                memo[i] = i not in pending
            else:
                memo[i] = any(available(ch) for ch in node.children)
        return memo[i]

    i = 0
    if not available(i):
        return None
    while nodes[i].expanded:
        choices = [ch for ch in nodes[i].children if available(ch)]
        scores = [uct(nodes, ch, c) for ch in choices]
        i = choices[scores.index(max(scores))]
    return i


def exhausted(nodes: Sequence[Node], i: int = 0) -> bool:
    """Every path below node `i` has ended (it is terminal, or expanded with all children exhausted)."""
    node = nodes[i]
    if node.terminal:
        return True
    return node.expanded and all(exhausted(nodes, ch) for ch in node.children)


def backup(nodes: Sequence[Node], i: int, value: float) -> None:
    """Add one visit with `value` to node `i` and to each of its ancestors (mean backup: Q = W / N)."""
    while i >= 0:
        nodes[i].visits += 1
        nodes[i].value_sum += value
        i = nodes[i].parent


def node_value(step_scores: Sequence[float], value: str) -> float:
    """A new node's evaluation from its path's step scores: the newest step's ("step") or the lowest
    ("path_min"); 0.0 for a path without steps. Raises ValueError for another `value`."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    if not step_scores:
        return 0.0
    return float(step_scores[-1]) if value == "step" else float(min(step_scores))


# ------------------------------------------------------------------------------------------------ expansion


def children_from_leaves(node: Node, leaves: Sequence[Leaf], max_new_tokens: int) -> list[tuple[int, Node]]:
    """The new nodes of expanding `node` into the EDU leaves of one `ExpansionParams` decode from its prefix, as
    (index of its parent among [node, *new nodes] -- 0 is `node` --, new node) in creation order.

    `leaves` (slot order; token ids, anchors and fork positions relative to the node's end): slot 0 decoded from
    the node and forked at most once (max_anchors = 1), at its anchor t; the other slots are its children from t.
    Paths are cut at `max_new_tokens` generated tokens in all (terminal, "max_new_tokens"); a child that would
    start past the cut is dropped. A fork at t > 0 puts a stem node (the node's tokens + slot 0's first t) between
    `node` and the forked paths. Raises ValueError when slot 0 is missing."""
    if not leaves or leaves[0].slot != 0:
        raise ValueError("an expansion's leaves must start with slot 0 (the path decoded from the node)")
    depth = len(node.token_ids)
    room = max_new_tokens - depth  # tokens this expansion may still generate on each path
    base = node.anchors + ([depth] if depth > 0 else [])  # the node's end is a step boundary (its next anchor)
    root = leaves[0]
    fork = root.anchors[0] if root.anchors else None
    forked = fork is not None and fork < room and len(leaves) > 1

    def make(leaf: Leaf) -> Node:
        ids, logprobs, reason = leaf.token_ids[:room], leaf.logprobs[:room], leaf.stop_reason
        if len(leaf.token_ids) > room or (reason == OPEN and depth + len(ids) >= max_new_tokens):
            reason = "max_new_tokens"  # the total cap: no token left for a next step
        anchors = base + [depth + a for a in leaf.anchors if 0 < a < len(ids)]
        return Node(parent=-1, token_ids=node.token_ids + ids, anchors=anchors,
                    logprobs=node.logprobs + logprobs, stop_reason=reason)

    if not forked:
        return [(0, make(root))]
    out: list[tuple[int, Node]] = []
    parent = 0
    if fork > 0:
        stem = Node(parent=-1, token_ids=node.token_ids + root.token_ids[:fork], anchors=list(base),
                    logprobs=node.logprobs + root.logprobs[:fork], stop_reason=OPEN)
        out.append((0, stem))
        parent = 1
    for leaf in leaves:
        if leaf.slot == 0 or leaf.fork_pos < room:
            out.append((parent, make(leaf)))
    return out


def _node_key(index: int, node: int) -> int:
    """The sampler's question id of a node's expansion (its randomness key): CRC-32, the same in every process."""
    return zlib.crc32(f"{index}:{node}".encode()) & 0x7FFFFFFF


def _leaf_dict(node: Node, slot: int) -> dict[str, Any]:
    return {"slot": slot, "token_ids": node.token_ids, "anchors": node.anchors, "text": node.text,
            "logprobs": node.logprobs}


# ------------------------------------------------------------------------------------------------ the search


def mcts_edu(model: nnx.Module, prm: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
             golds: Sequence[str | None], *, budget_tokens: int, params: DecodeParams,
             config: MCTSConfig = MCTSConfig(), mesh: Mesh | None = None, rules: parallel.RulesLike = None,
             stop_strings: Sequence[str] = (), extra_symbols: str = "",
             disable_symbols: bool = False) -> list[MCTSResult]:
    """MCTS-EDU over each prompt (module docstring); one `MCTSResult` per prompt, in input order.

    prompts: the rendered prompts (`tokenizer.apply_chat_template(problem)`, as `edu-prm sample` renders them)
    as text, encoded with `tokenizer.encode`, or as token ids; golds: the gold answers (None: nothing is graded,
    every candidate counts as not correct). budget_tokens: generated tokens per question (>= 1, EDU's
    `distinct_tokens` unit). params: the sampler's settings (tau, branch_k = K children per anchor,
    max_new_tokens = the cap on a path's generated tokens, edu_greedy / temperature / top_k / top_p, threshold
    and symbols, stop_at_answer, seed); mode, num_leaves and max_anchors are set here (edu, K, 1). prm: a PRM
    (`models.prm.PRM`, any head). mesh / rules / stop_strings / extra_symbols / disable_symbols: as `Sampler`'s.
    In a multi-host job every process calls it with the same arguments and gets the same results.

    Raises ValueError for budget_tokens < 1, prompts and golds of different lengths, an empty prompt, or a prompt
    that with max_new_tokens exceeds the policy's context (max_position_embeddings)."""
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens!r}")
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} golds: one gold answer per prompt")
    expansion = ExpansionParams(**{**dataclasses.asdict(params), "mode": "edu", "num_leaves": params.branch_k,
                                   "max_anchors": 1})
    cap = expansion.max_new_tokens
    prompt_ids = [list(tokenizer.encode(p)) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    context = model.cfg.max_position_embeddings
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(ids) + cap > context:
            raise ValueError(f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={cap} exceed the policy's "
                             f"context of {context} tokens")
    sampler = Sampler(model, tokenizer, expansion, mesh=mesh, batch_questions=config.batch_nodes,
                      prompt_bucket=config.prompt_bucket, stop_strings=stop_strings, extra_symbols=extra_symbols,
                      disable_symbols=disable_symbols, rules=rules)
    trees = [[Node(parent=-1, token_ids=[], anchors=[], logprobs=[], stop_reason=ROOT)] for _ in prompts]
    spent = [0] * len(prompts)
    rounds: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        picks: list[tuple[int, int]] = []  # (question, node) expanded this round
        for q in live:
            pending: set[int] = set()
            for _ in range(config.expansions_per_round):
                leaf = select_leaf(trees[q], config.c_uct, pending)
                if leaf is None:
                    break
                pending.add(leaf)
                picks.append((q, leaf))
        if not picks:
            break
        prefixes = [prompt_ids[q] + trees[q][n].token_ids for q, n in picks]
        expanded = list(sampler.sample_ids(prefixes, [_node_key(q, n) for q, n in picks]))
        new: list[tuple[int, list[int]]] = []  # (question, indices of the nodes created by one expansion)
        for (q, n), leaves in zip(picks, expanded):
            nodes, index_of = trees[q], [n]
            for parent, child in children_from_leaves(nodes[n], leaves, cap):
                child.parent = index_of[parent]
                child.text = tokenizer.decode(child.token_ids)
                nodes[child.parent].children.append(len(nodes))
                nodes[child.parent].expanded = True
                index_of.append(len(nodes))
                nodes.append(child)
            new.append((q, index_of[1:]))
        _evaluate(prm, trees, prompt_ids, golds, new, config)
        cost = [0] * len(prompts)
        for q, created in new:
            for i in created:
                node = trees[q][i]
                cost[q] += len(node.token_ids) - len(trees[q][node.parent].token_ids)
                node.value = node_value(node.step_scores, config.value)
                backup(trees[q], i, node.value)
        for q in {q for q, _ in picks}:
            spent[q] += cost[q]
            rounds[q].append(cost[q])
        live = [q for q in live if spent[q] < budget_tokens and not exhausted(trees[q])]
    results = []
    for q, nodes in enumerate(trees):
        terminal = [i for i, node in enumerate(nodes) if node.terminal]
        cands = [nodes[i].candidate for i in terminal]
        results.append(MCTSResult(index=q, chosen=prm_best(cands, config.aggregator), candidates=cands,
                                  terminal_nodes=terminal, nodes=nodes, tokens_spent=spent[q],
                                  round_tokens=rounds[q], exhausted=exhausted(nodes)))
    return results


def _evaluate(prm: Any, trees: list[list[Node]], prompt_ids: list[list[int]], golds: Sequence[str | None],
              new: list[tuple[int, list[int]]], config: MCTSConfig) -> None:
    """Score every node created this round in one `score_records` call (its step scores; terminal nodes also get
    their graded candidate). Open nodes go in records without a gold answer, so no partial path is graded."""
    records, owners = [], []
    for q, created in new:
        for terminal in (True, False):
            members = [i for i in created if trees[q][i].terminal == terminal]
            if members:
                records.append({"id": f"{q}/{'terminal' if terminal else 'open'}", "prompt_ids": prompt_ids[q],
                                "answer": golds[q] if terminal else None,
                                "leaves": [_leaf_dict(trees[q][i], i) for i in members]})
                owners.append((q, members))
    scored = score_records(prm, records, "anchors", batch_size=config.score_batch_size) if records else []
    for (q, members), cands in zip(owners, scored):
        for i, cand in zip(members, cands):
            node = trees[q][i]
            node.step_scores = list(cand.step_scores)
            if node.terminal:
                node.candidate = cand
