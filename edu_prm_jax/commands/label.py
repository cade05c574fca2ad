"""`edu-prm label`: sample trees -> Monte Carlo step labels, as JSONL shards + a TFDS dataset (resumable).

Input: the `trees-*` shards of `edu-prm sample` (README "Sample records"); every record is validated and a bad
one stops the run with a DataError naming the file, line and field. Output under `<output>`:

- `steps-0000i-of-0000n.jsonl`: one record per leaf path: `id` (`<question id>/<slot>`), `question_id`,
  `problem`, `prompt`, `prompt_ids`, `steps` (text per step), `step_ids` (generated token ids per step; their
  concatenation is the leaf's token ids), `labels` (float per step), `label_kind` ('hard' for a 0/1 label, else
  'soft'), `target`, `final_correct`, `provenance` (`method`, `source_shard`, `mode` and `sampler` params of the
  tree, `slot`, per step `values` (v before the target), `node_leaves`, `node_correct`, `node_rollouts`, and
  `rollout_params` when rollouts were sampled, and `node_undecided` when an answer check below a step stayed
  undecided: per step, the undecided verdicts left out of its counts). `prompt_ids`/`step_ids`/`labels` are what
  `scoring.examples.build_example` reads.
- `undecided-0000i-of-0000n.jsonl`: one line per shard: `undecided_leaves` (ids `<question id>/<slot>` of leaves
  whose answer check stayed undecided, `grading.answers.answers_verdict` None: out of its CPU bound twice),
  `rollouts` and `undecided_rollouts` (extra / Math-Shepherd / OmegaPRM rollouts judged, and how many were
  undecided), `unlabelled_paths` (ids of paths with no record: a step of theirs had only undecided verdicts below
  it, so it has no label), and the shard's cost: `rollout_tokens`, `rollout_queries` (the rollouts sampled) and
  `wall_seconds` (labelling time of the shard). Undecided verdicts are left out of the MC counts, never counted as
  wrong.
- `tfds/labels/1.0.0`: the same records for training as TFDS array_record, features: `id`, `question_id`
  (string), `prompt_ids`, `step_ids_flat` (int32[], the steps concatenated), `step_lengths` (int32[], tokens
  per step: split `step_ids_flat` with them), `labels` (float32[]), `label_kind` (string[]),
  `final_correct` (bool). Built once all shards exist; rebuilt when this run (re)wrote a shard.
- `label_stats.json` (also printed): labelled steps, hard/soft share of the emitted labels, `value_hard_share`
  (share of steps whose MC value v is 0 or 1, whatever the target), positive share (label >= 0.5), mean steps
  per solution, share of correct leaves, questions with at least one correct leaf; for toy questions
  `toy_audited_solutions`, `toy_step_agreement` (share of steps where "a right answer is reachable below" (v > 0)
  matches exact step correctness) and `toy_right_answers_through_a_wrong_step` (share of right answers whose path
  has a wrong line). Records written before labels carried `problem` are not audited. `undecided` (undecided
  verdicts: leaves + rollouts), `undecided_leaves`, `undecided_rollouts`, `unlabelled_paths` come from the
  `undecided-*` shards (null for an output made before they were written). `toy_label_agreement` scores the
  emitted labels (label >= 0.5) against exact step correctness. `cost` (`label_cost`): policy tokens generated,
  queries (sampled sequences) and wall seconds of the labels, sampling of the trees included (from the sample
  output's `cost-*` shards).

Methods: `edu` (tree labels), `shepherd` (line steps of the sampled solutions, k completions per step prefix) and
`omega` (OmegaPRM, `labeling/omega.py`: an MCTS with binary search for the first error per question of
`config.questions`; it reads no samples, its records are the search tree's root-to-node paths, `mode` "omega").

Output shard j holds input records [j*N/n, (j+1)*N/n) in input order; finished shards are skipped on rerun.
Questions without a gold answer cannot be labelled and are skipped (logged).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from edu_prm_jax import distributed
from edu_prm_jax.grading import answers
from edu_prm_jax.io import storage
from edu_prm_jax.io import tfds as tfds_io
from edu_prm_jax.io.atomic import write_json_atomic
from edu_prm_jax.io.jsonl import count_records
from edu_prm_jax.io.shards import ShardedJsonlWriter, check_fingerprint, content_digest, read_shards
from edu_prm_jax.labeling.mc import TARGETS, JudgedTree, PathLabels, apply_target, label_trees
from edu_prm_jax.labeling.omega import OmegaConfig, label_omega
from edu_prm_jax.labeling.shepherd import label_shepherd
from edu_prm_jax.records.steps import STEPS_PREFIX, TFDS_FEATURES, TFDS_NAME, Provenance, StepRecord, read_step_shards
from edu_prm_jax.records.trees import TreeRecord, read_tree_file, tree_shard_paths
from edu_prm_jax.sampling.engine import Leaf
from edu_prm_jax.sampling.shards import questions_digest, sampling_cost
from edu_prm_jax.toy.audit import ToyLabelAudit
from edu_prm_jax.toy.defaults import resolve_policy

DESCRIPTION = "Monte Carlo step labels (EDU tree or Math-Shepherd) of sample shards, as JSONL + TFDS."

METHODS = ("edu", "shepherd", "omega")
UNDECIDED_PREFIX = "undecided"  # per-shard summary of undecided answer checks (module docstring)
NO_SAMPLING = {"tokens": 0, "queries": 0, "wall_seconds": 0.0}  # OmegaPRM labels no sampled trees


# ------------------------------------------------------------------------------------------- input
def records_in_range(shards: Sequence[pathlib.Path], sizes: Sequence[int], lo: int, hi: int
                     ) -> Iterator[tuple[TreeRecord, str]]:
    """Validated input records lo..hi-1 (global order) with their shard's file name."""
    offset = 0
    for path, size in zip(shards, sizes):
        if offset < hi and offset + size > lo:
            for j, rec in enumerate(read_tree_file(path)):
                if offset + j >= hi:
                    break
                if offset + j >= lo:
                    yield rec, path.name
        offset += size


# ----------------------------------------------------------------------------------------- rollouts
@dataclasses.dataclass
class RolloutCost:
    """Policy work of a labeller's own rollouts: `tokens` generated (every continuation counted whole),
    `queries` sampled sequences, `calls` batched sampler calls."""

    tokens: int = 0
    queries: int = 0
    calls: int = 0

    def add(self, tokens: int, queries: int) -> None:
        self.tokens, self.queries, self.calls = self.tokens + tokens, self.queries + queries, self.calls + 1


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
                                     config.batch_questions, config.prompt_bucket, mode="ht", num_leaves=k)
        self.cost = RolloutCost()

    @property
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler.params)

    def __call__(self, prompts: list[list[int]]) -> list[list[str]]:
        return [[leaf.text for leaf in leaves] for leaves in self.leaves(prompts)]

    def leaves(self, prompts: list[list[int]]) -> list[list[Leaf]]:
        """The k sampled continuations (`Leaf`: token ids and text) of each prompt; counted in `cost`."""
        keys = [zlib.crc32(np.asarray(p, np.int64).tobytes()) & 0x7FFFFFFF for p in prompts]
        out = list(self.sampler.sample_ids(prompts, keys))
        self.cost.add(sum(len(leaf.token_ids) for leaves in out for leaf in leaves), sum(map(len, out)))
        return out


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


def path_record(rec: TreeRecord, source: str, leaf: Leaf, path: PathLabels, target: str, method: str,
                decode: Any, rollout_params: dict | None) -> StepRecord:
    labels, kinds = apply_target(path.values, target)
    qid = rec.question_id
    return StepRecord(
        id=f"{qid}/{leaf.slot}", question_id=qid, problem=rec.problem, prompt=rec.prompt, prompt_ids=rec.prompt_ids,
        steps=step_texts(decode, leaf.token_ids, path.spans),
        step_ids=[leaf.token_ids[s:e] for s, e in path.spans], labels=labels, label_kind=kinds,
        target=target, final_correct=path.correct,
        provenance=Provenance(method=method, source_shard=source, mode=rec.mode, sampler=rec.params, slot=leaf.slot,
                              values=path.values, node_leaves=path.node_leaves, node_correct=path.node_correct,
                              node_rollouts=path.node_rollouts, rollout_params=rollout_params,
                              **({"node_undecided": path.node_undecided} if any(path.node_undecided) else {})),
    )


def label_records(items: Sequence[tuple[TreeRecord, str]], config: ml_collections.ConfigDict, tokenizer: Any,
                  rollout: SamplerRollout | None) -> tuple[list[StepRecord], dict[str, Any]]:
    """Label every leaf path of the given tree records (one batched rollout call for all of them).

    Returns the records of the labelled paths and the summary of undecided answer checks (the line of the
    `undecided-*` shard: module docstring). A path with a step whose verdicts were all undecided gets no record.
    """
    trees, kept = [], []
    undecided_leaves: list[str] = []
    for rec, source in items:
        gold = rec.answer
        if gold is None:
            logging.warning("%s: question %s has no gold answer; not labelled", source, rec.id)
            continue
        leaves = [Leaf.from_json(d.to_json()) for d in rec.leaves if d.token_ids]
        correct = [answers.solution_verdict(leaf.text, str(gold)) for leaf in leaves]
        undecided_leaves += [f"{rec.question_id}/{leaf.slot}" for leaf, ok in zip(leaves, correct) if ok is None]
        trees.append(JudgedTree(leaves, correct, rec.prompt_ids, str(gold)))
        kept.append((rec, source))
    rollout_verdicts: list[bool | None] = []

    def judge(text: str, gold: str | None) -> bool | None:
        verdict = answers.solution_verdict(text, gold)
        rollout_verdicts.append(verdict)
        return verdict

    decode = tokenizer.decode
    if config.method == "edu":
        paths = label_trees(trees, min_leaves=config.extra_rollouts_min_leaves, rollout=rollout, decode=decode,
                            judge=judge)
    else:
        paths = label_shepherd(trees, tokenizer.decoded_token_texts(), rollout=rollout, decode=decode, judge=judge)
    params = rollout.params if rollout is not None else None
    out, unlabelled = [], []
    for (rec, source), tree, tree_paths in zip(kept, trees, paths):
        for leaf, p in zip(tree.leaves, tree_paths):
            if not p.labelled:
                unlabelled.append(f"{rec.question_id}/{leaf.slot}")
                continue
            out.append(path_record(rec, source, leaf, p, config.target, config.method, decode,
                                   params if any(p.node_rollouts) else None))
    if undecided_leaves or unlabelled or None in rollout_verdicts:
        logging.warning("label: %d leaves and %d of %d rollouts had undecided answer checks (left out of the MC "
                        "counts); %d paths have a step without a label and get no record", len(undecided_leaves),
                        rollout_verdicts.count(None), len(rollout_verdicts), len(unlabelled))
    summary = {"undecided_leaves": undecided_leaves, "rollouts": len(rollout_verdicts),
               "undecided_rollouts": rollout_verdicts.count(None), "unlabelled_paths": unlabelled}
    return out, summary


@dataclasses.dataclass(frozen=True)
class QuestionItem:
    """A question OmegaPRM searches from (it reads no sampled tree): what `path_record` takes of a tree record."""

    question_id: str
    problem: str
    prompt: str
    prompt_ids: list[int]
    answer: str | None
    params: dict[str, Any]
    mode: str = "omega"


def question_items(config: ml_collections.ConfigDict, tokenizer: Any) -> list[QuestionItem]:
    """The questions of `config.questions` (first `limit`) with their chat prompts, for method=omega."""
    from edu_prm_jax.toy.defaults import load_questions

    if not config.questions:
        raise ValueError("method=omega searches from questions, not sampled trees: set --config.questions "
                         "(a JSONL file or toy:<split>:<n>)")
    questions = load_questions(config.questions, limit=config.limit)
    if not questions:
        raise ValueError(f"questions={config.questions!r}: no questions")
    params = config.omega.to_dict()
    out = []
    for q in questions:
        prompt = tokenizer.apply_chat_template(q["problem"])
        gold = q.get("answer")
        out.append(QuestionItem(str(q["id"]), q["problem"], prompt, tokenizer.encode(prompt),
                                None if gold in (None, "") else str(gold), params))
    return out


def label_omega_records(items: Sequence[QuestionItem], config: ml_collections.ConfigDict, tokenizer: Any,
                        rollout: SamplerRollout, source: str) -> tuple[list[StepRecord], dict[str, Any]]:
    """OmegaPRM labels of the questions (all searches in lockstep, one batched rollout call per round): one record
    per emitted root-to-node path (labeling/omega.py), and the shard's summary line as `label_records` gives it."""
    kept = [it for it in items if it.answer is not None]
    for it in items:
        if it.answer is None:
            logging.warning("%s: question %s has no gold answer; not labelled", source, it.question_id)
    verdicts: list[bool | None] = []

    def judge(text: str, gold: str | None) -> bool | None:
        verdicts.append(answers.solution_verdict(text, gold))
        return verdicts[-1]

    result = label_omega([JudgedTree([], [], it.prompt_ids, it.answer) for it in kept],
                         tokenizer.decoded_token_texts(), rollout=rollout.leaves, decode=tokenizer.decode, judge=judge,
                         config=OmegaConfig(**config.omega.to_dict()))
    out, unlabelled = [], []
    for it, paths in zip(kept, result.paths):
        for p in paths:
            if not p.labels.labelled:
                unlabelled.append(f"{it.question_id}/{p.slot}")
                continue
            out.append(path_record(it, source, p.leaf(), p.labels, config.target, "omega", tokenizer.decode,
                                   rollout.params))
    summary = {"undecided_leaves": [], "rollouts": len(verdicts), "undecided_rollouts": verdicts.count(None),
               "unlabelled_paths": unlabelled}
    return out, summary


# ------------------------------------------------------------------------------------- stats, TFDS
def label_stats(records: Iterator[dict], undecided: Sequence[dict] | None = None) -> dict[str, Any]:
    """Summary of labelled-step records (the paper reports 52% hard labels); for toy questions also how the MC
    values compare with exact step correctness (toy/audit.py). `undecided`: the lines of the `undecided-*`
    shards (module docstring); None (an output made before they were written) gives null counts."""
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
            "questions_with_correct_leaf_share": share(len(solved), len(questions)),
            **undecided_stats(undecided), **toy_audit.summary()}


def undecided_stats(summaries: Sequence[dict] | None) -> dict[str, int | None]:
    """Totals of the `undecided-*` shard lines: `undecided` = undecided leaves + undecided rollouts."""
    if summaries is None:
        return dict.fromkeys(("undecided", "undecided_leaves", "undecided_rollouts", "unlabelled_paths"))
    leaves = sum(len(u["undecided_leaves"]) for u in summaries)
    rollouts = sum(int(u["undecided_rollouts"]) for u in summaries)
    return {"undecided": leaves + rollouts, "undecided_leaves": leaves, "undecided_rollouts": rollouts,
            "unlabelled_paths": sum(len(u["unlabelled_paths"]) for u in summaries)}


def label_cost(sampling: dict[str, Any] | None, summaries: Sequence[dict] | None) -> dict[str, Any]:
    """What the labels cost the policy, in the units every labeller reports (issue: equal-cost comparisons):
    `tokens` (generated tokens: the sampled trees' distinct tokens plus every rollout token), `queries`
    (sampled sequences: tree leaves plus rollouts) and `wall_seconds` (sampling plus labelling, summed over
    shards), each also split into `sample_*` (the `sample` run the labels were cut from; null when its output
    has no `cost-*` shards) and `rollout_*` / `label_wall_seconds` (this command's own rollouts). A total is null
    when a part is unknown, never a partial sum."""
    known = summaries is not None and all("rollout_tokens" in u for u in summaries)
    roll = {k: sum(u[k] for u in summaries) if known else None
            for k in ("rollout_tokens", "rollout_queries", "wall_seconds")}
    sample = sampling or {}
    out = {"sample_tokens": sample.get("tokens"), "sample_queries": sample.get("queries"),
           "sample_wall_seconds": sample.get("wall_seconds"), "rollout_tokens": roll["rollout_tokens"],
           "rollout_queries": roll["rollout_queries"],
           "label_wall_seconds": None if roll["wall_seconds"] is None else round(roll["wall_seconds"], 3)}
    for total, a, b in (("tokens", "sample_tokens", "rollout_tokens"), ("queries", "sample_queries", "rollout_queries"),
                        ("wall_seconds", "sample_wall_seconds", "label_wall_seconds")):
        out[total] = None if out[a] is None or out[b] is None else round(out[a] + out[b], 3)
    return out


def write_tfds(out: pathlib.Path, rebuild: bool) -> pathlib.Path:
    """The TFDS copy of all `steps-*` shards; a stale copy (shards rewritten this run) is rebuilt."""
    data_dir = out / "tfds"
    if rebuild and (data_dir / TFDS_NAME).exists():
        storage.remove_tree(data_dir / TFDS_NAME)
    return tfds_io.write_tfds_dataset((r.tfds_example() for r in read_step_shards(out)), data_dir, TFDS_NAME,
                                      TFDS_FEATURES)


# ---------------------------------------------------------------------------------------------- run
def check_tree_modes(shards: list[pathlib.Path], sizes: list[int], samples: pathlib.Path, allow_ht: bool) -> None:
    """Tree labels cut steps at anchors; an HT or greedy sample has none, so each would become a single
    outcome-labelled step. Refuse that (before anything is written) unless asked for explicitly.

    One `sample` run writes every tree of its output in one mode, so the first tree of each shard tells the
    mode of the whole shard (`sizes`: trees per shard): the shards are not read twice."""
    modes: Counter = Counter()
    for path, size in zip(shards, sizes):
        first = next(read_tree_file(path), None)
        if first is not None:
            modes[first.mode] += size
    other = {m: n for m, n in modes.items() if m != "edu"}
    if other and not allow_ht:
        raise ValueError(f"config.samples={str(samples)!r}: {sum(other.values())} of {sum(modes.values())} trees were "
                         f"sampled in mode {sorted(other)}, which has no anchors: each would be one outcome-labelled "
                         "step. Sample with sampling.mode=edu, use --config.method=shepherd, or pass "
                         "--config.allow_ht_trees=True")
    if other:
        logging.warning("label: %d trees without anchors (mode %s) give one outcome-labelled step each",
                        sum(other.values()), sorted(other))


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    from edu_prm_jax.tokenization import load_tokenizer

    if config.target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {config.target!r}")
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    out = storage.as_path(config.output) if config.output else workdir / "labels"
    omega = config.method == "omega"
    if omega:  # searches from questions: no tree shards are read
        OmegaConfig(**config.omega.to_dict())  # a bad setting stops here, before any model loads
        tokenizer = load_tokenizer(config.tokenizer or resolve_policy(config.policy))
        items = question_items(config, tokenizer)
        samples, shards, total = None, [], len(items)
        num_shards = max(1, min(config.num_shards or 4, total))
        input_identity = {"questions": questions_digest([{"id": it.question_id, "problem": it.problem,
                                                          "answer": it.answer} for it in items])}
    else:
        samples = storage.as_path(config.samples) if config.samples else workdir / "samples_edu"
        shards = tree_shard_paths(samples)
        sizes = [count_records(p) for p in shards]
        total = sum(sizes)
        num_shards = max(1, min(config.num_shards or len(shards), total))
        input_identity = {"samples": str(storage.resolved(samples)), "input_shards": content_digest(shards)}
    if config.method == "edu":
        check_tree_modes(shards, sizes, samples, config.allow_ht_trees)
    settings = {k: config[k] for k in ("target", "method", "extra_rollouts_min_leaves", "extra_rollouts_k",
                                       "shepherd_k")}
    if omega:
        settings["omega"] = config.omega.to_dict()
    shaping = {"policy": str(resolve_policy(config.policy)), "tokenizer": config.tokenizer,
               "sampling": config.sampling.to_dict()}  # the rollouts and the decoded step texts depend on these
    # multi-host: process 0 checks the fingerprint and clears stale temps; shard i is labelled and written by
    # process i % P (its rollouts on that process's devices); process 0 writes the TFDS copy and the stats
    rewritten = False  # whether any shard is (re)written this run: the TFDS copy is then rebuilt (process 0)
    if distributed.is_lead():
        check_fingerprint(out, {**input_identity, "num_shards": num_shards, **settings, **shaping})
        ShardedJsonlWriter(out, UNDECIDED_PREFIX, num_shards).pending()  # removes temp files a crash left behind
        rewritten = bool(ShardedJsonlWriter(out, STEPS_PREFIX, num_shards).pending())
    distributed.barrier(f"label: {out} checked")
    writer = ShardedJsonlWriter(out, STEPS_PREFIX, num_shards)
    undecided_writer = ShardedJsonlWriter(out, UNDECIDED_PREFIX, num_shards)
    bounds = [round(i * total / num_shards) for i in range(num_shards + 1)]
    done = writer.completed()
    pending = distributed.owned(i for i in range(num_shards) if i not in done)
    if not omega:
        tokenizer = load_tokenizer(config.tokenizer or resolve_policy(config.policy)) if pending else None
    needs_rollouts = config.method != "edu" or config.extra_rollouts_min_leaves > 0
    rollout = None
    if pending and needs_rollouts:
        k = {"shepherd": config.shepherd_k, "omega": config.omega.k}.get(config.method, config.extra_rollouts_k)
        rollout = SamplerRollout(config, k)
    for shard in tqdm(pending, desc=f"label[{config.method}/{config.target}]", unit="shard"):
        distributed.check_peers("labelling")  # another process failed: stop here, not at the next barrier
        start, before = time.perf_counter(), dataclasses.replace(rollout.cost) if rollout else RolloutCost()
        if omega:
            records, summary = label_omega_records(items[bounds[shard]:bounds[shard + 1]], config, tokenizer,
                                                   rollout, f"{config.questions}[{bounds[shard]}:{bounds[shard + 1]}]")
        else:
            records, summary = label_records(list(records_in_range(shards, sizes, bounds[shard], bounds[shard + 1])),
                                             config, tokenizer, rollout)
        after = rollout.cost if rollout else RolloutCost()
        summary.update(rollout_tokens=after.tokens - before.tokens, rollout_queries=after.queries - before.queries,
                       wall_seconds=round(time.perf_counter() - start, 3))
        undecided_writer.write(shard, [summary])  # before the steps shard, whose presence marks the shard done
        writer.write(shard, [r.to_json() for r in records])
    if pending:  # this run's checks: decided without sympy, symbolically, attempts out of their CPU bound, undecided
        logging.info("label: answer checks of this run: %s", answers.verification_stats())
    distributed.barrier(f"label: {out} shards written")
    if not distributed.is_lead():
        distributed.barrier(f"label: {out} summarised")  # wait for process 0's TFDS copy and stats
        return
    if not rewritten:
        logging.info("label: all %d shards already complete in %s", num_shards, out)
    if config.tfds:
        logging.info("label: TFDS dataset at %s", write_tfds(out, rebuild=rewritten))
    undecided = None
    if len(undecided_writer.completed()) == num_shards:
        undecided = list(read_shards(out, UNDECIDED_PREFIX))
    else:
        logging.warning("label: %s was made before undecided answer checks were recorded; their counts are null",
                        out)
    stats = {"method": config.method, "target": config.target,
             **label_stats((r.to_json() for r in read_step_shards(out)), undecided),
             "cost": label_cost(NO_SAMPLING if omega else sampling_cost(samples), undecided)}
    write_json_atomic(out / "label_stats.json", stats)
    print(json.dumps(stats, indent=2))
    distributed.barrier(f"label: {out} summarised")
