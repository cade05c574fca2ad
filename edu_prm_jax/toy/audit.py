"""Monte Carlo step labels against the toy world's exact step correctness.

Why: an MC label only sees final answers, so it calls a step right when some continuation below it reaches the
gold answer. In the toy world every step can be checked exactly, which measures how often that goes wrong: a
weak policy that slips twice ("18 * 4 = 70", then "70 + 6 = 78") reaches the right answer through a wrong line,
and the MC label of that line says it is fine. `label_stats` reports these figures for toy questions.
"""

from __future__ import annotations

from collections.abc import Sequence

from edu_prm_jax.toy import world as toy


def exact_step_correctness(problem: str, steps: Sequence[str]) -> list[bool] | None:
    """Per step: is the solution text up to the end of the step still on the reference solution? None when
    `problem` is not a toy problem. Text past the end of a complete reference (e.g. after the answer) keeps it
    correct."""
    try:
        start, ops = toy.ToyTask.parse_problem(problem)
        reference = toy.render(start, ops)["solution"]
    except ValueError:  # not a toy problem, or a chain the toy world cannot evaluate (inexact division)
        return None
    out, prefix = [], ""
    for step in steps:
        prefix += step
        out.append(reference.startswith(prefix) or prefix.startswith(reference))
    return out


class ToyLabelAudit:
    """Accumulates, over labelled-step records of toy questions, how MC values and the emitted labels compare
    with exact correctness: `toy_step_agreement` reads "a right answer is reachable below" (v > 0),
    `toy_label_agreement` the label a PRM is trained on (label >= 0.5, i.e. what BCE pushes the step towards),
    so labellers with different targets (hard 1[v > 0], soft v) are scored on what they teach."""

    def __init__(self) -> None:
        self.solutions = self.steps = self.agree = self.right_answers = self.right_through_wrong = 0
        self.label_agree = 0

    def add(self, record: dict) -> None:
        exact = exact_step_correctness(record.get("problem", ""), record["steps"])
        if exact is None:
            return
        reachable = [v > 0 for v in record["provenance"]["values"]]
        if len(reachable) != len(exact):
            raise ValueError(f"record {record.get('id')}: {len(exact)} steps but {len(reachable)} MC values")
        self.solutions += 1
        self.steps += len(exact)
        self.agree += sum(a == b for a, b in zip(exact, reachable))
        self.label_agree += sum(a == (label >= 0.5) for a, label in zip(exact, record["labels"]))
        if record["final_correct"]:
            self.right_answers += 1
            self.right_through_wrong += not all(exact)

    def summary(self) -> dict[str, float | int | None]:
        """Empty when no toy record was seen; the right-answer share is None when no audited path was right."""
        if not self.solutions:
            return {}
        return {"toy_audited_solutions": self.solutions,
                "toy_step_agreement": round(self.agree / self.steps, 6),
                "toy_label_agreement": round(self.label_agree / self.steps, 6),
                "toy_right_answers_through_a_wrong_step": round(self.right_through_wrong / self.right_answers, 6)
                if self.right_answers else None}  # no right answer: a share of nothing
