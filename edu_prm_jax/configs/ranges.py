"""The valid range of every numeric config field, checked when a config is loaded, before any model loads.

Why one table keyed by field name: the same name means the same thing in every command (`steps`, `tau`,
`num_leaves` ...), so a range is written once. A test walks every shipped config and fails when a numeric field
has no entry here, so a new field cannot skip validation. Every value must also be finite (no NaN or inf).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Range:
    """low <= value <= high (strict where `*_open`), or one of `also` (e.g. -1 for "all devices")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = " and ".join(parts) if parts else "finite"
        return text + "".join(f" (or {a:g})" for a in self.also)


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
PROBABILITY = Range(0, 1)
MESH_AXIS = Range(1, also=(-1,))  # a mesh dimension: a size, or -1 for the devices left over

FIELD_RANGES: dict[str, Range] = {
    "accum_steps": AT_LEAST_1, "alpha": Range(0, 1, low_open=True), "beta": Range(0, 1, low_open=True),
    "c_puct": AT_LEAST_0, "k": AT_LEAST_1, "length_scale": POSITIVE, "max_search_count": AT_LEAST_0,
    "rollout_budget": AT_LEAST_0, "solutions": AT_LEAST_1, "toy_processbench_n": Range(2), "mcts_c": AT_LEAST_0,
    "batch_questions": AT_LEAST_1, "batch_size": AT_LEAST_1, "branch_k": Range(2),
    "checkpoint_every": AT_LEAST_0, "clip_norm": Range(), "data": MESH_AXIS, "end_lr_fraction": PROBABILITY,
    "eval_every": AT_LEAST_0, "eval_fraction": Range(0, 1, high_open=True), "expand_layers": AT_LEAST_0,
    "extra_rollouts_k": AT_LEAST_1, "extra_rollouts_min_leaves": AT_LEAST_0, "fsdp": MESH_AXIS,
    "ht_temperature": POSITIVE, "keep_checkpoints": AT_LEAST_1, "learning_rate": POSITIVE, "limit": AT_LEAST_0,
    "max_anchors": AT_LEAST_1, "max_new_tokens": AT_LEAST_1, "max_tokens": AT_LEAST_1, "misread_rate": PROBABILITY,
    "num_leaves": AT_LEAST_1, "num_shards": AT_LEAST_0, "peak_flops": POSITIVE, "pos_weight": POSITIVE,
    "prompt_bucket": AT_LEAST_1, "prompt_len": AT_LEAST_1, "prune_below": PROBABILITY, "rows": AT_LEAST_1,
    "score_len": AT_LEAST_0, "score_rows": AT_LEAST_0, "seed": AT_LEAST_0, "seq_len": Range(2),
    "shard_bytes": AT_LEAST_1, "shepherd_k": AT_LEAST_1, "steps": AT_LEAST_1,
    "tau": AT_LEAST_0, "temperature": POSITIVE, "tensor": MESH_AXIS, "theta": PROBABILITY, "top_k": AT_LEAST_0,
    "top_p": Range(0, 1, low_open=True), "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
}


def range_of(dotted: str) -> Range | None:
    """The range of field `dotted` (by its last name), or None for a field with no numeric range."""
    return FIELD_RANGES.get(dotted.rsplit(".", 1)[-1])
