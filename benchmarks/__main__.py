"""`python -m benchmarks`: every speed benchmark at every thread count, one results file, one markdown table.

Each (benchmark, threads) pair runs in its own process (`python -m benchmarks.<name> --threads N`), because the
thread pools of XLA and torch are sized when they are imported (`benchmarks.harness.pin_threads`), and
`--processes` times over (default 3), the rounds pooled (`harness.merge_cells`): one process's rounds miss the
spread between runs (a process's compile, memory placement and clock), so a rerun fell outside their min-max for
9 of 22 ratios. The cells of all runs go to `<out>/results.json` (with the environment and the machine's load)
and `<out>/results.md`; `--readme README.md` rewrites the performance table between the README's
`benchmarks:begin` / `benchmarks:end` markers with the same table, dated.

    python -m benchmarks                       # decode, train_step, forward at 1 and 2 threads
    python -m benchmarks --only decode --threads 1
    python -m benchmarks --readme README.md    # and regenerate the README's table
    python -m benchmarks --out /tmp/rerun --compare benchmarks/results/results.json   # does it reproduce?

`--compare` matches each new ratio to the same (benchmark, case, threads, ratio) of an earlier results file and
says whether the new median lies within the earlier min-max (written to `<out>/reproduction.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks import harness

# (module, its arguments): the figures the README quotes. Keep each under a few minutes on 2 cores.
SUITE: dict[str, list[str]] = {
    "decode": ["--batch-sizes", "1", "8", "64", "--new-tokens", "64", "--repeats", "5"],
    "train_step": ["--seq-lens", "256", "--repeats", "7"],
    "forward": ["--batch-sizes", "1", "8", "--seq-lens", "128", "512", "--impls", "jax", "sdpa", "--repeats", "5"],
}
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(SUITE), default=list(SUITE))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each side pinned")
    p.add_argument("--processes", type=int, default=3,
                   help="independent runs of each benchmark (fresh processes), their rounds pooled")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    p.add_argument("--readme", type=pathlib.Path, default=None, help="rewrite this README's benchmark table")
    p.add_argument("--compare", type=pathlib.Path, default=None,
                   help="an earlier results.json: is each new median within its min-max there?")
    return p.parse_args(argv)


def _cell_key(cell: dict[str, Any], ratio: str) -> tuple[str, str, int, str]:
    case = ", ".join(f"{k} {v}" for k, v in cell["case"].items())
    return cell["benchmark"], case, int(cell["threads"].get("xla_cpu_threads", 0)), ratio


def reproduction(earlier: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ratio of `now` (cells as in results.json): the earlier median and min-max of the same
    (benchmark, case, threads, ratio), the new median, and `within` (earlier min <= new median <= earlier max;
    None where the earlier run has no such ratio)."""
    before = {_cell_key(c, name): r for c in earlier for name, r in c["ratios"].items()}
    rows = []
    for c in now:
        for name, r in c["ratios"].items():
            key = _cell_key(c, name)
            old = before.get(key)
            rows.append({"benchmark": key[0], "case": key[1], "threads": key[2], "ratio": name,
                         "median": r["median"], "earlier": old and {k: old[k] for k in ("median", "min", "max")},
                         "within": None if old is None else bool(old["min"] <= r["median"] <= old["max"])})
    return rows


def reproduction_table(rows: list[dict[str, Any]], earlier: str) -> str:
    """`reproduction` as markdown, with a count of the ratios that reproduced."""
    lines = [f"Reproduction against {earlier}:", "",
             "| benchmark | case | threads | ratio | earlier median (min-max) | now | within |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["earlier"]
        was = "absent" if e is None else f"{e['median']:.2f}x ({e['min']:.2f}-{e['max']:.2f})"
        verdict = {None: "-", True: "yes", False: "**no**"}[r["within"]]
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['threads']} | {r['ratio']} | {was} | "
                     f"{r['median']:.2f}x | {verdict} |")
    compared = [r for r in rows if r["within"] is not None]
    lines += ["", f"{sum(r['within'] for r in compared)} of {len(compared)} ratios within the earlier min-max."]
    return "\n".join(lines)


def run_one(name: str, threads: int, extra: list[str]) -> dict[str, Any]:
    """Run one benchmark module in a fresh process; returns its JSON. Raises RuntimeError when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--threads", str(threads), "--json", str(out), *extra]
        print("+ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmarks.{name} --threads {threads} failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def table_block(results: dict[str, Any]) -> str:
    """The dated table the README carries: machine, load, then one row per cell."""
    env = results["environment"]
    loads = [c["load"]["load_1m_before"] for c in results["cells"]]
    busy = [c["load"]["other_cores_busy"] for c in results["cells"]]
    head = (f"Measured {env['date']} by `python -m benchmarks` on {env['cpu']} ({env['cpu_count']} cores), "
            f"jax {env.get('jax', '?')}, torch {env.get('torch', '?')}, transformers "
            f"{env.get('transformers', '?')}, tunix {env.get('tunix', 'absent')}; 1-minute load "
            f"{min(loads):.2f}-{max(loads):.2f}, other processes kept {min(busy):.2f}-{max(busy):.2f} cores busy "
            f"while timing. Speed-up = the other side's time / ours, per interleaved round, rounds of "
            f"{env.get('processes', 1)} separate processes pooled: median (min-max).")
    notes = "".join(f"\n\n{n}" for n in results.get("notes", []))
    return f"{head}\n\n{harness.markdown_table(results['cells'])}{notes}"


def update_readme(readme: pathlib.Path, block: str) -> None:
    """Replace the text between the BEGIN and END markers; raises ValueError naming the file if they are absent."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no '{BEGIN}' ... '{END}' markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    from edu_prm_jax.io.atomic import write_text_atomic

    write_text_atomic(readme, f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    earlier = harness.load_cells(str(args.compare)) if args.compare else None  # fail before an hour of timing
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"benchmarks: 1-minute load is {load:.2f}: the machine is not idle, figures will spread more",
              file=sys.stderr)
    cells: list[dict[str, Any]] = []
    notes: list[str] = []
    env: dict[str, Any] = {}
    if args.processes < 1:
        raise SystemExit("--processes must be >= 1")
    for threads in args.threads:
        for name in args.only:
            runs = [run_one(name, threads, SUITE[name]) for _ in range(args.processes)]
            cells += harness.merge_cells([r["cells"] for r in runs])
            for result in runs:
                notes += [n for n in result.get("notes", []) if n not in notes]
                env = {**result["environment"], **env}
    env["processes"] = args.processes
    results = {"environment": env, "cells": cells, "notes": notes}
    args.out.mkdir(parents=True, exist_ok=True)
    from edu_prm_jax.io.atomic import write_json_atomic, write_text_atomic

    write_json_atomic(args.out / "results.json", results)
    block = table_block(results)
    write_text_atomic(args.out / "results.md", block + "\n")
    print(block)
    if args.readme:
        update_readme(args.readme, block)
        print(f"updated {args.readme}", file=sys.stderr)
    if earlier is not None:
        text = reproduction_table(reproduction(earlier, cells), f"{args.compare}")
        write_text_atomic(args.out / "reproduction.md", text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
