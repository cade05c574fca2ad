"""ProcessBench metric against hand-worked cases, trivial predictors on the real labels, brute force sweeps."""

import json

import numpy as np
import pytest

from edu_prm_jax.evaluation import processbench as P

SUBSETS = {"gsm8k": (207, 193), "math": (594, 406), "olympiadbench": (661, 339), "omnimath": (759, 241)}


def test_first_error_prediction():
    assert P.first_error_prediction([0.9, 0.4, 0.1], 0.5) == 1
    assert P.first_error_prediction([0.9, 0.4, 0.1], 0.4) == 2  # strictly below theta
    assert P.first_error_prediction([0.9, 0.4, 0.1], 0.05) == -1
    assert P.first_error_prediction([], 0.5) == -1


def test_hand_worked_case():
    m = P.processbench_f1([-1, 2, 0, -1], [-1, 2, 1, 0])
    assert m == {"acc_err": 50.0, "acc_corr": 50.0, "f1": 50.0, "n_err": 2, "n_corr": 2}
    # 3 of 5 erroneous right (60), 2 of 5 correct right (40): F1 = 2*60*40/100 = 48
    m = P.processbench_f1([0, 1, 2, 3, 4, -1, -1, -1, -1, -1], [0, 1, 2, -1, 0, -1, -1, 0, 1, 2])
    assert (m["acc_err"], m["acc_corr"]) == (60.0, 40.0) and m["f1"] == pytest.approx(48.0)


def test_trivial_predictors_and_errors():
    always_minus_one = P.processbench_f1([-1, 2, 0, -1], [-1] * 4)
    assert (always_minus_one["acc_err"], always_minus_one["acc_corr"], always_minus_one["f1"]) == (0, 100, 0)
    with pytest.raises(ValueError, match="n_err=0"):
        P.processbench_f1([-1, -1], [-1, -1])
    with pytest.raises(ValueError):
        P.processbench_f1([-1, 0], [-1])


@pytest.fixture(scope="module")
def real_labels(shared_data):
    return {
        name: [item["label"] for item in json.loads((shared_data / "processbench" / f"{name}.json").read_text())]
        for name in SUBSETS
    }


@pytest.mark.parametrize("name", sorted(SUBSETS))
def test_trivial_predictors_on_real_labels(real_labels, name):
    labels = real_labels[name]
    n_err, n_corr = SUBSETS[name]
    m = P.processbench_f1(labels, [-1] * len(labels))
    assert (m["n_err"], m["n_corr"]) == (n_err, n_corr)
    assert (m["acc_err"], m["acc_corr"], m["f1"]) == (0.0, 100.0, 0.0)
    n_first = sum(1 for label in labels if label == 0)  # items whose very first step is wrong
    m = P.processbench_f1(labels, [0] * len(labels))
    assert m["acc_err"] == pytest.approx(100.0 * n_first / n_err) and m["acc_corr"] == 0.0 and m["f1"] == 0.0
    assert 0 < n_first < n_err


def _oracle_scores(labels, rng):
    """Scores that put the first sub-0.5 score exactly at the label (random tails after it)."""
    out = []
    for label in labels:
        n = (label + 1 if label >= 0 else 0) + int(rng.integers(1, 4))
        s = rng.uniform(0.6, 1.0, size=n)
        if label >= 0:
            s[label] = rng.uniform(0.0, 0.4)
            s[label + 1 :] = rng.uniform(0.0, 1.0, size=n - label - 1)
        out.append(s.tolist())
    return out


def test_oracle_scores_on_real_labels_score_100(real_labels):
    rng = np.random.default_rng(0)
    scores = {name: _oracle_scores(labels, rng) for name, labels in real_labels.items()}
    res = P.evaluate_processbench(scores, real_labels, theta=0.5)
    assert res["average"] == {"acc_err": 100.0, "acc_corr": 100.0, "f1": 100.0}
    assert {n: (m["n_err"], m["n_corr"]) for n, m in res["subsets"].items()} == SUBSETS
    # Moving theta to 0.3 hides every error step scored in [0.3, 0.4): acc_err drops, acc_corr stays.
    lowered = P.evaluate_processbench(scores, real_labels, theta=0.3)
    assert all(m["acc_corr"] == 100.0 and m["acc_err"] < 100.0 for m in lowered["subsets"].values())


def test_average_is_unweighted_mean_over_subsets():
    scores = {"a": [[0.9], [0.1]], "b": [[0.9], [0.1], [0.1, 0.9], [0.9, 0.9]]}
    labels = {"a": [-1, 0], "b": [-1, -1, 0, 0]}
    res = P.evaluate_processbench(scores, labels, theta=0.5)
    assert res["subsets"]["a"]["f1"] == 100.0
    assert (res["subsets"]["b"]["acc_err"], res["subsets"]["b"]["acc_corr"]) == (50.0, 50.0)
    assert res["average"]["f1"] == 75.0 and res["average"]["acc_err"] == 75.0


def test_best_theta_hand_case():
    # Perfect for theta in (0.3, 0.6]; the candidates are the score values, ties go to the smallest -> 0.6.
    scores = {"s": [[0.9, 0.2], [0.9, 0.8], [0.3, 0.9], [0.6, 0.7]]}
    labels = {"s": [1, -1, 0, -1]}
    theta, res = P.best_theta(scores, labels)
    assert theta == 0.6 and res["average"]["f1"] == 100.0
    assert P.evaluate_processbench(scores, labels, theta=0.3)["average"]["f1"] < 100.0


def test_best_theta_matches_brute_force():
    rng = np.random.default_rng(1)
    scores, labels = {}, {}
    for name, n in (("x", 60), ("y", 45)):
        scores[name] = [np.round(rng.uniform(0, 1, size=rng.integers(1, 7)), 1).tolist() for _ in range(n)]
        labels[name] = [int(rng.integers(-1, len(s))) for s in scores[name]]
        labels[name][:2] = [-1, 0]  # both classes present
    grid = sorted({v for ss in scores.values() for s in ss for v in s} | {float("inf")})
    brute = [P.evaluate_processbench(scores, labels, t)["average"]["f1"] for t in grid]
    theta, res = P.best_theta(scores, labels)
    assert res["average"]["f1"] == pytest.approx(max(brute))
    assert theta == grid[int(np.argmax(brute))]
    # a theta strictly between grid points predicts like the next grid point up
    mid = (grid[2] + grid[3]) / 2
    assert P.evaluate_processbench(scores, labels, mid)["average"] == P.evaluate_processbench(
        scores, labels, grid[3])["average"]


def test_theta_from_split():
    scores = {
        "gsm8k": [[0.9, 0.2], [0.9, 0.8], [0.3, 0.9], [0.6, 0.7]],  # best theta 0.6 (see hand case)
        "math": [[0.55, 0.9], [0.65], [0.1]],
    }
    labels = {"gsm8k": [1, -1, 0, -1], "math": [0, -1, -1]}
    theta, res = P.theta_from_split(scores, labels, "gsm8k")
    assert theta == 0.6
    # at 0.6 on math: item0 predicted 0 (right), item1 -1 (right), item2 predicted 0 (wrong)
    assert (res["subsets"]["math"]["acc_err"], res["subsets"]["math"]["acc_corr"]) == (100.0, 50.0)
    assert res["subsets"]["gsm8k"]["f1"] == 100.0
    with pytest.raises(ValueError, match="not among"):
        P.theta_from_split(scores, labels, "omnimath")
