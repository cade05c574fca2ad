"""`edu-prm sample`: questions -> HT/EDU trees, written as atomic JSONL shards (resumable)."""

from __future__ import annotations

import pathlib

import ml_collections
from absl import logging

from edu_prm_jax.commands.common.builders import build_sampler, sampling_fingerprint
from edu_prm_jax.io import storage
from edu_prm_jax.sampling.shards import sample_to_shards
from edu_prm_jax.toy.defaults import load_questions, resolve_policy

DESCRIPTION = "HT or EDU sampling of questions (JSONL or the toy world) into tree shards."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    questions = load_questions(config.questions, limit=config.limit)
    if not questions:
        raise ValueError(f"questions={config.questions!r}: no questions")
    sampler = build_sampler(config.policy, config.tokenizer, config.sampling, config.mesh, config.dtype,
                            config.batch_questions, config.prompt_bucket,
                            refill=config.refill)  # slot refill (configs/sample.py): the same trees, sooner
    out = storage.as_path(config.output) if config.output else workdir / f"samples_{config.sampling.mode}"
    sample_to_shards(sampler, questions, out, config.num_shards, desc=f"sample[{config.sampling.mode}]",
                     fingerprint=sampling_fingerprint(resolve_policy(config.policy), config.dtype, config.sampling),
                     too_long=config.too_long)
    logging.info("wrote %s", out)
