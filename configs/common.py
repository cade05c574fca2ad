"""Shared config pieces for the per-command configs in this directory (not a command config itself).

Each builder returns a fresh ConfigDict whose every field carries a `# comment` on its line; `edu-prm <cmd>
--help` reads those comments, so keep one per field when adding more.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh axes; their product must equal the number of devices (-1 takes what is left)."""
    mesh = ml_collections.ConfigDict()
    mesh.data = data  # Data-parallel axis size; -1 = all devices not used by fsdp and tensor.
    mesh.fsdp = fsdp  # Fully-sharded (parameter-sharding) axis size.
    mesh.tensor = tensor  # Tensor-parallel axis size (splits heads and MLP columns).
    return mesh


def model_config(path: str | None = None, param_dtype: str = "float32",
                 dtype: str = "float32") -> ml_collections.ConfigDict:
    """Which checkpoint to load and in which dtypes."""
    model = ml_collections.ConfigDict()
    model.path = path if path is not None else config_dict.placeholder(str)  # HF dir or Orbax checkpoint dir.
    model.param_dtype = param_dtype  # Parameter dtype in memory: float32, bfloat16 or float16.
    model.dtype = dtype  # Compute dtype of matmuls (norms, softmax and logits stay float32).
    return model
