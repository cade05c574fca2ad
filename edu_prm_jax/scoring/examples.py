"""Labelled-step records -> PRM inputs (tokens, step-end mask, soft targets), packed batches, and scoring.

Record format (one per solution):
    {"id": optional, "prompt_ids": [int], "step_ids": [[int], ...], "labels": [float in [0, 1]] one per step}
`step_ids` are each step's token ids as generated. Step ends come from these spans, never from re-tokenizing
joined text (re-tokenizing moves boundaries when a merge spans two steps, the classic PRM label shift).

Step layouts (`head=` names a registered head, models/heads.py; its `step_layout` decides):
- LAST_TOKEN (e.g. "scalar"): the step end is the last token of the step; nothing is inserted.
- SEPARATOR_AFTER (e.g. "qwen_math"): a separator id (Qwen's `<extra_0>`) is inserted after each step; the step
  end is the separator.

Supervision (`supervise=`): "step_end" puts each step's label on its step end only; "step_tokens" puts it on
every token of the step (and its separator). With tree labels (no extra rollouts) that is exact, not an
approximation: the path is deterministic between anchors, so every prefix ending inside a step has the same leaves
below it, hence the same MC value, as the step end (extra rollouts count only at the node they start from).
It also supervises the anchor token itself (the token a fork chose); scoring still reads step ends only.

Malformed input raises `PRMDataError` naming the record and field; nothing is silently masked out. A record
longer than `max_len` would lose at least its last step end: by default that is an error; with
`on_overflow="drop"` the whole record is skipped and counted in `BuildStats.dropped_too_long`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.models.heads import get_head

SUPERVISE = ("step_end", "step_tokens")
SCORE_BUCKET = 64  # scoring pads lengths to a multiple of this, so jit compiles once per bucket


class PRMDataError(ValueError):
    """A record that cannot become a PRM example; the message names the record id and the field."""


@dataclasses.dataclass
class PRMExample:
    """One solution as model input: step ends marked, each with its target (0 elsewhere)."""

    record_id: Any
    tokens: np.ndarray  # int32 [L]
    step_end_mask: np.ndarray  # bool [L]
    targets: np.ndarray  # float32 [L]
    loss_mask: np.ndarray | None = None  # bool [L], positions that carry a target; None = step ends

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.step_end_mask

    @property
    def step_ends(self) -> np.ndarray:
        return np.flatnonzero(self.step_end_mask)


@dataclasses.dataclass
class BuildStats:
    """Counters from `build_examples`."""

    examples: int = 0
    steps: int = 0
    dropped_too_long: int = 0


def separator_ids(tokenizer: Any, text: str = "<extra_0>") -> int:
    """The one token id `text` encodes to. A separator that splits into several tokens would put the step end
    on a piece that also occurs inside ordinary text, so it is an error, not a guess."""
    ids = list(tokenizer.encode(text))
    if len(ids) != 1:
        raise PRMDataError(
            f"separator {text!r} encodes to {len(ids)} tokens {ids}, it must be exactly one token "
            f"(add it to the tokenizer as a special token)"
        )
    return int(ids[0])


def _int_list(value: Any, rid: Any, field: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise PRMDataError(
            f"record {rid!r}: field {field!r} must be a list of token ids, got {type(value).__name__}"
        )
    out = []
    for j, v in enumerate(value):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise PRMDataError(f"record {rid!r}: field {field}[{j}] = {v!r} is not an integer token id")
        if v < 0 or (vocab_size is not None and v >= vocab_size):
            raise PRMDataError(
                f"record {rid!r}: field {field}[{j}] = {v} is outside the vocabulary [0, {vocab_size})"
            )
        out.append(int(v))
    return out


def build_example(
    record: Mapping[str, Any],
    *,
    head: str,
    separator_id: int | None = None,
    max_len: int | None = None,
    on_overflow: str = "error",
    vocab_size: int | None = None,
    record_id: Any = None,
    supervise: str = "step_end",
) -> PRMExample | None:
    """One record -> `PRMExample` laid out for the registered head `head` (None only when it overflows
    `max_len` and on_overflow="drop")."""
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")
    use_sep = get_head(head).inserts_separator  # else the step end is the step's last token
    if on_overflow not in ("error", "drop"):
        raise ValueError(f"on_overflow must be 'error' or 'drop', got {on_overflow!r}")
    rid = record.get("id", record_id)
    for field in ("prompt_ids", "step_ids", "labels"):
        if field not in record:
            raise PRMDataError(f"record {rid!r}: missing field {field!r}")
    if use_sep and separator_id is None:
        raise PRMDataError(f"record {rid!r}: the {head} head inserts a separator after each step and needs its id")
    prompt = _int_list(record["prompt_ids"], rid, "prompt_ids", vocab_size)
    steps_raw = record["step_ids"]
    if not isinstance(steps_raw, (list, tuple)) or not steps_raw:
        raise PRMDataError(f"record {rid!r}: field 'step_ids' must be a non-empty list of steps")
    steps = [_int_list(s, rid, f"step_ids[{k}]", vocab_size) for k, s in enumerate(steps_raw)]
    labels = record["labels"]
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise PRMDataError(f"record {rid!r}: field 'labels' must be a list of numbers")
    if len(labels) != len(steps):
        raise PRMDataError(f"record {rid!r}: field 'labels' has {len(labels)} entries for {len(steps)} steps")
    for k, (step, label) in enumerate(zip(steps, labels)):
        if not step:
            raise PRMDataError(f"record {rid!r}: field step_ids[{k}] is an empty step")
        if use_sep and separator_id in step:
            raise PRMDataError(
                f"record {rid!r}: field step_ids[{k}] contains the separator id {separator_id}, "
                f"which would read as an extra step end"
            )
        if (
            isinstance(label, bool)
            or not isinstance(label, (int, float, np.integer, np.floating))
            or not math.isfinite(float(label))
            or not 0.0 <= float(label) <= 1.0
        ):
            raise PRMDataError(f"record {rid!r}: field labels[{k}] = {label!r} is not a number in [0, 1]")
    tokens = list(prompt)
    ends = []
    for step in steps:
        tokens.extend(step)
        if use_sep:
            tokens.append(int(separator_id))
        ends.append(len(tokens) - 1)
    if max_len is not None and len(tokens) > max_len:
        if on_overflow == "drop":
            return None
        lost = sum(e >= max_len for e in ends)
        raise PRMDataError(
            f"record {rid!r}: field 'step_ids': {len(tokens)} tokens exceed max_len={max_len}; "
            f"{lost} of {len(steps)} step end(s) would be truncated away"
        )
    n = len(tokens)
    mask = np.zeros(n, bool)
    targets = np.zeros(n, np.float32)
    mask[ends] = True
    starts = [len(prompt), *[e + 1 for e in ends[:-1]]]
    loss_mask = mask.copy() if supervise == "step_tokens" else None
    for start, end, label in zip(starts, ends, labels):
        if loss_mask is not None:
            targets[start:end + 1] = float(label)
            loss_mask[start:end + 1] = True
        else:
            targets[end] = float(label)
    return PRMExample(rid, np.asarray(tokens, np.int32), mask, targets, loss_mask)


def build_examples(
    records: Iterable[Mapping[str, Any]],
    *,
    head: str,
    separator_id: int | None = None,
    max_len: int | None = None,
    on_overflow: str = "error",
    vocab_size: int | None = None,
    supervise: str = "step_end",
) -> tuple[list[PRMExample], BuildStats]:
    """All records -> examples (a record without "id" is named by its 0-based index)."""
    stats = BuildStats()
    out = []
    for i, rec in enumerate(records):
        ex = build_example(
            rec,
            head=head,
            separator_id=separator_id,
            max_len=max_len,
            on_overflow=on_overflow,
            vocab_size=vocab_size,
            record_id=i,
            supervise=supervise,
        )
        if ex is None:
            stats.dropped_too_long += 1
            continue
        out.append(ex)
        stats.examples += 1
        stats.steps += int(ex.step_end_mask.sum())
    return out, stats


# ---------------------------------------------------------------------------------------------- scoring


def score_fn(graphdef: nnx.GraphDef, mesh: Mesh | None = None, rules: parallel.RulesLike = None):
    """The PRM scoring forward as a pure function, not jitted: `(state, tokens, segment_ids) -> step logits`.

    `graphdef`/`state`: `nnx.split(prm)` (the state concrete or `jax.ShapeDtypeStruct`s); tokens [B, T] int32,
    segment_ids [B, T] int32 (0 = padding) -> [B, T] float32 logits (sigmoid = step score; read them at step
    ends). With `mesh`, activations are pinned to `rules` inside the forward. `score_examples` jits it on one
    device; `edu-prm plan` lowers it for a target on abstract inputs."""

    def forward(state: nnx.State, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
        prm = nnx.merge(graphdef, state)
        with parallel.sharding_context(mesh, rules):
            return prm(tokens, None, segment_ids)

    return forward


@functools.partial(jax.jit, static_argnums=0)
def _step_logits(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    return score_fn(graphdef)(state, tokens, segment_ids)


def joined_steps(steps: Sequence[str], joiner: str) -> list[str]:
    """Step texts with `joiner` (e.g. the blank line between paragraphs) after every step but the last."""
    return [s + (joiner if i < len(steps) - 1 else "") for i, s in enumerate(steps)]


def encode_solution(
    tokenizer: Any, prompt: str, steps: Sequence[str], *, head: str, separator_id: int | None = None,
    record_id: Any = None,
) -> PRMExample:
    """Tokenize the prompt and each step separately and concatenate ids laid out for `head` (step ends stay
    exact)."""
    record = {
        "prompt_ids": tokenizer.encode(prompt),
        "step_ids": [tokenizer.encode(s) for s in steps],
        "labels": [0.0] * len(steps),
    }
    return build_example(record, head=head, separator_id=separator_id, record_id=record_id)


def score_solutions(
    prm: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    separator_id: int | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    bucket: int = SCORE_BUCKET,
) -> list[list[float]]:
    """Step scores (sigmoid of the step logit) for each (prompt, [step strings]) item, in input order.

    The prompt is used verbatim (apply the chat template first if the PRM expects one). When the PRM's head
    inserts a separator (`prm.head_spec.inserts_separator`, e.g. qwen_math), the separator (`separator_id`,
    else `prm.separator_id`) goes after each step. Rows are right-padded to a multiple of `bucket` and
    batches to `batch_size`, so the jitted forward compiles once per length bucket. An item longer than
    `max_len` is an error naming its index.
    """
    spec = prm.head_spec
    sep = separator_id if separator_id is not None else prm.separator_id
    if spec.inserts_separator and sep is None:
        raise PRMDataError(
            f"score_solutions: the {spec.name} head inserts a separator after each step and needs its id (pass "
            f"separator_id=, e.g. separator_ids(tokenizer, '<extra_0>'))"
        )
    examples = []
    for i, (prompt, steps) in enumerate(items):
        try:
            ex = encode_solution(tokenizer, prompt, steps, head=spec.name, separator_id=sep)
        except PRMDataError as e:
            raise PRMDataError(f"item {i}: {e}") from None
        if max_len is not None and len(ex.tokens) > max_len:
            raise PRMDataError(f"item {i}: {len(ex.tokens)} tokens exceed max_len={max_len}")
        examples.append(ex)
    return score_examples(prm, examples, batch_size=batch_size, bucket=bucket)


def score_examples(prm: Any, examples: Sequence[PRMExample], *, batch_size: int = 8, bucket: int = SCORE_BUCKET,
                   logits: bool = False) -> list[list[float]]:
    """Step scores (or, with `logits=True`, the step logits) for built examples, in input order.

    Examples are sorted by length and right-padded to a multiple of `bucket`, so the jitted forward compiles
    once per length bucket whatever the number of examples."""
    graphdef, state = nnx.split(prm)
    results: list[list[float]] = [[] for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    for b in range(0, len(order), batch_size):
        members = order[b : b + batch_size]
        width = -(-max(len(examples[i].tokens) for i in members) // bucket) * bucket
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(members):
            n = len(examples[i].tokens)
            tokens[r, :n] = examples[i].tokens
            segments[r, :n] = 1
        z = np.asarray(_step_logits(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments)), np.float64)
        values = z if logits else 1.0 / (1.0 + np.exp(-z))
        for r, i in enumerate(members):
            results[i] = [float(v) for v in values[r, examples[i].step_ends]]
    return results
