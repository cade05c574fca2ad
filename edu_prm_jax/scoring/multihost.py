"""Step scoring split over the processes of a multi-host job, equal to one process scoring everything.

`score_examples` sorts examples by length and scores them `batch_size` at a time, each batch right-padded to a
multiple of `bucket`. Here the same batches are dealt out, batch b to process b mod P (`distributed.owner`): each
process scores its batches on its own devices, with exactly the members, order and padded shape that batch has
in a single-process run, so every score is the same float; the scores are then gathered (`distributed.allgather`)
and every process returns all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edu_prm_jax import distributed
from edu_prm_jax.scoring.examples import SCORE_BUCKET, PRMExample, score_examples


def batch_plan(examples: Sequence[PRMExample], batch_size: int) -> list[list[int]]:
    """The batches `score_examples` forms: example indices sorted by token count (stable: ties keep input
    order), `batch_size` at a time. Raises ValueError for batch_size < 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def score_share(prm: Any, examples: Sequence[PRMExample], process: int, processes: int, *, batch_size: int = 8,
                bucket: int = SCORE_BUCKET, logits: bool = False) -> dict[int, list[float]]:
    """{example index: step scores} of the batches process `process` of `processes` owns (batch b: b mod
    `processes`), scored as `score_examples` scores them in one process.

    The owned batches are passed to `score_examples` in plan order: they stay sorted by length and every owned
    batch but the plan's last is full, so `score_examples` cuts them into the very same batches."""
    mine = [i for b, members in enumerate(batch_plan(examples, batch_size)) if b % processes == process
            for i in members]
    scores = score_examples(prm, [examples[i] for i in mine], batch_size=batch_size, bucket=bucket,
                            logits=logits) if mine else []
    return dict(zip(mine, scores))


def score_examples_across_processes(prm: Any, examples: Sequence[PRMExample], *, batch_size: int = 8,
                                    bucket: int = SCORE_BUCKET, logits: bool = False,
                                    name: str = "scores") -> list[list[float]]:
    """`score_examples(prm, examples, ...)` with the batches split over the job's processes (module docstring);
    every process gets every example's step scores (float, or logits with `logits=True`), in input order.

    Every process must call it with the same examples (a meeting point named `name`). Single process: exactly
    `score_examples`."""
    share = score_share(prm, examples, distributed.process_index(), distributed.process_count(),
                        batch_size=batch_size, bucket=bucket, logits=logits)
    results: list[list[float] | None] = [None] * len(examples)
    for part in distributed.allgather(name, sorted(share.items())):
        for index, scores in part:
            results[index] = scores
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"{name}: no process scored examples {missing[:5]} (processes disagree on the examples)")
    return results  # type: ignore[return-value]
