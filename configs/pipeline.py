"""`edu-prm pipeline`: the whole method end to end — EDU sampling, MC labels, PRM training, Best-of-N
(HT vs EDU vs P-EDU) and ProcessBench — on the embedded toy world by default, resumable stage by stage.

Examples:
  edu-prm pipeline --workdir=runs/toy                                   # laptop CPU, minutes
  edu-prm pipeline --workdir=runs/toy --config.stages=eval_bon          # re-run one stage
  edu-prm pipeline --config=configs/qwen25_math_7b.py --workdir=gs://... # real models (see that file)
Every sub-config is reachable by override, e.g. --config.train.steps=600 --config.eval_bon.n_grid=1,4,16.
"""

from __future__ import annotations

import ml_collections

from configs import eval_bon as eval_bon_config
from configs import eval_processbench as processbench_config
from configs import label as label_config
from configs import sample as sample_config
from configs import train as train_config

STAGES = "sample,label,train,eval_bon,processbench"


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stages = STAGES  # Comma-separated stages to run, in pipeline order.
    config.policy = "toy"  # Policy for every stage: 'toy' (shipped), an HF dir or an Orbax dir.
    config.prm_backbone = ""  # PRM initialisation (sets train.policy), e.g. a base model; empty = the policy.
    config.dtype = "float32"  # Compute dtype for every stage.
    config.sample = sample_config.get_config("edu")  # Stage 1: EDU trees on training questions.
    config.sample.questions = "toy:train:2048"
    config.sample.sampling.num_leaves = 8
    config.sample.sampling.tau = 0.5  # the toy policy is confident: 1.0 nats would anchor ~1 fork per question
    config.label = label_config.get_config()  # Stage 2: Monte Carlo step labels.
    config.train = train_config.get_config()  # Stage 3: PRM training (exported to <workdir>/prm/hf).
    config.train.steps = 400
    config.train.learning_rate = 3e-4
    config.eval_bon = eval_bon_config.get_config()  # Stage 4: Best-of-N (its sampling = config.sample.sampling).
    config.processbench = processbench_config.get_config()  # Stage 5: ProcessBench (skipped if data missing).
    config.processbench.limit = 40
    config.processbench.max_tokens = 1024
    return config
