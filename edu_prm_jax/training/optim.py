"""The optimizer: clip -> AdamW (warmup + cosine), optional frozen params, gradient accumulation.

Master weights stay in the params' dtype (float32 by default); the model's compute dtype (bf16 allowed)
only affects the forward/backward matmuls, so the optimizer never sees low-precision state.

Gradient accumulation normalises by the supervised positions of the whole accumulated batch, not per
micro-batch: each micro-batch contributes the gradient of its *summed* loss and its position count, and the
update divides the summed gradient by the summed count (`accumulate_by_count`). The update then equals the one
a single batch holding all the micro-batches' rows would give, however unevenly the positions fall (packed rows
change the count every step). Averaging micro-batch means instead (optax.MultiSteps' default) weighs a position
of a sparse micro-batch more; torchtune and transformers moved to this normalisation for the same reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    accum_steps: int = 1  # micro-batches accumulated per update (`accumulate_by_count`)
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


class AccumulateState(NamedTuple):
    """`accumulate_by_count`'s state: everything a resumed run needs to finish a partial accumulation."""

    mini_step: jax.Array  # int32: micro-batches summed since the last update (0 .. every_k - 1)
    grad_sum: optax.Updates  # sum of the micro-batches' summed-loss gradients (float32 or wider)
    count: jax.Array  # float32: sum of the micro-batches' supervised-position counts (or total weights)
    inner_state: optax.OptState  # the wrapped optimizer's state, advanced once per update


def accumulate_by_count(inner: optax.GradientTransformation, every_k: int
                        ) -> optax.GradientTransformationExtraArgs:
    """Accumulate `every_k` micro-batch gradients, then apply `inner` once to sum(gradients) / sum(counts).

    `update(grads, state, params, count=n)`: `grads` is the gradient of the micro-batch's *summed* loss (its
    mean loss times n) and `n` the number (or total weight) of supervised positions it sums over. Updates are
    zero on the first every_k - 1 calls; the every_k-th returns `inner`'s update for the gradient of the mean
    loss over all positions of the every_k micro-batches (a total count of 0 means a zero gradient). With n the
    per-micro-batch counts this is the mean-loss gradient of the combined batch, the normalisation of torchtune
    and transformers' `num_items_in_batch`. The sum is kept in float32 for lower-precision params.
    """
    if every_k < 1:
        raise ValueError(f"accumulate_by_count: every_k must be >= 1, got {every_k}")

    def acc_dtype(x: jax.Array) -> Any:
        return jnp.promote_types(x.dtype, jnp.float32)

    def init(params: optax.Params) -> AccumulateState:
        return AccumulateState(mini_step=jnp.zeros([], jnp.int32),
                               grad_sum=jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype(p)), params),
                               count=jnp.zeros([], jnp.float32), inner_state=inner.init(params))

    def update(updates: optax.Updates, state: AccumulateState, params: optax.Params | None = None, *,
               count: jax.Array | float, **extra_args: Any) -> tuple[optax.Updates, AccumulateState]:
        del extra_args
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), state.grad_sum, updates)
        total = state.count + jnp.asarray(count, jnp.float32)

        def emit() -> tuple[optax.Updates, AccumulateState]:
            denom = jnp.where(total > 0, total, 1.0)
            mean = jax.tree.map(lambda acc, g: (acc / denom.astype(acc.dtype)).astype(g.dtype), grad_sum, updates)
            out, inner_state = inner.update(mean, state.inner_state, params)
            out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
            return out, AccumulateState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, grad_sum),
                                        jnp.zeros([], jnp.float32), inner_state)

        def hold() -> tuple[optax.Updates, AccumulateState]:
            return (jax.tree.map(jnp.zeros_like, updates),
                    AccumulateState(state.mini_step + 1, grad_sum, total, state.inner_state))

        return jax.lax.cond(state.mini_step + 1 >= every_k, emit, hold)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) on trainable params (the norm over them only), zero updates on
    frozen ones; when accumulating (accum_steps > 1) wrapped in `accumulate_by_count`, whose `update` then
    needs `count=` (the state carries the partial gradient sum and count, so a resumed run continues
    exactly)."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:  # clip inside the trainable branch: frozen params' gradients must not shrink updates
        adamw = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    if cfg.trainable is None:
        tx = adamw
    else:
        tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels(cfg.trainable))
    if cfg.accum_steps > 1:
        tx = accumulate_by_count(tx, cfg.accum_steps)
    return tx
