"""`edu-prm plan`: compile a run's programs for a TPU slice or GPU host, on this CPU, and say whether they fit.

Examples:
  edu-prm plan --workdir=runs/plan                                   # the toy pipeline on a v5e-4
  edu-prm plan --config=configs/plan.py:qwen25_math_7b --config.arch=Qwen2.5-Math-7B-Instruct
      --config.train_topology=v4-32 --config.decode_topology=v4-8 --workdir=runs/plan7b
  edu-prm plan --config=configs/plan.py:qwen25_72b_prm_tpu --config.arch=Qwen2.5-72B-Instruct
      --config.topology=v5p-128 --config.layers=4,8 --workdir=runs/plan72b
  edu-prm plan --config.run.train.rows=64 --config.search=batch    # any field of the planned config
(each example is one command line).
`configs/plan.py:NAME` plans the shipped config NAME (a pipeline, train or sample config); to plan your own
file, write a config that sets `config.run = mine.get_config()` on `plan.get_config()`.
Needs the `[plan]` extra (libtpu; `[plan-cuda]` for GPU targets); nothing runs on an accelerator.
"""

from __future__ import annotations

import importlib

import ml_collections

from edu_prm_jax.configs import pipeline


def planned_config(name: str) -> ml_collections.ConfigDict:
    """The shipped config `name` ("qwen25_math_7b", "configs/qwen25_math_7b.py" or "train.py" alike)."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".py")
    try:
        module = importlib.import_module(f"edu_prm_jax.configs.{stem}")
    except ModuleNotFoundError:
        raise ValueError(f"configs/plan.py:{name}: no shipped config {stem!r} in edu_prm_jax/configs/") from None
    return module.get_config()


def get_config(planned: str | None = None) -> ml_collections.ConfigDict:
    """`configs/plan.py:NAME` plans the shipped config NAME instead of the toy pipeline."""
    config = ml_collections.ConfigDict()
    config.planned = planned or "pipeline"  # Which shipped config `run` holds (set by configs/plan.py:NAME).
    config.run = pipeline.get_config()  # The config to plan: a pipeline, train or sample config (any field).
    if planned:
        config.run = planned_config(planned)
    config.programs = "train,decode,decode_eval,score"  # Programs to compile; those the config lacks are skipped.
    config.topology = "v5e-4"  # Target: v4-8..128, v5e-1..256, v5p-8..128, v6e-1..256 or h100-1/2/4/8.
    config.train_topology = ""  # Target of the train and score programs; empty = topology.
    config.decode_topology = ""  # Target of decode and decode_eval; empty = topology.
    config.arch = ""  # Policy architecture if its dir is not here: a name (planning/architectures.py) or config.json.
    config.prm_arch = ""  # PRM backbone architecture (train policy / prm_backbone); empty = as the policy's.
    config.prompt_len = 256  # Decode: prompt tokens per question (rounded up to the prompt_bucket).
    config.score_rows = 0  # Score: rows per forward; 0 = the train config's rows.
    config.score_len = 0  # Score: tokens per row; 0 = the train config's seq_len.
    config.layers = ""  # Compile at this depth ("8") or two depths extrapolated to the full one ("4,8"); "" = full.
    config.scan_layers = "auto"  # Layer layout: auto (the target's default: scanned on TPU/GPU), true or false.
    config.attention = "auto"  # Kernel: auto (the target's default: splash on TPU, cuDNN for bf16 on GPU), xla, ...
    config.search = ""  # "", slice (smallest slice that fits), batch (largest batch), slots (largest num_leaves).
    config.output = ""  # JSON report; empty = <workdir>/plan.json (the table also goes to <workdir>/plan.md).
    return config
