"""Flax NNX Qwen2/Qwen2.5 decoder with an explicit, preallocated KV cache.

Attention takes explicit positions and a boolean mask, so packed training rows (segment ids), right-padded
prompt batches and branched tree decoding (each slot its own cache row) all run through this one model.
Parameters carry logical axis names (`out_sharding` metadata) that `parallel.ShardingRules` maps onto a device
mesh; so do the KV cache (`CACHE_AXES`) and the residual stream between decoder layers (`ACTIVATION_AXES`), which
are pinned to their layout inside a `parallel.sharding_context` (the Trainer's step, the decode loop).
Kernels are stored [in, out]; the HF mapping (transposes included) lives in `checkpoints.py`.

Two layouts of the decoder layers (`Qwen2Config.scan_layers`), one function:
- unrolled: `layers` is a list of `DecoderLayer`s run by a Python loop; the KV cache is one array per layer.
  XLA compiles every layer separately (compile time grows with depth); the CPU default.
- scanned: `layers` is ONE `DecoderLayer` whose parameters carry a leading [num_layers] axis (logical axis
  `LAYERS_AXIS`), run by `jax.lax.scan` with the remat policy inside the scanned body; the KV cache is one
  stacked [num_layers, ...] array per K and V, carried through the scan and written in place at the layer's
  index. Compiled once whatever the depth; the accelerator default.
`stack_layers` / `unstack_layers` / `set_scan_layers` convert between them; checkpoints map both layouts to the
same per-layer names (`checkpoints.layer_view`). Attention kernels: `attention.py` (`Qwen2Config.attention`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models import attention
from edu_prm_jax.models.attention import NEG_INF  # noqa: F401  (re-exported: older callers import it here)
from edu_prm_jax.models.config import Qwen2Config, default_scan_layers

CACHE_AXES = ("cache_batch", "cache_seq", "kv_heads", "head_dim")  # logical axes of each layer's K and V arrays
ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed")  # logical axes of the residual stream [B, T, H]
LAYERS_AXIS = "layers"  # logical axis of the stacked-layers dimension (parameters and KV cache of a scanned model)


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


def scan_layers_of(cfg: Qwen2Config) -> bool:
    """`cfg.scan_layers`, or when None the default of this process's platform (`config.default_scan_layers`)."""
    return default_scan_layers(jax.default_backend()) if cfg.scan_layers is None else cfg.scan_layers


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, in the layout of the model that fills them:

    - unrolled model: `k`, `v` are tuples of one [batch, cache_len, kv_heads, head_dim] array per layer (each
      layer updates its own buffer in place; slicing and re-stacking a stacked cache in a Python loop would
      copy it every step);
    - scanned model: `k`, `v` are single [num_layers, batch, cache_len, kv_heads, head_dim] arrays, carried
      through the layer scan and written in place at the layer's index (`stacked` is True).
    Every cache this class builds is pinned to the `CACHE_AXES` layout (with `LAYERS_AXIS` in front when
    stacked) of the active sharding rules (a no-op outside a sharding context)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, length: int, dtype: Any = None) -> KVCache:
        """An empty cache for a model built from `cfg` (its `scan_layers` decides the layout)."""
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        if scan_layers_of(cfg):
            stacked = (cfg.num_hidden_layers, *shape)
            return cls(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype)).constrained()
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))).constrained()

    @property
    def stacked(self) -> bool:
        """Whether this is a scanned model's cache ([num_layers, ...] arrays)."""
        return not isinstance(self.k, tuple)

    @property
    def length(self) -> int:
        return self.k.shape[2] if self.stacked else self.k[0].shape[1]

    def gather_rows(self, rows: jax.Array) -> KVCache:
        """Cache rows `rows` (a fork copies its parent's row into a new slot this way).

        A stacked cache is gathered one layer at a time, written back in place: `k[:, rows]` in one go makes
        the TPU compiler hold a second copy of the whole cache (measured on a compile for v5p: 1.06x the cache
        in temporaries, vs 0.08x layer by layer), which is what a 7B EDU decode at N = 64 cannot spare."""
        if self.stacked:
            def take(cache: jax.Array) -> jax.Array:
                if rows.shape[0] != cache.shape[1]:  # a new row count (prefill rows to slots): a new buffer anyway
                    return cache[:, rows]

                def one(layer: jax.Array, c: jax.Array) -> jax.Array:
                    picked = jnp.take(jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False), rows, axis=0)
                    return jax.lax.dynamic_update_index_in_dim(c, picked, layer, 0)
                return jax.lax.fori_loop(0, cache.shape[0], one, cache)
            return KVCache(take(self.k), take(self.v)).constrained()
        return KVCache(tuple(k[rows] for k in self.k), tuple(v[rows] for v in self.v)).constrained()

    def constrained(self) -> KVCache:
        """This cache pinned to the active sharding rules' `CACHE_AXES` layout (`parallel.constrain`)."""
        if self.stacked:
            axes = (LAYERS_AXIS, *CACHE_AXES)
            return KVCache(parallel.constrain(self.k, axes), parallel.constrain(self.v, axes))
        return KVCache(tuple(parallel.constrain(k, CACHE_AXES) for k in self.k),
                       tuple(parallel.constrain(v, CACHE_AXES) for v in self.v))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache[b, start[b]:start[b]+T] = new[b] for each row b. cache [B, S, H, D], new [B, T, H, D]."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(
        cache, new, start
    )


def _write_layer_rows(cache: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache[layer, b, start[b]:start[b]+T] = new[b] for each row b. cache [L, B, S, H, D], new [B, T, H, D].

    One scatter with explicit (layer, row, position) indices, in place in the scan's carry (a vmapped
    `dynamic_update_slice` over the rows, axis 1 here, makes XLA:CPU pick a row-major layout for the loop's
    cache and copy the whole of it in and out). Starts are clamped to [0, S - T], as `dynamic_update_slice`
    clamps them in `_write_rows`, so both layouts write the same slots."""
    b, t = new.shape[:2]
    start = jnp.clip(start, 0, cache.shape[2] - t)
    cols = start[:, None] + jnp.arange(t)[None, :]
    return cache.at[layer, jnp.arange(b)[:, None], cols].set(new.astype(cache.dtype), mode="promise_in_bounds")


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(h, cfg.num_attention_heads * d, ("embed", "q_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.k_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.v_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.o_proj = Dense(cfg.num_attention_heads * d, h, ("q_heads", "embed"), bias=False, cfg=cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x, positions, mask, layer_cache, write_index, *, impl: str = "xla",
                 segment_ids: jax.Array | None = None, layer_index: jax.Array | None = None, fresh: bool = False):
        """x [B, T, H] -> ([B, T, H], the layer's updated cache or None).

        `impl` "xla" attends through `mask` [B, T, S] (over the cache when there is one); a fused kernel
        attends causally within `segment_ids` over the T new tokens (training and scoring, or a `fresh`
        prefill, whose cache held nothing before). `layer_cache` is (k, v) of this layer ([B, S, K, D]), or of
        all layers ([L, B, S, K, D]) with this layer's `layer_index` (scanned model)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = rotary(q, positions, cfg.rope_theta)
        k = rotary(k, positions, cfg.rope_theta)
        keys, values = k, v
        if layer_cache is not None:
            ck, cv = layer_cache
            if layer_index is None:
                keys, values = _write_rows(ck, k, write_index), _write_rows(cv, v, write_index)
                layer_cache = (keys, values)
            else:  # read back only this layer's slice of the stacked cache
                ck = _write_layer_rows(ck, layer_index, k, write_index)
                cv = _write_layer_rows(cv, layer_index, v, write_index)
                layer_cache = (ck, cv)
                keys = jax.lax.dynamic_index_in_dim(ck, layer_index, 0, keepdims=False)
                values = jax.lax.dynamic_index_in_dim(cv, layer_index, 0, keepdims=False)
        if impl == "xla" or (layer_cache is not None and not fresh):
            out = attention.dense_attention(q, keys, values, mask, cfg.compute_dtype)
        else:  # training, scoring or a fresh prefill: the new tokens attend to each other only
            out = attention.fused_attention(impl, q, k, v, segment_ids)
            out = out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim).astype(cfg.compute_dtype)
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

    def __call__(self, x, positions, mask, layer_cache, write_index, **attn_kw: Any):
        """x [B, T, H] -> (x after this block, the updated cache); `attn_kw` as `Attention.__call__` takes them."""
        dtype = x.dtype
        attn_out, layer_cache = self.attn(self.input_norm(x).astype(dtype), positions, mask, layer_cache,
                                          write_index, **attn_kw)
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


def remat_policy(mode: str) -> Any:
    """`full` keeps only each layer's input (least memory, one extra forward); `dots` also keeps matmul outputs
    without a batch dimension (less recompute, more memory)."""
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if mode == "dots" else None


def _remat_layer(mode: str, impl: str):
    """A layer call without a cache, `(layer, x, positions, mask, segment_ids) -> x`, under `nnx.remat`."""
    def layer_without_cache(layer: DecoderLayer, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                            segment_ids: jax.Array | None) -> jax.Array:
        return layer(x, positions, mask, None, None, impl=impl, segment_ids=segment_ids)[0]

    return nnx.remat(layer_without_cache, policy=remat_policy(mode))


# ------------------------------------------------------------------------------------ stacked layers
def is_stacked(var: Any) -> bool:
    """Whether a Variable is a scanned model's stacked parameter (its first logical axis is `LAYERS_AXIS`)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("out_sharding") or ()
    return len(axes) > 0 and axes[0] == LAYERS_AXIS


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def stack_layers(layers: Sequence[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose every parameter is the [len(layers), ...] stack of `layers`' (logical axes
    `LAYERS_AXIS` + the layer's own). Values are copied (jnp.stack); abstract (ShapeDtypeStruct) values stay
    abstract."""
    if not layers:
        raise ValueError("stack_layers: no layers")
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata()["out_sharding"]
        values = [v.get_raw_value() for v in variables]
        if isinstance(values[0], jax.ShapeDtypeStruct):  # an abstract model: shapes only
            value = jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
        else:
            value = jnp.stack(values)
        return variables[0].replace(value, out_sharding=(LAYERS_AXIS, *axes))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_var))


def unstack_layers(stacked: DecoderLayer) -> list[DecoderLayer]:
    """The inverse of `stack_layers`: one DecoderLayer per index of the stacked axis (values sliced)."""
    graphdef, state = nnx.split(stacked)
    leaves = jax.tree.leaves(state, is_leaf=_is_var)
    if not leaves or not all(is_stacked(v) for v in leaves):
        raise ValueError("unstack_layers: not a stacked layer (parameters lack the leading 'layers' axis)")
    count = leaves[0].shape[0]

    def one(v: nnx.Variable, i: int) -> nnx.Variable:
        value = v.get_raw_value()
        if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model: shapes only
            value = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        else:
            value = value[i]
        return v.replace(value, out_sharding=tuple(v.get_metadata()["out_sharding"][1:]))

    def layer(i: int) -> DecoderLayer:
        return nnx.merge(graphdef, jax.tree.map(lambda v: one(v, i), state, is_leaf=_is_var))

    return [layer(i) for i in range(count)]


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `backbone` gives final hidden states; `logits` the LM head in float32.

    `cfg.scan_layers` (None: this platform's default, `scan_layers_of`) fixes the layers' layout when the model
    is built; `cfg` is kept as given, `stacked` tells the layout."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.params_dtype,
                            "normal")
        # built one by one in both layouts, so a seed gives the same weights whatever the layout
        layers = [DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)]
        self.layers = stack_layers(layers) if scan_layers_of(cfg) else nnx.List(layers)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings else _param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.params_dtype, "normal"))

    @property
    def stacked(self) -> bool:
        """Whether the layers are stacked and scanned (the layout, read from the module itself)."""
        return isinstance(self.layers, DecoderLayer)

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

        Without a cache: `segment_ids` [B, T] (0 = padding) give packed/causal masking, positions default to
        0..T-1. With a cache: the T tokens are written at `write_index[b]` [B] int32 and attend to the cache;
        `write_index=None` means a fresh prefill (written from slot 0 of an empty cache), which a fused
        attention kernel (`cfg.attention`) runs over the T tokens alone. Decode steps (a `write_index`) and an
        explicit `mask` [B, T, S] bool always attend through the XLA reference. Raises ValueError for a cache
        of the other layer layout.
        """
        cfg = self.cfg
        b, t = tokens.shape
        impl = attention.resolve(cfg.attention, cfg.dtype)
        if cfg.attention == "auto":
            impl = attention.auto_fallback(impl, t, cfg.head_dim, segment_ids is not None and cache is None)
        fresh = False
        if cache is not None:
            if cache.stacked != self.stacked:
                raise ValueError(f"KV cache layout ({'stacked' if cache.stacked else 'per-layer'}) does not match "
                                 f"the model's layers ({'scanned' if self.stacked else 'unrolled'}); build it "
                                 "with KVCache.zeros(model.cfg, ...)")
            if write_index is None:
                fresh, write_index = True, jnp.zeros((b,), jnp.int32)
            if positions is None:
                positions = write_index[:, None] + jnp.arange(t)[None, :]
            if mask is not None or not fresh:
                impl = "xla"
            if impl == "xla" and mask is None:
                mask = cache_mask(write_index, t, cache.length)
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
            if mask is not None:
                impl = "xla"
            if impl == "xla" and mask is None:
                mask = causal_mask(segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32))
        fused_segments = None if impl == "xla" else segment_ids
        # the residual stream is pinned to ACTIVATION_AXES at every block boundary (inside a sharding context)
        x = parallel.constrain(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype), ACTIVATION_AXES)
        if self.stacked:
            x, new_cache = self._scan_layers(x, positions, mask, cache, write_index,
                                             dict(impl=impl, segment_ids=fused_segments, fresh=fresh))
            return self.final_norm(x), new_cache
        new_k, new_v = [], []
        remat = cache is None and cfg.remat != "none"
        for i, layer in enumerate(self.layers):
            if remat:  # training: recompute the layer's activations in the backward pass instead of storing them
                x = parallel.constrain(_remat_layer(cfg.remat, impl)(layer, x, positions, mask, fused_segments),
                                       ACTIVATION_AXES)
                continue
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x, layer_cache = layer(x, positions, mask, layer_cache, write_index, impl=impl,
                                   segment_ids=fused_segments, fresh=fresh)
            x = parallel.constrain(x, ACTIVATION_AXES)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        hidden = self.final_norm(x)
        new_cache = KVCache(tuple(new_k), tuple(new_v)).constrained() if cache is not None else None
        return hidden, new_cache

    def _scan_layers(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None, cache: KVCache | None,
                     write_index: jax.Array | None, attn_kw: dict[str, Any]) -> tuple[jax.Array, KVCache | None]:
        """The stacked layers by `jax.lax.scan`: the residual stream (and the stacked cache, written in place at
        each layer's index) is the carry, the layer parameters and indices the scanned inputs. Without a cache,
        `cfg.remat` applies to the scanned body, i.e. per layer."""
        cfg = self.cfg
        graphdef, params = nnx.split(self.layers)

        def body(carry: Any, xs: tuple[nnx.State, jax.Array]) -> tuple[Any, None]:
            layer_state, index = xs
            layer = nnx.merge(graphdef, layer_state)
            if cache is None:
                out, _ = layer(carry, positions, mask, None, None, **attn_kw)
                return parallel.constrain(out, ACTIVATION_AXES), None
            h, ck, cv = carry
            h, (ck, cv) = layer(h, positions, mask, (ck, cv), write_index, layer_index=index, **attn_kw)
            return (parallel.constrain(h, ACTIVATION_AXES), ck, cv), None

        if cache is None and cfg.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=False)
        carry = x if cache is None else (x, cache.k, cache.v)
        carry, _ = jax.lax.scan(body, carry, (params, jnp.arange(cfg.num_hidden_layers)))
        if cache is None:
            return carry, None
        x, k, v = carry
        return x, KVCache(k, v).constrained()

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


def qwen2_modules(model: nnx.Module) -> list[Qwen2]:
    """Every Qwen2 in `model` (the model itself, a PRM's backbone, ...)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Qwen2)]


def scan_layers_in(model: nnx.Module) -> bool:
    """Whether `model`'s Qwen2 layers are stacked (False when it holds no Qwen2)."""
    return any(m.stacked for m in qwen2_modules(model))


def set_scan_layers(model: nnx.Module, scan: bool) -> nnx.Module:
    """Convert every Qwen2 in `model` to the stacked (`scan=True`) or unrolled layout, in place, recording it in
    its `cfg.scan_layers`; returns `model`. Parameter values are copied (stacked or sliced) where they lie:
    re-place them with `parallel.shard_model` on a mesh. An `nnx.eval_shape`-built model stays abstract."""
    for module in qwen2_modules(model):
        if module.stacked != scan:
            module.layers = stack_layers(list(module.layers)) if scan else nnx.List(unstack_layers(module.layers))
        module.cfg = module.cfg.replace(scan_layers=scan)
    return model
