"""Flax NNX Qwen2/Qwen2.5 decoder with an explicit, preallocated KV cache.

Attention takes explicit positions and a boolean mask, so packed training rows (segment ids), right-padded
prompt batches and branched tree decoding (each slot its own cache row) all run through this one model.
Parameters carry logical axis names (`out_sharding` metadata) that `parallel.ShardingRules` maps onto a device
mesh; so do the KV cache (`K_CACHE_AXES`, `V_CACHE_AXES`) and the residual stream between decoder layers
(`ACTIVATION_AXES`), which are pinned to their layout inside a `parallel.sharding_context` (the Trainer's step,
the decode loop). Kernels are stored [in, out]; the HF mapping (transposes included) lives in `checkpoints.py`.

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
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models import attention
from edu_prm_jax.models.attention import NEG_INF  # noqa: F401  (re-exported: older callers import it here)
from edu_prm_jax.models.config import Qwen2Config, default_scan_layers

# Logical axes of each layer's cache arrays, in the two layouts (`Qwen2Config.cache_layout`):
# - heads-first (the default): keys [batch, kv_heads, head_dim, positions] and values [batch, kv_heads, positions,
#   head_dim]. Each decode step's two attention matmuls (q K and p V) then read the cache in place as plain
#   row-major batched matmuls; with [batch, positions, kv_heads, head_dim] XLA:CPU copied the whole cache into a
#   transposed layout for the attention einsums at every step (at batch 64 and 1056 cached positions: 61 ms per
#   layer and step, 8.5 ms with this layout).
# - positions-first: keys and values [batch, positions, kv_heads, head_dim], the projections' layout (the layout
#   before 2026-12-01; `Qwen2Config.cache_layout` says why it is kept).
HEADS_FIRST, POSITIONS_FIRST = "heads_first", "positions_first"
K_CACHE_AXES = ("cache_batch", "kv_heads", "head_dim", "cache_seq")  # heads-first keys
V_CACHE_AXES = ("cache_batch", "kv_heads", "cache_seq", "head_dim")  # heads-first values
SEQ_CACHE_AXES = ("cache_batch", "cache_seq", "kv_heads", "head_dim")  # positions-first keys and values
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x: jax.Array, kernel: jax.Array, axes: tuple[str | None, str | None]) -> jax.Array:
    """`jnp.dot(x, kernel)`: x [..., in] @ kernel [in, out] -> [..., out] (x and kernel in one dtype), with the
    backward pass written out so that XLA:CPU runs both of its matmuls on its fast path.

    Gradients (the chain rule of y = x W, e.g. Goodfellow et al., Deep Learning, 6.5.9): dx = dy W^T, and
    dW = sum over every leading (row) position of x_row^T dy_row, one `dot_general` contracting all leading
    dimensions. `jax.grad` of `jnp.dot` computes dW as (dy^T x)^T, which XLA:CPU runs on its generic Eigen
    path after copying dy into a transposed layout (about 2x slower for the 28 kernel gradients of the
    benchmark's step). YNNPACK's matmul (XLA:CPU's fast path) needs its left operand with the contracted rows
    last, so one operand is copied transposed either way; this copies the one with fewer features: x for
    dW = x^T dy, or dy for dW = (dy^T x)^T when dy has under half as many (the MLP's down projection; x is
    preferred at parity because q/k/v and gate/up read the same x and share its copy). An optimization
    barrier keeps XLA from folding that final small transpose back into the matmul. Values equal jax.grad's
    up to float32 summation order. dW is pinned to the kernel's logical `axes` (`parallel.constrain`, a no-op
    outside a sharding context), the layout the parameter and its optimizer state have."""
    return jnp.dot(x, kernel)


def _dense_matmul_fwd(x: jax.Array, kernel: jax.Array, axes: tuple[str | None, str | None]):
    return jnp.dot(x, kernel), (x, kernel)


def _dense_matmul_bwd(axes: tuple[str | None, str | None], residuals: tuple[jax.Array, jax.Array],
                      dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    lead = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    if 2 * dy.shape[-1] < x.shape[-1]:
        dkernel = jax.lax.optimization_barrier(jax.lax.dot_general(dy, x, ((lead, lead), ((), ())))).T
    else:
        dkernel = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))
    return dx.astype(x.dtype), parallel.constrain(dkernel.astype(kernel.dtype), axes)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axis names. The matmul is `dense_matmul` (its
    gradient is jnp.dot's, computed in a layout XLA:CPU runs fast)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, cfg: Qwen2Config,
                 rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, cfg.params_dtype, "normal")
        self.bias = nnx.data(_param(rngs, (d_out,), axes[1:], cfg.params_dtype, "zeros") if bias else None)
        self.compute_dtype = cfg.compute_dtype
        self.axes = tuple(axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense_matmul(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype), self.axes)
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


RotaryTables = tuple[jax.Array, jax.Array]


def plain_rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> RotaryTables:
    """RoPE's (cos, sin), each [B, T, 1, head_dim] float32, for int `positions` [B, T] (transformers' Qwen2:
    inverse frequencies theta^(-2i/d) in float32, each frequency used for both halves). As written: XLA may fuse
    them into their consumers; the model calls `rotary_tables`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> RotaryTables:
    """`plain_rotary_tables`, computed once per model call (`Qwen2.backbone`) and handed to every layer.

    On XLA:CPU they are computed inside a `lax.cond` whose two branches are the same function (so its predicate,
    a position, does not matter): a conditional is a fusion boundary, so the tables are materialised once and
    read by the q and k rotations of every layer, forward and backward. Without it XLA fuses the cos and sin into
    each consumer loop and evaluates them there again (68 cosines in a 4-layer train step instead of 2, ~7% of
    the benchmark's step); an optimisation barrier does not stop that, XLA:CPU removes barriers before fusion.
    Values are identical. Other platforms let XLA choose."""
    def tables(pos: jax.Array) -> RotaryTables:
        return plain_rotary_tables(pos, head_dim, theta)

    if positions.size and attention.current_platform() == "cpu":
        return jax.lax.cond(positions.reshape(-1)[0] == 0, tables, tables, positions)
    return tables(positions)


def rotary(x: jax.Array, tables: RotaryTables) -> jax.Array:
    """Rotate-half RoPE as in transformers' Qwen2: x [B, T, heads, D] by `rotary_tables` (cos, sin), in float32,
    returned in x's dtype."""
    cos, sin = tables
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
    return (x32 * cos + half * sin).astype(x.dtype)


def cache_axes(layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys' logical axes, values' logical axes) of one layer's cache arrays in `layout`."""
    return (K_CACHE_AXES, V_CACHE_AXES) if layout == HEADS_FIRST else (SEQ_CACHE_AXES, SEQ_CACHE_AXES)


def cache_shapes(layout: str, batch: int, kv_heads: int, head_dim: int, length: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(keys' shape, values' shape) of one layer's cache arrays in `layout`."""
    if layout == HEADS_FIRST:
        return (batch, kv_heads, head_dim, length), (batch, kv_heads, length, head_dim)
    return (batch, length, kv_heads, head_dim), (batch, length, kv_heads, head_dim)


def _positions_axis(layout: str, keys: bool) -> int:
    """The positions axis of one layer's [B, ...] keys (`keys`) or values array in `layout`."""
    if layout == HEADS_FIRST:
        return 3 if keys else 2
    return 1


def scan_layers_of(cfg: Qwen2Config) -> bool:
    """`cfg.scan_layers`, or when None the default of this process's platform (`config.default_scan_layers`)."""
    return default_scan_layers(jax.default_backend()) if cfg.scan_layers is None else cfg.scan_layers


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, in the layout of the model that fills them and in `layout`
    (`Qwen2Config.cache_layout`: "heads_first" keys [batch, kv_heads, head_dim, cache_len] and values [batch,
    kv_heads, cache_len, head_dim]; "positions_first" both [batch, cache_len, kv_heads, head_dim]):

    - unrolled model: `k` and `v` are tuples of one such array per layer; each layer updates its own buffer in
      place (slicing and re-stacking a stacked cache in a Python loop would copy it every step);
    - scanned model: `k`, `v` are single arrays with `num_layers` in front, carried through the layer scan and
      written in place at the layer's index (`stacked` is True).
    Every cache this class builds is pinned to its layout's axes (`cache_axes`, with `LAYERS_AXIS` in front when
    stacked) of the active sharding rules (a no-op outside a sharding context)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    layout: str = HEADS_FIRST

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, length: int, dtype: Any = None) -> KVCache:
        """An empty cache for a model built from `cfg` (its `scan_layers` decides stacked or per layer, its
        `cache_layout` the axes)."""
        layout = cfg.cache_layout
        k_shape, v_shape = cache_shapes(layout, batch, cfg.num_key_value_heads, cfg.head_dim, length)
        dtype, layers = dtype or cfg.compute_dtype, cfg.num_hidden_layers
        if scan_layers_of(cfg):
            return cls(jnp.zeros((layers, *k_shape), dtype), jnp.zeros((layers, *v_shape), dtype),
                       layout).constrained()
        return cls(tuple(jnp.zeros(k_shape, dtype) for _ in range(layers)),
                   tuple(jnp.zeros(v_shape, dtype) for _ in range(layers)), layout).constrained()

    @property
    def stacked(self) -> bool:
        """Whether this is a scanned model's cache ([num_layers, ...] arrays)."""
        return not isinstance(self.k, tuple)

    def positions_axis(self, keys: bool) -> int:
        """The positions axis of the keys (`keys`) or values arrays (the layer axis counted when stacked)."""
        return _positions_axis(self.layout, keys) + int(self.stacked)

    @property
    def length(self) -> int:
        """Cached positions per row (the static length every step attends over)."""
        return (self.k if self.stacked else self.k[0]).shape[self.positions_axis(True)]

    def replace(self, k: Any, v: Any) -> KVCache:
        """This cache's layout with other arrays (pinned, `constrained`)."""
        return KVCache(k, v, self.layout).constrained()

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
            return self.replace(take(self.k), take(self.v))
        return self.replace(tuple(k[rows] for k in self.k), tuple(v[rows] for v in self.v))

    def constrained(self) -> KVCache:
        """This cache pinned to the active sharding rules' axes of its layout (`cache_axes`, `parallel.constrain`)."""
        k_axes, v_axes = cache_axes(self.layout)
        if self.stacked:
            return KVCache(parallel.constrain(self.k, (LAYERS_AXIS, *k_axes)),
                           parallel.constrain(self.v, (LAYERS_AXIS, *v_axes)), self.layout)
        return KVCache(tuple(parallel.constrain(k, k_axes) for k in self.k),
                       tuple(parallel.constrain(v, v_axes) for v in self.v), self.layout)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=["layout"])


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array, keys: bool, layout: str) -> jax.Array:
    """Write T new positions of each row b at start[b]: one layer's keys (`keys`) or values cache in `layout`
    (heads-first keys [B, K, D, S] / values [B, K, S, D], or positions-first [B, S, K, D]), new [B, T, K, D] (the
    projections' layout). Starts are clamped to [0, S - T] (`dynamic_update_slice`)."""
    if layout == POSITIONS_FIRST:
        at = lambda s: (s, 0, 0)  # noqa: E731
    elif keys:
        new, at = new.transpose(0, 2, 3, 1), lambda s: (0, 0, s)  # [B, K, D, T]
    else:
        new, at = new.transpose(0, 2, 1, 3), lambda s: (0, s, 0)  # [B, K, T, D]
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), at(s)))(cache, new, start)


def _write_layer_rows(cache: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array, keys: bool,
                      layout: str) -> jax.Array:
    """`_write_rows` into layer `layer` of a stacked cache ([L, ...] in front of `_write_rows`' layouts), new
    [B, T, K, D].

    One scatter with explicit (layer, row, position) indices, in place in the scan's carry (a vmapped
    `dynamic_update_slice` over the rows, axis 1 here, makes XLA:CPU pick a row-major layout for the loop's
    cache and copy the whole of it in and out). Indexed dimensions separated by slices come first in the
    scattered value (numpy's rule), so it is `new` itself, [B, T, K, D], in every layout. Starts are clamped to
    [0, S - T], as `dynamic_update_slice` clamps them in `_write_rows`, so both model layouts write the same
    slots."""
    b, t = new.shape[:2]
    length = cache.shape[_positions_axis(layout, keys) + 1]
    start = jnp.clip(start, 0, length - t)
    rows, cols = jnp.arange(b)[:, None], start[:, None] + jnp.arange(t)[None, :]
    if layout == POSITIONS_FIRST:
        at = cache.at[layer, rows, cols]
    else:
        at = cache.at[layer, rows, :, :, cols] if keys else cache.at[layer, rows, :, cols, :]
    return at.set(new.astype(cache.dtype), mode="promise_in_bounds")


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(h, cfg.num_attention_heads * d, ("embed", "q_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.k_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.v_proj = Dense(h, cfg.num_key_value_heads * d, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.o_proj = Dense(cfg.num_attention_heads * d, h, ("q_heads", "embed"), bias=False, cfg=cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x, rope: RotaryTables, mask, layer_cache, write_index, *, impl: str = "xla",
                 segment_ids: jax.Array | None = None, layer_index: jax.Array | None = None, fresh: bool = False,
                 cache_layout: str = HEADS_FIRST):
        """x [B, T, H] -> ([B, T, H], the layer's updated cache or None).

        A `mask` [B, T, S] over the cache is attended through by `attention.cache_attention` (decode steps, XLA
        prefills; `attention.dense_attention` for a positions-first cache), one over the T new tokens alone by
        the XLA reference (`attention.dense_attention`). Without one the T new tokens attend causally within
        `segment_ids` to each other only (training and scoring, or a `fresh` prefill, whose cache held nothing
        before), through `attention.causal_attention` (`impl` "xla") or a fused kernel. `layer_cache` is (k, v)
        of this layer in `cache_layout` (`KVCache`), or of all layers (`num_layers` in front) with this layer's
        `layer_index` (scanned model)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = rotary(q, rope)
        k = rotary(k, rope)
        keys, values = k, v
        if layer_cache is not None:
            ck, cv = layer_cache
            if layer_index is None:
                keys = _write_rows(ck, k, write_index, True, cache_layout)
                values = _write_rows(cv, v, write_index, False, cache_layout)
                layer_cache = (keys, values)
            else:  # read back only this layer's slice of the stacked cache
                ck = _write_layer_rows(ck, layer_index, k, write_index, True, cache_layout)
                cv = _write_layer_rows(cv, layer_index, v, write_index, False, cache_layout)
                layer_cache = (ck, cv)
                keys = jax.lax.dynamic_index_in_dim(ck, layer_index, 0, keepdims=False)
                values = jax.lax.dynamic_index_in_dim(cv, layer_index, 0, keepdims=False)
        if mask is not None and layer_cache is not None:  # decode steps, XLA prefills: over the cache, in place
            if cache_layout == HEADS_FIRST:
                out = attention.cache_attention(q, keys, values, mask, cfg.compute_dtype)
            else:  # positions-first: the projections' layout, the reference reads it as it is
                out = attention.dense_attention(q, keys, values, mask, cfg.compute_dtype)
        elif mask is not None:  # an explicit mask over the T new tokens: the reference
            out = attention.dense_attention(q, k, v, mask, cfg.compute_dtype)
        elif impl == "xla":  # training and scoring: causal within segments, by query blocks
            out = attention.causal_attention(q, k, v, segment_ids, cfg.compute_dtype)
        else:  # training, scoring or a fresh prefill: the new tokens attend to each other only
            out = attention.fused_attention(impl, q, k, v, segment_ids)
            out = out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim).astype(cfg.compute_dtype)
        return self.o_proj(out), layer_cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up (Qwen2's MLP activation; arrays of one shape and dtype), with a backward pass that
    recomputes the sigmoid from `gate` in one elementwise pass: d/dgate = dy * up * s * (1 + gate * (1 - s)),
    d/dup = dy * silu(gate), s = sigmoid(gate) (the derivative of x * sigmoid(x)). Autodiff of the same
    expression keeps silu(gate) and the sigmoid as extra [.., intermediate] arrays and makes several passes."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    dgate = dy * up * (sig * (1 + gate * (1 - sig)))
    return dgate.astype(gate.dtype), (dy * (gate * sig)).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Dense(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Dense(m, h, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope: RotaryTables, mask, layer_cache, write_index, **attn_kw: Any):
        """x [B, T, H] -> (x after this block, the updated cache); `rope`: the call's `rotary_tables`;
        `attn_kw` as `Attention.__call__` takes them."""
        dtype = x.dtype
        attn_out, layer_cache = self.attn(self.input_norm(x).astype(dtype), rope, mask, layer_cache,
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
    """A layer call without a cache, `(layer, x, rope, mask, segment_ids) -> x`, under `nnx.remat` (the rotary
    tables are an input, so they are kept, not recomputed)."""
    def layer_without_cache(layer: DecoderLayer, x: jax.Array, rope: RotaryTables, mask: jax.Array | None,
                            segment_ids: jax.Array | None) -> jax.Array:
        return layer(x, rope, mask, None, None, impl=impl, segment_ids=segment_ids)[0]

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
        0..T-1; XLA attention then runs by causal query blocks (`attention.causal_attention`). With a cache: the
        T tokens are written at `write_index[b]` [B] int32 and attend to the cache; `write_index=None` means a
        fresh prefill (written from slot 0 of an empty cache), which a fused attention kernel (`cfg.attention`)
        runs over the T tokens alone. Decode steps (a `write_index`), XLA prefills and an explicit `mask`
        [B, T, S] bool always attend through the XLA reference's masked form (`attention.cache_attention` over
        a cache, `attention.dense_attention` without). Raises ValueError for a cache of the other layer layout.
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
        # without a mask, attention is causal within `segment_ids` (`causal_attention` or a fused kernel)
        fused_segments = segment_ids if mask is None else None
        layout = cache.layout if cache is not None else HEADS_FIRST
        rope = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)  # once per call, shared by every layer
        # the residual stream is pinned to ACTIVATION_AXES at every block boundary (inside a sharding context)
        x = parallel.constrain(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype), ACTIVATION_AXES)
        if self.stacked:
            x, new_cache = self._scan_layers(x, rope, mask, cache, write_index,
                                             dict(impl=impl, segment_ids=fused_segments, fresh=fresh,
                                                  cache_layout=layout))
            return self.final_norm(x), new_cache
        new_k, new_v = [], []
        remat = cache is None and cfg.remat != "none"
        for i, layer in enumerate(self.layers):
            if remat:  # training: recompute the layer's activations in the backward pass instead of storing them
                x = parallel.constrain(_remat_layer(cfg.remat, impl)(layer, x, rope, mask, fused_segments),
                                       ACTIVATION_AXES)
                continue
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x, layer_cache = layer(x, rope, mask, layer_cache, write_index, impl=impl,
                                   segment_ids=fused_segments, fresh=fresh, cache_layout=layout)
            x = parallel.constrain(x, ACTIVATION_AXES)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        hidden = self.final_norm(x)
        new_cache = cache.replace(tuple(new_k), tuple(new_v)) if cache is not None else None
        return hidden, new_cache

    def _scan_layers(self, x: jax.Array, rope: RotaryTables, mask: jax.Array | None, cache: KVCache | None,
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
                out, _ = layer(carry, rope, mask, None, None, **attn_kw)
                return parallel.constrain(out, ACTIVATION_AXES), None
            h, ck, cv = carry
            h, (ck, cv) = layer(h, rope, mask, (ck, cv), write_index, layer_index=index, **attn_kw)
            return (parallel.constrain(h, ACTIVATION_AXES), ck, cv), None

        if cache is None and cfg.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=False)
        carry = x if cache is None else (x, cache.k, cache.v)
        carry, _ = jax.lax.scan(body, carry, (params, jnp.arange(cfg.num_hidden_layers)))
        if cache is None:
            return carry, None
        x, k, v = carry
        return x, cache.replace(k, v)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head in the compute dtype, returned as float32 (entropy and logprobs are computed from it)."""
        dtype = self.cfg.compute_dtype
        h = hidden.astype(dtype)
        # `dense_matmul`: its kernel gradient copies the [.., hidden] activations transposed, not the
        # [.., vocab] logit gradients (jax.grad's choice on a CPU, vocab / hidden times more memory traffic)
        if self.lm_head is None:
            out = dense_matmul(h, self.embed[...].astype(dtype).T, ("embed", "vocab"))
        else:
            out = dense_matmul(h, self.lm_head[...].astype(dtype), ("embed", "vocab"))
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
