"""Where commands find what other stages wrote: the workdir layout and the files beside a PRM."""

from __future__ import annotations

import json
import pathlib

import ml_collections

from edu_prm_jax.toy.defaults import resolve_policy


def prm_dir(workdir: pathlib.Path, configured: str = "") -> pathlib.Path:
    """Where a PRM is read from: the configured path, else the one `edu-prm train` exports in the workdir."""
    return pathlib.Path(configured) if configured else workdir / "prm" / "hf"


def tokenizer_source(config: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(config.init_prm) if config.init_prm else resolve_policy(config.policy)


TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer.model")


def find_tokenizer_dir(prm_dir: pathlib.Path, override: str) -> pathlib.Path:
    """The tokenizer beside the PRM (`edu-prm train` copies the policy's there), unless one is given.

    Never a silent fallback: scoring a real PRM with another model's tokenizer gives garbage, not an error."""
    if override:
        return pathlib.Path(override)
    if any((prm_dir / f).is_file() for f in TOKENIZER_MARKERS):
        return prm_dir
    raise FileNotFoundError(f"{prm_dir}: no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); pass "
                            "--config.tokenizer=DIR (the policy's tokenizer)")


def train_finished(workdir: pathlib.Path) -> int | None:
    """The step a finished `edu-prm train` run in `workdir` ended at (its summary and export both exist), or
    None. One definition for the train command and the pipeline."""
    summary = workdir / "prm" / "train_summary.json"
    if summary.is_file() and (prm_dir(workdir) / "config.json").is_file():
        return int(json.loads(summary.read_text()).get("step", 0))
    return None


def train_started(workdir: pathlib.Path) -> bool:
    """Whether a train run in `workdir` has produced anything (a checkpoint or an export) that a fingerprint
    must protect."""
    checkpoints = workdir / "prm" / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return saved or (prm_dir(workdir) / "config.json").is_file()
