"""`edu-prm export`: a PRM from a training workdir's Orbax checkpoint to Hugging Face format.

Example: edu-prm export --workdir=runs/toy --config.which=best --config.output=out/prm
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.which = "latest"  # latest or best (by held-out step AUROC) checkpoint.
    config.output = ""  # Output HF dir; empty = <workdir>/prm/hf_<which>.
    config.dtype = "float32"  # Safetensors dtype (float32 or bfloat16).
    config.mesh = common.mesh_config()  # Mesh the parameters are restored onto (this host's devices by default).
    config.overwrite = False  # Replace output when it holds an earlier export of this tool (anything else: refused).
    return config
