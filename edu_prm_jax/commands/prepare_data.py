"""`edu-prm prepare-data`: validate a source file whole, then write it as a TFDS array_record dataset."""

from __future__ import annotations

import pathlib

import ml_collections
from absl import logging

from edu_prm_jax.io import storage
from edu_prm_jax.records.sources import prepare_source

DESCRIPTION = "Convert MATH/GSM8K/ProcessBench/PRM800K/Math-Shepherd files into TFDS array_record datasets."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    if not config.source:
        raise ValueError("config.source is not set (pass --config.source=FILE)")
    data_dir = storage.as_path(config.data_dir) if config.data_dir else workdir / "tfds"
    out = prepare_source(config.source, data_dir, name=config.name or None, split=config.split,
                         fmt=config.format or None, num_shards=config.num_shards or None)
    logging.info("prepared %s -> %s (read with tfds.data_source(%r, data_dir=%r))", config.source, out,
                 out.parent.name if out.parent != data_dir else out.name, str(data_dir))
