"""The official ProcessBench metric (QwenLM/ProcessBench, code/run_eval.py), for PRM step scores.

A PRM predicts the earliest wrong step as the first step whose score falls below a threshold theta (-1 when
none does). The metric is the harmonic mean (F1) of two accuracies, in percent (0-100) as the official
repo reports them:
- acc_err:  exact-match accuracy on items with an error (label != -1): the predicted index must equal it;
- acc_corr: accuracy on fully correct items (label == -1): the prediction must be -1.
The headline number averages the per-subset F1 over the subsets (gsm8k, math, olympiadbench, omnimath).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def first_error_prediction(step_scores: Sequence[float], theta: float) -> int:
    """Index of the first step scored below `theta`, or -1 when every step is at or above it."""
    for i, score in enumerate(step_scores):
        if score < theta:
            return i
    return -1


def _f1(acc_err: float, acc_corr: float) -> float:
    return 0.0 if acc_err + acc_corr == 0 else 2 * acc_err * acc_corr / (acc_err + acc_corr)


def processbench_f1(labels: Sequence[int], predictions: Sequence[int]) -> dict:
    """{acc_err, acc_corr, f1 (percent), n_err, n_corr} for one subset.

    Raises ValueError when either class is empty (the official script would report NaN).
    """
    labels_arr, preds_arr = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels_arr.shape != preds_arr.shape or labels_arr.ndim != 1:
        raise ValueError(f"labels {labels_arr.shape} and predictions {preds_arr.shape} must be equal 1-D")
    err = labels_arr != -1
    n_err, n_corr = int(err.sum()), int((~err).sum())
    if n_err == 0 or n_corr == 0:
        raise ValueError(f"need both erroneous and correct items, got n_err={n_err}, n_corr={n_corr}")
    match = labels_arr == preds_arr
    acc_err = 100.0 * float(match[err].mean())
    acc_corr = 100.0 * float(match[~err].mean())
    return {"acc_err": acc_err, "acc_corr": acc_corr, "f1": _f1(acc_err, acc_corr), "n_err": n_err,
            "n_corr": n_corr}


def _check_subsets(scores_by_subset: Mapping, labels_by_subset: Mapping) -> None:
    if set(scores_by_subset) != set(labels_by_subset):
        raise ValueError(f"subsets differ: scores {sorted(scores_by_subset)}, labels {sorted(labels_by_subset)}")
    for name in scores_by_subset:
        if len(scores_by_subset[name]) != len(labels_by_subset[name]):
            raise ValueError(
                f"subset {name!r}: {len(scores_by_subset[name])} score lists for "
                f"{len(labels_by_subset[name])} labels"
            )


def evaluate_processbench(
    scores_by_subset: Mapping[str, Sequence[Sequence[float]]],
    labels_by_subset: Mapping[str, Sequence[int]],
    theta: float = 0.5,
) -> dict:
    """Per-subset metrics at one threshold plus their unweighted average over subsets.

    Returns ``{"theta", "subsets": {name: processbench_f1(...)}, "average": {acc_err, acc_corr, f1}}``.
    """
    _check_subsets(scores_by_subset, labels_by_subset)
    subsets = {}
    for name, scores in scores_by_subset.items():
        predictions = [first_error_prediction(s, theta) for s in scores]
        subsets[name] = processbench_f1(labels_by_subset[name], predictions)
    average = {k: float(np.mean([m[k] for m in subsets.values()])) for k in ("acc_err", "acc_corr", "f1")}
    return {"theta": float(theta), "subsets": subsets, "average": average}


def _match_counts(scores: Sequence[Sequence[float]], labels: Sequence[int], thetas: np.ndarray) -> tuple:
    """Exact-match counts of erroneous and correct items at every theta in sorted `thetas`, in O(N log T).

    With prefix minima m_k = min(s_0..s_k), the first step below theta is L exactly when
    m_L < theta <= m_{L-1} (m_{-1} = +inf), and no step is below theta when theta <= m_{n-1}. Each item
    thus matches on one half-open interval of thetas, added with a difference array.
    """
    t = len(thetas)
    diff_err, diff_corr = np.zeros(t + 1, np.int64), np.zeros(t + 1, np.int64)
    for s, label in zip(scores, labels):
        m = np.minimum.accumulate(np.asarray(s, dtype=np.float64)) if len(s) else np.zeros(0)
        if label == -1:
            lo, hi, diff = -np.inf, (m[-1] if len(m) else np.inf), diff_corr
        else:
            if label >= len(m):
                continue  # the error step was never scored: no theta can predict it
            lo, hi, diff = m[label], (m[label - 1] if label > 0 else np.inf), diff_err
        # thetas in (lo, hi]: indices [searchsorted(lo, right), searchsorted(hi, right))
        a, b = np.searchsorted(thetas, lo, side="right"), np.searchsorted(thetas, hi, side="right")
        if a < b:
            diff[a] += 1
            diff[b] -= 1
    return np.cumsum(diff_err)[:t], np.cumsum(diff_corr)[:t]


def candidate_thetas(scores_by_subset: Mapping[str, Sequence[Sequence[float]]]) -> np.ndarray:
    """Every distinct step score plus +inf: between consecutive values the predictions cannot change."""
    values = [np.asarray(s, dtype=np.float64) for scores in scores_by_subset.values() for s in scores]
    flat = np.concatenate(values) if values else np.zeros(0)
    return np.unique(np.append(flat, np.inf))


def best_theta(
    scores_by_subset: Mapping[str, Sequence[Sequence[float]]],
    labels_by_subset: Mapping[str, Sequence[int]],
    thetas: Sequence[float] | None = None,
) -> tuple[float, dict]:
    """The threshold maximising the average F1 over subsets (an oracle upper bound, tuned on the test
    labels) and `evaluate_processbench` at it. Ties go to the smallest theta."""
    _check_subsets(scores_by_subset, labels_by_subset)
    grid = candidate_thetas(scores_by_subset) if thetas is None else np.unique(np.asarray(thetas, np.float64))
    f1_sum = np.zeros(len(grid))
    for name, scores in scores_by_subset.items():
        labels = np.asarray(labels_by_subset[name])
        n_err, n_corr = int((labels != -1).sum()), int((labels == -1).sum())
        if n_err == 0 or n_corr == 0:
            raise ValueError(f"subset {name!r} needs both erroneous and correct items")
        hit_err, hit_corr = _match_counts(scores, labels, grid)
        a, b = 100.0 * hit_err / n_err, 100.0 * hit_corr / n_corr
        with np.errstate(invalid="ignore", divide="ignore"):
            f1_sum += np.where(a + b > 0, 2 * a * b / (a + b), 0.0)
    theta = float(grid[int(np.argmax(f1_sum))])
    return theta, evaluate_processbench(scores_by_subset, labels_by_subset, theta)


def theta_from_split(
    scores_by_subset: Mapping[str, Sequence[Sequence[float]]],
    labels_by_subset: Mapping[str, Sequence[int]],
    split: str = "gsm8k",
) -> tuple[float, dict]:
    """Choose theta on one subset (default gsm8k, the smallest) and report all subsets at that theta."""
    if split not in scores_by_subset:
        raise ValueError(f"subset {split!r} not among {sorted(scores_by_subset)}")
    theta, _ = best_theta({split: scores_by_subset[split]}, {split: labels_by_subset[split]})
    return theta, evaluate_processbench(scores_by_subset, labels_by_subset, theta)
