"""The one way every benchmark times things, so figures from different benchmarks mean the same.

- **Threads pinned, both sides.** `pin_threads(n)` runs before jax or torch is imported: the process's CPU
  affinity is cut to n cores (XLA:CPU sizes its thread pool from the affinity and ignores
  `--xla_cpu_multi_thread_eigen`), and torch gets n intra-op threads and one inter-op thread. What each side
  actually has is recorded (`threads`).
- **Warm-up excluded, sides interleaved.** `measure` runs each side `warmup` times untimed (the compile), then
  `repeats` rounds in which every side runs once, the order rotating per round, so a burst of load from another
  process hits every side alike. Per side: every duration, the median and the min-max.
- **Ratios are paired.** `paired_ratio(a, b)` divides b's round-r time by a's round-r time (a's speed-up over b)
  and reports the median and min-max of those per-round ratios: the spread a rerun should land in.
- **Machine load is recorded** (1-minute load average and the CPU time other processes took) before and after
  every measurement.
- **Correctness travels with the figure.** A `Cell` carries the cross-check of the compared implementations (same
  tokens, same loss): a benchmark fails rather than time implementations that disagree.
- **JSON out**; `markdown_table` renders cells for `python -m benchmarks` and the README.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def pin_threads(threads: int) -> dict[str, Any]:
    """Restrict this process to `threads` cores (the first ones it may use) and set the thread-count environment
    variables of torch / OpenMP / MKL. Call it before importing jax or torch; returns what was pinned.

    Raises ValueError when `threads` is < 1 or more than the cores this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(allowed):
        raise ValueError(f"--threads {threads}: this process may use {len(allowed)} cores ({allowed})")
    if "jax" in sys.modules or "torch" in sys.modules:
        raise RuntimeError("pin_threads must run before jax or torch is imported (their thread pools are sized "
                           "at import)")
    cores = allowed[:threads]
    os.sched_setaffinity(0, cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return {"threads": threads, "cores": cores}


def thread_report() -> dict[str, Any]:
    """The threads each side runs with, read back after import: XLA:CPU's pool is the affinity's size."""
    out: dict[str, Any] = {"affinity": sorted(os.sched_getaffinity(0))}
    out["xla_cpu_threads"] = len(out["affinity"])
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    return out


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads = `threads`, inter-op = 1 (call once, after `import torch`)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier parallel region; recorded by thread_report
        pass


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies this process used) from /proc; (0, 0) where absent."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        mine = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
        return busy, mine
    except OSError:
        return 0, 0


@dataclasses.dataclass
class Load:
    """The machine's load over one measurement: load averages and the cores other processes kept busy."""

    load_1m_before: float
    load_1m_after: float
    other_cores_busy: float  # mean cores busy with other processes while measuring

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in dataclasses.asdict(self).items()}


class _LoadMeter:
    def __enter__(self) -> _LoadMeter:
        self.load0 = os.getloadavg()[0]
        self.jiffies0 = _cpu_jiffies()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        busy, mine = (b - a for a, b in zip(self.jiffies0, _cpu_jiffies()))
        hz = os.sysconf("SC_CLK_TCK")
        wall = max(time.perf_counter() - self.t0, 1e-9)
        self.load = Load(self.load0, os.getloadavg()[0], max(0.0, (busy - mine) / hz / wall))


@dataclasses.dataclass
class Timing:
    """One side's timed runs (seconds), warm-up excluded."""

    seconds: list[float]
    warmup_s: float  # the first (compiling) run

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def low(self) -> float:
        return min(self.seconds)

    @property
    def high(self) -> float:
        return max(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.low, "max_s": self.high, "repeats": len(self.seconds),
                "seconds": self.seconds, "warmup_s": self.warmup_s}


@dataclasses.dataclass
class Spread:
    """A median with its min-max, e.g. per-round speed-up ratios."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "values": self.values}

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f}x ({self.low:.{digits}f}-{self.high:.{digits}f})"


def measure(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
            ) -> tuple[dict[str, Timing], dict[str, Any], Load]:
    """Time each side `repeats` times, interleaved, after `warmup` untimed runs of each.

    Every callable must block until its result exists (`jax.block_until_ready`, a host array). Returns (Timing per
    side, the last result per side, the load while measuring). Raises ValueError for repeats < 1."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    names = list(sides)
    results: dict[str, Any] = {}
    first: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        for _ in range(warmup):
            results[name] = sides[name]()
        first[name] = (time.perf_counter() - t0) / max(warmup, 1)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    with _LoadMeter() as meter:
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                t0 = time.perf_counter()
                results[name] = sides[name]()
                seconds[name].append(time.perf_counter() - t0)
    return {n: Timing(seconds[n], first[n]) for n in names}, results, meter.load


def paired_ratio(fast: Timing, slow: Timing) -> Spread:
    """`slow`'s time over `fast`'s, round by round (how many times faster `fast` is), from `measure`'s rounds."""
    if len(fast.seconds) != len(slow.seconds):
        raise ValueError("paired ratios need timings from the same measure() call")
    return Spread([s / f for f, s in zip(fast.seconds, slow.seconds)])


@dataclasses.dataclass
class Cell:
    """One row of results: a benchmark's case, each side's timing, the ratios and the cross-check."""

    benchmark: str
    case: dict[str, Any]  # what was run: batch, lengths, model
    timings: dict[str, Timing]
    ratios: dict[str, Spread]  # e.g. {"jax vs transformers": Spread}: the first side's speed-up
    check: dict[str, Any]  # the correctness cross-check that ran before timing
    threads: dict[str, Any]
    load: Load
    units: dict[str, float] = dataclasses.field(default_factory=dict)  # work per run, e.g. {"tokens": 4096}

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "case": self.case,
                "timings": {k: v.to_json() for k, v in self.timings.items()},
                "ratios": {k: v.to_json() for k, v in self.ratios.items()}, "check": self.check,
                "threads": self.threads, "load": self.load.to_json(), "units": self.units}


def merge_cells(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The cells of several independent runs of one benchmark (each a list of `Cell.to_json()` dicts, same cases in
    each) as one list: per (benchmark, case, threads), every round's ratio and time pooled, medians and min-max
    recomputed over the pool, the highest load kept, `processes` = how many runs the pool holds. Pooling runs made
    in separate processes (each compiling and warming up on its own) puts the run-to-run spread into the min-max,
    which rounds of one process understate. Raises ValueError when the runs do not hold the same cases."""
    keys = [[(c["benchmark"], json.dumps(c["case"], sort_keys=True), json.dumps(c["threads"], sort_keys=True))
             for c in run] for run in runs]
    if not runs or any(k != keys[0] for k in keys):
        raise ValueError("merge_cells: the runs do not hold the same benchmark cases in the same order")
    merged = []
    for group in zip(*runs):
        first = group[0]
        cell = {**first, "processes": len(group)}
        cell["ratios"] = {name: Spread([v for c in group for v in c["ratios"][name]["values"]]).to_json()
                          for name in first["ratios"]}
        cell["timings"] = {side: Timing([v for c in group for v in c["timings"][side]["seconds"]],
                                        first["timings"][side]["warmup_s"]).to_json() for side in first["timings"]}
        cell["load"] = {k: max(c["load"][k] for c in group) for k in first["load"]}
        merged.append(cell)
    return merged


def environment() -> dict[str, Any]:
    """Versions, machine and date for a results file."""
    env: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "python": platform.python_version(), "platform": platform.platform(),
                           "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    for mod, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("torch", "torch"), ("transformers", "transformers"),
                      ("tunix", "google-tunix")):
        if mod in sys.modules:  # the installed distribution's version (tunix's stand-in package has none)
            try:
                env[mod] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                env[mod] = getattr(sys.modules[mod], "__version__", "?")
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_json(path: str, cells: Sequence[Cell], extra: dict[str, Any] | None = None) -> None:
    """{"environment", "cells", **extra} written atomically to `path`."""
    from edu_prm_jax.io.atomic import write_json_atomic

    write_json_atomic(path, {"environment": environment(), "cells": [c.to_json() for c in cells], **(extra or {})})


def markdown_table(cells: Sequence[dict[str, Any]]) -> str:
    """One markdown row per (cell, ratio): benchmark, case, threads, the ratio's median (min-max), the sides'
    median times, the cross-check and the load. `cells` are `Cell.to_json()` dicts (as read back from JSON)."""
    rows = ["| benchmark | case | threads | speed-up, median (min-max) | median times | check | load |",
            "|---|---|---|---|---|---|---|"]
    for c in cells:
        case = ", ".join(f"{k} {v}" for k, v in c["case"].items())
        times = "; ".join(f"{k} {_seconds(v['median_s'])}" for k, v in c["timings"].items())
        check = ", ".join(f"{k}: {v}" for k, v in c["check"].items())
        load = c["load"]
        load_text = f"{load['load_1m_before']:.2f} / other {load['other_cores_busy']:.2f} cores"
        threads = c["threads"]
        t = f"{threads.get('xla_cpu_threads', '?')}" + (f" / torch {threads['torch_threads']}"
                                                        if "torch_threads" in threads else "")
        for name, r in c["ratios"].items():
            rows.append(f"| {c['benchmark']} | {case} | {t} | {name}: **{r['median']:.2f}x** "
                        f"({r['min']:.2f}-{r['max']:.2f}) | {times} | {check} | {load_text} |")
    return "\n".join(rows)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def load_cells(path: str) -> list[dict[str, Any]]:
    """The cells of a results.json (`python -m benchmarks`). Raises ValueError naming the file if it cannot be
    read as one."""
    try:
        with open(path) as f:
            return json.load(f)["cells"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a benchmarks results.json ({type(e).__name__}: {e})") from e
