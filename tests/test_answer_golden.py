"""The golden answer corpus (tests/data/answer_golden.jsonl): every verdict, in both argument orders.

Each line is one (prediction, gold, verdict) triple with a one-line reason and a source: a public grader bug
report (math-verify, the Qwen2.5-Math grader, lm-evaluation-harness, opencompass, helm, ...) or an answer format
of MATH / GSM8K. `solution: true` rows hold a whole solution text: its extracted answer is what is compared.
"""

import collections
import json
import pathlib

import pytest

from edu_prm_jax.grading.answers import answers_verdict, extract_answer

CORPUS = pathlib.Path(__file__).parent / "data" / "answer_golden.jsonl"
ROWS = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
FAMILIES = {
    "rational_decimal", "closed_form", "fraction", "percentage", "units_degrees", "text_wrappers", "markdown",
    "interval", "sets_tuples", "equation", "matrix", "multiple_choice", "words", "thousands", "negative",
    "scientific", "empty_set", "infinity", "plus_minus", "near_miss", "extraction",
}


def test_corpus_is_complete_and_documented():
    assert len(ROWS) >= 150
    for k, row in enumerate(ROWS, 1):
        assert set(row) == {"family", "pred", "gold", "verdict", "solution", "reason", "source"}, k
        assert isinstance(row["verdict"], bool) and row["reason"].strip() and row["source"].strip(), k
        assert "\n" not in row["reason"], k
    families = collections.Counter(row["family"] for row in ROWS)
    assert FAMILIES <= set(families), FAMILIES - set(families)
    assert sum(not row["verdict"] for row in ROWS) >= 50  # near misses that must stay False
    pairs = [(row["pred"], row["gold"]) for row in ROWS]
    assert len(set(pairs)) == len(pairs)  # no duplicate cases


@pytest.mark.parametrize("row", ROWS, ids=[f"{k:03d}-{row['family']}" for k, row in enumerate(ROWS, 1)])
def test_golden_verdict_in_both_orders(row):
    pred = extract_answer(row["pred"]) if row["solution"] else row["pred"]
    assert pred is not None, "no answer extracted"
    assert answers_verdict(pred, row["gold"]) is row["verdict"], row["reason"]
    assert answers_verdict(row["gold"], pred) is row["verdict"], row["reason"]
