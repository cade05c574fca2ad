"""Per-token statistics and token choice, computed in-graph in float32 from one step's logits.

Entropy is the temperature-1 entropy of the model's full next-token distribution, natural log:
H = logsumexp(z) - sum_v softmax(z)_v z_v, whatever temperature the sampler uses (METHOD.md "Entropy").
Padded embedding rows beyond the tokenizer's vocabulary are masked out with a finite -1e30, so masked
positions give exact zeros in softmax and never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30


def mask_logits(logits: jax.Array, vocab_mask: jax.Array | None) -> jax.Array:
    z = logits.astype(jnp.float32)
    return z if vocab_mask is None else jnp.where(vocab_mask, z, MASKED)


def entropy_and_logz(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(H, logsumexp) over the last axis of float32 logits z.

    Computed on max-shifted logits: with raw logits of size ~100, logsumexp(z) and E_p[z] cancel
    catastrophically in float32 (and H could come out negative)."""
    peak = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    shifted = z - peak
    log_z_shifted = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    p = jnp.exp(shifted - log_z_shifted[..., None])
    entropy = log_z_shifted - jnp.sum(p * shifted, axis=-1)
    return jnp.maximum(entropy, 0.0), log_z_shifted + peak[..., 0]


def filter_logits(z: jax.Array, temperature: float | jax.Array, top_k: int, top_p: float | jax.Array,
                  nucleus: bool | None = None) -> jax.Array:
    """Logits of the sampling distribution: softmax(z / T) restricted to top-k and the top-p nucleus.

    `temperature` and `top_p` may be traced values; `nucleus` (static) says whether the top-p branch is built,
    by default when a Python `top_p` is below 1."""
    z = z / jnp.maximum(temperature, 1e-6)
    if top_k and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, MASKED)
    if nucleus if nucleus is not None else top_p < 1.0:
        sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_z, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the top token is always kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_z, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= cutoff, z, MASKED)
    return z


def sample_tokens(z: jax.Array, keys: jax.Array, temperature: float | jax.Array, top_k: int,
                  top_p: float | jax.Array, nucleus: bool | None = None) -> jax.Array:
    """One token per row from softmax(filtered z / T); one independent key per row.

    Inverse-CDF sampling with one uniform per row (Gumbel-max would draw one number per vocabulary entry,
    a large share of a step's cost at 150k vocabularies)."""
    filtered = filter_logits(z, temperature, top_k, top_p, nucleus)
    probs = jax.nn.softmax(filtered, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf[:, -1]
    idx = jnp.sum(cdf <= u[:, None], axis=-1)
    # never land on a zero-probability token (float round-off at the top of the cdf)
    idx = jnp.minimum(idx, z.shape[-1] - 1)
    ok = probs[jnp.arange(z.shape[0]), idx] > 0
    return jnp.where(ok, idx, jnp.argmax(filtered, axis=-1)).astype(jnp.int32)


def top_k_small(z: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest logits per row (ties: lowest index), by k argmax passes.

    For the tiny k of EDU branching this beats `lax.top_k`, which lowers to a full vocabulary sort on CPU."""
    out = []
    for _ in range(k):
        i = jnp.argmax(z, axis=-1)
        out.append(i)
        z = z.at[jnp.arange(z.shape[0]), i].set(-jnp.inf)
    return jnp.stack(out, axis=-1).astype(jnp.int32)
