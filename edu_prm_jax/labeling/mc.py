"""Monte Carlo step labels read off an EDU tree (METHOD.md "MC label").

Why no extra generation: every leaf of an EDU tree is a full solution, so the leaves below a node already are
rollouts from that node. Definitions used here (exactly):

- Steps of a leaf: its generated token ids split at its anchors. The token AT an anchor index starts a new
  step, so the spans are ``[0:a1], [a1:a2], ..., [ak:n]``; empty spans (an anchor at 0, repeated anchors,
  an anchor at n) are dropped.
- Node of a step: the token prefix ``token_ids[:end]`` the step ends in. Nodes are identified by that token
  prefix, so siblings that forked at an anchor share the node that ends just before it.
- v(u) = correct leaves below u / leaves below u, where a leaf is below u when its token ids start with u.
  The last step of a leaf ends in the leaf itself: its value is the leaf's own correctness (one leaf).
- Extra rollouts (optional): an internal node (the end of a non-final step) with fewer than `min_leaves` tree
  leaves below it gets `k` HT continuations of prompt + prefix. Each continuation is judged on
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
Judge = Callable[[str, str | None], bool]  # (full solution text, gold answer) -> correct


@dataclasses.dataclass
class NodeCount:
    """Leaves below one node: from the tree, and from extra rollouts started at it or below it."""

    leaves: int = 0
    correct: int = 0
    rollouts: int = 0  # extra rollouts counted here (started at this node or at a descendant)
    rollouts_correct: int = 0

    @property
    def total(self) -> int:
        return self.leaves + self.rollouts


@dataclasses.dataclass
class PathLabels:
    """MC values of one leaf's steps (before a target is applied)."""

    slot: int
    spans: list[tuple[int, int]]
    values: list[float]
    node_leaves: list[int]  # leaves (tree + extra rollouts) under each step's node
    node_correct: list[int]
    node_rollouts: list[int]  # how many of node_leaves are extra rollouts
    correct: bool


def internal_nodes(leaves: Sequence[Leaf]) -> set[Prefix]:
    """Prefixes that end a non-final step of some leaf (the tree's branch points that label a step)."""
    nodes: set[Prefix] = set()
    for leaf in leaves:
        for _, end in step_spans(len(leaf.token_ids), leaf.anchors)[:-1]:
            nodes.add(tuple(leaf.token_ids[:end]))
    return nodes


def count_tree(leaves: Sequence[Leaf], correct: Sequence[bool]) -> dict[Prefix, NodeCount]:
    """Tree leaves and correct leaves below every internal node."""
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
                c.leaves += 1
                c.correct += int(bool(ok))
    return counts


def nodes_needing_rollouts(counts: dict[Prefix, NodeCount], min_leaves: int) -> list[Prefix]:
    """Internal nodes with fewer than `min_leaves` tree leaves, shortest prefix first (deterministic order)."""
    if min_leaves <= 0:
        return []
    return sorted((n for n, c in counts.items() if c.leaves < min_leaves), key=lambda n: (len(n), n))


def add_rollouts(counts: dict[Prefix, NodeCount], node: Prefix, outcomes: Sequence[bool]) -> None:
    """Count rollouts started at `node` for it and its ancestors (internal nodes that are proper prefixes)."""
    if node not in counts:
        raise KeyError(f"node of length {len(node)} is not an internal node of this tree")
    for other, c in counts.items():
        if len(other) <= len(node) and node[:len(other)] == other:
            c.rollouts += len(outcomes)
            c.rollouts_correct += sum(bool(o) for o in outcomes)


def path_labels(leaf: Leaf, ok: bool, spans: Sequence[tuple[int, int]],
                node: Callable[[Prefix], tuple[int, int, int]]) -> PathLabels:
    """One leaf's labels. A non-final step's node (its token prefix) gives (leaves, correct leaves, of which
    extra rollouts) through `node`; the final step ends in the leaf itself, so its value is the leaf's own
    correctness. Shared by the tree labels here and the Math-Shepherd labels (`labeling.shepherd`)."""
    values, n_leaves, n_correct, n_roll = [], [], [], []
    for k, (_, end) in enumerate(spans):
        total, correct, rolled = (1, int(bool(ok)), 0) if k == len(spans) - 1 else node(tuple(leaf.token_ids[:end]))
        values.append(correct / total)
        n_leaves.append(total)
        n_correct.append(correct)
        n_roll.append(rolled)
    return PathLabels(leaf.slot, list(spans), values, n_leaves, n_correct, n_roll, bool(ok))


def label_paths(leaves: Sequence[Leaf], correct: Sequence[bool],
                counts: dict[Prefix, NodeCount] | None = None) -> list[PathLabels]:
    """Per leaf: its step spans and each step's node value (the last step: the leaf's own correctness)."""
    counts = count_tree(leaves, correct) if counts is None else counts

    def node(prefix: Prefix) -> tuple[int, int, int]:
        c = counts[prefix]
        return c.total, c.correct + c.rollouts_correct, c.rollouts

    return [path_labels(leaf, ok, step_spans(len(leaf.token_ids), leaf.anchors), node)
            for leaf, ok in zip(leaves, correct)]


def apply_target(values: Sequence[float], target: str) -> tuple[list[float], list[str]]:
    """(labels, kinds): `edu`/`soft` keep v, `hard` gives 1[v > 0]; kind is 'hard' for a 0/1 label."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    labels = [float(v > 0) if target == "hard" else float(v) for v in values]
    return labels, ["hard" if x in (0.0, 1.0) else "soft" for x in labels]


@dataclasses.dataclass
class JudgedTree:
    """One question's leaves, their correctness and the prompt ids rollouts continue from."""

    leaves: Sequence[Leaf]
    correct: Sequence[bool]
    prompt_ids: Sequence[int] = ()
    gold: str | None = None  # gold answer: rollouts are judged against it


def label_trees(trees: Sequence[JudgedTree], *, min_leaves: int = 0, rollout: RolloutFn | None = None,
                judge: Judge = answers.is_correct,
                decode: Callable[[Sequence[int]], str] | None = None) -> list[list[PathLabels]]:
    """`label_paths` of each tree after extra rollouts (module docstring) at nodes with < min_leaves leaves.

    All trees' rollout prompts go to ONE `rollout` call so the sampler batches them. A rollout is correct when
    `judge(decode(prefix_ids) + continuation_text, tree.gold)`.
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
