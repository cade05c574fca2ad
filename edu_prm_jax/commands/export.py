"""`edu-prm export`: restore a PRM training checkpoint and write it in Hugging Face format.

The PRM's architecture is rebuilt, as shapes only, from the `train_config.json` the training run left in the
workdir; then only its parameters are restored from the latest or best Orbax checkpoint (a partial restore onto
this process's mesh: the optimizer state is never read) and written with `save_prm`.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import logging

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.io.destinations import check_destination
from edu_prm_jax.models.checkpoints import tokenizer_files
from edu_prm_jax.models.prm import save_prm
from edu_prm_jax.training.loop import restore_model

WHICH = ("latest", "best")
DESCRIPTION = "Export a trained PRM (latest or best checkpoint) to Hugging Face format."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    from edu_prm_jax.commands.common.builders import abstract_prm, prm_checkpoints
    from edu_prm_jax.commands.common.paths import tokenizer_source

    if config.which not in WHICH:
        raise ValueError(f"config.which={config.which!r}: expected one of {list(WHICH)}")
    saved = workdir / "train_config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: not found; export reads the config of an `edu-prm train` run")
    train_cfg = ml_collections.ConfigDict(json.loads(saved.read_text()))
    out = storage.as_path(config.output) if config.output else workdir / "prm" / f"hf_{config.which}"
    check_destination(out, overwrite=config.overwrite, field="output")  # before any model is built
    checkpoints = prm_checkpoints(workdir)
    try:
        wanted = checkpoints.best_step() if config.which == "best" else checkpoints.latest_step()
        if wanted is None:
            raise FileNotFoundError(f"{checkpoints.directory}: no {config.which} checkpoint")
        # onto this process's devices (export's own mesh), not the training slice's: a run trained with fsdp=16
        # exports on a smaller host; the logical-axis rules are export's own too
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        rules = parallel.rules_from_config(config.mesh.rules)
        abstract = abstract_prm(train_cfg)
        # the wanted step first, then the others newest first: a damaged one is skipped with a warning naming it
        order = [wanted, *sorted((s for s in checkpoints.all_steps() if s != wanted), reverse=True)]
        step, prm = checkpoints.first_intact(order, lambda s: restore_model(checkpoints, s, abstract, mesh, rules))
        if step != wanted:
            logging.warning("export: the %s checkpoint (step %d) is damaged; exported step %d instead",
                            config.which, wanted, step)
    finally:
        checkpoints.close()
    save_prm(prm, out, dtype=config.dtype, overwrite=config.overwrite,
             copy_files=tokenizer_files(tokenizer_source(train_cfg)))
    logging.info("exported step %d (%s) -> %s", step, config.which, out)
