"""Searches over compiles: the largest batch (or slot count) that fits, the smallest slice that fits.

Both assume fitting is monotone (more rows never need less memory; more chips never need more per chip) and
compile as few programs as that allows: doubling then bisection for a size, smallest first for slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def largest_fitting(fits: Callable[[int], bool], start: int, multiple: int = 1,
                    limit: int = 1 << 20) -> tuple[int | None, dict[int, bool]]:
    """(the largest multiple of `multiple` in [multiple, limit] for which `fits` holds, or None when even
    `multiple` does not fit; every value tried -> its result). Doubles from `start` (rounded up to a multiple)
    while it fits, then bisects between the last fit and the first failure."""
    if multiple < 1 or limit < multiple:
        raise ValueError(f"need 1 <= multiple <= limit, got multiple={multiple}, limit={limit}")
    tried: dict[int, bool] = {}

    def check(n: int) -> bool:
        if n not in tried:
            tried[n] = bool(fits(n))
        return tried[n]

    top = limit - limit % multiple
    n = min(max(multiple, -(-start // multiple) * multiple), top)
    if check(n):
        good, bad = n, None
        while good < top:
            nxt = min(good * 2, top)
            if not check(nxt):
                bad = nxt
                break
            good = nxt
        if bad is None:
            return good, tried
    else:
        if n == multiple or not check(multiple):
            return None, tried
        good, bad = multiple, n
    while bad - good > multiple:  # bisection on multiples
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        if check(mid):
            good = mid
        else:
            bad = mid
    return good, tried


def smallest_fitting(candidates: Sequence[T], fits: Callable[[T], bool]) -> tuple[T | None, list[tuple[T, bool]]]:
    """(the first candidate, in order, for which `fits` holds, or None; each candidate tried with its result)."""
    tried: list[tuple[T, bool]] = []
    for c in candidates:
        ok = bool(fits(c))
        tried.append((c, ok))
        if ok:
            return c, tried
    return None, tried
