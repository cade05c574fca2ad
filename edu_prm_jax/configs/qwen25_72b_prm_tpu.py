"""Training a 72B PRM (Qwen2.5-72B-Instruct backbone, Qwen2.5-Math-PRM head) on a TPU v5p-128 pod slice.

  launch/tpu_vm.sh launch --name prm72b --zone us-east5-a --accelerator-type v5p-128 --version v2-alpha-tpuv5 \
      -- train --config=configs/qwen25_72b_prm_tpu.py --config.labels=gs://my-bucket/runs/math7b/labels \
      --workdir=gs://my-bucket/runs/prm72b
Every worker runs the same command; jax.distributed initialises itself from the TPU environment, and the gs://
workdir holds the checkpoints every host writes and resumes from (launch/README.md walks through it).

Memory per chip, from `edu-prm plan` (compiled for a v5p-128 on a CPU; README "Planning for a slice"):
  edu-prm plan --config=configs/plan.py:qwen25_72b_prm_tpu --config.arch=Qwen2.5-72B-Instruct
      --config.topology=v5p-128   (one command line; all 80 scanned layers, splash attention: 234 s to compile)
- arguments 16.7 GiB: float32 master weights + AdamW moments + the accumulated gradient (accum_steps=4),
  16 B x 72.7e9 parameters over fsdp x tensor = 64 chips;
- the train step in all 31.6 GiB of the 95.74 a v5p chip lets a program use (of which 14.9 GiB temporaries);
- the same step planned with unrolled layers and extrapolated from 4- and 8-layer compiles needed 66-69 GiB.
"""

from __future__ import annotations

from edu_prm_jax.configs import train


def get_config():
    config = train.get_config()
    config.policy = "/models/Qwen2.5-72B-Instruct"  # Backbone initialisation (set this).
    config.head = "qwen_math"  # Qwen2.5-Math-PRM layout; exports load in transformers like the public PRM.
    config.seq_len = 2048  # Packed row length.
    config.rows = 32  # Global rows per micro-batch (2 per fsdp group).
    config.accum_steps = 4  # 128 rows per optimizer update.
    config.steps = 8000  # Micro-batches.
    config.learning_rate = 5e-6  # Peak learning rate.
    config.warmup_steps = 50  # Updates of linear warmup.
    config.dtype = "bfloat16"  # bf16 compute, float32 master weights.
    config.remat = "full"  # Recompute each decoder layer in the backward pass (see the memory estimate above).
    config.peak_flops = 4.59e14  # TPU v5p bf16 peak per chip.
    config.checkpoint_every = 200  # Orbax saves (async) every 200 micro-batches; SIGTERM also saves.
    config.eval_every = 500  # Held-out step AUROC.
    config.mesh.data = 1  # Batch axis.
    config.mesh.fsdp = 16  # Parameter/optimizer sharding.
    config.mesh.tensor = 4  # Heads and MLP columns.
    return config
