"""The optimizer: clip -> AdamW (warmup + cosine), optional frozen params, gradient accumulation.

Master weights stay in the params' dtype (float32 by default); the model's compute dtype (bf16 allowed)
only affects the forward/backward matmuls, so the optimizer never sees low-precision state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (one optimizer update = `accum_steps` micro-batches)."""

    learning_rate: float = 1e-3  # peak learning rate after warmup
    warmup_steps: int = 100  # linear warmup from 0 (in optimizer updates)
    total_steps: int = 1000  # optimizer updates; the cosine decays to end_lr_fraction * peak here
    end_lr_fraction: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.01  # decoupled AdamW weight decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm gradient clipping (<= 0 disables)
    accum_steps: int = 1  # micro-batches accumulated per update (optax.MultiSteps)
    trainable: str | None = None  # regex on param paths ('layers.0.attn.q_proj.kernel'); None = all train

    def __post_init__(self) -> None:
        if self.accum_steps < 1:
            raise ValueError(f"OptimConfig.accum_steps must be >= 1, got {self.accum_steps}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"OptimConfig: need total_steps >= 1 and warmup_steps >= 0, got "
                             f"{self.total_steps}, {self.warmup_steps}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup then cosine decay, indexed by optimizer update (not micro-batch)."""
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def param_path(path: tuple) -> str:
    """'layers.0.attn.q_proj.kernel' from a jax key path (Variable 'value' attributes dropped)."""
    parts = []
    for p in path:
        if hasattr(p, "key"):
            parts.append(str(p.key))
        elif hasattr(p, "idx"):
            parts.append(str(p.idx))
    return ".".join(parts)


def trainable_labels(pattern: str | None) -> Callable:
    """A labels function for optax.multi_transform: 'train' where the path matches `pattern`, else 'frozen'."""
    regex = re.compile(pattern) if pattern is not None else None

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if regex is None or regex.search(param_path(path)) else "frozen", params)

    return labels


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) on trainable params (the norm over them only), zero updates on
    frozen ones, wrapped in MultiSteps when accumulating (the state carries the partial gradient sum, so a
    resumed run continues exactly)."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:  # clip inside the trainable branch: frozen params' gradients must not shrink updates
        adamw = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    if cfg.trainable is None:
        tx = adamw
    else:
        tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels(cfg.trainable))
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx
