"""OmegaPRM step labels (Luo et al. 2024, arXiv 2406.06592): a binary search for the first error, per question.

Follows the public OpenR implementation (openreasoner/openr `data/omegaPRM_v2/omegaprm.py`, last changed in
commit 2f23e11 "fix increment visit count"; defaults from its `run_omegaprm.py`), rewritten over token ids and
run for all questions in lockstep so that every round's rollouts go to ONE batched sampler call.

Definitions used here (exactly):

- State s: the question prompt + a prefix of generated token ids (the root: no generated ids). A state is
  identified by that token prefix; the same prefix reached twice within a question is one node (see below).
- Steps: LINE steps over a rollout's generated token ids, `labeling.shepherd.line_step_spans(ids, token_texts)`
  (a step ends after a token whose decoded text contains "\\n"; text is never re-tokenised).
- MC estimation of s: `k` rollouts from prompt + prefix (one sampler request); rollout r is judged as
  ``judge(decode(prefix) + r.text, gold)``. MC(s) = correct / decided rollouts; undecided verdicts (None) are left
  out and counted apart, as in `labeling.mc`. A state whose verdicts are ALL undecided has MC None and is not added
  to the tree (an undecided root stays in the tree, but nothing is searched). Each estimation adds 1 to N(s).
  After it (OpenR `monte_carlo_estimation`): if MC(s) > 0, every correct rollout becomes a child node
  s + r ("solution" node, value 1.0: its own verdict); if 0 < MC(s) < 1, every incorrect rollout joins the pool.
- Selection: the pool of (state, incorrect rollout) pairs; pick argmax Q(s, r) + U(s) with
  Q(s, r) = alpha^(1 - MC(s)) * beta^(len(r) / L) and U(s) = c_puct * sqrt(sum over tree nodes of N) / (1 + N(s))
  (paper eq. in section 3.3; OpenR `compute_Q` / `compute_U`, a zero sum counted as 1). len(r) is in WORDS
  (whitespace-separated pieces of the rollout text, OpenR's `len(rollout.split())`, which L = 500 is scaled for);
  `OmegaConfig.length_unit="tokens"` uses the rollout's token count (the paper's wording) instead. Ties go to
  the pair that entered the pool first. The selected pair leaves the pool and N(s) of its state grows by 1.
- Binary search (OpenR `binary_search_incorrect_step`) over the selected rollout's steps [left, right]: at
  mid = (left + right) // 2 the state s_new = s + steps[0..mid] is estimated and added to the tree (whatever its
  MC, so the first-error state, MC 0, is in the tree: it is the negative label); MC(s_new) = 0 -> search
  [left, mid - 1], else [mid + 1, right]. A search whose state comes out undecided (MC None) stops there.
- Stopping (OpenR `run`): a question keeps selecting while searches < `max_search_count`, rollouts sampled
  (all of them, undecided included, root included) < `rollout_budget` and the pool is not empty. The limits are
  checked before each selection, so a binary search that has started runs to its end (a question can pass the
  budget by at most one search). MC(root) in {0, 1} leaves the pool empty: nothing is searched.
- Tree and emitted paths: a node's parent is the longest other node whose prefix is a proper prefix of its own.
  One path is emitted per node without children (root excluded), in node creation order (`slot` = its index in
  that list). Its steps are the tree edges root -> ... -> node, so a step is one or more consecutive line steps,
  and a step's label is the MC value of the node the step ends in: the share of decided rollouts from that
  state that reached the gold answer (a "solution" node: 1.0, its own correct verdict; a "final" node, the whole
  selected incorrect rollout: 0.0, its own verdict). `PathLabels.correct` is True only for a path ending in a
  solution node (a complete solution judged correct); False for partial paths and wrong complete rollouts.

Changes from OpenR, and why:

- Nodes are keyed by token prefix: a search state whose prefix is already a node reuses its MC (no new
  rollouts), a correct rollout whose prefix is already a node adds nothing, and the same incorrect rollout of
  a state enters the pool once. OpenR makes a new State object each time (k more rollouts for a known prefix;
  with a sampler keyed by the prompt they would even repeat the same samples). `labeling.shepherd` does the same.
- Parents come from prefixes, not from the state the search started at: OpenR hangs the first-error state
  found at the midpoint from the search's start state, and the correct state found after it between them
  becomes its sibling, so the emitted path would give one label to correct and wrong lines together.
- The state that is the whole selected rollout (mid = last step) is not rolled out: its value is the rollout's
  own verdict (wrong, 0.0) -- OpenR samples k continuations after a finished solution.
- Scores are recomputed for the whole pool at each selection (the argmax of the formula); OpenR stores a score
  when a pair enters its heap and refreshes only the selected state's pairs, so older pairs keep a smaller
  sqrt(sum N). OpenR's maintenance also re-adds the selected pair (`State.incorrect_rollouts` still holds it), so
  the same binary search can run again; here a selected pair leaves the pool for good.
- N(s) grows by 1 per MC estimation of s (OpenR) AND per selection of one of its rollouts (the paper's
  maintenance step). With only OpenR's increment every pooled state has N = 1 and U would be the same for
  every pair: the exploration term would never act.

Cost (`LabelCost`, the units every labeller reports): policy tokens generated (sum of the rollouts' generated
token counts), queries (sampled sequences = rollouts) and rollout calls (batched sampler calls).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Sequence
from typing import Protocol

from edu_prm_jax.grading import answers
from edu_prm_jax.labeling.mc import Judge, PathLabels, Prefix, Verdict
from edu_prm_jax.labeling.shepherd import line_step_spans
from edu_prm_jax.sampling.engine import Leaf

LENGTH_UNITS = ("words", "tokens")
NODE_KINDS = ("root", "state", "solution", "final")


class RolloutSample(Protocol):
    """One sampled continuation: its generated token ids and their decoded text (e.g. `sampling.engine.Leaf`)."""

    @property
    def token_ids(self) -> Sequence[int]: ...

    @property
    def text(self) -> str: ...


class Question(Protocol):
    """What a search needs of a question (e.g. `labeling.mc.JudgedTree`; its leaves are not used)."""

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def gold(self) -> str | None: ...


# rollout(prompt_ids_list) -> for each prompt (question prompt + state prefix), its k sampled continuations
SampleRolloutFn = Callable[[list[list[int]]], Sequence[Sequence[RolloutSample]]]


@dataclasses.dataclass(frozen=True)
class OmegaConfig:
    """OmegaPRM search settings; defaults are OpenR `run_omegaprm.py`'s. Raises ValueError naming a bad field."""

    k: int = 16  # rollouts per MC estimation (OpenR --num_rollouts)
    alpha: float = 0.5  # Q weight of MC(s), in (0, 1]
    beta: float = 0.9  # Q length penalty, in (0, 1]
    length_scale: float = 500.0  # L in beta^(len(r) / L), in `length_unit`s (OpenR --length_scale)
    length_unit: str = "words"  # len(r): "words" (OpenR: whitespace-separated words) or "tokens" (the paper)
    c_puct: float = 0.125  # exploration constant of U(s), >= 0
    max_search_count: int = 20  # binary searches (selections) per question (OpenR --max_search_count)
    rollout_budget: int = 200  # rollouts per question, checked before each selection (OpenR --rollout_budget)

    def __post_init__(self) -> None:
        for name, low in (("k", 1), ("max_search_count", 0), ("rollout_budget", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OmegaConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"OmegaConfig.{name} must be in (0, 1], got {value!r}")
        if not _is_real(self.length_scale) or not 0.0 < self.length_scale < math.inf:
            raise ValueError(f"OmegaConfig.length_scale must be a finite number > 0, got {self.length_scale!r}")
        if not _is_real(self.c_puct) or not 0.0 <= self.c_puct < math.inf:
            raise ValueError(f"OmegaConfig.c_puct must be a finite number >= 0, got {self.c_puct!r}")
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"OmegaConfig.length_unit must be one of {LENGTH_UNITS}, got {self.length_unit!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclasses.dataclass(frozen=True)
class LabelCost:
    """What a labeller spent on the policy: `tokens` generated (sum of rollout lengths in tokens), `queries`
    (sampled sequences = rollouts) and `calls` (batched rollout calls)."""

    tokens: int = 0
    queries: int = 0
    calls: int = 0


@dataclasses.dataclass
class OmegaNode:
    """One state of a question's search tree.

    `mc` is the node's value: the share of its `decided` verdicts that are correct (None only for a root whose
    verdicts were all undecided). For a "root"/"state" node every decided verdict is a rollout from it
    (`rollouts` == `decided`); a "solution" node (a correct rollout) has its own verdict only (1 decided, 1
    correct, 0 rollouts), a "final" node (a whole selected incorrect rollout) too (1 decided, 0 correct).
    `visits` is N(s) (module docstring); `parent` indexes the tree's node list (-1 for the root)."""

    prefix: Prefix  # generated token ids from the question to this state
    kind: str  # one of NODE_KINDS
    mc: float | None
    decided: int
    correct: int
    rollouts: int
    undecided: int = 0  # undecided rollout verdicts left out of the counts
    visits: int = 0
    parent: int = -1


@dataclasses.dataclass
class OmegaTree:
    """One question's search: nodes in creation order (nodes[0] is the root), searches made, rollouts and
    generated tokens spent, and why it stopped ("search_count", "budget" or "pool": no pair left)."""

    nodes: list[OmegaNode]
    searches: int
    rollouts: int
    tokens: int
    stop: str


@dataclasses.dataclass
class OmegaPath:
    """One emitted root-to-node path: its generated token ids and their step labels.

    `labels.spans` cut `token_ids` at the tree's nodes (a step may hold several lines); `labels.values[j]` is the
    MC value of the node step j ends in, with that node's counts in `node_leaves` (decided verdicts), `node_correct`,
    `node_rollouts` (how many of them are rollouts) and `node_undecided`. `slot` numbers the question's paths."""

    slot: int
    token_ids: list[int]
    labels: PathLabels

    def leaf(self) -> Leaf:
        """The path as a `sampling.engine.Leaf` whose anchors are its step starts (`records.trees.step_spans`
        gives `labels.spans` back), for code written for tree leaves (e.g. `commands.label.path_record`)."""
        return Leaf(slot=self.slot, parent_slot=-1, fork_pos=0, token_ids=list(self.token_ids), entropies=[],
                    logprobs=[], anchors=[start for start, _ in self.labels.spans[1:]], stop_reason="omega")


@dataclasses.dataclass
class OmegaResult:
    """`paths[i]` / `trees[i]`: question i's emitted paths and search tree; `cost`: all questions together."""

    paths: list[list[OmegaPath]]
    trees: list[OmegaTree]
    cost: LabelCost


def rollout_length(sample: RolloutSample, unit: str) -> int:
    """len(r) of Q(s, r): whitespace-separated words of the rollout text ("words", OpenR `compute_Q`) or its
    generated token count ("tokens"). Raises ValueError for another unit."""
    if unit == "words":
        return len(sample.text.split())
    if unit == "tokens":
        return len(sample.token_ids)
    raise ValueError(f"length unit must be one of {LENGTH_UNITS}, got {unit!r}")


def selection_score(mc: float, length: int, visits: int, total_visits: int, config: OmegaConfig) -> float:
    """Q(s, r) + U(s) = alpha^(1 - MC(s)) * beta^(length / L) + c_puct * sqrt(total_visits) / (1 + N(s)).

    `length` = len(r) in `config.length_unit`s, `visits` = N(s), `total_visits` = sum of N over the tree's
    nodes (0 counts as 1, as in OpenR `compute_U`). Source: arXiv 2406.06592 section 3.3; OpenR `compute_Q/U`."""
    q = config.alpha ** (1.0 - mc) * config.beta ** (length / config.length_scale)
    u = config.c_puct * math.sqrt(max(total_visits, 1)) / (1 + visits)
    return q + u


@dataclasses.dataclass
class _Entry:
    """A (state, incorrect rollout) pair of the pool."""

    state: int  # node index
    token_ids: tuple[int, ...]
    length: int  # len(r) in the config's unit


class _Search:
    """One question's OmegaPRM search as a generator: it yields the prefix of each state to estimate and is sent
    that state's k rollouts; it returns the finished `OmegaTree`."""

    def __init__(self, question: Question, token_texts: Sequence[str], judge: Judge,
                 decode: Callable[[Sequence[int]], str], config: OmegaConfig):
        self.gold = question.gold
        self.token_texts, self.judge, self.decode, self.config = token_texts, judge, decode, config
        self.nodes: list[OmegaNode] = []
        self.index: dict[Prefix, int] = {}
        self.pool: list[_Entry] = []
        self.pooled: dict[tuple[int, tuple[int, ...]], None] = {}  # pairs that ever entered the pool
        self.searches = self.rollouts = self.tokens = 0

    def run(self) -> Generator[Prefix, Sequence[RolloutSample], OmegaTree]:
        self._estimate((), (yield ()))
        cfg = self.config
        while True:
            if self.searches >= cfg.max_search_count:
                stop = "search_count"
                break
            if self.rollouts >= cfg.rollout_budget:
                stop = "budget"
                break
            if not self.pool:
                stop = "pool"
                break
            entry = self._select()
            self.searches += 1
            yield from self._binary_search(entry)
        self._link_parents()
        return OmegaTree(self.nodes, self.searches, self.rollouts, self.tokens, stop)

    # ----------------------------------------------------------------------------------------- phases
    def _estimate(self, prefix: Prefix, samples: Sequence[RolloutSample]) -> OmegaNode | None:
        """MC estimation of the state `prefix` from its rollouts; adds it (and its correct rollouts, its
        incorrect ones to the pool) unless every verdict was undecided. Returns the node or None."""
        samples = list(samples)
        if len(samples) != self.config.k:
            raise ValueError(f"rollout returned {len(samples)} continuations for a state prompt, expected "
                             f"OmegaConfig.k = {self.config.k}")
        prefix_text = self.decode(list(prefix)) if prefix else ""
        verdicts: list[Verdict] = [self.judge(prefix_text + s.text, self.gold) for s in samples]
        self.rollouts += len(samples)
        self.tokens += sum(len(s.token_ids) for s in samples)
        decided = [bool(v) for v in verdicts if v is not None]
        correct = sum(decided)
        mc = correct / len(decided) if decided else None
        if mc is None and prefix:
            return None
        node = self._add(OmegaNode(prefix, "state" if prefix else "root", mc, len(decided), correct, len(decided),
                                   undecided=len(samples) - len(decided), visits=1))
        if mc is None or mc == 0.0:
            return node
        for sample, verdict in zip(samples, verdicts):
            ids = tuple(sample.token_ids)
            if verdict is not None and bool(verdict):
                if prefix + ids not in self.index:
                    self._add(OmegaNode(prefix + ids, "solution", 1.0, 1, 1, 0))
            elif verdict is not None and mc < 1.0 and ids and (self.index[prefix], ids) not in self.pooled:
                self.pooled[(self.index[prefix], ids)] = None
                self.pool.append(_Entry(self.index[prefix], ids, rollout_length(sample, self.config.length_unit)))
        return node

    def _select(self) -> _Entry:
        """Pop the pool pair with the highest Q + U (earliest on ties); N of its state grows by 1."""
        total = sum(n.visits for n in self.nodes)
        best, best_score = 0, -math.inf
        for i, entry in enumerate(self.pool):
            state = self.nodes[entry.state]
            assert state.mc is not None  # pooled states have 0 < MC < 1
            score = selection_score(state.mc, entry.length, state.visits, total, self.config)
            if score > best_score:
                best, best_score = i, score
        entry = self.pool.pop(best)
        self.nodes[entry.state].visits += 1
        return entry

    def _binary_search(self, entry: _Entry) -> Generator[Prefix, Sequence[RolloutSample], None]:
        """Binary search for the first step of the rollout whose state has MC 0 (module docstring)."""
        ids = entry.token_ids
        steps = line_step_spans(ids, self.token_texts)
        base = self.nodes[entry.state].prefix
        left, right = 0, len(steps) - 1
        while left <= right:
            mid = (left + right) // 2
            end = steps[mid][1]
            prefix = base + ids[:end]
            node = self.nodes[self.index[prefix]] if prefix in self.index else None
            if node is None and end == len(ids):  # the whole (incorrect) rollout: its own verdict, no rollouts
                node = self._add(OmegaNode(prefix, "final", 0.0, 1, 0, 0))
            elif node is None:
                node = self._estimate(prefix, (yield prefix))
                if node is None:  # every verdict undecided: no direction to go
                    return
            if node.mc == 0.0:
                right = mid - 1
            else:
                left = mid + 1

    # ------------------------------------------------------------------------------------------- tree
    def _add(self, node: OmegaNode) -> OmegaNode:
        self.index[node.prefix] = len(self.nodes)
        self.nodes.append(node)
        return node

    def _link_parents(self) -> None:
        """Parent of each node: the longest other node whose prefix is a proper prefix of its own."""
        lengths = sorted({len(n.prefix) for n in self.nodes}, reverse=True)
        for node in self.nodes[1:]:
            node.parent = next(self.index[node.prefix[:n]] for n in lengths
                               if n < len(node.prefix) and node.prefix[:n] in self.index)


def tree_paths(tree: OmegaTree) -> list[OmegaPath]:
    """One `OmegaPath` per node without children (the root excluded), in node creation order (module
    docstring: a step = a tree edge, its value = the MC value of the node it ends in)."""
    has_child = [False] * len(tree.nodes)
    for node in tree.nodes[1:]:
        has_child[node.parent] = True
    out = []
    for i, node in enumerate(tree.nodes):
        if i == 0 or has_child[i]:
            continue
        chain = [node]
        while chain[-1].parent > 0:
            chain.append(tree.nodes[chain[-1].parent])
        chain.reverse()
        starts = [0] + [len(n.prefix) for n in chain[:-1]]
        values: list[float | None] = [n.mc for n in chain]
        labels = PathLabels(slot=len(out), spans=[(s, len(n.prefix)) for s, n in zip(starts, chain)], values=values,
                            node_leaves=[n.decided for n in chain], node_correct=[n.correct for n in chain],
                            node_rollouts=[n.rollouts for n in chain], correct=node.kind == "solution",
                            node_undecided=[n.undecided for n in chain])
        out.append(OmegaPath(len(out), list(node.prefix), labels))
    return out


def label_omega(questions: Sequence[Question], token_texts: Sequence[str], *, rollout: SampleRolloutFn,
                decode: Callable[[Sequence[int]], str], judge: Judge = answers.solution_verdict,
                config: OmegaConfig | None = None) -> OmegaResult:
    """OmegaPRM labels of every question (module docstring), all searches run in lockstep.

    Each round, every question still searching contributes its next state to estimate; all of them go to ONE
    `rollout(prompts)` call (prompt = question prompt ids + state prefix ids), which must return, per prompt in
    order, `config.k` samples with `.token_ids` (generated ids) and `.text` (e.g. `sampling.engine.Leaf`). So
    `cost.calls` = rounds = the largest number of estimations of any one question.

    Returns per question its paths (`tree_paths`) and tree, and the total `LabelCost`. Raises ValueError for a
    question with empty prompt ids or no gold answer, a token id outside `token_texts`, or a rollout result of the
    wrong length (prompts or samples per prompt)."""
    config = OmegaConfig() if config is None else config
    for i, q in enumerate(questions):
        if not len(q.prompt_ids):
            raise ValueError(f"question {i}: empty prompt_ids")
        if q.gold is None:
            raise ValueError(f"question {i}: no gold answer; OmegaPRM rollouts cannot be judged")
    searches = [_Search(q, token_texts, judge, decode, config) for q in questions]
    runs = [s.run() for s in searches]
    pending: dict[int, Prefix] = {i: next(r) for i, r in enumerate(runs)}  # every search first estimates its root
    trees: list[OmegaTree | None] = [None] * len(questions)
    calls = 0
    while pending:
        order = sorted(pending)
        prompts = [[*questions[i].prompt_ids, *pending[i]] for i in order]
        results = list(rollout(prompts))
        calls += 1
        if len(results) != len(prompts):
            raise ValueError(f"rollout returned {len(results)} results for {len(prompts)} prompts")
        for i, samples in zip(order, results):
            try:
                pending[i] = runs[i].send(samples)
            except StopIteration as done:
                trees[i] = done.value
                del pending[i]
    finished = [t for t in trees if t is not None]
    cost = LabelCost(tokens=sum(t.tokens for t in finished), queries=sum(t.rollouts for t in finished), calls=calls)
    return OmegaResult([tree_paths(t) for t in finished], finished, cost)
