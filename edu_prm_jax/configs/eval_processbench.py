"""`edu-prm eval-processbench`: ProcessBench F1 of a PRM on the four subsets.

Example: edu-prm eval-processbench --config.prm=runs/toy/prm/hf --config.data=/data/processbench
The data dir holds ProcessBench's gsm8k.json, math.json, olympiadbench.json and omnimath.json (the Hugging Face
dataset Qwen/ProcessBench, one JSON list per subset); it has no default.
--config.data=toy (or toy:N[:SEED], N items per subset, default 64, seed 0) evaluates on the toy benchmark instead:
held-out toy problems with exact step labels, subsets `policy` (the policy's own samples) and `corrupted` (reference
solutions and single-line slips), built and cached under <workdir>/toy_processbench/ (see edu_prm_jax/toy/
processbench.py); `subsets`, `theta_split` and `step_joiner` then give way to the `toy.*` fields.
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.prm = ""  # PRM in HF format; empty = <workdir>/prm/hf.
    config.tokenizer = ""  # Tokenizer dir; empty = the PRM dir (training copies the policy's tokenizer there).
    config.data = ""  # Dir of <subset>.json files, or toy[:N[:SEED]] (required; the pipeline skips the stage if empty).
    config.subsets = "gsm8k,math,olympiadbench,omnimath"  # Comma-separated subsets to evaluate.
    config.limit = 0  # Items per subset (first N, both classes in proportion; 0 = all). Partial runs say so.
    config.theta = 0.5  # Fixed threshold: the first step scoring below it is the predicted error.
    config.theta_split = "gsm8k"  # Subset on which the 'chosen' threshold is tuned.
    config.step_joiner = "\n\n"  # Appended to every step but the last (how steps are joined in the text).
    config.max_tokens = 4096  # Longest scored sequence; later steps of a longer item are left unscored.
    config.batch_size = 8  # Items per PRM forward.
    config.dtype = "float32"  # Compute dtype of the PRM.
    config.mesh = common.mesh_config()  # Device mesh.
    config.toy = ml_collections.ConfigDict()  # The toy benchmark (data=toy...): how it is built and evaluated.
    config.toy.policy = "toy"  # Policy whose samples fill the `policy` subset ('toy' = the shipped one).
    config.toy.temperatures = "0,0.7,1.0,1.3"  # Its decoding settings, comma-separated (0 = greedy).
    config.toy.num_leaves = 2  # HT samples per problem at each temperature > 0.
    config.toy.max_new_tokens = 96  # Sampling budget per solution.
    config.toy.theta_split = "corrupted"  # Subset on which the 'chosen' threshold is tuned (ProcessBench: gsm8k).
    config.toy.step_joiner = "\n"  # Joins the steps (lines) as the policy writes them.
    return config
