"""`edu-prm prepare-data`: a source file as a TFDS array_record dataset (built and read without TensorFlow).

Example: edu-prm prepare-data --config.source=/data/processbench/math.json --workdir=runs/data
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.source = config_dict.placeholder(str)  # Input file: MATH/GSM8K/generic JSONL, ProcessBench, PRM800K, ...
    config.format = ""  # Force a format (math, gsm8k, generic, processbench, prm800k, math_shepherd); empty = detect.
    config.name = ""  # Dataset name; empty = <format>_<file stem>.
    config.split = "train"  # Split name inside the dataset.
    config.data_dir = ""  # Where the dataset goes; empty = <workdir>/tfds.
    config.num_shards = 0  # array_record shards; 0 = chosen by size.
    return config
