"""Monte Carlo step labels read off an EDU tree (METHOD.md "MC label").

Why no extra generation: every leaf of an EDU tree is a full solution, so the leaves below a node already are
rollouts from that node. Definitions used here (exactly):

- Steps of a leaf: its generated token ids split at its anchors. The token AT an anchor index starts a new
  step, so the spans are ``[0:a1], [a1:a2], ..., [ak:n]``; empty spans (an anchor at 0, repeated anchors,
  an anchor at n) are dropped.
- Node of a step: the token prefix ``token_ids[:end]`` the step ends in. Nodes are identified by that token
  prefix, so siblings that forked at an anchor share the node that ends just before it.
- v(u) = correct leaves below u / decided leaves below u, where a leaf is below u when its token ids start with
  u. The last step of a leaf ends in the leaf itself: its value is the leaf's own correctness (one leaf).
- Undecided verdicts (the answer check ran out of its CPU bound, `grading.answers.answers_verdict` is None) are
  neither correct nor wrong: they are left out of both counts and counted apart (`undecided`). A node whose
  leaves and rollouts are all undecided has no value (None), never a number from nothing; so has the last step
  of an undecided leaf. `edu-prm label` writes no record for a path with such a step and reports how many.
- Extra rollouts (optional): an internal node (the end of a non-final step) with fewer than `min_leaves`
  decided tree leaves below it gets `k` HT continuations of prompt + prefix. Each continuation is judged on
  ``decode(prefix) + continuation`` and counted as one more leaf of that node AND of every internal node of the
  same tree whose prefix is a proper prefix of it (its ancestors); never of descendants, nor of final (leaf)
  nodes, whose value stays the leaf's own correctness. Which nodes get rollouts is decided on the tree counts
  alone, before any rollout is added.
- Targets: ``edu`` and ``soft`` emit v; ``hard`` (Math-Shepherd style) emits 1[v > 0]. A label is of kind
  ``hard`` when the emitted value is 0 or 1, else ``soft``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from edu_prm_jax.grading import answers
from edu_prm_jax.records.trees import step_spans
from edu_prm_jax.sampling.engine import Leaf

TARGETS = ("edu", "hard", "soft")
Prefix = tuple[int, ...]
# rollout(prompt_ids_list) -> for each prompt, the texts of its sampled continuations (generated part only)
RolloutFn = Callable[[list[list[int]]], list[list[str]]]
Verdict = bool | None  # correct / wrong / undecided (the answer check ran out of its CPU bound)
Judge = Callable[[str, str | None], Verdict]  # (full solution text, gold answer) -> verdict
NodeStats = tuple[int, int, int, int]  # (decided leaves, correct, of the decided: extra rollouts, undecided)


@dataclasses.dataclass
class NodeCount:
    """Leaves below one node: from the tree, and from extra rollouts started at it or below it. `leaves` and
    `rollouts` count decided verdicts only; undecided ones are counted apart."""

    leaves: int = 0
    correct: int = 0
    rollouts: int = 0  # extra rollouts counted here (started at this node or at a descendant)
    rollouts_correct: int = 0
    undecided: int = 0  # tree leaves below with an undecided verdict
    rollouts_undecided: int = 0

    @property
    def total(self) -> int:
        """Decided leaves and rollouts: the denominator of the node's value."""
        return self.leaves + self.rollouts


@dataclasses.dataclass
class PathLabels:
    """MC values of one leaf's steps (before a target is applied)."""

    slot: int
    spans: list[tuple[int, int]]
    values: list[float | None]  # None: every verdict below the step's node was undecided (no label)
    node_leaves: list[int]  # decided leaves (tree + extra rollouts) under each step's node
    node_correct: list[int]
    node_rollouts: list[int]  # how many of node_leaves are extra rollouts
    correct: Verdict  # the leaf's own verdict
    node_undecided: list[int] = dataclasses.field(default_factory=list)  # undecided verdicts left out per step

    @property
    def labelled(self) -> bool:
        """Every step has a value."""
        return all(v is not None for v in self.values)


def internal_nodes(leaves: Sequence[Leaf]) -> set[Prefix]:
    """Prefixes that end a non-final step of some leaf (the tree's branch points that label a step)."""
    nodes: set[Prefix] = set()
    for leaf in leaves:
        for _, end in step_spans(len(leaf.token_ids), leaf.anchors)[:-1]:
            nodes.add(tuple(leaf.token_ids[:end]))
    return nodes


def count_tree(leaves: Sequence[Leaf], correct: Sequence[Verdict]) -> dict[Prefix, NodeCount]:
    """Decided, correct and undecided tree leaves below every internal node."""
    if len(leaves) != len(correct):
        raise ValueError(f"{len(leaves)} leaves but {len(correct)} correctness flags")
    counts = {node: NodeCount() for node in internal_nodes(leaves)}
    by_len: dict[int, set[Prefix]] = {}
    for node in counts:
        by_len.setdefault(len(node), set()).add(node)
    for leaf, ok in zip(leaves, correct):
        ids = tuple(leaf.token_ids)
        for n, nodes in by_len.items():
            if n <= len(ids) and ids[:n] in nodes:
                c = counts[ids[:n]]
                if ok is None:
                    c.undecided += 1
                else:
                    c.leaves += 1
                    c.correct += int(bool(ok))
    return counts


def nodes_needing_rollouts(counts: dict[Prefix, NodeCount], min_leaves: int) -> list[Prefix]:
    """Internal nodes with fewer than `min_leaves` decided tree leaves, shortest prefix first (deterministic
    order)."""
    if min_leaves <= 0:
        return []
    return sorted((n for n, c in counts.items() if c.leaves < min_leaves), key=lambda n: (len(n), n))


def add_rollouts(counts: dict[Prefix, NodeCount], node: Prefix, outcomes: Sequence[Verdict]) -> None:
    """Count rollouts started at `node` for it and its ancestors (internal nodes that are proper prefixes);
    undecided outcomes (None) are counted apart."""
    if node not in counts:
        raise KeyError(f"node of length {len(node)} is not an internal node of this tree")
    decided = [o for o in outcomes if o is not None]
    for other, c in counts.items():
        if len(other) <= len(node) and node[:len(other)] == other:
            c.rollouts += len(decided)
            c.rollouts_correct += sum(bool(o) for o in decided)
            c.rollouts_undecided += len(outcomes) - len(decided)


def path_labels(leaf: Leaf, ok: Verdict, spans: Sequence[tuple[int, int]],
                node: Callable[[Prefix], NodeStats]) -> PathLabels:
    """One leaf's labels. A non-final step's node (its token prefix) gives (decided leaves, correct leaves, of
    the decided: extra rollouts, undecided) through `node`; the final step ends in the leaf itself, so its value
    is the leaf's own verdict (None when undecided). A step whose node has no decided verdict gets value None.
    Shared by the tree labels here and the Math-Shepherd labels (`labeling.shepherd`)."""
    values: list[float | None] = []
    n_leaves, n_correct, n_roll, n_undecided = [], [], [], []
    own = (0, 0, 0, 1) if ok is None else (1, int(bool(ok)), 0, 0)
    for k, (_, end) in enumerate(spans):
        total, correct, rolled, undecided = own if k == len(spans) - 1 else node(tuple(leaf.token_ids[:end]))
        values.append(correct / total if total else None)
        n_leaves.append(total)
        n_correct.append(correct)
        n_roll.append(rolled)
        n_undecided.append(undecided)
    return PathLabels(leaf.slot, list(spans), values, n_leaves, n_correct, n_roll,
                      None if ok is None else bool(ok), n_undecided)


def label_paths(leaves: Sequence[Leaf], correct: Sequence[Verdict],
                counts: dict[Prefix, NodeCount] | None = None) -> list[PathLabels]:
    """Per leaf: its step spans and each step's node value (the last step: the leaf's own correctness)."""
    counts = count_tree(leaves, correct) if counts is None else counts

    def node(prefix: Prefix) -> NodeStats:
        c = counts[prefix]
        return c.total, c.correct + c.rollouts_correct, c.rollouts, c.undecided + c.rollouts_undecided

    return [path_labels(leaf, ok, step_spans(len(leaf.token_ids), leaf.anchors), node)
            for leaf, ok in zip(leaves, correct)]


def apply_target(values: Sequence[float | None], target: str) -> tuple[list[float], list[str]]:
    """(labels, kinds): `edu`/`soft` keep v, `hard` gives 1[v > 0]; kind is 'hard' for a 0/1 label. Raises
    ValueError for an unknown target or a step without a value (None: all its verdicts were undecided)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if any(v is None for v in values):
        raise ValueError(f"step {list(values).index(None)} has no MC value (every verdict below it was "
                         "undecided): such a path gets no labels")
    labels = [float(v > 0) if target == "hard" else float(v) for v in values]
    return labels, ["hard" if x in (0.0, 1.0) else "soft" for x in labels]


@dataclasses.dataclass
class JudgedTree:
    """One question's leaves, their correctness and the prompt ids rollouts continue from."""

    leaves: Sequence[Leaf]
    correct: Sequence[Verdict]  # per leaf: True / False / None = undecided
    prompt_ids: Sequence[int] = ()
    gold: str | None = None  # gold answer: rollouts are judged against it


def label_trees(trees: Sequence[JudgedTree], *, min_leaves: int = 0, rollout: RolloutFn | None = None,
                judge: Judge = answers.solution_verdict,
                decode: Callable[[Sequence[int]], str] | None = None) -> list[list[PathLabels]]:
    """`label_paths` of each tree after extra rollouts (module docstring) at nodes with < min_leaves leaves.

    All trees' rollout prompts go to ONE `rollout` call so the sampler batches them. A rollout's verdict is
    `judge(decode(prefix_ids) + continuation_text, tree.gold)` (True / False / None = undecided, left out).
    """
    counts = [count_tree(t.leaves, t.correct) for t in trees]
    todo = [(i, node) for i, c in enumerate(counts) for node in nodes_needing_rollouts(c, min_leaves)]
    if todo:
        if rollout is None or decode is None:
            raise ValueError("extra rollouts requested (min_leaves > 0) but no rollout/decode function given")
        texts = rollout([[*trees[i].prompt_ids, *node] for i, node in todo])
        if len(texts) != len(todo):
            raise ValueError(f"rollout returned {len(texts)} results for {len(todo)} prompts")
        for (i, node), conts in zip(todo, texts):
            prefix_text = decode(node)
            add_rollouts(counts[i], node, [judge(prefix_text + t, trees[i].gold) for t in conts])
    return [label_paths(t.leaves, t.correct, c) for t, c in zip(trees, counts)]
