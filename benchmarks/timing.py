"""Timed repeats shared by the benchmarks: one warm-up run (the compile), then `repeats` timed runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed_runs(fn: Callable[[], Any], repeats: int, warmup: Callable[[], Any] | None = None
               ) -> tuple[float, list[float], Any]:
    """(warm-up seconds, the `repeats` timed durations in seconds, the last result). The warm-up is `fn` itself
    unless given; `fn` must block until its result is ready (e.g. `jax.block_until_ready`)."""
    t0 = time.perf_counter()
    out = (warmup or fn)()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, times, out
