"""Labelled-step records: what `edu-prm label` writes (one JSON object per leaf path) and PRM training reads.

`StepRecord` is the one schema of the `steps-*` shards (README "Files between stages"); the same records go to
a TFDS array_record dataset (`TFDS_FEATURES`, `StepRecord.tfds_example`) that training streams. Training needs
only `TrainingRecord`'s fields (all the TFDS copy carries), and other tools write step shards holding only those
(benchmarks/toy_verifier.py), so `load_label_records` validates just them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from edu_prm_jax.io import storage
from edu_prm_jax.io.jsonl import PathLike
from edu_prm_jax.records.codec import Record, TokenId, read_record_shards

STEPS_PREFIX = "steps"
MADE_BY = "edu-prm label"
TFDS_NAME = "labels"
TFDS_FEATURES = {"id": "string", "question_id": "string", "prompt_ids": "int32[]", "step_ids_flat": "int32[]",
                 "step_lengths": "int32[]", "labels": "float32[]", "label_kind": "string[]",
                 "final_correct": "bool"}


def _per_step(values: list, info: ValidationInfo, steps_field: str = "step_ids") -> list:
    """Check that a per-step list has one entry per step (`steps_field` must be declared before it)."""
    steps = info.data.get(steps_field)
    if steps is not None and len(values) != len(steps):
        raise PydanticCustomError("per_step", "{n} entries for {steps} steps", {"n": len(values), "steps": len(steps)})
    return values


class Provenance(Record):
    """How a labelled path was made: the tree it came from and its per-step Monte Carlo counts."""

    method: str  # edu (tree) or shepherd
    source_shard: str  # the `trees-*` file name
    mode: str  # the tree's sampling mode
    sampler: dict[str, Any]  # the tree's sampler params
    slot: int
    values: list[float]  # MC value v of each step, before the target is applied
    node_leaves: list[int]  # leaves (tree + extra rollouts) under each step's node
    node_correct: list[int]
    node_rollouts: list[int]  # how many of node_leaves are extra rollouts
    rollout_params: dict[str, Any] | None = None  # sampler params of the rollouts, when any were sampled


class StepRecord(Record):
    """One leaf path cut into labelled steps, as one line of a `steps-*` shard."""

    id: str  # <question id>/<slot>
    question_id: str
    problem: str = ""  # absent in records written before labels carried it
    prompt: str
    prompt_ids: list[TokenId]
    steps: list[str]  # text per step
    step_ids: list[list[TokenId]]  # generated token ids per step; joined, the leaf's tokens
    labels: list[float]
    label_kind: list[Literal["hard", "soft"]]  # hard for a 0/1 label
    target: str  # edu / hard / soft
    final_correct: bool
    provenance: Provenance

    @field_validator("step_ids")
    @classmethod
    def _one_id_list_per_step(cls, step_ids: list[list[int]], info: ValidationInfo) -> list[list[int]]:
        return _per_step(step_ids, info, "steps")

    @field_validator("labels", "label_kind")
    @classmethod
    def _one_label_per_step(cls, values: list, info: ValidationInfo) -> list:
        return _per_step(values, info)

    @field_validator("provenance")
    @classmethod
    def _one_value_per_step(cls, provenance: Provenance, info: ValidationInfo) -> Provenance:
        steps = info.data.get("step_ids")
        if steps is not None and len(provenance.values) != len(steps):
            raise PydanticCustomError("per_step", "values has {n} entries for {steps} steps",
                                      {"n": len(provenance.values), "steps": len(steps)})
        return provenance

    def tfds_example(self) -> dict[str, Any]:
        """The record as a TFDS example (`TFDS_FEATURES`): the steps concatenated plus their lengths."""
        return {"id": self.id, "question_id": self.question_id, "prompt_ids": self.prompt_ids,
                "step_ids_flat": [t for s in self.step_ids for t in s], "step_lengths": [len(s) for s in self.step_ids],
                "labels": self.labels, "label_kind": self.label_kind, "final_correct": self.final_correct}


class TrainingRecord(Record):
    """The fields of a labelled-step record that PRM training reads (`scoring.examples.build_example`)."""

    id: str
    question_id: str
    prompt_ids: list[TokenId]
    step_ids: list[list[TokenId]]
    labels: list[float]

    @field_validator("labels")
    @classmethod
    def _one_label_per_step(cls, labels: list[float], info: ValidationInfo) -> list[float]:
        return _per_step(labels, info)


def read_step_shards(directory: PathLike) -> Iterator[StepRecord]:
    """The validated labelled-step records of all `steps-*` shards of `directory`, in shard order."""
    return read_record_shards(directory, STEPS_PREFIX, StepRecord, MADE_BY)


def training_record_from_tfds(example: dict[str, Any]) -> dict[str, Any]:
    """A decoded TFDS example back to the training fields (the steps split by their lengths)."""
    flat, lengths = list(example["step_ids_flat"]), list(example["step_lengths"])
    steps, pos = [], 0
    for n in lengths:
        steps.append([int(t) for t in flat[pos:pos + n]])
        pos += n
    return {"id": example["id"], "question_id": example["question_id"],
            "prompt_ids": [int(t) for t in example["prompt_ids"]], "step_ids": steps,
            "labels": [float(x) for x in example["labels"]]}


def load_label_records(labels_dir: PathLike) -> list[dict[str, Any]]:
    """All labelled-step records of a `label` output as training dicts, from its TFDS dataset when present, else
    from its JSONL shards (validated: a bad line is a DataError naming the file, line and field)."""
    tfds_dir = storage.as_path(labels_dir) / "tfds"
    if (tfds_dir / TFDS_NAME).is_dir():
        from edu_prm_jax.io.tfds import grain_loader, open_tfds_source  # TFDS loads only when a dataset is there

        ds = grain_loader(open_tfds_source(tfds_dir, TFDS_NAME, "train"), shuffle=False)
        return [training_record_from_tfds(ds[i]) for i in range(len(ds))]
    return [r.to_json() for r in read_record_shards(labels_dir, STEPS_PREFIX, TrainingRecord, MADE_BY)]
