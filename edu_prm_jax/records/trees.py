"""Tree records: what `edu-prm sample` writes (one JSON object per question) and `label` / `eval-bon` read.

A tree record holds the question, its prompt and one leaf per slot; the steps of a leaf are its generated token
ids cut at its anchors (`step_spans`). `TreeRecord` is the one schema of the `trees-*` shards (README "Files
between stages"): the sampler builds it, `to_json()` is the line it writes, `read_tree_shards` the validated read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from etils import epath
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from edu_prm_jax.io.jsonl import PathLike
from edu_prm_jax.io.shards import shard_paths
from edu_prm_jax.records.codec import Record, TokenId, one_of, read_record_shards, read_records

TREES_PREFIX = "trees"
MADE_BY = "edu-prm sample"


def step_spans(num_tokens: int, anchors: Sequence[int]) -> list[tuple[int, int]]:
    """Non-empty [start, end) spans of a path of `num_tokens` tokens cut before each anchor index."""
    cuts = sorted({a for a in anchors if 0 < a < num_tokens})
    bounds = [0, *cuts, num_tokens]
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]


class LeafRecord(Record):
    """One root-to-leaf path (one slot): `sampling.engine.Leaf` on disk, fields in its order.

    Fields a labeller does not need (parent, fork position, entropies, log-probabilities, stop reason,
    high-entropy flags) may be absent.
    """

    slot: int
    parent_slot: int = -1  # -1 for a root / an HT sample
    fork_pos: int = 0  # generated-token index where the path left its parent
    token_ids: list[TokenId]
    entropies: list[float] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    anchors: list[int]  # generated-token indices where the path branched: step boundaries
    stop_reason: str = ""
    high_entropy: list[int] = Field(default_factory=list)  # indices that qualified as anchors, forked or not
    text: str

    @field_validator("anchors")
    @classmethod
    def _anchors_on_the_path(cls, anchors: list[int], info: ValidationInfo) -> list[int]:
        ids = info.data.get("token_ids")
        if ids is None:  # token_ids failed: that error is the one reported
            return anchors
        n = len(ids)
        bad = [a for a in anchors if not 0 <= a <= n]
        if bad:
            raise PydanticCustomError("anchor_range", "anchor {anchor} outside [0, {n}] (the path has {n} tokens)",
                                      {"anchor": bad[0], "n": n})
        return anchors


class TreeRecord(Record):
    """One question's sampled tree, as one line of a `trees-*` shard."""

    id: Annotated[str | int, one_of(str, int)]  # the writer writes a str; hand-made files may hold an int
    index: int  # position of the question in the sampler's input
    problem: str
    answer: Annotated[str | int | float | None, one_of(str, int, float, type(None))] = None  # gold; null if none
    prompt: str  # the rendered chat prompt
    prompt_ids: list[TokenId]
    mode: str  # edu / ht / greedy
    params: dict[str, Any]  # every sampler setting used (sampling.decode.DecodeParams)
    leaves: list[LeafRecord]
    distinct_tokens: int  # tree cost: generated tokens counted once, shared prefixes once, plus pruned_tokens
    pruned_tokens: int = 0  # tokens of paths P-EDU pruned

    @property
    def question_id(self) -> str:
        return str(self.id)


def read_tree_file(path: PathLike) -> Iterator[TreeRecord]:
    """The validated tree records of one shard file."""
    return read_records(path, TreeRecord)


def tree_shard_paths(directory: PathLike) -> list[epath.Path]:
    """All `trees-*` shards of `directory`, checked complete."""
    return shard_paths(directory, TREES_PREFIX, MADE_BY)


def read_tree_shards(directory: PathLike) -> Iterator[TreeRecord]:
    """The validated tree records of all `trees-*` shards of `directory`, in shard order."""
    return read_record_shards(directory, TREES_PREFIX, TreeRecord, MADE_BY)
