"""Tree records: what `edu-prm sample` writes (one JSON object per question) and `label` / `eval-bon` read.

A tree record holds the question, its prompt and one leaf per slot; the steps of a leaf are its generated token
ids cut at its anchors (`step_spans`).
"""

from __future__ import annotations

from collections.abc import Sequence


def step_spans(num_tokens: int, anchors: Sequence[int]) -> list[tuple[int, int]]:
    """Non-empty [start, end) spans of a path of `num_tokens` tokens cut before each anchor index."""
    cuts = sorted({a for a in anchors if 0 < a < num_tokens})
    bounds = [0, *cuts, num_tokens]
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]
