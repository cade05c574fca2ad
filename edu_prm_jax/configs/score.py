"""`edu-prm score`: step scores for solutions in a JSONL file.

Input lines: {"id", "problem" (chat template applied) or "prompt" (used verbatim), "steps": [str, ...]}.
Example: edu-prm score --config.prm=runs/toy/prm/hf --config.input=solutions.jsonl --config.output=scores.jsonl
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.prm = ""  # PRM in HF format; empty = <workdir>/prm/hf.
    config.tokenizer = ""  # Tokenizer dir; empty = the PRM dir (training copies the policy's tokenizer there).
    config.input = config_dict.placeholder(str)  # JSONL with id, problem|prompt and steps.
    config.output = ""  # Output JSONL (input fields + step_scores); empty = <workdir>/scores.jsonl.
    config.step_joiner = "\n"  # Appended to every step but the last before tokenising.
    config.batch_size = 8  # Solutions per PRM forward.
    config.dtype = "float32"  # Compute dtype.
    return config
