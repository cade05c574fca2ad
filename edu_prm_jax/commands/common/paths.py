"""Where commands find what other stages wrote: the workdir layout and the files beside a PRM.

Every path here is an `epath.Path` (`io.storage.as_path`), so a `gs://` workdir stays on the object store."""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.destinations import output_complete
from edu_prm_jax.toy.defaults import resolve_policy


def prm_dir(workdir: storage.PathLike, configured: str = "") -> epath.Path:
    """Where a PRM is read from: the configured path, else the one `edu-prm train` exports in the workdir."""
    return storage.as_path(configured) if configured else storage.as_path(workdir) / "prm" / "hf"


def tokenizer_source(config: ml_collections.ConfigDict) -> epath.Path:
    return storage.as_path(config.init_prm) if config.init_prm else resolve_policy(config.policy)


TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer.model")


def find_tokenizer_dir(prm_dir: epath.Path, override: str) -> epath.Path:
    """The tokenizer beside the PRM (`edu-prm train` copies the policy's there), unless one is given.

    Never a silent fallback: scoring a real PRM with another model's tokenizer gives garbage, not an error."""
    if override:
        return storage.as_path(override)
    if any((prm_dir / f).is_file() for f in TOKENIZER_MARKERS):
        return prm_dir
    raise FileNotFoundError(f"{prm_dir}: no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); pass "
                            "--config.tokenizer=DIR (the policy's tokenizer)")


def train_finished(workdir: storage.PathLike) -> int | None:
    """The step a finished `edu-prm train` run in `workdir` ended at (its summary and export both exist; on an
    object store the export also carries its completion marker, `output_complete`), or None. One definition for
    the train command and the pipeline."""
    workdir = storage.as_path(workdir)
    summary = workdir / "prm" / "train_summary.json"
    if summary.is_file() and output_complete(prm_dir(workdir)):
        return int(json.loads(summary.read_text()).get("step", 0))
    return None


def train_started(workdir: storage.PathLike) -> bool:
    """Whether a train run in `workdir` has produced anything (a checkpoint or an export) that a fingerprint
    must protect."""
    workdir = storage.as_path(workdir)
    checkpoints = workdir / "prm" / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return saved or (prm_dir(workdir) / "config.json").is_file()
