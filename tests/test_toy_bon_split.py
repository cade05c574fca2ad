"""benchmarks/toy_bon_split: the per-group Best-of-N figures, recounted by hand on four questions."""

import math

from benchmarks.toy_bon_split import split_accuracy
from edu_prm_jax.evaluation.bon import Candidate


def _c(answer: str, correct: bool, score: float) -> Candidate:
    return Candidate(answer=answer, correct=correct, step_scores=[score])


def test_split_accuracy_hand_worked():
    records = [{"id": "a", "problem": "Start with 6. Add 1. What is the result?"},
               {"id": "b", "problem": "Start with 2. Add 6. What is the result?"},
               {"id": "c", "problem": "Start with 2. Add 1. What is the result?"},
               {"id": "d", "problem": "Start with 3. Add 1. What is the result?"}]
    cands = [[_c("10", False, 0.2), _c("7", True, 0.9), _c("10", False, 0.3)],  # PRM right, majority wrong
             [_c("11", False, 0.8), _c("8", True, 0.1), _c("11", False, 0.5)],  # both wrong, pass@n right
             [_c("3", True, 0.1), _c("4", False, 0.9), _c("3", True, 0.2)],  # PRM wrong, majority right
             [_c("4", True, 0.9), _c("4", True, 0.8), _c("5", False, 0.1)]]  # both right
    greedy = {"a": False, "b": True, "c": True, "d": False}
    out = split_accuracy(records, cands, greedy, n=3, number=6)
    assert out[True] == {"questions": 2, "prm_min": 50.0, "majority": 0.0, "greedy": 50.0, "pass@n": 100.0}
    assert out[False] == {"questions": 2, "prm_min": 50.0, "majority": 100.0, "greedy": 50.0, "pass@n": 100.0}
    # only the first n candidates count: with n=1, question a has just its wrong first sample
    one = split_accuracy(records[:1], cands[:1], greedy, n=1, number=6)
    assert one[True]["pass@n"] == 0.0
    assert one[False]["questions"] == 0 and math.isnan(one[False]["prm_min"])  # an empty group, not a crash
