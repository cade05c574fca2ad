"""`edu-prm build-toy`: train the embedded toy policy from a seed (the shipped asset is seed 0, 1600 steps)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections
from absl import logging

from edu_prm_jax.io import storage
from edu_prm_jax.toy.policy import ToyPolicyConfig, build_toy_policy

DESCRIPTION = "Re-create the embedded toy policy and tokenizer from a seed (bit for bit on CPU)."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    out = storage.as_path(config.output) if config.output else workdir / "toy_policy"
    cfg = dataclasses.replace(ToyPolicyConfig(), misread_rate=float(config.misread_rate))
    report = build_toy_policy(out, config.seed, config.steps, cfg=cfg, workdir=workdir / "toy_policy_work",
                              overwrite=config.overwrite)
    shown = {k: v for k, v in report.items() if k not in ("toy_config", "policy_config")}
    logging.info("toy policy written to %s\n%s", out, json.dumps(shown, indent=2))
