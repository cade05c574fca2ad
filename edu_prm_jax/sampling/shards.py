"""Sampled trees to resumable `trees-*` JSONL shards (the file `label` and `eval-bon` read)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

from absl import logging
from tqdm import tqdm

from edu_prm_jax import distributed
from edu_prm_jax.io.shards import ShardedJsonlWriter, check_fingerprint, completed_shards, read_shards, shard_paths
from edu_prm_jax.records.trees import TREES_PREFIX, LeafRecord, TreeRecord
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.sampling.engine import Sampler, Tree

COST_PREFIX = "cost"  # per-shard sampling cost next to the tree shards (`sampling_cost`)


def tree_record(question: dict, index: int, prompt: str, prompt_ids: list[int], params: DecodeParams,
                tree: Tree) -> TreeRecord:
    """The shard line of one sampled question (validated here, so a writer bug fails before it is written)."""
    return TreeRecord(id=str(question["id"]), index=index, problem=question["problem"],
                      answer=question.get("answer"), prompt=prompt, prompt_ids=prompt_ids, mode=params.mode,
                      params=dataclasses.asdict(params),
                      leaves=[LeafRecord.model_validate(leaf.to_json()) for leaf in tree.leaves],
                      distinct_tokens=tree.cost, pruned_tokens=tree.pruned_tokens)


def questions_digest(questions: list[dict]) -> str:
    """SHA-256 of every question's id, text and gold answer: a rerun trusts finished shards only when the
    questions they were sampled from are the same in content, not just in ids."""
    content = json.dumps([[str(q["id"]), q["problem"], q.get("answer")] for q in questions], ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()


TOO_LONG = ("error", "skip")


def fit_to_context(questions: list[dict], prompt_lengths: list[int], context: int, max_new_tokens: int,
                   too_long: str = "error") -> list[int]:
    """The positions of the questions whose chat prompt (`prompt_lengths`, tokens) plus `max_new_tokens` fits
    the policy's `context` (its max_position_embeddings): positions beyond it were never trained, so what the
    policy writes there is noise. `too_long="error"` raises ValueError naming the first question that does not
    fit and both lengths; "skip" drops such questions with one counted warning. Checked before anything is
    sampled."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}: expected one of {TOO_LONG}")
    kept, dropped = [], []
    for position, (q, n) in enumerate(zip(questions, prompt_lengths)):
        if n + max_new_tokens <= context:
            kept.append(position)
            continue
        if too_long == "error":
            raise ValueError(f"question {q['id']!r}: its prompt is {n} tokens, which with max_new_tokens="
                             f"{max_new_tokens} exceeds the policy's context of {context} tokens; shorten it, lower "
                             "max_new_tokens, or pass --config.too_long=skip")
        dropped.append(str(q["id"]))
    if dropped:
        logging.warning("skipped %d of %d questions longer than the policy's context (%d tokens with "
                        "max_new_tokens=%d): %s%s", len(dropped), len(questions), context, max_new_tokens,
                        ", ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")
    return kept


def shard_cost(records: list[TreeRecord], wall_seconds: float) -> dict[str, Any]:
    """One line of a `cost-*` shard: what sampling these trees cost the policy. `tokens`: generated tokens,
    each counted once (a tree's `distinct_tokens`, P-EDU's pruned tokens included); `queries`: sampled sequences
    (leaves, and paths P-EDU pruned are not counted: they left no leaf); `wall_seconds`: time of the shard's
    sampling on the process that wrote it (varies run to run; everything else is deterministic)."""
    return {"trees": len(records), "tokens": sum(r.distinct_tokens for r in records),
            "queries": sum(len(r.leaves) for r in records), "wall_seconds": round(wall_seconds, 3)}


def sampling_cost(samples_dir: Any) -> dict[str, Any] | None:
    """Totals of a sample output's `cost-*` shards ({trees, tokens, queries, wall_seconds}); None when the output
    has none for every tree shard (made before sampling cost was recorded)."""
    trees = shard_paths(samples_dir, TREES_PREFIX)
    if completed_shards(samples_dir, COST_PREFIX, len(trees)) != set(range(len(trees))):
        return None
    lines = list(read_shards(samples_dir, COST_PREFIX))
    total = {k: sum(line[k] for line in lines) for k in ("trees", "tokens", "queries")}
    return {**total, "wall_seconds": round(sum(line["wall_seconds"] for line in lines), 3)}


def sample_to_shards(sampler: Sampler, questions: list[dict], out_dir: pathlib.Path, num_shards: int,
                     desc: str = "sample", fingerprint: dict[str, Any] | None = None,
                     too_long: str = "error") -> pathlib.Path:
    """Sample every question and write `trees-*` shards; finished shards from an earlier run are kept (only
    when `fingerprint` — the settings that make the shards — matches the one recorded in out_dir). Questions
    that do not fit the policy's context are refused or skipped first (`fit_to_context`).

    In a multi-host job (`distributed`) every process calls it with the same arguments: process 0 checks the
    fingerprint, each process samples and writes the pending shards it owns (shard i: process i % P) on its own
    devices, and all return once every shard is written. A tree depends on its question's position alone (the
    sampling key), and each shard is decoded in the same batches whichever process owns it, so the shards equal a
    single-process run's."""
    tok = sampler.tokenizer
    prompts = [tok.apply_chat_template(q["problem"]) for q in questions]  # encoded once: checked, then sampled
    prompt_ids = [tok.encode(p) for p in prompts]
    positions = fit_to_context(questions, [len(ids) for ids in prompt_ids], sampler.model.cfg.max_position_embeddings,
                               sampler.params.max_new_tokens, too_long)
    if not positions:
        raise ValueError("no question fits the policy's context")
    # a skipped question leaves a gap: every other question keeps its position in the input, which is both its
    # record `index` and its sampling key, so skipping one never changes another's tree
    num_shards = max(1, min(num_shards, len(positions)))
    if num_shards < distributed.process_count():
        logging.warning("%s: %d shards for %d processes: only processes 0-%d have questions to sample (shard i "
                        "belongs to process i %% %d)", desc, num_shards, distributed.process_count(), num_shards - 1,
                        distributed.process_count())
    if distributed.is_lead():  # multi-host: process 0 checks the fingerprint and clears stale temps, alone
        check_fingerprint(out_dir, {"params": dataclasses.asdict(sampler.params), "num_shards": num_shards,
                                    "questions": questions_digest([questions[i] for i in positions]),
                                    **(fingerprint or {})})
        ShardedJsonlWriter(out_dir, TREES_PREFIX, num_shards).pending()
        ShardedJsonlWriter(out_dir, COST_PREFIX, num_shards).pending()  # removes temp files a crash left behind
    distributed.barrier(f"{desc}: {out_dir} checked")
    writer = ShardedJsonlWriter(out_dir, TREES_PREFIX, num_shards)
    cost_writer = ShardedJsonlWriter(out_dir, COST_PREFIX, num_shards)
    bounds = [round(i * len(positions) / num_shards) for i in range(num_shards + 1)]
    done = writer.completed()
    pending = distributed.owned(i for i in range(num_shards) if i not in done)  # shard i: process i % P
    todo = sum(bounds[i + 1] - bounds[i] for i in pending)
    if not pending:
        logging.info("%s: all %d shards already complete in %s", desc, num_shards, out_dir)
        distributed.barrier(f"{desc}: {out_dir} written")
        return out_dir
    start, n_tokens = time.time(), 0
    with tqdm(total=todo, desc=desc, unit="q") as bar:
        for shard in pending:
            lo, hi = bounds[shard], bounds[shard + 1]
            chunk = positions[lo:hi]  # positions in the input, of the questions that fit
            records, shard_start = [], time.perf_counter()
            for position, tree in zip(chunk, sampler.sample_trees([prompt_ids[i] for i in chunk], chunk)):
                records.append(tree_record(questions[position], position, prompts[position], prompt_ids[position],
                                           sampler.params, tree))
                n_tokens += records[-1].distinct_tokens
                bar.update(1)
                bar.set_postfix(tok_per_s=f"{n_tokens / max(time.time() - start, 1e-9):.0f}")
            cost_writer.write(shard, [shard_cost(records, time.perf_counter() - shard_start)])  # before the trees
            writer.write(shard, [r.to_json() for r in records])
    distributed.barrier(f"{desc}: {out_dir} written")  # every shard exists when any process returns
    return out_dir


