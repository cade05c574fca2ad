"""`edu-prm convert`: HF safetensors <-> Orbax, streamed onto a mesh, tokenizer files carried along."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from absl import logging

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.io.destinations import check_destination
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.safetensors_io import CheckpointError

DESCRIPTION = "Convert model weights between Hugging Face safetensors and Orbax checkpoints."

DIRECTIONS = ("hf_to_orbax", "orbax_to_hf")


def _check(config: ml_collections.ConfigDict) -> tuple[pathlib.Path, pathlib.Path]:
    if config.direction not in DIRECTIONS:
        raise ValueError(f"config.direction={config.direction!r}: expected one of {list(DIRECTIONS)}")
    if not config.src:
        raise ValueError("config.src is not set (pass --config.src=DIR)")
    if not config.dst:
        raise ValueError("config.dst is not set (pass --config.dst=DIR)")
    src, dst = storage.as_path(config.src), storage.as_path(config.dst)
    if not src.is_dir():
        raise CheckpointError(f"config.src={str(src)!r}: no such directory")
    check_destination(dst, overwrite=config.overwrite, field="dst", sources=[src])  # before loading anything
    if config.direction == "hf_to_orbax" and not (src / "config.json").is_file():
        raise CheckpointError(f"config.src={str(src)!r}: not an HF model directory (no config.json)")
    if config.direction == "orbax_to_hf" and not checkpoints.is_orbax_dir(src):
        raise CheckpointError(f"config.src={str(src)!r}: not an Orbax checkpoint of this project "
                              f"(no {checkpoints.ORBAX_CONFIG})")
    return src, dst


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    del workdir  # the converted model goes to config.dst; the workdir only holds the provenance config
    src, dst = _check(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.rules_from_config(config.mesh.rules)
    logging.info("convert %s: %s -> %s on mesh %s", config.direction, src, dst, dict(mesh.shape))
    carried = checkpoints.tokenizer_files(src) if config.copy_tokenizer else []
    if config.direction == "hf_to_orbax":
        if config.dtype:
            logging.warning("config.dtype=%s is the safetensors export dtype; Orbax keeps config.param_dtype",
                            config.dtype)
        model = checkpoints.load_hf_model(src, param_dtype=config.param_dtype, mesh=mesh, rules=rules)
        checkpoints.save_orbax(model, dst, overwrite=config.overwrite, copy_files=carried, field="dst",
                               sources=[src])
    else:
        if jax.process_count() > 1:
            raise NotImplementedError("orbax_to_hf writes safetensors from one process; run it single-host")
        model = checkpoints.load_orbax_model(src, param_dtype=config.param_dtype, mesh=mesh, rules=rules)
        checkpoints.save_hf_model(model, dst, dtype=config.dtype, shard_bytes=int(config.shard_bytes),
                                  overwrite=config.overwrite, copy_files=carried, field="dst", sources=[src])
    logging.info("convert: wrote %s (tokenizer files copied: %s)", dst, [p.name for p in carried] or "none")
