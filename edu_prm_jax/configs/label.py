"""`edu-prm label`: Monte Carlo step labels for sampled trees (EDU) or Math-Shepherd line steps.

Examples:
  edu-prm label --workdir=runs/toy                                      # EDU tree labels of samples_edu
  edu-prm label --config.target=hard --workdir=runs/toy                 # Math-Shepherd hard targets 1[v > 0]
  edu-prm label --config.method=shepherd --config.shepherd_k=8 --workdir=runs/toy
  edu-prm label --config.extra_rollouts_min_leaves=4 --config.extra_rollouts_k=4 --workdir=runs/toy
  edu-prm label --config.method=omega --config.questions=toy:train:256 --config.target=soft --workdir=runs/omega
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.samples = ""  # Dir of `sample` shards (trees-*.jsonl); empty = <workdir>/samples_edu.
    config.output = ""  # Output dir for steps-*.jsonl, tfds/ and label_stats.json; empty = <workdir>/labels.
    config.target = "edu"  # Label target: edu (MC value v), hard (Math-Shepherd 1[v > 0]) or soft (v).
    config.method = "edu"  # edu: anchor spans, v from tree leaves; shepherd: line steps + k completions; omega: MCTS.
    config.allow_ht_trees = False  # method=edu on HT/greedy samples (no anchors: one outcome step each); else refused.
    config.extra_rollouts_min_leaves = 0  # m: extra HT rollouts for internal nodes with < m leaves; 0 = off.
    config.extra_rollouts_k = 4  # HT continuations per node that gets extra rollouts.
    config.shepherd_k = 8  # method=shepherd: HT completions per step prefix.
    config.questions = ""  # method=omega: questions to search (JSONL or toy:<split>:<n>); no samples are read.
    config.limit = 0  # method=omega: only the first N questions; 0 = all.
    config.omega = ml_collections.ConfigDict()  # method=omega: OmegaPRM search (OpenR's defaults).
    config.omega.k = 16  # Rollouts per MC estimation of a state.
    config.omega.alpha = 0.5  # Q(s, r) = alpha^(1 - MC(s)) * beta^(len(r) / L): weight of MC, in (0, 1].
    config.omega.beta = 0.9  # Q's length penalty, in (0, 1].
    config.omega.length_scale = 500.0  # L, in length_unit.
    config.omega.length_unit = "words"  # len(r): words (OpenR) or tokens.
    config.omega.c_puct = 0.125  # Exploration: U(s) = c_puct * sqrt(sum N) / (1 + N(s)).
    config.omega.max_search_count = 20  # Binary searches (selections) per question.
    config.omega.rollout_budget = 200  # Rollouts per question (checked before each selection).
    config.policy = "toy"  # Policy for rollouts (and its tokenizer): 'toy', an HF dir or an Orbax dir.
    config.tokenizer = ""  # Tokenizer dir; empty = the policy dir.
    config.sampling = common.sampling_config(fields=common.ROLLOUT_SAMPLING)  # HT rollouts (k set per use).
    config.sampling.temperature = 0.7  # Temperature of the HT rollouts.
    config.batch_questions = 8  # Rollout prompts decoded together.
    config.prompt_bucket = 32  # Rollout prompt lengths are padded to a multiple of this.
    config.dtype = "float32"  # Compute dtype of the policy.
    config.mesh = common.mesh_config()  # Device mesh for rollouts; prompts are sharded over 'data'.
    config.num_shards = 0  # Output shards; 0 = as many as the input (a rerun skips finished ones).
    config.tfds = True  # Also write the TFDS array_record dataset <output>/tfds/labels for training.
    return config
