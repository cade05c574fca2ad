"""Where does the toy PRM's Best-of-N gain come from? Accuracy split by questions with / without a misread number.

    python -m benchmarks.toy_bon_split --workdir runs/toy [--n 16] [--number 6]

Reads the runs `edu-prm eval-bon` cached under <workdir>/eval_bon/runs (HT, EDU, P-EDU at N and the greedy run),
scores them with the workdir's PRM exactly as eval-bon does, and prints, for questions that contain the number the
shipped toy policy misreads (`misread_from` in its training_report.json, 6) and for the others: PRM (min),
majority vote, greedy and pass@N accuracy.

Why: the shipped policy's errors are of two kinds, a planted systematic misreading and unsystematic arithmetic
slips. A PRM that only learned to catch the first beats majority vote and greedy on the first group and can lose
to them on the second; the pooled Best-of-N table cannot tell the two apart.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from edu_prm_jax import parallel  # noqa: E402
from edu_prm_jax.data import toy  # noqa: E402
from edu_prm_jax.data.questions import resolve_policy  # noqa: E402
from edu_prm_jax.data.records import read_shards  # noqa: E402
from edu_prm_jax.data.toy_policy import REPORT  # noqa: E402
from edu_prm_jax.evaluation.bon import select_all  # noqa: E402
from edu_prm_jax.evaluation.candidates import score_records  # noqa: E402
from edu_prm_jax.models.prm import load_prm  # noqa: E402

SELECTORS = ("prm_min", "majority", "greedy", "pass@n")


def mentions(problem: str, number: int) -> bool:
    """True when a toy problem's start value or an operand equals `number`."""
    start, ops = toy.ToyTask.parse_problem(problem)
    return start == number or any(b == number for _, b in ops)


def split_accuracy(records: list[dict], cands: list[list], greedy: dict[str, bool], n: int, number: int
                   ) -> dict[bool, dict[str, float | int]]:
    """{mentions number: {selector: accuracy %, 'questions': count}} over one run's questions."""
    groups: dict[bool, list[list[float]]] = {True: [], False: []}
    for rec, c in zip(records, cands):
        sel = select_all(c[:n])
        groups[mentions(rec["problem"], number)].append(
            [sel["prm_min"], sel["majority"], greedy[rec["id"]], sel["pass@n"]])
    out: dict[bool, dict[str, float | int]] = {}
    for key, rows in groups.items():
        mean = 100 * np.asarray(rows, float).mean(0) if rows else [float("nan")] * len(SELECTORS)
        out[key] = {"questions": len(rows), **dict(zip(SELECTORS, (round(float(x), 1) for x in mean)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, type=pathlib.Path)
    ap.add_argument("--n", type=int, default=16, help="candidates per question (a value of eval-bon's n_grid)")
    ap.add_argument("--number", type=int, default=None,
                    help="the misread number (default: misread_from in the shipped policy's training report)")
    args = ap.parse_args()
    number = args.number
    if number is None:
        number = json.loads((resolve_policy("toy") / REPORT).read_text())["policy_config"]["misread_from"]
    runs_dir = args.workdir / "eval_bon" / "runs"
    greedy_runs = list(read_shards(runs_dir / "greedy", "trees"))
    greedy = {r["id"]: bool(r["leaves"]) and toy.ToyTask.check(r["leaves"][0]["text"], r["answer"])
              for r in greedy_runs}
    prm = load_prm(args.workdir / "prm" / "hf", parallel.make_mesh(1, 1, 1), dtype="float32")
    runs = sorted(runs_dir.glob("ht_n*_s*")) + sorted(runs_dir.glob(f"edu_n{args.n}_s*")) \
        + sorted(runs_dir.glob(f"p-edu_n{args.n}_s*"))
    print(f"questions with / without a {number}, N = {args.n}; accuracy in %\n")
    print("| run | questions | " + " | ".join(SELECTORS) + " |")
    print("|---|---|" + "---|" * len(SELECTORS))
    for run in runs:
        if run.name.startswith("ht_n") and int(run.name[4:].split("_")[0]) < args.n:
            continue  # an HT run holds max(n_grid) samples; N must be among them
        records = list(read_shards(run, "trees"))
        cands = score_records(prm, records, "high_entropy" if run.name.startswith("ht") else "anchors")
        for key, res in split_accuracy(records, cands, greedy, args.n, number).items():
            label = f"with a {number}" if key else f"without a {number}"
            print(f"| {run.name} | {label} ({res['questions']}) | "
                  + " | ".join(f"{res[s]:.1f}" for s in SELECTORS) + " |")


if __name__ == "__main__":
    main()
