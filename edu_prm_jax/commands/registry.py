"""The command table: name -> implementing module, imported only when the command runs.

`cli` dispatches through it and `pipeline` chains stages through it, so no command module imports another.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("pipeline", "experiment", "build-toy", "sample", "label", "train", "score", "export", "convert", "eval-bon",
         "eval-processbench", "prepare-data", "plan")
# Command name -> module that implements it (`DESCRIPTION` and `run(config, workdir)`).
COMMANDS: dict[str, str] = {n: f"edu_prm_jax.commands.{n.replace('-', '_')}" for n in NAMES}


def load(name: str) -> ModuleType:
    """The module of command `name` (KeyError for an unknown name)."""
    return importlib.import_module(COMMANDS[name])
