"""`edu-prm convert`: model weights between Hugging Face safetensors and Orbax.

Example: edu-prm convert --config.src=Qwen2.5-Math-1.5B --config.dst=ckpt/policy
         edu-prm convert --config=configs/convert.py:orbax_to_hf --config.src=ckpt/prm --config.dst=out/prm
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from edu_prm_jax.configs import common


def get_config(direction: str | None = None) -> ml_collections.ConfigDict:
    """`configs/convert.py:orbax_to_hf` picks the direction as a config argument."""
    config = ml_collections.ConfigDict()
    config.direction = direction or "hf_to_orbax"  # hf_to_orbax or orbax_to_hf.
    config.src = config_dict.placeholder(str)  # Source directory (HF model dir or Orbax checkpoint dir).
    config.dst = config_dict.placeholder(str)  # Destination dir: new or empty (or an earlier output, with overwrite).
    config.overwrite = False  # Replace dst when it holds an earlier output of this tool (anything else is refused).
    config.dtype = config_dict.placeholder(str)  # Safetensors dtype on export; unset = source's dtype.
    config.param_dtype = config_dict.placeholder(str)  # Dtype params load (and Orbax-save) in; unset=f32.
    config.mesh = common.mesh_config()  # Mesh the weights are loaded onto while converting.
    config.shard_bytes = 4 * 1024**3  # Largest safetensors shard on export, in bytes.
    config.copy_tokenizer = True  # Copy tokenizer/generation files from src to dst when present.
    return config
