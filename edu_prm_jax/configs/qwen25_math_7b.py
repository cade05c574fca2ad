"""The paper's setting: Qwen2.5-Math-7B-Instruct as policy, a Qwen2.5-Math-7B PRM, MATH questions.

Run on a Cloud TPU VM (see launch/tpu_vm.sh):
  edu-prm pipeline --config=configs/qwen25_math_7b.py --config.policy=/models/Qwen2.5-Math-7B-Instruct \
      --config.prm_backbone=/models/Qwen2.5-Math-7B --config.sample.questions=/data/math/train.jsonl \
      --config.eval_bon.questions=/data/math500/test.jsonl --config.processbench.data=/data/processbench \
      --workdir=/runs/math7b
The /models and /data paths below are placeholders: point them at your copies (ProcessBench is skipped while
processbench.data is empty).

Memory per chip, from `edu-prm plan` (compiled for the slices below on a CPU, scanned layers and splash
attention; README "Planning for a slice"): sampling and evaluation on a TPU v4-8 (4 chips, mesh data=4: 18.7
and 22.9 GiB of 30.75), PRM training on a v4-32 (16 chips, fsdp=16: 12.7 GiB).
  edu-prm plan --config=configs/plan.py:qwen25_math_7b --config.arch=Qwen2.5-Math-7B-Instruct
      --config.train_topology=v4-32 --config.decode_topology=v4-8   (one command line)
On 16-GiB chips (v5e) the replicated weights do not fit beside the cache: sample with the weights sharded
instead, `--config.sample.mesh.data=1 --config.sample.mesh.tensor=4` per 4-chip host (launch/README.md).
- sampling loads the policy in its checkpoint's dtype (bf16: 15.2 GB of weights per chip, replicated);
- eval_bon decodes 64 slots per question at N=64, so 4 questions per batch keep its KV cache within a v4 chip;
- training keeps float32 master weights + AdamW (16 B per parameter, fsdp=16) and recomputes each layer in the
  backward pass (remat full): 16 rows x 4096 tokens per micro-batch, 2 micro-batches per update (32 rows).
  Without remat, or with 32 rows per micro-batch, the [rows, heads, T, T] attention scores do not fit.
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
    config.train.rows = 16  # per micro-batch (1 per chip on a v4-32); accum_steps=2 makes 32 per update
    config.train.accum_steps = 2
    config.train.remat = "full"  # recompute each decoder layer in the backward pass (see the plan above)
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
    config.eval_bon.batch_questions = 4  # x 64 slots at N=64: the KV cache of 256 paths over 4 chips
    config.eval_bon.prompt_bucket = 128
    config.eval_bon.p_edu = False  # P-EDU needs a scalar-head PRM
    config.processbench.data = ""  # ProcessBench dir (gsm8k.json, math.json, ...); empty = stage skipped
    config.processbench.limit = 0
    config.processbench.max_tokens = 8192
    return config
