"""Next-token language-model objective over packed rows, with a per-token weight mask.

Used to train the toy policy: only the answer (solution + EOS) tokens carry weight, so the model learns
to continue a prompt, not to generate prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def lm_example(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """One example for `pack_examples`: inputs = sequence[:-1], targets = sequence[1:], weight 1 on the
    targets that belong to the answer."""
    seq = np.asarray([*prompt_ids, *answer_ids], np.int32)
    if len(answer_ids) == 0 or len(seq) < 2:
        raise ValueError("lm_example: need a non-empty answer and at least two tokens")
    weights = np.zeros(len(seq) - 1, np.float32)
    weights[len(prompt_ids) - 1:] = 1.0
    return {"tokens": seq[:-1], "targets": seq[1:], "weights": weights}


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, in float32. logits [B, T, V], targets [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def lm_loss(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over weighted tokens of a packed batch (tokens, targets, weights, segment_ids, positions).

    Returns (loss, aux) with aux = token accuracy and `weighted_tokens`, the total weight the loss is the mean
    over (so loss * weighted_tokens is the summed loss: pass count_key="weighted_tokens" to a Trainer that
    accumulates). A batch with no weight gives loss 0.
    """
    logits = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    nll = token_nll(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32) * (batch["segment_ids"] > 0)
    total = w.sum()
    denom = jnp.where(total > 0, total, 1.0)  # exactly the total weight (fractional weights included)
    loss = (nll * w).sum() / denom
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return loss, {"token_accuracy": (correct * w).sum() / denom, "weighted_tokens": total}
