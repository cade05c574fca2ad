"""Flax NNX Qwen2/Qwen2.5 decoder with an explicit, preallocated KV cache.

Attention takes explicit positions and a boolean mask, so packed training rows (segment ids), right-padded
prompt batches and branched tree decoding (each slot its own cache row) all run through this one model.
Parameters carry logical axis names (`out_sharding` metadata) that `parallel.ShardingRules` maps onto a device
mesh; so do the KV cache (`CACHE_AXES`) and the residual stream between decoder layers (`ACTIVATION_AXES`), which
are pinned to their layout inside a `parallel.sharding_context` (the Trainer's step, the decode loop).
Kernels are stored [in, out]; the HF mapping (transposes included) lives in `checkpoints.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models.config import Qwen2Config

NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN

CACHE_AXES = ("cache_batch", "cache_seq", "kv_heads", "head_dim")  # logical axes of each layer's K and V arrays
ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed")  # logical axes of the residual stream [B, T, H]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, init: str) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axis names."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, cfg: Qwen2Config,
                 rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, cfg.params_dtype, "normal")
        self.bias = nnx.data(_param(rngs, (d_out,), axes[1:], cfg.params_dtype, "zeros") if bias else None)
        self.compute_dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (transformers' order of operations)."""

    def __init__(self, dim: int, eps: float, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("norm",), cfg.params_dtype, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE as in transformers' Qwen2 (frequencies in float32). x: [B, T, heads, D]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
    return (x32 * cos + half * sin).astype(x.dtype)


@dataclasses.dataclass
class KVCache:
    """Keys and values, one [batch, cache_len, kv_heads, head_dim] array per layer.

    Per-layer arrays (not one stacked [layers, ...] array) let each layer update its own buffer in place inside
    a loop; slicing and re-stacking a stacked cache costs a full copy per step. Every cache this class builds is
    pinned to the `CACHE_AXES` layout of the active sharding rules (a no-op outside a sharding context)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, length: int, dtype: Any = None) -> KVCache:
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))).constrained()

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def gather_rows(self, rows: jax.Array) -> KVCache:
        """Cache rows `rows` (a fork copies its parent's row into a new slot this way)."""
        return KVCache(tuple(k[rows] for k in self.k), tuple(v[rows] for v in self.v)).constrained()

    def constrained(self) -> KVCache:
        """This cache pinned to the active sharding rules' `CACHE_AXES` layout (`parallel.constrain`)."""
        return KVCache(tuple(parallel.constrain(k, CACHE_AXES) for k in self.k),
                       tuple(parallel.constrain(v, CACHE_AXES) for v in self.v))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache[b, start[b]:start[b]+T] = new[b] for each row b. cache [B, S, H, D], new [B, T, H, D]."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(
        cache, new, start
    )


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(h, cfg.num_attention_heads * d, ("embed", "q_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.k_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.v_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.o_proj = Dense(cfg.num_attention_heads * d, h, ("q_heads", "embed"), bias=False, cfg=cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x, positions, mask, layer_cache, write_index):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = rotary(q, positions, cfg.rope_theta)
        k = rotary(k, positions, cfg.rope_theta)
        if layer_cache is not None:
            ck, cv = layer_cache
            k = _write_rows(ck, k, write_index)
            v = _write_rows(cv, v, write_index)
            layer_cache = (k, v)
        s = k.shape[1]
        qg = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32)
        scores = scores * (cfg.head_dim ** -0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.compute_dtype))
        out = out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim)
        del s
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Dense(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Dense(m, h, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, layer_cache, write_index):
        dtype = x.dtype
        attn_out, layer_cache = self.attn(self.input_norm(x).astype(dtype), positions, mask, layer_cache,
                                          write_index)
        x = x + attn_out.astype(dtype)
        x = x + self.mlp(self.post_attn_norm(x).astype(dtype)).astype(dtype)
        return x, layer_cache


def causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] mask: causal, within one segment, never onto padding (segment id 0)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, None, :] != 0)


def cache_mask(write_index: jax.Array, num_new: int, cache_len: int) -> jax.Array:
    """[B, T, S] mask for T new tokens written at cache index write_index[b]: each sees the slots up to itself.

    Slots past a row's frontier may hold stale keys (right padding, a forked parent's tail); they are never
    visible because a query only sees cache indices <= its own.
    """
    query_index = write_index[:, None] + jnp.arange(num_new)[None, :]
    return jnp.arange(cache_len)[None, None, :] <= query_index[:, :, None]


def _layer_without_cache(layer: DecoderLayer, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    return layer(x, positions, mask, None, None)[0]


def _remat_layer(mode: str):
    """`full` keeps only each layer's input (least memory, one extra forward); `dots` also keeps matmul outputs
    without a batch dimension (less recompute, more memory)."""
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if mode == "dots" else None
    return nnx.remat(_layer_without_cache, policy=policy)


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `backbone` gives final hidden states; `logits` the LM head in float32."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.params_dtype,
                            "normal")
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings else _param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.params_dtype, "normal"))

    def backbone(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states [B, T, H] (float32) after the final norm, and the updated cache.

        Without a cache: `segment_ids` (0 = padding) give packed/causal masking, positions default to
        0..T-1. With a cache: the T tokens are written at `write_index[b]` and attend to the cache.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if cache is not None:
            if write_index is None:
                raise ValueError("write_index is required with a cache")
            if positions is None:
                positions = write_index[:, None] + jnp.arange(t)[None, :]
            if mask is None:
                mask = cache_mask(write_index, t, cache.length)
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
            if mask is None:
                mask = causal_mask(segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32))
        # the residual stream is pinned to ACTIVATION_AXES at every block boundary (inside a sharding context)
        x = parallel.constrain(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype), ACTIVATION_AXES)
        new_k, new_v = [], []
        remat = cache is None and cfg.remat != "none"
        for i, layer in enumerate(self.layers):
            if remat:  # training: recompute the layer's activations in the backward pass instead of storing them
                x = parallel.constrain(_remat_layer(cfg.remat)(layer, x, positions, mask), ACTIVATION_AXES)
                continue
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x, layer_cache = layer(x, positions, mask, layer_cache, write_index)
            x = parallel.constrain(x, ACTIVATION_AXES)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        hidden = self.final_norm(x)
        new_cache = KVCache(tuple(new_k), tuple(new_v)).constrained() if cache is not None else None
        return hidden, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head in the compute dtype, returned as float32 (entropy and logprobs are computed from it)."""
        dtype = self.cfg.compute_dtype
        h = hidden.astype(dtype)
        if self.lm_head is None:
            out = jnp.einsum("bth,vh->btv", h, self.embed[...].astype(dtype))
        else:
            out = jnp.dot(h, self.lm_head[...].astype(dtype))
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, **kw: Any):
        """Logits [B, T, V] float32 (and the cache when one is passed)."""
        hidden, cache = self.backbone(tokens, positions, **kw)
        logits = self.logits(hidden)
        return (logits, cache) if kw.get("cache") is not None else logits
