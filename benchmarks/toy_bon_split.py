"""Where does the toy PRM's Best-of-N gain come from? Accuracy split by questions with / without a misread number.

    python -m benchmarks.toy_bon_split --workdir runs/toy [--n 16] [--number 6]

Reads the runs `edu-prm eval-bon` cached under <workdir>/eval_bon/runs (HT, EDU, P-EDU at N and the greedy run),
scores them with the PRM, dtype and answer check eval-bon used (from <workdir>/eval_bon_config.json when present),
and prints, for questions that contain the number the policy misreads (`misread_from` in the policy's
training_report.json: 6 for the shipped one) and for the others: PRM (min), majority vote, greedy and pass@N
accuracy.

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

from benchmarks.likelihood_rerank import load_ht_runs  # noqa: E402
from edu_prm_jax import parallel  # noqa: E402
from edu_prm_jax.commands.common.paths import prm_dir  # noqa: E402
from edu_prm_jax.evaluation.bon import select_all  # noqa: E402
from edu_prm_jax.evaluation.candidates import score_records  # noqa: E402
from edu_prm_jax.grading.answers import is_correct  # noqa: E402
from edu_prm_jax.models.prm import load_prm  # noqa: E402
from edu_prm_jax.records.trees import read_tree_shards  # noqa: E402
from edu_prm_jax.toy.defaults import resolve_policy  # noqa: E402
from edu_prm_jax.toy.policy import REPORT, count_number  # noqa: E402

SELECTORS = ("prm_min", "majority", "greedy", "pass@n")


def split_accuracy(records: list[dict], cands: list[list], greedy: dict[str, bool], n: int, number: int
                   ) -> dict[bool, dict[str, float | int]]:
    """{mentions number: {selector: accuracy %, 'questions': count}} over one run's questions (an empty group has
    0 questions and NaN accuracies)."""
    groups: dict[bool, list[list[float]]] = {True: [], False: []}
    for rec, c in zip(records, cands):
        sel = select_all(c[:n])
        groups[count_number(rec["problem"], number) > 0].append(
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
                    help="the misread number (default: misread_from in the policy's training report)")
    args = ap.parse_args()
    config_path = args.workdir / "eval_bon_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    number = args.number
    if number is None:
        report = resolve_policy(config.get("policy", "toy")) / REPORT
        if not report.is_file():
            raise SystemExit(f"{report} not found: pass --number (the number the policy misreads)")
        number = json.loads(report.read_text())["policy_config"]["misread_from"]
    runs_dir = args.workdir / "eval_bon" / "runs"
    greedy = {r.id: bool(r.leaves) and is_correct(r.leaves[0].text, r.answer)
              for r in read_tree_shards(runs_dir / "greedy")}
    prm = load_prm(prm_dir(args.workdir, config.get("prm", "")), parallel.make_mesh(1, 1, 1),
                   dtype=config.get("dtype", "float32"))
    runs = {f"ht_n{args.n}_s{seed}": (records, "high_entropy")
            for seed, records in load_ht_runs(args.workdir, args.n)[1].items()}  # the first N of each seed's run
    for path in sorted(runs_dir.glob(f"edu_n{args.n}_s*")) + sorted(runs_dir.glob(f"p-edu_n{args.n}_s*")):
        runs[path.name] = ([tree.to_json() for tree in read_tree_shards(path)], "anchors")
    print(f"questions with / without a {number}, N = {args.n}; accuracy in %\n")
    print("| run | questions | " + " | ".join(SELECTORS) + " |")
    print("|---|---|" + "---|" * len(SELECTORS))
    for name, (records, split) in runs.items():
        cands = score_records(prm, records, split)
        for key, res in split_accuracy(records, cands, greedy, args.n, number).items():
            label = f"with a {number}" if key else f"without a {number}"
            print(f"| {name} | {label} ({res['questions']}) | "
                  + " | ".join(f"{res[s]:.1f}" for s in SELECTORS) + " |")


if __name__ == "__main__":
    main()
