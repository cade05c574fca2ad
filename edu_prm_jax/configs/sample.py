"""`edu-prm sample`: HT or EDU sampling of questions into tree shards.

Examples:
  edu-prm sample --workdir=runs/toy                                     # EDU on 64 toy test questions
  edu-prm sample --config=configs/sample.py:ht --config.sampling.num_leaves=16 --workdir=runs/toy
  edu-prm sample --config.policy=/ckpt/Qwen2.5-Math-7B-Instruct --config.questions=/data/math500/test.jsonl
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config(mode: str | None = None) -> ml_collections.ConfigDict:
    """`configs/sample.py:ht` starts from another sampling mode (edu, ht or greedy)."""
    config = ml_collections.ConfigDict()
    config.policy = "toy"  # Policy model: 'toy' (the shipped toy policy), an HF dir or an Orbax dir.
    config.tokenizer = ""  # Tokenizer dir; empty = the policy dir.
    config.questions = "toy:test:64"  # A JSONL file (MATH, GSM8K, {id, problem}) or toy:<split>:<n>[:<seed>].
    config.limit = 0  # Use only the first N questions; 0 = all.
    config.sampling = common.sampling_config(mode or "edu")  # Sampler settings.
    config.output = ""  # Output dir for the shards; empty = <workdir>/samples_<mode>.
    config.num_shards = 4  # Output shards (a rerun skips finished ones).
    config.too_long = "error"  # Prompt + max_new_tokens beyond the policy's context: error (naming it) or skip.
    config.batch_questions = 8  # Questions decoded together (padded to a multiple of the data axis).
    config.prompt_bucket = 32  # Prompt lengths are padded to a multiple of this (one compile per bucket).
    config.refill = True  # A finished question's slots go to the next one at once (same trees; 1-device meshes).
    config.dtype = "float32"  # Compute dtype of the policy.
    config.mesh = common.mesh_config()  # Device mesh; questions are sharded over 'data'.
    return config
