"""Sampled trees -> scored Best-of-N candidates.

Step boundaries for scoring: EDU / P-EDU leaves split at their anchors (exactly how the PRM's training steps
were cut). HT and greedy samples have no forks, so they split at their `high_entropy` indices: the positions
where the policy's temperature-1 entropy (computed in-graph from the same logits, i.e. the teacher-forced
entropy of the sampled text) exceeded tau with a non-symbol top-1 token — the positions EDU would have
branched at given free slots.

Correctness: `grading.answers.answers_verdict` of the candidate's extracted answer against the gold. A candidate
whose check stayed undecided (out of its CPU bound twice) counts as not correct for selection, is flagged
`undecided` and is counted in the Best-of-N report, so an accuracy never silently absorbs undecided checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from edu_prm_jax.evaluation.bon import Candidate
from edu_prm_jax.grading.answers import answers_verdict, extract_answer
from edu_prm_jax.records.trees import step_spans
from edu_prm_jax.scoring.examples import build_example
from edu_prm_jax.scoring.multihost import score_examples_across_processes


@dataclasses.dataclass
class GradedCandidate(Candidate):
    """A Best-of-N candidate whose answer check may have stayed undecided (then `correct` is False)."""

    undecided: bool = False


def count_undecided(cands_per_question: Sequence[Sequence[Candidate]]) -> int:
    """Candidates whose answer check stayed undecided (plain `Candidate`s count as decided)."""
    return sum(bool(getattr(c, "undecided", False)) for cands in cands_per_question for c in cands)


def leaf_steps(leaf: dict[str, Any], split: str) -> list[list[int]]:
    """Token ids of each step of a leaf; `split` is 'anchors' or 'high_entropy'."""
    ids = leaf["token_ids"]
    return [ids[a:b] for a, b in step_spans(len(ids), leaf[split])]


def score_records(prm: Any, records: Sequence[dict[str, Any]], split: str, batch_size: int = 32
                  ) -> list[list[Candidate]]:
    """One list of scored candidates (`GradedCandidate`) per tree record (leaves in slot order).

    In a multi-host job every process calls it with the same records: the scoring batches are split over the
    processes and gathered (`scoring.multihost`), so every process gets the candidates a single process would."""
    examples, owners = [], []
    for qi, rec in enumerate(records):
        for leaf in rec["leaves"]:
            steps = leaf_steps(leaf, split)
            if not steps:  # a path that generated nothing still is a candidate (no answer, score 0)
                owners.append((qi, leaf, None))
                continue
            record = {"prompt_ids": rec["prompt_ids"], "step_ids": steps, "labels": [0.0] * len(steps)}
            examples.append(build_example(record, head=prm.head_spec.name, separator_id=prm.separator_id,
                                          record_id=f"{rec['id']}/{leaf['slot']}"))
            owners.append((qi, leaf, len(examples) - 1))
    scores = score_examples_across_processes(prm, examples, batch_size=batch_size, name="best-of-n candidates")
    out: list[list[Candidate]] = [[] for _ in records]
    for qi, leaf, ex in owners:
        gold = records[qi].get("answer")
        text = leaf["text"]
        answer = extract_answer(text)
        logprobs = leaf.get("logprobs") or []
        verdict = answers_verdict(answer, gold) if gold is not None else False
        out[qi].append(GradedCandidate(answer=answer, correct=verdict is True,
                                       step_scores=scores[ex] if ex is not None else [],
                                       mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
                                       undecided=verdict is None))
    return out
