"""`edu-prm eval-processbench`: ProcessBench F1 of a PRM on the four subsets.

Example: edu-prm eval-processbench --config.prm=runs/toy/prm/hf --config.data=/data/processbench
The data dir holds ProcessBench's gsm8k.json, math.json, olympiadbench.json and omnimath.json (the Hugging Face
dataset Qwen/ProcessBench, one JSON list per subset); it has no default.
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.prm = ""  # PRM in HF format; empty = <workdir>/prm/hf.
    config.tokenizer = ""  # Tokenizer dir; empty = the PRM dir (training copies the policy's tokenizer there).
    config.data = ""  # Dir with the subsets' <name>.json files (required; the pipeline skips the stage when empty).
    config.subsets = "gsm8k,math,olympiadbench,omnimath"  # Comma-separated subsets to evaluate.
    config.limit = 0  # Items per subset (first N, both classes in proportion; 0 = all). Partial runs say so.
    config.theta = 0.5  # Fixed threshold: the first step scoring below it is the predicted error.
    config.theta_split = "gsm8k"  # Subset on which the 'chosen' threshold is tuned.
    config.step_joiner = "\n\n"  # Appended to every step but the last (how steps are joined in the text).
    config.max_tokens = 4096  # Longest scored sequence; later steps of a longer item are left unscored.
    config.batch_size = 8  # Items per PRM forward.
    config.dtype = "float32"  # Compute dtype of the PRM.
    config.mesh = common.mesh_config()  # Device mesh.
    return config
