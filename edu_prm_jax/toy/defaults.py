"""Where questions come from: a user's file (MATH / GSM8K / generic JSONL) or the embedded toy world.

A question spec is either a path, or `toy:<split>:<n>[:<seed>]` for n toy problems of a split. Toy problems use
the ToyConfig the shipped policy was trained with (read from its training report), so the difficulty matches.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.records import sources
from edu_prm_jax.toy import world as toy

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"  # package data: always local
TOY_POLICY_DIR = ASSETS / "toy_policy"


def resolve_policy(path: str | None) -> epath.Path:
    """'toy' (or empty) means the shipped toy policy; anything else is a user path (gs:// included)."""
    if not path or path == "toy":
        return storage.as_path(TOY_POLICY_DIR)
    return storage.as_path(path)


def toy_config_of(policy_dir: storage.PathLike = TOY_POLICY_DIR) -> toy.ToyConfig:
    report = storage.as_path(policy_dir) / "training_report.json"
    if report.is_file():
        raw = json.loads(report.read_text()).get("toy_config")
        if raw:
            return toy.ToyConfig(**raw)
    return toy.ToyConfig()


def load_questions(spec: str, toy_config: toy.ToyConfig | None = None, limit: int = 0) -> list[dict[str, Any]]:
    """All questions of `spec`, validated before anything is sampled (a bad line stops the run up front)."""
    if spec.startswith("toy:"):
        parts = spec.split(":")
        if len(parts) not in (3, 4) or parts[1] not in toy.SPLITS or not parts[2].isdigit():
            raise ValueError(f"questions={spec!r}: expected toy:<train|test>:<n>[:<seed>]")
        cfg = toy_config or toy_config_of()
        seed = int(parts[3]) if len(parts) == 4 else None
        items = toy.generate_split(parts[1], int(parts[2]), cfg, seed=seed)
        out = [{"id": it["id"], "problem": it["problem"], "answer": it["answer"], "source": "toy"} for it in items]
    else:
        path = storage.as_path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"questions={spec!r}: no such file")
        out = list(sources.read_questions(path))
    return out[:limit] if limit else out
