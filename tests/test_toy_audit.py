"""The toy audit of MC labels, on hand-worked records (one compensated slip, one clean path, one non-toy)."""

from edu_prm_jax.commands.label import label_stats
from edu_prm_jax.toy.audit import exact_step_correctness

PROBLEM = "Start with 2. Add 3. Multiply by 4. What is the result?"  # 2 + 3 = 5, 5 * 4 = 20


def record(problem, steps, values, final_correct, qid="q"):
    return {"question_id": qid, "problem": problem, "steps": steps, "labels": [float(v > 0) for v in values],
            "label_kind": ["hard"] * len(steps), "final_correct": final_correct, "provenance": {"values": values}}


def test_exact_step_correctness_hand_worked():
    assert exact_step_correctness(PROBLEM, ["2 + 3 = ", "5\n5 * 4 = 2", "0\nThe answer is \\boxed{20}."]) == [
        True, True, True]
    assert exact_step_correctness(PROBLEM, ["2 + 3 = ", "6\n6 * 4 = 24", "\nThe answer is \\boxed{24}."]) == [
        True, False, False]
    # a right answer reached through a wrong line is still wrong from that line on
    assert exact_step_correctness(PROBLEM, ["2 + 3 = 6\n", "6 * 4 = 20\nThe answer is \\boxed{20}."]) == [
        False, False]
    assert exact_step_correctness("What is 1 + 1?", ["2"]) is None


def test_label_stats_audit_counts_compensated_slips():
    records = [
        record(PROBLEM, ["2 + 3 = 6\n", "6 * 4 = 20\nThe answer is \\boxed{20}."], [0.5, 1.0], True),  # 0 of 2 agree
        record(PROBLEM, ["2 + 3 = 5\n", "5 * 4 = 20\nThe answer is \\boxed{20}."], [0.5, 1.0], True),  # 2 of 2
        record(PROBLEM, ["2 + 3 = 5\n", "5 * 4 = 21\nThe answer is \\boxed{21}."], [0.5, 0.0], False),  # 2 of 2
        record("What is 1 + 1?", ["2"], [1.0], True, qid="other"),  # not a toy problem: not audited
    ]
    stats = label_stats(iter(records))
    assert stats["toy_audited_solutions"] == 3
    assert stats["toy_step_agreement"] == round(4 / 6, 6)  # label_stats rounds to 6 places
    assert stats["toy_right_answers_through_a_wrong_step"] == 1 / 2
    assert "toy_step_agreement" not in label_stats(iter(records[3:]))


def test_label_agreement_reads_the_emitted_label_not_the_value():
    """A soft label 0.25 on a right step: v > 0 agrees with the truth, the label (< 0.5) teaches 'wrong'."""
    soft = record(PROBLEM, ["2 + 3 = 5\n", "5 * 4 = 20\nThe answer is \\boxed{20}."], [0.25, 1.0], True)
    soft["labels"] = [0.25, 1.0]
    wrong = record(PROBLEM, ["2 + 3 = 6\n", "6 * 4 = 24\nThe answer is \\boxed{24}."], [0.75, 0.0], False)
    wrong["labels"] = [0.75, 0.0]  # step 0 is wrong but labelled 0.75: disagrees; step 1 agrees
    stats = label_stats(iter([soft, wrong]))
    assert stats["toy_step_agreement"] == round(3 / 4, 6)  # v > 0: T,T (right, right); T,F vs F,F: 1 of 2
    assert stats["toy_label_agreement"] == round(2 / 4, 6)  # labels >= 0.5: F,T vs T,T; T,F vs F,F
