"""A PRM's step scores on ProcessBench-format items and the three-threshold report, shared by `edu-prm
eval-processbench` (the real ProcessBench files) and the toy benchmark (`toy.processbench`), so both feed steps to
the PRM the same way and report the same numbers.

Items are ProcessBench records {id, problem, steps, label, ...}; a step's text is `joined_steps(steps, joiner)`
(the joiner after every step but the last), tokenised step by step after the prompt
`tokenizer.apply_chat_template(problem)`. The metric is the official one (`evaluation.processbench`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from edu_prm_jax.evaluation.processbench import best_theta, evaluate_processbench, processbench_f1, theta_from_split
from edu_prm_jax.scoring.examples import build_example, joined_steps
from edu_prm_jax.scoring.multihost import score_examples_across_processes


def item_example(prm: Any, tokenizer: Any, item: dict, joiner: str, max_tokens: int):
    """The item as PRM input, keeping only the steps that fit in max_tokens (the rest stay unscored).

    Returns (example or None when not even the first step fits, number of steps left unscored)."""
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


def score_items(prm: Any, tokenizer: Any, items: Sequence[dict], *, joiner: str, max_tokens: int, batch_size: int,
                name: str) -> tuple[list[list[float]], int]:
    """(per item its step scores in [0, 1], a list as long as the steps that fit in `max_tokens` (empty when none
    does), the number of items with unscored steps). Multi-host: every process must call it with the same items;
    each scores its share of the batches and all get every score (`score_examples_across_processes`)."""
    built = [item_example(prm, tokenizer, it, joiner, max_tokens)
             for it in tqdm(items, desc=f"encode {name}", unit="item")]
    examples = [ex for ex, _ in built if ex is not None]
    scored = iter(score_examples_across_processes(prm, examples, batch_size=batch_size, name=f"processbench {name}"))
    scores = [next(scored) if ex is not None else [] for ex, _ in built]
    return scores, sum(1 for _, n in built if n)


def trivial_baselines(labels_by_subset: Mapping[str, Sequence[int]]) -> dict[str, dict]:
    """The official metric of the predictors "always -1" and "always step 0" (a sanity line for the harness)."""
    out = {}
    for name, pred in (("always -1", lambda lab: -1), ("always step 0", lambda lab: 0)):
        per = {s: processbench_f1(labels, [pred(x) for x in labels]) for s, labels in labels_by_subset.items()}
        out[name] = {"subsets": per, "average_f1": sum(m["f1"] for m in per.values()) / len(per)}
    return out


def processbench_results(scores: Mapping[str, Sequence[Sequence[float]]], labels: Mapping[str, Sequence[int]],
                         theta: float, theta_split: str) -> dict[str, Any]:
    """{"fixed": metric at `theta`, "chosen": at the theta tuned on subset `theta_split` (absent when that subset
    is not evaluated), "best": at the oracle theta tuned on all labels, "trivial": `trivial_baselines`}; each
    metric is `evaluate_processbench`'s dict (per-subset acc_err, acc_corr, F1 in percent, and their average)."""
    out: dict[str, Any] = {"fixed": evaluate_processbench(scores, labels, theta)}
    if theta_split in scores:
        out["chosen"] = theta_from_split(scores, labels, theta_split)[1]
    out["best"] = best_theta(scores, labels)[1]
    out["trivial"] = trivial_baselines(labels)
    return out
