"""Math-Shepherd-style step labels: line steps, k completions per step prefix (the METHOD.md baseline).

Why token spans: a step is a run of the solution's *generated* token ids that ends after a token whose decoded
text contains "\\n". Re-tokenizing joined line texts would move step ends whenever a merge spans two lines (the
PRM label shift `scoring/examples.py` warns about), so text is never re-encoded here.

Labels: for every step but the last, `k` HT completions are sampled from prompt + the leaf's ids up to the
step's end; a completion is judged on ``decode(prefix) + completion`` against the tree's gold answer. v = share
of correct completions among the decided ones (an undecided verdict, `grading.answers.answers_verdict` None, is
left out and counted apart; a step whose completions are all undecided has no value), so target ``hard`` =
1[any correct] and ``soft``/``edu`` = share correct (`mc.apply_target`). The last step ends the solution
itself: its value is the solution's own verdict (no completions). Identical prefixes within one question (shared
by the leaves of an EDU tree) are rolled out once and their result reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edu_prm_jax.grading import answers
from edu_prm_jax.labeling.mc import Judge, JudgedTree, NodeStats, PathLabels, Prefix, RolloutFn, Verdict, path_labels


def line_step_spans(token_ids: Sequence[int], token_texts: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) spans ending after each token whose decoded text contains a newline (last span: the rest)."""
    spans, start = [], 0
    for i, t in enumerate(token_ids):
        if not 0 <= t < len(token_texts):
            raise ValueError(f"token id {t} at position {i} is outside the tokenizer's {len(token_texts)} ids")
        if "\n" in token_texts[t]:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(token_ids):
        spans.append((start, len(token_ids)))
    return spans


def label_shepherd(trees: Sequence[JudgedTree], token_texts: Sequence[str], *, rollout: RolloutFn,
                   decode: Callable[[Sequence[int]], str], judge: Judge = answers.solution_verdict
                   ) -> list[list[PathLabels]]:
    """Line-step labels of every leaf of every tree; all completions are requested in ONE `rollout` call."""
    requests: dict[tuple[int, Prefix], int] = {}  # (tree index, prefix) -> index into the rollout prompts
    spans_of: list[list[list[tuple[int, int]]]] = []
    for i, tree in enumerate(trees):
        per_leaf = []
        for leaf in tree.leaves:
            spans = line_step_spans(leaf.token_ids, token_texts)
            per_leaf.append(spans)
            for _, end in spans[:-1]:
                requests.setdefault((i, tuple(leaf.token_ids[:end])), len(requests))
        spans_of.append(per_leaf)
    prompts = [[*trees[i].prompt_ids, *prefix] for (i, prefix) in requests]
    texts = rollout(prompts) if prompts else []
    if len(texts) != len(prompts):
        raise ValueError(f"rollout returned {len(texts)} results for {len(prompts)} prompts")
    outcomes: list[list[Verdict]] = []
    for ((i, prefix), conts) in zip(requests, texts):
        if not conts:
            raise ValueError("rollout returned no completions for a step prefix")
        prefix_text = decode(prefix)
        outcomes.append([judge(prefix_text + t, trees[i].gold) for t in conts])
    out = []
    for i, tree in enumerate(trees):
        def node(prefix: Prefix, i: int = i) -> NodeStats:  # every count at a prefix is a rollout
            res = outcomes[requests[(i, prefix)]]
            decided = [o for o in res if o is not None]
            return len(decided), sum(bool(o) for o in decided), len(decided), len(res) - len(decided)

        out.append([path_labels(leaf, ok, spans, node)
                    for leaf, ok, spans in zip(tree.leaves, tree.correct, spans_of[i])])
    return out
