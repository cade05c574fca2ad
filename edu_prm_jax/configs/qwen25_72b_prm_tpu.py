"""Training a 72B PRM (Qwen2.5-72B-Instruct backbone, Qwen2.5-Math-PRM head) on a TPU v5p-128 pod slice.

  launch/tpu_vm.sh launch --name prm72b --zone us-east5-a --accelerator-type v5p-128 --version v2-alpha-tpuv5 \
      -- train --config=configs/qwen25_72b_prm_tpu.py --config.labels=gs-mounted/labels --workdir=/runs/prm72b
Every worker runs the same command; jax.distributed initialises itself from the TPU environment.

Expected memory per chip (64 chips x 95 GB HBM; estimates, not measurements):
- float32 master params + AdamW moments + grads: 16 B x 72.7e9 = 1.16 TB, sharded over fsdp x tensor = 64 ways:
  18.2 GB per chip.
- bf16 activations with remat="full" (each decoder layer keeps only its input and recomputes the rest in the
  backward pass): layer inputs 80 x 8192 x 2 B = 1.3 MB per token x 4096 tokens (2 rows x 2048 per fsdp group)
  = 5.4 GB, plus one layer's working set (~34 x 8192 x 2 B per token, split 4 ways by tensor parallelism)
  ~0.6 GB: ~6 GB per chip. Without remat it would be ~46 GB (all 80 layers' ~44.6 MB per token / 4).
- total ~24 GB of 95 GB, room for more rows per fsdp group. For v4 (32 GB) keep remat and use rows 16.
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
