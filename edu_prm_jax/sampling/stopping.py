"""Token tables that let the jitted loop detect stops without decoding text.

A closed `\\boxed{...}` is tracked with a per-slot brace depth: each token contributes the braces it
contains; a token containing "boxed" (re)starts tracking and only its braces after "boxed" count. Stop strings
are matched as token sequences (the tokenisation of the string), which is exact for the token streams the
policy itself produces in the common case and documented as token-level.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StopTables:
    eos: np.ndarray  # [V] bool: token ends the sequence
    has_boxed: np.ndarray  # [V] bool: token text contains "boxed"
    opens: np.ndarray  # [V] int32: "{" count (after the last "boxed" when has_boxed)
    closes: np.ndarray  # [V] int32: "}" count (after the last "boxed" when has_boxed)
    stop_seqs: np.ndarray  # [n, k] int32, right-aligned, -1 padded on the left; n >= 1


def build_stop_tables(token_texts: list[str], vocab_size: int, eos_ids: list[int],
                      stop_token_seqs: list[list[int]] = ()) -> StopTables:
    eos = np.zeros(vocab_size, bool)
    eos[[i for i in eos_ids if 0 <= i < vocab_size]] = True
    has_boxed = np.zeros(vocab_size, bool)
    opens = np.zeros(vocab_size, np.int32)
    closes = np.zeros(vocab_size, np.int32)
    for i, text in enumerate(token_texts[:vocab_size]):
        if "boxed" in text:
            has_boxed[i] = True
            text = text[text.rindex("boxed") + len("boxed"):]
        opens[i] = text.count("{")
        closes[i] = text.count("}")
    seqs = [list(s) for s in stop_token_seqs if len(s)]
    width = max([len(s) for s in seqs] + [1])
    table = np.full((max(len(seqs), 1), width), -1, np.int32)
    for r, s in enumerate(seqs):
        table[r, width - len(s):] = s
    if not seqs:
        table[0, :] = -2  # matches nothing
    return StopTables(eos, has_boxed, opens, closes, table)
