"""`edu-prm sample`: questions -> HT/EDU trees, written as atomic JSONL shards (resumable)."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import ml_collections
from absl import logging
from tqdm import tqdm

from edu_prm_jax import parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.data.questions import load_questions, resolve_policy
from edu_prm_jax.data.records import ShardedJsonlWriter, check_fingerprint
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.sampling.engine import Sampler, Tree

DESCRIPTION = "HT or EDU sampling of questions (JSONL or the toy world) into tree shards."


def decode_params(s: ml_collections.ConfigDict, **override: Any) -> DecodeParams:
    fields = {f.name for f in dataclasses.fields(DecodeParams)}
    values = {k: v for k, v in s.to_dict().items() if k in fields}
    values["num_slots"] = 1 if s.mode == "greedy" else s.num_leaves
    values.update(override)
    return DecodeParams(**values)


def build_sampler(policy: str, tokenizer_dir: str, s: ml_collections.ConfigDict, mesh_cfg: Any, dtype: str,
                  batch_questions: int = 8, prompt_bucket: int = 32, **override: Any) -> Sampler:
    policy_dir = resolve_policy(policy)
    mesh = parallel.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    model = load_model(policy_dir, dtype=dtype, mesh=mesh)
    tokenizer = load_tokenizer(tokenizer_dir or policy_dir)
    stops = [x for x in s.stop_strings.split("|") if x]
    return Sampler(model, tokenizer, decode_params(s, **override), mesh=mesh, batch_questions=batch_questions,
                   prompt_bucket=prompt_bucket, stop_strings=stops, extra_symbols=s.extra_symbols,
                   disable_symbols=s.disable_symbols)


def tree_record(question: dict, index: int, prompt: str, prompt_ids: list[int], params: DecodeParams,
                tree: Tree) -> dict[str, Any]:
    return {"id": str(question["id"]), "index": index, "problem": question["problem"],
            "answer": question.get("answer"), "prompt": prompt, "prompt_ids": prompt_ids, "mode": params.mode,
            "params": dataclasses.asdict(params), "leaves": [leaf.to_json() for leaf in tree.leaves],
            "distinct_tokens": tree.cost, "pruned_tokens": tree.pruned_tokens}


def sample_to_shards(sampler: Sampler, questions: list[dict], out_dir: pathlib.Path, num_shards: int,
                     desc: str = "sample", fingerprint: dict[str, Any] | None = None) -> pathlib.Path:
    """Sample every question and write `trees-*` shards; finished shards from an earlier run are kept (only
    when `fingerprint` — the settings that make the shards — matches the one recorded in out_dir)."""
    num_shards = max(1, min(num_shards, len(questions)))
    check_fingerprint(out_dir, {"params": dataclasses.asdict(sampler.params), "num_shards": num_shards,
                                "questions": [q["id"] for q in questions], **(fingerprint or {})})
    writer = ShardedJsonlWriter(out_dir, "trees", num_shards)
    bounds = [round(i * len(questions) / num_shards) for i in range(num_shards + 1)]
    pending = writer.pending()
    todo = sum(bounds[i + 1] - bounds[i] for i in pending)
    if not pending:
        logging.info("%s: all %d shards already complete in %s", desc, num_shards, out_dir)
        return out_dir
    tok = sampler.tokenizer
    start, n_tokens = time.time(), 0
    with tqdm(total=todo, desc=desc, unit="q") as bar:
        for shard in pending:
            lo, hi = bounds[shard], bounds[shard + 1]
            chunk = questions[lo:hi]
            prompts = [tok.apply_chat_template(q["problem"]) for q in chunk]
            prompt_ids = [tok.encode(p) for p in prompts]
            records = []
            for i, tree in enumerate(sampler.sample_trees(prompt_ids, list(range(lo, hi)))):
                records.append(tree_record(chunk[i], lo + i, prompts[i], prompt_ids[i], sampler.params, tree))
                n_tokens += records[-1]["distinct_tokens"]
                bar.update(1)
                bar.set_postfix(tok_per_s=f"{n_tokens / max(time.time() - start, 1e-9):.0f}")
            writer.write(shard, records)
    return out_dir


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    questions = load_questions(config.questions, limit=config.limit)
    if not questions:
        raise ValueError(f"questions={config.questions!r}: no questions")
    sampler = build_sampler(config.policy, config.tokenizer, config.sampling, config.mesh, config.dtype,
                            config.batch_questions, config.prompt_bucket)
    out = pathlib.Path(config.output) if config.output else workdir / f"samples_{config.sampling.mode}"
    sample_to_shards(sampler, questions, out, config.num_shards, desc=f"sample[{config.sampling.mode}]",
                     fingerprint={"policy": str(resolve_policy(config.policy).resolve()), "dtype": config.dtype,
                                  "stop_strings": config.sampling.stop_strings,
                                  "symbols": [config.sampling.extra_symbols, config.sampling.disable_symbols]})
    logging.info("wrote %s", out)
