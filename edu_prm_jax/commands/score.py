"""`edu-prm score`: step scores for JSONL solutions (each step tokenised on its own, so step ends are exact)."""

from __future__ import annotations

import pathlib

import ml_collections
from absl import logging

from edu_prm_jax import distributed, parallel
from edu_prm_jax.api import load_tokenizer
from edu_prm_jax.commands.common.paths import find_tokenizer_dir, prm_dir
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_jsonl_atomic
from edu_prm_jax.io.jsonl import DataError, ListOf, read_jsonl
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.scoring.examples import encode_solution, joined_steps
from edu_prm_jax.scoring.multihost import score_examples_across_processes

DESCRIPTION = "Step scores for solutions given as JSONL (problem or prompt + a list of steps) with a PRM."


def _validate(record: dict) -> None:
    if "problem" not in record and "prompt" not in record:
        raise DataError("needs 'problem' (chat template applied) or 'prompt' (verbatim)", field="problem")
    steps = record.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise DataError(f"expected a non-empty list of strings, got {ListOf(str)!r} violated", field="steps")


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    if not config.input:
        raise ValueError("config.input is not set (pass --config.input=FILE.jsonl)")
    records = list(read_jsonl(config.input, _validate))  # all lines validated before any scoring
    prm_path = prm_dir(workdir, config.prm)
    prm = load_prm(prm_path, parallel.local_mesh(1), dtype=config.dtype)  # one of this host's devices
    tokenizer = load_tokenizer(find_tokenizer_dir(prm_path, config.tokenizer))
    prompts = [r["prompt"] if "prompt" in r else tokenizer.apply_chat_template(r["problem"]) for r in records]
    examples = [encode_solution(tokenizer, prompt, joined_steps(r["steps"], config.step_joiner),
                                head=prm.head_spec.name, separator_id=prm.separator_id, record_id=r.get("id"))
                for prompt, r in zip(prompts, records)]
    # multi-host: the batches are split over the processes and gathered; process 0 writes the file
    scores = score_examples_across_processes(prm, examples, batch_size=config.batch_size, name="score")
    out = storage.as_path(config.output) if config.output else workdir / "scores.jsonl"
    if distributed.is_lead():
        write_jsonl_atomic(out, [{**r, "step_scores": s} for r, s in zip(records, scores)])
        logging.info("scored %d solutions -> %s", len(records), out)
    distributed.barrier("score: written")
