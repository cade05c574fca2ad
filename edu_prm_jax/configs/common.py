"""Shared config pieces for the per-command configs in this package (not a command config itself).

Each builder returns a fresh ConfigDict whose every field carries a `# comment` on its line; `edu-prm <cmd>
--help` reads those comments, so keep one per field when adding more.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh axes; their product must equal the number of devices (-1 takes what is left)."""
    mesh = ml_collections.ConfigDict()
    mesh.data = data  # Data-parallel axis size; -1 = all devices not used by fsdp and tensor.
    mesh.fsdp = fsdp  # Fully-sharded (parameter-sharding) axis size.
    mesh.tensor = tensor  # Tensor-parallel axis size (splits heads and MLP columns).
    mesh.rules = ml_collections.ConfigDict()  # Sharding rules: logical axis -> mesh axes ('a,b' several, '' none).
    mesh.rules.vocab = "tensor"  # Parameters: vocabulary rows of the embedding and LM head.
    mesh.rules.embed = "fsdp"  # Parameters: the hidden size of every kernel and of the embedding.
    mesh.rules.q_heads = "tensor"  # Parameters: query heads (q_proj outputs, o_proj inputs).
    mesh.rules.kv_heads = "tensor"  # Parameters and KV cache: key/value heads.
    mesh.rules.mlp = "tensor"  # Parameters: MLP intermediate size (and a reward head's hidden layer).
    mesh.rules.norm = ""  # Parameters: RMSNorm scales.
    mesh.rules.head_dim = ""  # KV cache: features per head.
    mesh.rules.layers = ""  # Parameters and KV cache: the stacked-layers axis of scan_layers=True (replicated).
    mesh.rules.head_out = ""  # Parameters: a reward head's output columns.
    mesh.rules.batch = "data,fsdp"  # Training batches: rows of a micro-batch.
    mesh.rules.rollout = "data"  # Rollouts: questions of a decode batch (decode is manual over these axes).
    mesh.rules.cache_batch = "data"  # KV cache: rows (path slots); usually the rollout axes.
    mesh.rules.cache_seq = ""  # KV cache: positions.
    mesh.rules.act_batch = "data,fsdp"  # Activations between decoder layers: rows.
    mesh.rules.act_seq = ""  # Activations between decoder layers: positions.
    mesh.rules.act_embed = ""  # Activations between decoder layers: hidden features.
    return mesh


def model_config(path: str | None = None, param_dtype: str = "float32",
                 dtype: str = "float32") -> ml_collections.ConfigDict:
    """Which checkpoint to load and in which dtypes."""
    model = ml_collections.ConfigDict()
    model.path = path if path is not None else config_dict.placeholder(str)  # HF dir or Orbax checkpoint dir.
    model.param_dtype = param_dtype  # Parameter dtype in memory: float32, bfloat16 or float16.
    model.dtype = dtype  # Compute dtype of matmuls (norms, softmax and logits stay float32).
    return model


# Sampler fields each command reads (the others it sets itself per run, or its sampler never looks at):
# eval-bon picks mode, leaf budget and seed per run; label's rollouts are HT samples, k per prompt, whose
# continuation text is all that is kept (no anchors, so the EDU-only fields and the symbol set play no part).
EVAL_BON_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "edu_greedy", "tau", "branch_k",
                     "threshold_mode", "max_anchors", "stop_at_answer", "stop_strings", "extra_symbols",
                     "disable_symbols")
ROLLOUT_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_at_answer", "stop_strings", "seed")


def sampling_config(mode: str = "edu", num_leaves: int = 8,
                    fields: Sequence[str] | None = None) -> ml_collections.ConfigDict:
    """Sampler settings (sample, eval-bon, label rollouts); `fields` keeps only those a command reads."""
    c = ml_collections.ConfigDict()
    c.mode = mode  # edu (entropy-anchored tree), ht (independent samples) or greedy (one argmax path).
    c.num_leaves = num_leaves  # M: leaf budget per question (EDU) or samples per question (HT); greedy: 1.
    c.max_new_tokens = 96  # Generation length cap per path.
    c.temperature = 0.7  # HT sampling temperature (and EDU non-anchor tokens when edu_greedy=False).
    c.top_k = 0  # Top-k filter for sampling; 0 = off.
    c.top_p = 1.0  # Nucleus filter for sampling; 1.0 = off.
    c.edu_greedy = True  # EDU: non-anchor positions greedy (True) or sampled at `temperature`.
    c.tau = 1.0  # Entropy threshold in nats: H > tau (and a non-symbol top-1) makes an anchor.
    c.branch_k = 2  # Children per anchor: the top-K tokens.
    c.threshold_mode = "fixed"  # fixed: first come first forked; budget: highest entropy forks first.
    c.max_anchors = 16  # Most anchors (forks) along one path.
    c.stop_at_answer = True  # Stop a path once its \boxed{...} closes.
    c.stop_strings = ""  # Extra stop strings, separated by '|' (matched as token sequences).
    c.extra_symbols = ""  # Characters added to the anchor symbol set.
    c.disable_symbols = False  # Empty symbol set: any high-entropy token may anchor.
    c.seed = 0  # Sampling seed; randomness is keyed by (seed, question, slot, step).
    if fields is not None:
        unknown = sorted(set(fields) - set(c.keys()))
        if unknown:
            raise ValueError(f"sampling_config: no sampler field(s) {unknown}; fields are {list(c.keys())}")
        for name in [k for k in c.keys() if k not in fields]:
            del c[name]
    return c


def unset_like(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config`'s fields, each unset (None, keeping its type so `--config.x=v` still parses): overrides of some
    other config, where only the fields a user sets take effect."""
    out = ml_collections.ConfigDict()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out[key] = unset_like(value)
        else:
            out[key] = config_dict.placeholder(config.get_type(key))
    return out
