"""PRM training inputs: labelled-step records -> a resumable, deterministic stream of packed batches.

Records are read from the TFDS array_record dataset `edu-prm label` writes (through `tfds.data_source` and a
grain MapDataset shuffled by seed, repeated forever), falling back to its JSONL shards. The stream's state is
one integer (the position in the grain sequence), saved with every checkpoint, so a resumed run sees exactly
the batches an uninterrupted run would have. Held-out questions (by a stable hash of the question id) form the
eval split: no question contributes to both.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx

from edu_prm_jax.data.records import read_shards
from edu_prm_jax.evaluation.metrics import auroc
from edu_prm_jax.models.prm import masked_bce
from edu_prm_jax.training.prm_data import PRMExample, build_example, make_prm_batches

TFDS_NAME = "labels"


def is_eval_question(question_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(str(question_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _from_tfds(example: dict) -> dict:
    flat, lengths = list(example["step_ids_flat"]), list(example["step_lengths"])
    steps, pos = [], 0
    for n in lengths:
        steps.append([int(t) for t in flat[pos:pos + n]])
        pos += n
    return {"id": example["id"], "question_id": example["question_id"],
            "prompt_ids": [int(t) for t in example["prompt_ids"]], "step_ids": steps,
            "labels": [float(x) for x in example["labels"]]}


def load_label_records(labels_dir: pathlib.Path) -> list[dict]:
    """All labelled-step records, from the TFDS dataset when present, else from the JSONL shards."""
    tfds_dir = labels_dir / "tfds"
    if (tfds_dir / TFDS_NAME).is_dir():
        from edu_prm_jax.data.tfds_io import grain_loader, open_tfds_source

        ds = grain_loader(open_tfds_source(tfds_dir, TFDS_NAME, "train"), shuffle=False)
        return [_from_tfds(ds[i]) for i in range(len(ds))]
    return list(read_shards(labels_dir, "steps"))


def split_records(records: Sequence[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for r in records:
        (held if is_eval_question(r["question_id"], eval_fraction) else train).append(r)
    return train, held


def to_examples(records: Sequence[dict], prm: Any, max_len: int) -> list[PRMExample]:
    out = []
    for r in records:
        ex = build_example(r, convention=prm.head_kind, separator_id=prm.separator_id, max_len=max_len,
                           on_overflow="drop", record_id=r.get("id"))
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
                 "targets": np.zeros(shape, np.float32)}
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
            batch["targets"][row, sl] = ex.targets
            col += n
            self.position += 1


def make_eval_fn(examples: Sequence[PRMExample], seq_len: int, rows: int, pos_weight: float = 1.0):
    """Held-out loss, step accuracy and step AUROC (target >= 0.5 is the positive class)."""
    batches = make_prm_batches(list(examples), seq_len, rows, seed=0) if examples else []

    @jax.jit
    def forward(graphdef, state, batch):
        prm = nnx.merge(graphdef, state)
        logits = prm(batch["tokens"], batch["positions"], batch["segment_ids"])
        loss, _ = masked_bce(logits, batch["targets"], batch["step_end_mask"], pos_weight)
        return logits, loss

    def eval_fn(model: Any, step: int) -> dict[str, float]:
        if not batches:
            return {}
        graphdef, state = nnx.split(model)
        scores, targets, losses, weights = [], [], [], []
        for b in batches:
            logits, loss = forward(graphdef, state, b)
            mask = b["step_end_mask"]
            scores.append(np.asarray(jax.nn.sigmoid(logits))[mask])
            targets.append(b["targets"][mask])
            losses.append(float(loss))
            weights.append(int(mask.sum()))
        s, t = np.concatenate(scores), np.concatenate(targets)
        accuracy = float(((s >= 0.5) == (t >= 0.5)).mean())
        return {"loss": float(np.average(losses, weights=weights)), "step_accuracy": accuracy,
                "step_auroc": auroc(s, t >= 0.5), "steps": float(len(s))}

    return eval_fn
