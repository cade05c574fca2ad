"""`edu-prm eval-processbench`: the official ProcessBench F1 (first step scoring below theta) per subset.

Three thresholds are reported, each labelled: the fixed one (0.5), one tuned on the GSM8K subset and applied
to all, and the best-theta upper bound (tuned on the test labels themselves, an oracle). The trivial
predictors "always -1" and "always step 0" are scored by the same harness as a sanity line.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from absl import logging
from tqdm import tqdm

from edu_prm_jax import distributed, parallel
from edu_prm_jax.api import load_tokenizer
from edu_prm_jax.commands.common.paths import find_tokenizer_dir, prm_dir
from edu_prm_jax.evaluation.processbench import best_theta, evaluate_processbench, processbench_f1, theta_from_split
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_json_atomic, write_text_atomic
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.records.sources import read_processbench
from edu_prm_jax.scoring.examples import build_example, joined_steps
from edu_prm_jax.scoring.multihost import score_examples_across_processes

DESCRIPTION = "ProcessBench F1 (per subset and average) of a PRM, at fixed, GSM8K-tuned and best theta."


def item_example(prm: Any, tokenizer: Any, item: dict, joiner: str, max_tokens: int):
    """The item as PRM input, keeping only the steps that fit in max_tokens (the rest stay unscored)."""
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(item["problem"]))
    steps = [tokenizer.encode(s) for s in joined_steps(item["steps"], joiner)]
    steps = [s if s else [tokenizer.pad_token_id] for s in steps]
    sep = 1 if prm.head_spec.inserts_separator else 0
    total, kept = len(prompt_ids), []
    for s in steps:
        if total + len(s) + sep > max_tokens:
            break
        kept.append(s)
        total += len(s) + sep
    if not kept:
        return None, len(steps)
    record = {"prompt_ids": prompt_ids, "step_ids": kept, "labels": [0.0] * len(kept)}
    ex = build_example(record, head=prm.head_spec.name, separator_id=prm.separator_id, record_id=item["id"])
    return ex, len(steps) - len(kept)


def stratified_head(items: list[dict], limit: int) -> list[dict]:
    """The first items of each class (erroneous / all-correct) in the subset's proportion, original order kept,
    so a partial run still has both classes the F1 needs."""
    err = [i for i, it in enumerate(items) if it["label"] != -1]
    corr = [i for i, it in enumerate(items) if it["label"] == -1]
    k_err = min(len(err), max(1, round(limit * len(err) / len(items))))
    keep = set(err[:k_err]) | set(corr[: max(1, limit - k_err)])
    return [it for i, it in enumerate(items) if i in keep]


def trivial_baselines(labels_by_subset: dict[str, list[int]]) -> dict[str, dict]:
    out = {}
    for name, pred in (("always -1", lambda lab: -1), ("always step 0", lambda lab: 0)):
        per = {s: processbench_f1(labels, [pred(x) for x in labels]) for s, labels in labels_by_subset.items()}
        out[name] = {"subsets": per, "average_f1": sum(m["f1"] for m in per.values()) / len(per)}
    return out


def _table(title: str, result: dict) -> list[str]:
    lines = [f"### {title} (theta = {result['theta']:.4g})", "", "| subset | acc_err | acc_corr | F1 |",
             "|---|---|---|---|"]
    for name, m in result["subsets"].items():
        lines.append(f"| {name} | {m['acc_err']:.1f} | {m['acc_corr']:.1f} | {m['f1']:.1f} |")
    avg = result["average"]
    lines += [f"| **average** | {avg['acc_err']:.1f} | {avg['acc_corr']:.1f} | **{avg['f1']:.1f}** |", ""]
    return lines


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    if not config.data:  # ProcessBench is not shipped: no default
        raise ValueError("config.data is not set (pass --config.data=DIR, the dir holding ProcessBench's "
                         "gsm8k.json, math.json, olympiadbench.json and omnimath.json)")
    if not storage.as_path(config.data).is_dir():
        raise FileNotFoundError(f"config.data={config.data!r}: no such directory")
    mesh = parallel.local_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)  # this host's devices
    rules = parallel.rules_from_config(config.mesh.rules)
    prm_path = prm_dir(workdir, config.prm)
    prm = load_prm(prm_path, mesh, dtype=config.dtype, rules=rules)
    tokenizer = load_tokenizer(find_tokenizer_dir(prm_path, config.tokenizer))
    data = storage.as_path(config.data)
    subsets = [s for s in config.subsets.split(",") if s]
    scores, labels, unscored = {}, {}, {}
    for name in subsets:
        items = list(read_processbench(data / f"{name}.json"))
        if config.limit:
            items = stratified_head(items, config.limit)
        built = [item_example(prm, tokenizer, it, config.step_joiner, config.max_tokens)
                 for it in tqdm(items, desc=f"encode {name}", unit="item")]
        examples = [ex for ex, _ in built if ex is not None]
        # multi-host: each process scores its share of the batches; all get every score, process 0 writes
        scored = iter(score_examples_across_processes(prm, examples, batch_size=config.batch_size,
                                                      name=f"processbench {name}"))
        scores[name] = [next(scored) if ex is not None else [] for ex, _ in built]
        labels[name] = [int(it["label"]) for it in items]
        unscored[name] = sum(1 for _, n in built if n)
    fixed = evaluate_processbench(scores, labels, config.theta)
    results: dict[str, Any] = {"fixed": fixed, "items": {s: len(labels[s]) for s in subsets},
                               "items_with_unscored_steps": unscored, "trivial": trivial_baselines(labels)}
    lines = ["## ProcessBench", "", f"PRM: `{prm_path}`; items per subset: "
             + ", ".join(f"{s} {len(labels[s])}" for s in subsets)
             + (" (a partial run: `limit` is set)" if config.limit else ""), ""]
    lines += _table("fixed threshold", fixed)
    if config.theta_split in subsets:
        theta, chosen = theta_from_split(scores, labels, config.theta_split)
        results["chosen"] = chosen
        lines += _table(f"threshold tuned on {config.theta_split}", chosen)
    theta, best = best_theta(scores, labels)
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
