"""`edu-prm sample`: HT or EDU sampling of questions into tree shards.

Examples:
  edu-prm sample --workdir=runs/toy                                     # EDU on 64 toy test questions
  edu-prm sample --config.mode=ht --config.num_leaves=16 --workdir=runs/toy
  edu-prm sample --config.policy=/ckpt/Qwen2.5-Math-7B-Instruct --config.questions=../shared/data/math500/test.jsonl
"""

from __future__ import annotations

import ml_collections

from configs import common


def sampling_config(mode: str = "edu", num_leaves: int = 8) -> ml_collections.ConfigDict:
    """Sampler settings shared by sample, pipeline and eval-bon."""
    c = ml_collections.ConfigDict()
    c.mode = mode  # edu (entropy-anchored tree), ht (independent samples) or greedy.
    c.num_leaves = num_leaves  # M: leaf budget per question (EDU) or samples per question (HT).
    c.max_new_tokens = 96  # Generation length cap per path.
    c.temperature = 0.7  # HT sampling temperature (and EDU non-anchor tokens when edu_greedy=False).
    c.top_k = 0  # Top-k filter for sampling; 0 = off.
    c.top_p = 1.0  # Nucleus filter for sampling; 1.0 = off.
    c.edu_greedy = True  # EDU: non-anchor positions greedy (True) or sampled at `temperature`.
    c.tau = 1.0  # Entropy threshold in nats: H > tau (and a non-symbol top-1) makes an anchor.
    c.branch_k = 2  # Children per anchor: the top-K tokens.
    c.threshold_mode = "fixed"  # fixed: first come first forked; budget: highest entropy forks first.
    c.max_anchors = 16  # Most anchors (forks) along one path.
    c.stop_at_answer = True  # Stop a path once its \boxed{...} closes.
    c.stop_strings = ""  # Extra stop strings, separated by '|' (matched as token sequences).
    c.extra_symbols = ""  # Characters added to the anchor symbol set.
    c.disable_symbols = False  # Empty symbol set: any high-entropy token may anchor.
    c.seed = 0  # Sampling seed; randomness is keyed by (seed, question index, slot, step).
    return c


def get_config(mode: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.policy = "toy"  # Policy model: 'toy' (the shipped toy policy), an HF dir or an Orbax dir.
    config.tokenizer = ""  # Tokenizer dir; empty = the policy dir.
    config.questions = "toy:test:64"  # A JSONL file (MATH, GSM8K, {id, problem}) or toy:<split>:<n>[:<seed>].
    config.limit = 0  # Use only the first N questions; 0 = all.
    config.sampling = sampling_config(mode or "edu")  # Sampler settings.
    config.output = ""  # Output dir for the shards; empty = <workdir>/samples_<mode>.
    config.num_shards = 4  # Output shards (a rerun skips finished ones).
    config.batch_questions = 8  # Questions decoded together (padded to a multiple of the data axis).
    config.prompt_bucket = 32  # Prompt lengths are padded to a multiple of this (one compile per bucket).
    config.dtype = "float32"  # Compute dtype of the policy.
    config.mesh = common.mesh_config()  # Device mesh; questions are sharded over 'data'.
    return config
