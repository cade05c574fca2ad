"""`edu-prm eval-bon`: Best-of-N with a PRM, HT vs EDU (vs P-EDU), over a grid of N and several seeds.

Example: edu-prm eval-bon --config.prm=runs/toy/prm/hf --config.questions=toy:test:128 --workdir=runs/toy
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.policy = "toy"  # Policy: 'toy' (shipped), an HF dir or an Orbax dir.
    config.tokenizer = ""  # Tokenizer dir; empty = the policy dir.
    config.prm = ""  # PRM in HF format; empty = <workdir>/prm/hf (what `edu-prm train` exports).
    config.questions = "toy:test:64"  # Evaluation questions: a JSONL file or toy:<split>:<n>[:<seed>].
    config.limit = 0  # Use only the first N questions; 0 = all.
    config.n_grid = "1,2,4,8,16,32,64"  # Comma-separated N values (EDU leaf budget M = N).
    config.seeds = "0,1,2"  # Comma-separated sampling seeds; results report mean and std over them.
    config.sampling = common.sampling_config(fields=common.EVAL_BON_SAMPLING)  # Sampler (mode, N, seed: per run).
    config.sampling.temperature = 0.7  # EDU non-anchor tokens when edu_greedy=False (HT uses ht_temperature).
    config.ht_temperature = 0.7  # Temperature of the HT baseline.
    config.p_edu = True  # Also run P-EDU (needs a scalar-head PRM): prune paths whose newest step scores low.
    config.prune_below = 0.2  # P-EDU pruning threshold on the step score.
    config.mcts = False  # Also MCTS-EDU with the PRM at HT's token cost per N (its own line in the report).
    config.mcts_c = 1.0  # MCTS-EDU exploration constant c of UCT = Q + c * sqrt(ln N_parent / N_child).
    config.aggregator = "min"  # Aggregator highlighted in plots (all of min/last/product/mean are reported).
    config.batch_questions = 16  # Questions decoded together.
    config.prompt_bucket = 32  # Prompt lengths padded to a multiple of this.
    config.num_shards = 1  # Shards per sampling run (runs are cached in <workdir>/eval_bon/runs for resume).
    config.dtype = "float32"  # Compute dtype of policy and PRM.
    config.mesh = common.mesh_config()  # Device mesh; questions are sharded over 'data'.
    return config
