"""`edu-prm eval-processbench`: the official ProcessBench F1 (first step scoring below theta) per subset.

Three thresholds are reported, each labelled: the fixed one (0.5), one tuned on the GSM8K subset and applied
to all, and the best-theta upper bound (tuned on the test labels themselves, an oracle). The trivial
predictors "always -1" and "always step 0" are scored by the same harness as a sanity line.

`--config.data=toy` (or `toy:N[:SEED]`, N items per subset) evaluates on the toy benchmark instead
(`toy.processbench`: held-out toy problems with exact step labels, subsets `policy` and `corrupted`), built once
and cached under <workdir>/toy_processbench/; the 'chosen' threshold is then tuned on `config.toy.theta_split`
and steps are joined with `config.toy.step_joiner`. Items are scored exactly as ProcessBench's are.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from absl import logging

from edu_prm_jax import distributed, parallel
from edu_prm_jax.api import load_tokenizer
from edu_prm_jax.commands.common.paths import find_tokenizer_dir, prm_dir
from edu_prm_jax.evaluation.processbench_prm import processbench_results, score_items
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_json_atomic, write_text_atomic
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.records.sources import read_processbench
from edu_prm_jax.toy import processbench as toy_processbench

DESCRIPTION = "ProcessBench F1 (per subset and average) of a PRM, at fixed, GSM8K-tuned and best theta."


def stratified_head(items: list[dict], limit: int) -> list[dict]:
    """The first items of each class (erroneous / all-correct) in the subset's proportion, original order kept,
    so a partial run still has both classes the F1 needs."""
    err = [i for i, it in enumerate(items) if it["label"] != -1]
    corr = [i for i, it in enumerate(items) if it["label"] == -1]
    k_err = min(len(err), max(1, round(limit * len(err) / len(items))))
    keep = set(err[:k_err]) | set(corr[: max(1, limit - k_err)])
    return [it for i, it in enumerate(items) if i in keep]


def _table(title: str, result: dict) -> list[str]:
    lines = [f"### {title} (theta = {result['theta']:.4g})", "", "| subset | acc_err | acc_corr | F1 |",
             "|---|---|---|---|"]
    for name, m in result["subsets"].items():
        lines.append(f"| {name} | {m['acc_err']:.1f} | {m['acc_corr']:.1f} | {m['f1']:.1f} |")
    avg = result["average"]
    lines += [f"| **average** | {avg['acc_err']:.1f} | {avg['acc_corr']:.1f} | **{avg['f1']:.1f}** |", ""]
    return lines


def _toy_items(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, rules) -> tuple[dict, str]:
    """The toy benchmark's items by subset (built or reused) and the report line naming it."""
    n, seed = toy_processbench.parse_toy_spec(config.data)
    spec = toy_processbench.ToyBenchSpec(
        n=n, seed=seed, policy=config.toy.policy,
        temperatures=toy_processbench.parse_temperatures(config.toy.temperatures),
        samples_per_temperature=config.toy.num_leaves, max_new_tokens=config.toy.max_new_tokens)
    items, bench = toy_processbench.load_or_build(spec, workdir / "toy_processbench", mesh=mesh, rules=rules)
    return toy_processbench.items_by_subset(items), (
        f"Data: toy benchmark `{config.data}` (`{bench}`): held-out toy problems, exact labels "
        f"({toy_processbench.LABELS}); policy `{config.toy.policy}`.")


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    if not config.data:  # ProcessBench is not shipped: no default
        raise ValueError("config.data is not set (pass --config.data=DIR, the dir holding ProcessBench's "
                         "gsm8k.json, math.json, olympiadbench.json and omnimath.json, or --config.data=toy)")
    toy = toy_processbench.is_toy_spec(config.data)
    if toy:
        toy_processbench.parse_toy_spec(config.data)  # a bad spec fails before anything loads
    elif not storage.as_path(config.data).is_dir():
        raise FileNotFoundError(f"config.data={config.data!r}: no such directory")
    mesh = parallel.local_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)  # this host's devices
    rules = parallel.rules_from_config(config.mesh.rules)
    if toy:  # built (sampling the policy) before the PRM loads
        by_subset, data_line = _toy_items(config, workdir, mesh, rules)
        subsets, theta_split, joiner = list(by_subset), config.toy.theta_split, config.toy.step_joiner
    else:
        data = storage.as_path(config.data)
        subsets = [s for s in config.subsets.split(",") if s]
        by_subset = {name: list(read_processbench(data / f"{name}.json")) for name in subsets}
        theta_split, joiner, data_line = config.theta_split, config.step_joiner, ""
    prm_path = prm_dir(workdir, config.prm)
    prm = load_prm(prm_path, mesh, dtype=config.dtype, rules=rules)
    tokenizer = load_tokenizer(find_tokenizer_dir(prm_path, config.tokenizer))
    scores, labels, unscored = {}, {}, {}
    for name in subsets:
        items = by_subset[name]
        if config.limit:
            items = stratified_head(items, config.limit)
        # multi-host: each process scores its share of the batches; all get every score, process 0 writes
        scores[name], unscored[name] = score_items(prm, tokenizer, items, joiner=joiner, max_tokens=config.max_tokens,
                                                   batch_size=config.batch_size, name=name)
        labels[name] = [int(it["label"]) for it in items]
    computed = processbench_results(scores, labels, config.theta, theta_split)
    fixed = computed["fixed"]
    results: dict[str, Any] = {"fixed": fixed, "items": {s: len(labels[s]) for s in subsets},
                               "items_with_unscored_steps": unscored, "trivial": computed["trivial"]}
    if toy:
        results["data"] = config.data
    lines = ["## ProcessBench" + (" (toy benchmark)" if toy else ""), "", f"PRM: `{prm_path}`; items per subset: "
             + ", ".join(f"{s} {len(labels[s])}" for s in subsets)
             + (" (a partial run: `limit` is set)" if config.limit else ""), ""]
    if data_line:
        lines += [data_line, ""]
    lines += _table("fixed threshold", fixed)
    if "chosen" in computed:
        results["chosen"] = computed["chosen"]
        lines += _table(f"threshold tuned on {theta_split}", computed["chosen"])
    best = computed["best"]
    results["best"] = best
    lines += _table("best threshold (oracle upper bound, tuned on the test labels)", best)
    lines += ["### Trivial predictors (same harness)", "", "| predictor | " + " | ".join(subsets) + " | average |",
              "|---|" + "---|" * (len(subsets) + 1)]
    for name, t in results["trivial"].items():
        lines.append(f"| {name} | " + " | ".join(f"{t['subsets'][s]['f1']:.1f}" for s in subsets)
                     + f" | {t['average_f1']:.1f} |")
    out = workdir / "processbench"
    text = "\n".join(lines) + "\n"
    if distributed.is_lead():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "results.json", results)
        write_text_atomic(out / "report.md", text)
        logging.info("ProcessBench report: %s\n%s", out / "report.md", text)
    distributed.barrier("eval-processbench: written")
