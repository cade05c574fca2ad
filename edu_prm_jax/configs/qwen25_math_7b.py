"""The paper's setting: Qwen2.5-Math-7B-Instruct as policy, a Qwen2.5-Math-7B PRM, MATH questions.

Run on a Cloud TPU VM (see launch/tpu_vm.sh):
  edu-prm pipeline --config=configs/qwen25_math_7b.py --config.policy=/models/Qwen2.5-Math-7B-Instruct \
      --config.prm_backbone=/models/Qwen2.5-Math-7B --config.sample.questions=/data/math/train.jsonl \
      --config.eval_bon.questions=/data/math500/test.jsonl --config.processbench.data=/data/processbench \
      --workdir=/runs/math7b
The /models and /data paths below are placeholders: point them at your copies (ProcessBench is skipped while
processbench.data is empty).

Expected memory per device (estimates from the formulas below, not measurements; TPU v4-8: 4 chips x 32 GB):
- sampling / eval (mesh data=4): bf16 weights 7.6e9 x 2 B = 15.2 GB replicated per chip; KV cache per slot =
  28 layers x 2 (k, v) x 4 kv-heads x 128 x 2048 tokens x 2 B = 117 MB; 2 questions x 32 slots per chip = 7.5 GB;
  total ~23 GB of 32 GB.
- PRM training (v4-32, mesh fsdp=16): float32 params + AdamW moments + grads = 16 B x 7.6e9 = 122 GB / 16 =
  7.6 GB per chip; bf16 activations ~3.4 MB per token (28 layers x ~34 x 3584 x 2 B) x 2 rows x 2048 = 14 GB;
  total ~22 GB of 32 GB.
"""

from __future__ import annotations

from edu_prm_jax.configs import pipeline


def get_config():
    config = pipeline.get_config()
    config.policy = "/models/Qwen2.5-Math-7B-Instruct"  # HF dir of the policy (set this).
    config.prm_backbone = "/models/Qwen2.5-Math-7B"  # HF dir of the PRM's base model (set this).
    config.dtype = "bfloat16"  # bf16 compute on TPU; master weights stay float32 in training.
    for stage in (config.sample, config.label, config.eval_bon, config.processbench):
        stage.mesh.data = -1  # sampling, rollouts and evaluation: questions over all chips
    # sampling: MATH train (7,500 queries in the paper), tree budget 8, long solutions
    config.sample.questions = "/data/math/train.jsonl"
    config.sample.sampling.num_leaves = 8
    config.sample.sampling.max_new_tokens = 2048
    config.sample.sampling.max_anchors = 32
    config.sample.batch_questions = 8
    config.sample.prompt_bucket = 128
    config.sample.num_shards = 64
    config.label.sampling.max_new_tokens = 2048
    # PRM: Qwen2.5-Math-PRM convention (separator after each step) on the base model
    config.train.head = "qwen_math"
    config.train.seq_len = 4096
    config.train.rows = 32
    config.train.steps = 3000
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 100
    config.train.peak_flops = 2.75e14  # TPU v4 bf16 peak per chip
    config.train.mesh.data = 1
    config.train.mesh.fsdp = -1
    # evaluation: MATH-500, N up to 64, 8 seeds like the paper (with the spread it did not report)
    config.eval_bon.questions = "/data/math500/test.jsonl"  # MATH-500 as JSONL (set this)
    config.eval_bon.n_grid = "1,2,4,8,16,32,64"
    config.eval_bon.seeds = "0,1,2,3,4,5,6,7"
    # eval_bon samples with config.sample.sampling (max_new_tokens 2048, the same anchor rule as the PRM's
    # training data); set a config.eval_bon.sampling field only to evaluate with a different value
    config.eval_bon.batch_questions = 8
    config.eval_bon.prompt_bucket = 128
    config.eval_bon.p_edu = False  # P-EDU needs a scalar-head PRM
    config.processbench.data = ""  # ProcessBench dir (gsm8k.json, math.json, ...); empty = stage skipped
    config.processbench.limit = 0
    config.processbench.max_tokens = 8192
    return config
