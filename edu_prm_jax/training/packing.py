"""Pack variable-length examples into fixed [rows, seq_len] arrays with segment ids.

Why: toy and PRM examples are short and uneven; packing several per row wastes little compute on
padding. Each example becomes a segment (ids 1..k within a row, 0 = padding) with positions restarting at
0, and the model's segment mask keeps attention inside each segment, so a packed row computes exactly
what the examples would compute alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def pack_examples(
    examples: Sequence[Mapping[str, Sequence]],
    seq_len: int,
    pad_id: int = 0,
    *,
    drop_long: bool = False,
) -> dict[str, np.ndarray]:
    """Greedy first-fit packing, in input order (deterministic).

    Each example is a mapping with 'tokens' and any number of per-token arrays of the same length
    (e.g. 'targets', 'weights'). Returns 'tokens', 'segment_ids', 'positions' and each extra key as
    [rows, seq_len] arrays; extra keys are zero-padded (float keys stay float32, ints int32).
    An example longer than seq_len raises (or is skipped with drop_long=True).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not examples:
        raise ValueError("pack_examples: no examples")
    keys = [k for k in examples[0] if k != "tokens"]
    for i, ex in enumerate(examples):
        if "tokens" not in ex:
            raise ValueError(f"example {i}: missing field 'tokens'")
        if set(ex) - {"tokens"} != set(keys):
            raise ValueError(f"example {i}: fields {sorted(ex)} differ from example 0's {sorted(['tokens', *keys])}")
        for k in keys:
            if len(ex[k]) != len(ex["tokens"]):
                raise ValueError(f"example {i}: field {k!r} has length {len(ex[k])}, tokens {len(ex['tokens'])}")
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    open_rows: list[int] = []  # rows that can still take the shortest example (first-fit scans only these)
    shortest = min(len(ex["tokens"]) for ex in examples) or 1
    for i, ex in enumerate(examples):
        n = len(ex["tokens"])
        if n > seq_len or n == 0:
            if drop_long:
                continue
            raise ValueError(f"example {i}: length {n} is not in [1, seq_len={seq_len}]")
        for j, r in enumerate(open_rows):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                if free[r] < shortest:
                    del open_rows[j]
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
            if free[-1] >= shortest:
                open_rows.append(len(rows) - 1)
    if not rows:
        raise ValueError(f"pack_examples: every example is longer than seq_len={seq_len}")
    out = {
        "tokens": np.full((len(rows), seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
    }
    for k in keys:
        dtype = np.float32 if np.asarray(examples[0][k]).dtype.kind == "f" else np.int32
        out[k] = np.zeros((len(rows), seq_len), dtype)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ex = examples[i]
            n = len(ex["tokens"])
            out["tokens"][r, at:at + n] = ex["tokens"]
            out["segment_ids"][r, at:at + n] = seg
            out["positions"][r, at:at + n] = np.arange(n)
            for k in keys:
                out[k][r, at:at + n] = ex[k]
            at += n
    return out


class PackedRowLoader:
    """Batches of packed rows, a pure function of (seed, step): each epoch visits the rows in a fresh
    permutation from np.random.default_rng((seed, epoch)). Its state is just the next step, so resuming
    from a checkpoint replays exactly the batches an uninterrupted run would see."""

    def __init__(self, rows: Mapping[str, np.ndarray], batch_rows: int, seed: int = 0):
        n = len(rows["tokens"])
        if batch_rows < 1 or batch_rows > n:
            raise ValueError(f"batch_rows={batch_rows} must be in [1, {n}] (the number of packed rows)")
        self.rows = {k: np.asarray(v) for k, v in rows.items()}
        self.batch_rows = batch_rows
        self.seed = seed
        self.step = 0
        self._per_epoch = n // batch_rows

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self._per_epoch)
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows["tokens"]))
        idx = np.sort(perm[i * self.batch_rows:(i + 1) * self.batch_rows])
        return {k: v[idx] for k, v in self.rows.items()}

    def __iter__(self) -> PackedRowLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: Mapping) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, loader has seed {self.seed}")
        self.step = int(state["step"])
