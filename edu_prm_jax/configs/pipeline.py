"""`edu-prm pipeline`: the whole method end to end — EDU sampling, MC labels, PRM training, Best-of-N
(HT vs EDU vs P-EDU) and ProcessBench — on the embedded toy world by default, resumable stage by stage.

Examples:
  edu-prm pipeline --workdir=runs/toy                                   # laptop CPU, minutes
  edu-prm pipeline --workdir=runs/toy --config.stages=eval_bon          # re-run one stage
  edu-prm pipeline --workdir=runs/toy --config.processbench.data=/data/processbench  # with ProcessBench
  edu-prm pipeline --config=configs/qwen25_math_7b.py --workdir=/mnt/shared/runs/7b  # real models (see that file)
Every sub-config is reachable by override, e.g. --config.train.steps=600 --config.eval_bon.n_grid=1,4,16.
`policy` and `dtype` are set once here for every stage (the stages have no copies of their own), and
eval_bon samples with sample's settings except the eval_bon.sampling fields you set.
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common
from edu_prm_jax.configs import eval_bon as eval_bon_config
from edu_prm_jax.configs import eval_processbench as processbench_config
from edu_prm_jax.configs import label as label_config
from edu_prm_jax.configs import sample as sample_config
from edu_prm_jax.configs import train as train_config

STAGES = "sample,label,train,eval_bon,processbench"
SHARED = ("policy", "dtype")  # pipeline fields that replace the stages' own (train.policy: prm_backbone, if set)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stages = STAGES  # Comma-separated stages to run, in pipeline order.
    config.policy = "toy"  # Policy for sample, label and eval_bon: 'toy' (shipped), an HF dir or an Orbax dir.
    config.prm_backbone = ""  # PRM initialisation (train's policy), e.g. a base model; empty = the policy.
    config.dtype = "float32"  # Compute dtype for every stage.
    config.sample = sample_config.get_config("edu")  # Stage 1: EDU trees on training questions.
    config.sample.questions = "toy:train:2048"
    config.sample.sampling.num_leaves = 8
    config.sample.sampling.tau = 0.5  # Anchor entropy threshold (nats); 0.5 suits the confident toy policy.
    config.label = label_config.get_config()  # Stage 2: Monte Carlo step labels.
    config.train = train_config.get_config()  # Stage 3: PRM training (exported to <workdir>/prm/hf).
    config.train.steps = 400
    config.train.learning_rate = 3e-4
    config.eval_bon = eval_bon_config.get_config()  # Stage 4: Best-of-N with the trained PRM.
    # Best-of-N samples with the anchor rule the PRM's training steps were cut by: sample.sampling's settings,
    # except the fields set here (each starts unset).
    config.eval_bon.sampling = common.unset_like(config.eval_bon.sampling)  # null = sample.sampling's value.
    config.processbench = processbench_config.get_config()  # Stage 5: ProcessBench (skipped while data is "").
    config.processbench.limit = 40
    config.processbench.max_tokens = 1024
    for stage in ("sample", "label", "train", "eval_bon", "processbench"):
        for field in SHARED:
            if field in config[stage]:
                del config[stage][field]
    return config
