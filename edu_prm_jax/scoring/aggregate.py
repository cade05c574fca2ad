"""A solution's score from its step scores: the aggregators Best-of-N and the training evals share.

Conventions: `min` (the default; a solution is as good as its weakest step), `last`, `product`, `mean`. A solution
with no scored steps scores 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

AGGREGATORS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": lambda s: float(min(s)),
    "last": lambda s: float(s[-1]),
    "product": lambda s: float(math.prod(s)),
    "mean": lambda s: float(sum(s) / len(s)),
}


def solution_score(step_scores: Sequence[float], aggregator: str = "min") -> float:
    """One float per solution; raises KeyError naming nothing else for an unknown aggregator."""
    if not len(step_scores):
        return 0.0
    return AGGREGATORS[aggregator](step_scores)


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest solution score; the earliest wins ties, so selection is deterministic."""
    return int(np.argmax(scores))
