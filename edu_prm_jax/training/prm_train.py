"""PRM training inputs: labelled-step records -> a resumable, deterministic stream of packed batches.

Records are read from the TFDS array_record dataset `edu-prm label` writes (through `tfds.data_source` and a
grain MapDataset shuffled by seed, repeated forever), falling back to its JSONL shards. The stream's state is
one integer (the position in the grain sequence), saved with every checkpoint, so a resumed run sees exactly
the batches an uninterrupted run would have. Held-out questions (by a stable hash of the question id) form the
eval split: no question contributes to both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from edu_prm_jax.models.prm import masked_bce
from edu_prm_jax.records.steps import load_label_records as load_label_records  # re-exported: training's input
from edu_prm_jax.scoring.aggregate import best_index, solution_score
from edu_prm_jax.scoring.examples import PRMExample, build_example, score_examples
from edu_prm_jax.scoring.metrics import auroc


def is_eval_question(question_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(str(question_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_records(records: Sequence[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for r in records:
        (held if is_eval_question(r["question_id"], eval_fraction) else train).append(r)
    return train, held


def to_examples(records: Sequence[dict], prm: Any, max_len: int, supervise: str = "step_end") -> list[PRMExample]:
    out = []
    for r in records:
        ex = build_example(r, head=prm.head_spec.name, separator_id=prm.separator_id, max_len=max_len,
                           on_overflow="drop", record_id=r.get("id"), supervise=supervise)
        if ex is not None:
            out.append(ex)
    return out


class PackedStream:
    """Infinite iterator of packed [rows, seq_len] batches over a grain-shuffled example sequence.

    Packing is sequential: examples fill rows in grain order; one that does not fit the current row starts the
    next row, and one that does not fit the batch starts the next batch. State = next position."""

    def __init__(self, examples: Sequence[PRMExample], seq_len: int, rows: int, seed: int):
        if not examples:
            raise ValueError("no training examples (all labelled steps held out or too long?)")
        self.examples, self.seq_len, self.rows = list(examples), seq_len, rows
        self.order = grain.MapDataset.range(len(self.examples)).shuffle(seed=seed).repeat(None)
        self.position = 0

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("position", 0))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        shape = (self.rows, self.seq_len)
        batch = {"tokens": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
                 "segment_ids": np.zeros(shape, np.int32), "step_end_mask": np.zeros(shape, bool),
                 "loss_mask": np.zeros(shape, bool), "targets": np.zeros(shape, np.float32)}
        row, col, seg = 0, 0, 0
        while True:
            ex = self.examples[int(self.order[self.position])]
            n = len(ex.tokens)
            if col + n > self.seq_len:
                row, col, seg = row + 1, 0, 0
                if row == self.rows:
                    return batch
            seg += 1
            sl = slice(col, col + n)
            batch["tokens"][row, sl] = ex.tokens
            batch["positions"][row, sl] = np.arange(n)
            batch["segment_ids"][row, sl] = seg
            batch["step_end_mask"][row, sl] = ex.step_end_mask
            batch["loss_mask"][row, sl] = ex.loss_mask
            batch["targets"][row, sl] = ex.targets
            col += n
            self.position += 1


def selection_metrics(step_scores: Sequence[Sequence[float]], final_labels: Sequence[float],
                      groups: Sequence[Any]) -> dict[str, float]:
    """How well min-aggregated solution scores rank solutions of the same question (what Best-of-N needs; a
    pooled step AUROC also rewards knowing which questions are hard). A solution is correct when its last
    step's label is >= 0.5 (for tree labels that label is the leaf's own correctness).

    - pair_accuracy: over (correct, wrong) solution pairs of one question, the share where the correct one
      scores higher (ties count half); 0.5 is chance.
    - select_accuracy: over questions with at least one correct solution, the share where the top-scored
      solution is correct.
    """
    by_group: dict[Any, list[tuple[float, bool]]] = {}  # (min-aggregated score, correct) per solution
    for scores, label, group in zip(step_scores, final_labels, groups):
        by_group.setdefault(group, []).append((solution_score(list(scores), "min"), label >= 0.5))
    wins = pairs = selected = solvable = 0.0
    for solutions in by_group.values():
        good = [score for score, correct in solutions if correct]
        bad = [score for score, correct in solutions if not correct]
        if not good:
            continue
        solvable += 1
        selected += solutions[best_index([score for score, _ in solutions])][1]
        for g in good:
            wins += sum((g > b) + 0.5 * (g == b) for b in bad)
            pairs += len(bad)
    return {"pair_accuracy": wins / pairs if pairs else float("nan"),
            "select_accuracy": selected / solvable if solvable else float("nan")}


def make_eval_fn(examples: Sequence[PRMExample], rows: int, pos_weight: float = 1.0,
                 groups: Sequence[Any] | None = None):
    """Held-out loss (the training BCE at step ends), step accuracy and step AUROC (target >= 0.5 is the
    positive class); with `groups` (the question id of each example) also the within-question
    `selection_metrics`. One scoring pass over the held-out set serves all of them."""
    targets = np.concatenate([ex.targets[ex.step_ends] for ex in examples]).astype(np.float64) if examples else None

    def eval_fn(model: Any, step: int) -> dict[str, float]:
        if not examples:
            return {}
        per_example = score_examples(model, examples, batch_size=rows, logits=True)
        z = np.concatenate([np.asarray(x, np.float64) for x in per_example])
        loss, step_metrics = masked_bce(jnp.asarray(z), jnp.asarray(targets), jnp.ones(len(z), bool), pos_weight)
        scores = 1.0 / (1.0 + np.exp(-z))
        out = {"loss": float(loss), "step_accuracy": float(step_metrics["step_accuracy"]),
               "step_auroc": auroc(scores, targets >= 0.5), "steps": float(len(z))}
        if groups is not None:
            step_scores = np.split(scores, np.cumsum([len(x) for x in per_example])[:-1])
            finals = [float(ex.targets[ex.step_ends[-1]]) for ex in examples]
            out.update(selection_metrics(step_scores, finals, groups))
        return out

    return eval_fn
