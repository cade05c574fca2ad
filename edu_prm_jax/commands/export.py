"""`edu-prm export`: restore a PRM training checkpoint and write it in Hugging Face format.

The PRM is rebuilt from the `train_config.json` the training run left in the workdir, then its latest or best
Orbax checkpoint is restored into it (onto this process's mesh) and written with `save_prm`.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import logging

from edu_prm_jax import parallel
from edu_prm_jax.io.destinations import check_destination
from edu_prm_jax.models.checkpoints import tokenizer_files
from edu_prm_jax.models.prm import save_prm

DESCRIPTION = "Export a trained PRM (latest or best checkpoint) to Hugging Face format."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    from edu_prm_jax.commands.common.builders import build_prm, make_trainer
    from edu_prm_jax.commands.common.paths import tokenizer_source

    saved = workdir / "train_config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: not found; export reads the config of an `edu-prm train` run")
    train_cfg = ml_collections.ConfigDict(json.loads(saved.read_text()))
    out = pathlib.Path(config.output) if config.output else workdir / "prm" / f"hf_{config.which}"
    check_destination(out, overwrite=config.overwrite, field="output")  # before any model is built
    mesh = parallel.make_mesh(train_cfg.mesh.data, train_cfg.mesh.fsdp, train_cfg.mesh.tensor)
    trainer = make_trainer(train_cfg, workdir, build_prm(train_cfg, mesh), None, mesh)
    try:
        ckpt = trainer.checkpointer
        step = ckpt.best_step() if config.which == "best" else ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir / 'prm' / 'checkpoints'}: no {config.which} checkpoint")
        trainer.state, _, _ = ckpt.restore(step, trainer.state)
        save_prm(trainer.model, out, dtype=config.dtype, overwrite=config.overwrite,
                 copy_files=tokenizer_files(tokenizer_source(train_cfg)))
    finally:
        trainer.close()
    logging.info("exported step %d (%s) -> %s", step, config.which, out)
