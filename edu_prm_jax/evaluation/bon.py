"""Best-of-N selection: aggregate step scores into a solution score, then pick one candidate per question.

Conventions (documented because papers differ):
- A candidate without a final answer is kept and scored like any other; if a PRM selector picks it, the
  question counts as wrong. It casts no vote in majority / weighted voting; when no candidate of a question has
  an answer, every vote-based selector is wrong for it.
- Answers vote by `answers.normalize_answer` key (two answers with the same key are the same answer).
- Ties: the earliest candidate wins (candidates are in sampling order), so selection is deterministic.
- `policy_logprob` uses no PRM: it picks the candidate the policy itself was surest of (highest mean token
  log-probability at temperature 1, as recorded by the sampler). It costs nothing beyond sampling, so it is the
  reranker a PRM has to beat besides majority vote; candidates without recorded log-probabilities are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from edu_prm_jax.grading.answers import normalize_answer
from edu_prm_jax.scoring.aggregate import AGGREGATORS, best_index, solution_score


@dataclasses.dataclass
class Candidate:
    answer: str | None  # extracted final answer (None when the solution has none)
    correct: bool
    step_scores: list[float]
    mean_logprob: float | None = None  # the policy's mean token log-prob of the solution; None when unknown

    def score(self, aggregator: str) -> float:
        return solution_score(self.step_scores, aggregator)


def prm_best(cands: Sequence[Candidate], aggregator: str = "min") -> Candidate | None:
    if not cands:
        return None
    return cands[best_index([c.score(aggregator) for c in cands])]


def _vote(cands: Sequence[Candidate], weight: Callable[[Candidate], float]) -> Candidate | None:
    totals: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for c in cands:
        if c.answer is None:
            continue
        key = normalize_answer(c.answer)
        totals[key] = totals.get(key, 0.0) + weight(c)
        first.setdefault(key, c)
    if not totals:
        return None
    best = max(totals.values())
    winner = next(k for k in totals if totals[k] == best)  # insertion order: first seen wins ties
    return first[winner]


def majority_vote(cands: Sequence[Candidate]) -> Candidate | None:
    return _vote(cands, lambda c: 1.0)


def weighted_vote(cands: Sequence[Candidate], aggregator: str = "min") -> Candidate | None:
    return _vote(cands, lambda c: c.score(aggregator))


def most_confident(cands: Sequence[Candidate]) -> Candidate | None:
    """The candidate with the highest mean token log-probability under the policy (first on ties)."""
    known = [c for c in cands if c.mean_logprob is not None]
    if not known:
        return None
    return known[int(np.argmax([c.mean_logprob for c in known]))]


def select_all(cands: Sequence[Candidate]) -> dict[str, bool]:
    """Correctness of every selector for one question's candidates."""
    out = {f"prm_{agg}": bool(c and c.correct) for agg in AGGREGATORS for c in [prm_best(cands, agg)]}
    maj, wv = majority_vote(cands), weighted_vote(cands)
    out["majority"] = bool(maj and maj.correct)
    out["weighted_vote"] = bool(wv and wv.correct)
    confident = most_confident(cands)
    out["policy_logprob"] = bool(confident and confident.correct)
    out["pass@n"] = any(c.correct for c in cands)
    return out


SELECTORS = tuple(f"prm_{a}" for a in AGGREGATORS) + ("majority", "weighted_vote", "policy_logprob", "pass@n")



def selector_accuracies(cands_per_question: Sequence[Sequence[Candidate]]) -> dict[str, float]:
    """Share of questions (0-1) each selector of `SELECTORS` gets right; ValueError for no questions (an
    accuracy of nothing)."""
    if not cands_per_question:
        raise ValueError("selector_accuracies: no questions")
    per_q = [select_all(c) for c in cands_per_question]
    return {s: sum(r[s] for r in per_q) / len(per_q) for s in SELECTORS}
