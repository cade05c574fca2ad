"""`edu-prm label`: sample trees -> Monte Carlo step labels, as JSONL shards + a TFDS dataset (resumable).

Input: the `trees-*` shards of `edu-prm sample` (README "Sample records"); every record is validated and a bad
one stops the run with a DataError naming the file, line and field. Output under `<output>`:

- `steps-0000i-of-0000n.jsonl`: one record per leaf path: `id` (`<question id>/<slot>`), `question_id`,
  `problem`, `prompt`, `prompt_ids`, `steps` (text per step), `step_ids` (generated token ids per step; their
  concatenation is the leaf's token ids), `labels` (float per step), `label_kind` ('hard' for a 0/1 label, else
  'soft'), `target`, `final_correct`, `provenance` (`method`, `source_shard`, `mode` and `sampler` params of the
  tree, `slot`, per step `values` (v before the target), `node_leaves`, `node_correct`, `node_rollouts`, and
  `rollout_params` when rollouts were sampled). `prompt_ids`/`step_ids`/`labels` are what
  `training.prm_data.build_examples` reads.
- `tfds/labels/1.0.0`: the same records for training as TFDS array_record, features: `id`, `question_id`
  (string), `prompt_ids`, `step_ids_flat` (int32[], the steps concatenated), `step_lengths` (int32[], tokens
  per step: split `step_ids_flat` with them), `labels` (float32[]), `label_kind` (string[]),
  `final_correct` (bool). Built once all shards exist; rebuilt when this run (re)wrote a shard.
- `label_stats.json` (also printed): labelled steps, hard/soft share of the emitted labels, `value_hard_share`
  (share of steps whose MC value v is 0 or 1, whatever the target), positive share (label >= 0.5), mean steps
  per solution, share of correct leaves, questions with at least one correct leaf; for toy questions
  `toy_audited_solutions`, `toy_step_agreement` (share of steps where "a right answer is reachable below" (v > 0)
  matches exact step correctness) and `toy_right_answers_through_a_wrong_step` (share of right answers whose path
  has a wrong line). Records written before labels carried `problem` are not audited.

Output shard j holds input records [j*N/n, (j+1)*N/n) in input order; finished shards are skipped on rerun.
Questions without a gold answer cannot be labelled and are skipped (logged).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from edu_prm_jax.grading import answers
from edu_prm_jax.io import tfds as tfds_io
from edu_prm_jax.io.atomic import write_json_atomic
from edu_prm_jax.io.jsonl import DataError, ListOf, Schema, read_jsonl
from edu_prm_jax.io.shards import ShardedJsonlWriter, check_fingerprint, read_shards
from edu_prm_jax.labeling.mc import TARGETS, JudgedTree, PathLabels, apply_target, label_trees
from edu_prm_jax.labeling.shepherd import label_shepherd
from edu_prm_jax.sampling.engine import Leaf
from edu_prm_jax.toy.audit import ToyLabelAudit
from edu_prm_jax.toy.defaults import resolve_policy

DESCRIPTION = "Monte Carlo step labels (EDU tree or Math-Shepherd) of sample shards, as JSONL + TFDS."

INPUT_PREFIX, OUTPUT_PREFIX, TFDS_NAME = "trees", "steps", "labels"
METHODS = ("edu", "shepherd")
TREE_SCHEMA = Schema({"id": (str, int), "prompt": str, "prompt_ids": ListOf(int), "mode": str, "params": dict,
                      "leaves": list}, optional={"answer": (str, int, float), "index": int})
LEAF_SCHEMA = Schema({"slot": int, "token_ids": ListOf(int), "anchors": ListOf(int), "text": str},
                     optional={"parent_slot": int, "fork_pos": int, "stop_reason": str})
TFDS_FEATURES = {"id": "string", "question_id": "string", "prompt_ids": "int32[]", "step_ids_flat": "int32[]",
                 "step_lengths": "int32[]", "labels": "float32[]", "label_kind": "string[]",
                 "final_correct": "bool"}


# ------------------------------------------------------------------------------------------- input
def validate_tree(record: dict) -> None:
    """Schema of a `sample` tree record; leaf errors name the field as `leaves[i].<field>`."""
    TREE_SCHEMA.validate(record)
    for i, leaf in enumerate(record["leaves"]):
        try:
            LEAF_SCHEMA.validate(leaf)
        except DataError as e:
            raise DataError(e.message, field=f"leaves[{i}]" + (f".{e.field}" if e.field else "")) from None
        n = len(leaf["token_ids"])
        bad = [a for a in leaf["anchors"] if not 0 <= a <= n]
        if bad:
            raise DataError(f"anchor {bad[0]} outside [0, {n}] (the path has {n} tokens)",
                            field=f"leaves[{i}].anchors")
        if any(t < 0 for t in leaf["token_ids"]):
            raise DataError("negative token id", field=f"leaves[{i}].token_ids")


def input_shards(samples: pathlib.Path) -> list[pathlib.Path]:
    """All `trees-*` shards of `samples`, checked complete (a missing shard is an error, not a gap)."""
    pattern = re.compile(re.escape(INPUT_PREFIX) + r"-(\d{5})-of-(\d{5})\.jsonl")
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in (samples.iterdir() if samples.is_dir() else [])
                   if (m := pattern.fullmatch(p.name)))
    if not found:
        raise DataError(f"no shards named '{INPUT_PREFIX}-NNNNN-of-NNNNN.jsonl' (run `edu-prm sample` first)",
                        path=samples)
    totals = {n for _, n, _ in found}
    if len(totals) != 1 or [i for i, _, _ in found] != list(range(totals.pop())):
        raise DataError(f"incomplete or mixed '{INPUT_PREFIX}' shards: {[p.name for *_, p in found]}", path=samples)
    return [p for *_, p in found]


def count_records(path: pathlib.Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def records_in_range(shards: Sequence[pathlib.Path], sizes: Sequence[int], lo: int, hi: int
                     ) -> Iterator[tuple[dict, str]]:
    """Validated input records lo..hi-1 (global order) with their shard's file name."""
    offset = 0
    for path, size in zip(shards, sizes):
        if offset < hi and offset + size > lo:
            for j, rec in enumerate(read_jsonl(path, validate_tree)):
                if offset + j >= hi:
                    break
                if offset + j >= lo:
                    yield rec, path.name
        offset += size


# ----------------------------------------------------------------------------------------- rollouts
class SamplerRollout:
    """`rollout(prompt_ids_list) -> [[continuation text] * k]` via HT sampling of the policy.

    Each continuation gets up to `sampling.max_new_tokens` new tokens after the prompt + prefix. Randomness is
    keyed by a hash of each prompt's ids, so a prompt gets the same continuations whichever shard or batch it
    lands in (deterministic reruns)."""

    def __init__(self, config: ml_collections.ConfigDict, k: int):
        from edu_prm_jax.commands.common.builders import build_sampler

        if k < 1:
            raise ValueError(f"rollouts need k >= 1 samples per prompt, got {k}")
        self.sampler = build_sampler(config.policy, config.tokenizer, config.sampling, config.mesh, config.dtype,
                                     config.batch_questions, config.prompt_bucket, mode="ht", num_slots=k)

    @property
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler.params)

    def __call__(self, prompts: list[list[int]]) -> list[list[str]]:
        keys = [zlib.crc32(np.asarray(p, np.int64).tobytes()) & 0x7FFFFFFF for p in prompts]
        return [[leaf.text for leaf in leaves] for leaves in self.sampler.sample_ids(prompts, keys)]


# ------------------------------------------------------------------------------------------ records
def step_texts(decode: Any, token_ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[str]:
    """Text of each step as the growth of the decoded prefix (so the steps join to the leaf's text); a step
    whose prefix does not decode to an extension of the previous one (a split multi-byte character) falls back
    to decoding the step alone."""
    out, prev = [], ""
    for start, end in spans:
        cur = decode(list(token_ids[:end]))
        out.append(cur[len(prev):] if cur.startswith(prev) else decode(list(token_ids[start:end])))
        prev = cur
    return out


def path_record(rec: dict, source: str, leaf: Leaf, path: PathLabels, target: str, method: str,
                decode: Any, rollout_params: dict | None) -> dict[str, Any]:
    labels, kinds = apply_target(path.values, target)
    qid = str(rec["id"])
    return {
        "id": f"{qid}/{leaf.slot}", "question_id": qid, "problem": rec.get("problem", ""), "prompt": rec["prompt"],
        "prompt_ids": rec["prompt_ids"],
        "steps": step_texts(decode, leaf.token_ids, path.spans),
        "step_ids": [leaf.token_ids[s:e] for s, e in path.spans], "labels": labels, "label_kind": kinds,
        "target": target, "final_correct": path.correct,
        "provenance": {"method": method, "source_shard": source, "mode": rec["mode"], "sampler": rec["params"],
                       "slot": leaf.slot, "values": path.values, "node_leaves": path.node_leaves,
                       "node_correct": path.node_correct, "node_rollouts": path.node_rollouts,
                       "rollout_params": rollout_params},
    }


def label_records(items: Sequence[tuple[dict, str]], config: ml_collections.ConfigDict, tokenizer: Any,
                  rollout: SamplerRollout | None) -> list[dict[str, Any]]:
    """Label every leaf path of the given tree records (one batched rollout call for all of them)."""
    trees, kept = [], []
    for rec, source in items:
        gold = rec.get("answer")
        if gold is None:
            logging.warning("%s: question %s has no gold answer; not labelled", source, rec["id"])
            continue
        leaves = [Leaf.from_json(d) for d in rec["leaves"] if d["token_ids"]]
        correct = [answers.is_correct(leaf.text, str(gold)) for leaf in leaves]
        trees.append(JudgedTree(leaves, correct, rec["prompt_ids"], str(gold)))
        kept.append((rec, source))
    decode = tokenizer.decode
    if config.method == "edu":
        paths = label_trees(trees, min_leaves=config.extra_rollouts_min_leaves, rollout=rollout, decode=decode)
    else:
        paths = label_shepherd(trees, tokenizer.decoded_token_texts(), rollout=rollout, decode=decode)
    params = rollout.params if rollout is not None else None
    out = []
    for (rec, source), tree, tree_paths in zip(kept, trees, paths):
        for leaf, p in zip(tree.leaves, tree_paths):
            out.append(path_record(rec, source, leaf, p, config.target, config.method, decode,
                                   params if any(p.node_rollouts) else None))
    return out


# ------------------------------------------------------------------------------------- stats, TFDS
def label_stats(records: Iterator[dict]) -> dict[str, Any]:
    """Summary of labelled-step records (the paper reports 52% hard labels); for toy questions also how the MC
    values compare with exact step correctness (labeling/toy_audit.py)."""
    steps = hard = value_hard = positive = solutions = correct = 0
    questions: set[str] = set()
    solved: set[str] = set()
    toy_audit = ToyLabelAudit()
    for r in records:
        toy_audit.add(r)
        solutions += 1
        steps += len(r["labels"])
        hard += sum(k == "hard" for k in r["label_kind"])
        value_hard += sum(v in (0, 1) for v in r["provenance"]["values"])
        positive += sum(x >= 0.5 for x in r["labels"])
        correct += bool(r["final_correct"])
        questions.add(r["question_id"])
        if r["final_correct"]:
            solved.add(r["question_id"])
    share = lambda a, b: round(a / b, 6) if b else 0.0
    return {"labelled_steps": steps, "hard_share": share(hard, steps), "soft_share": share(steps - hard, steps),
            "value_hard_share": share(value_hard, steps),
            "positive_share": share(positive, steps), "solutions": solutions,
            "mean_steps_per_solution": share(steps, solutions), "correct_leaf_share": share(correct, solutions),
            "questions": len(questions), "questions_with_correct_leaf": len(solved),
            "questions_with_correct_leaf_share": share(len(solved), len(questions)), **toy_audit.summary()}


def tfds_example(r: dict) -> dict[str, Any]:
    return {"id": r["id"], "question_id": r["question_id"], "prompt_ids": r["prompt_ids"],
            "step_ids_flat": [t for s in r["step_ids"] for t in s], "step_lengths": [len(s) for s in r["step_ids"]],
            "labels": r["labels"], "label_kind": r["label_kind"], "final_correct": r["final_correct"]}


def write_tfds(out: pathlib.Path, rebuild: bool) -> pathlib.Path:
    """The TFDS copy of all `steps-*` shards; a stale copy (shards rewritten this run) is rebuilt."""
    data_dir = out / "tfds"
    if rebuild and (data_dir / TFDS_NAME).exists():
        shutil.rmtree(data_dir / TFDS_NAME)
    return tfds_io.write_tfds_dataset((tfds_example(r) for r in read_shards(out, OUTPUT_PREFIX)), data_dir,
                                      TFDS_NAME, TFDS_FEATURES)


# ---------------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    from edu_prm_jax.tokenization import load_tokenizer

    if config.target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {config.target!r}")
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    samples = pathlib.Path(config.samples) if config.samples else workdir / "samples_edu"
    out = pathlib.Path(config.output) if config.output else workdir / "labels"
    shards = input_shards(samples)
    sizes = [count_records(p) for p in shards]
    total = sum(sizes)
    num_shards = max(1, min(config.num_shards or len(shards), total))
    settings = {k: config[k] for k in ("target", "method", "extra_rollouts_min_leaves", "extra_rollouts_k",
                                       "shepherd_k")}
    check_fingerprint(out, {"samples": str(samples.resolve()), "input_shards": [p.name for p in shards],
                            "input_bytes": [p.stat().st_size for p in shards], "num_shards": num_shards, **settings})
    writer = ShardedJsonlWriter(out, OUTPUT_PREFIX, num_shards)
    bounds = [round(i * total / num_shards) for i in range(num_shards + 1)]
    pending = writer.pending()
    tokenizer = load_tokenizer(config.tokenizer or resolve_policy(config.policy)) if pending else None
    needs_rollouts = config.method == "shepherd" or config.extra_rollouts_min_leaves > 0
    rollout = None
    if pending and needs_rollouts:
        k = config.shepherd_k if config.method == "shepherd" else config.extra_rollouts_k
        rollout = SamplerRollout(config, k)
    for shard in tqdm(pending, desc=f"label[{config.method}/{config.target}]", unit="shard"):
        items = list(records_in_range(shards, sizes, bounds[shard], bounds[shard + 1]))
        writer.write(shard, label_records(items, config, tokenizer, rollout))
    if not pending:
        logging.info("label: all %d shards already complete in %s", num_shards, out)
    if config.tfds:
        logging.info("label: TFDS dataset at %s", write_tfds(out, rebuild=bool(pending)))
    stats = {"method": config.method, "target": config.target, **label_stats(read_shards(out, OUTPUT_PREFIX))}
    write_json_atomic(out / "label_stats.json", stats)
    print(json.dumps(stats, indent=2))
