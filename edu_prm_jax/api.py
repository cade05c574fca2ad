"""Library entry points for people who use edu_prm_jax from Python rather than the `edu-prm` CLI."""

from __future__ import annotations

import os

from jax.sharding import Mesh
from jax.typing import DTypeLike

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import dtype_name
from edu_prm_jax.models.safetensors_io import CheckpointError
from edu_prm_jax.tokenization import load_tokenizer

__all__ = ["load_model", "load_tokenizer"]


def load_model(path: str | os.PathLike, dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
               mesh: Mesh | None = None, rules: parallel.RulesLike = None, scan_layers: bool | None = None):
    """The Qwen2 model stored at `path`: an HF directory (config.json + safetensors) or an Orbax checkpoint
    written by this project. `dtype` is the compute dtype, `param_dtype` the in-memory parameter dtype; both
    default to float32 and take any spelling (`jnp.bfloat16`, `np.float32`, `jnp.dtype("bfloat16")`,
    "bfloat16", "bf16", ...; see `models.config.dtype_name`). `mesh` places the weights (default: the first
    device) by their logical axes under `rules` (default: `parallel.ShardingRules.default()`). `scan_layers`
    picks the decoder layers' layout: True stacks them under one `lax.scan` (one layer compiled, the TPU/GPU
    default), False keeps a Python loop (the CPU default), None the platform's default; either layout loads any
    checkpoint and computes the same function.

    Raises CheckpointError for a missing path or unreadable checkpoint and ConfigError (naming the value) for an
    unknown dtype, before any weight is read."""
    dtype = None if dtype is None else dtype_name(dtype, "dtype")
    param_dtype = None if param_dtype is None else dtype_name(param_dtype, "param_dtype")
    path = storage.as_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a model directory")
    if checkpoints.is_orbax_dir(path):
        return checkpoints.load_orbax_model(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules,
                                            scan_layers=scan_layers)
    if (path / "config.json").is_file():
        return checkpoints.load_hf_model(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules,
                                         scan_layers=scan_layers)
    raise CheckpointError(f"{path}: neither an HF model directory (config.json + *.safetensors) nor an Orbax "
                          f"checkpoint ({checkpoints.ORBAX_CONFIG} + params/)")
