"""Library entry points for people who use edu_prm_jax from Python rather than the `edu-prm` CLI."""

from __future__ import annotations

import os
import pathlib

from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.safetensors_io import CheckpointError
from edu_prm_jax.tokenization import load_tokenizer

__all__ = ["load_model", "load_tokenizer"]


def load_model(path: str | os.PathLike, dtype: str | None = None, param_dtype: str | None = None,
               mesh: Mesh | None = None, rules: parallel.RulesLike = None):
    """The Qwen2 model stored at `path`: an HF directory (config.json + safetensors) or an Orbax checkpoint
    written by this project. `dtype` is the compute dtype, `param_dtype` the in-memory parameter dtype; both
    default to the checkpoint's own (float32). `mesh` places the weights (default: the first device) by their
    logical axes under `rules` (default: `parallel.ShardingRules.default()`)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a model directory")
    if checkpoints.is_orbax_dir(path):
        return checkpoints.load_orbax_model(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules)
    if (path / "config.json").is_file():
        return checkpoints.load_hf_model(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules)
    raise CheckpointError(f"{path}: neither an HF model directory (config.json + *.safetensors) nor an Orbax "
                          f"checkpoint ({checkpoints.ORBAX_CONFIG} + params/)")
