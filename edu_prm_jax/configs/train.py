"""`edu-prm train`: a PRM (policy backbone + reward head) on labelled steps, sharded, checkpointed, resumable.

Example: edu-prm train --workdir=runs/toy --config.steps=400 --config.mesh.fsdp=2
The 72B layout on a pod slice is in configs/qwen25_72b_prm_tpu.py.
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.labels = ""  # Labelled-step dir from `edu-prm label`; empty = <workdir>/labels.
    config.policy = "toy"  # Backbone initialisation: 'toy', an HF policy dir or an Orbax dir.
    config.init_prm = ""  # Start from an existing PRM in HF format instead (e.g. Qwen2.5-Math-PRM-7B).
    config.head = "scalar"  # A registered head (models/heads.py): scalar (step's last token) or qwen_math (separator).
    config.separator = "<extra_0>"  # Separator token text for heads that insert one, e.g. qwen_math (one token).
    config.supervise = "step_end"  # Labelled positions: step_end, or step_tokens (every token of a step).
    config.seq_len = 256  # Packed row length (a solution longer than this is dropped and counted).
    config.rows = 16  # Rows per micro-batch (a multiple of the mesh's data x fsdp size).
    config.steps = 300  # Micro-batch steps in total (a resumed run continues to this).
    config.learning_rate = 1e-3  # Peak AdamW learning rate.
    config.warmup_steps = 30  # Linear warmup (optimizer updates).
    config.end_lr_fraction = 0.1  # Cosine decays to this fraction of the peak.
    config.weight_decay = 0.01  # Decoupled weight decay.
    config.clip_norm = 1.0  # Global-norm gradient clipping (<= 0 disables).
    config.accum_steps = 1  # Micro-batches per optimizer update (gradient accumulation).
    config.expand_layers = 0  # Append this many identity-initialised decoder blocks (LLaMA Pro block expansion).
    config.trainable = "all"  # all, head (frozen backbone) or expanded (new blocks + head; init_prm: its own ones).
    config.pos_weight = 1.0  # Weight of the positive class in the BCE loss.
    config.eval_fraction = 0.1  # Share of questions held out for eval (by hash of the question id).
    config.eval_every = 100  # Eval every n steps (0 = only at the end).
    config.checkpoint_every = 100  # Save an Orbax checkpoint every n steps (0 = only at the end / SIGTERM).
    config.keep_checkpoints = 2  # Checkpoints kept (plus the best by eval step AUROC).
    config.dtype = "float32"  # Compute dtype (bfloat16 on TPU); master weights stay float32.
    config.remat = "none"  # Activation rematerialisation per decoder layer: none, full (least memory) or dots.
    config.peak_flops = 1e12  # Peak FLOP/s per device for the MFU estimate (v5e bf16: 1.97e14).
    config.seed = 0  # Head initialisation and data order.
    config.mesh = common.mesh_config()  # Device mesh: batch over data x fsdp, params over fsdp and tensor.
    return config
