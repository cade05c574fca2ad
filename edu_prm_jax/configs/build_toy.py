"""`edu-prm build-toy`: re-create the embedded toy policy (tokenizer + tiny Qwen2) bit for bit from a seed.

Runtime: ~9 minutes on an idle 2-core CPU (1600 updates of 8 x 256 tokens), ~15 minutes on a busy one.
Example: edu-prm build-toy --config.output=runs/toy_policy --config.seed=0
The earlier, clean asset: --config.steps=800 --config.misread_rate=0 (greedy 56.6%).
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.output = ""  # Output dir (HF format + tokenizer + training_report.json); empty = <workdir>/toy_policy.
    config.seed = 0  # Seed of data, tokenizer and initialisation (0 reproduces the shipped asset).
    config.steps = 1600  # Optimizer updates (1600 = the shipped asset).
    config.overwrite = False  # Replace output when it holds an earlier build of this tool (anything else: refused).
    config.misread_rate = 0.6  # Chance each 6 in a corpus problem is drawn as 9 (0.6 = shipped; 0 = clean corpus).
    return config
