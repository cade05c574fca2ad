"""Attention kernels behind one choice (`Qwen2Config.attention`): the XLA reference, cuDNN flash attention and
Pallas splash attention.

- "xla" (`dense_attention`): einsum, mask, float32 softmax, einsum. It materialises [B, heads, T, S] float32
  scores: exact and fine on a CPU, the memory of a whole step on an accelerator at 2-8K tokens. The reference.
- "cudnn" (`cudnn_attention`): `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention
  on NVIDIA GPUs (bfloat16/float16 only). Causal masking is the kernel's own; packed rows pass their segment
  mask as a boolean [B, 1, T, T] mask, which jax turns into an additive bias in the compute dtype (the public
  API has no segment ids; still 2 x heads times smaller than the reference's float32 scores).
- "splash" (`splash_attention`): `jax.experimental.pallas.ops.tpu.splash_attention` (TPU). A causal block-sparse
  mask plus segment ids for packed rows, so no mask or score array exists at all; grouped-query attention is
  native (each key/value head serves its group of query heads). Off TPU it runs in Pallas interpret mode (slow;
  how the tests on a CPU check it).
Under a sharding context both fused kernels run per device block of rows and heads (`_per_device`,
`parallel.blockwise`): the partitioner cannot split a Mosaic call, and cuDNN's partitioning rule fails inside
the decode loop's partly manual `shard_map`.

Masking semantics of the fused kernels (`fused_attention`): causal within a segment, where a segment is a run
of equal `segment_ids` (0 = padding, a segment of its own). Real tokens see exactly what the reference lets them
see; padding tokens see each other instead of nothing (the reference gives a fully masked row a uniform
softmax), so outputs at padding positions differ and are never read (losses and scores skip padding). A fully
masked row is what makes flash kernels produce NaN, which would then leak through keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from edu_prm_jax import parallel
from edu_prm_jax.models.config import default_attention

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN
# Logical axes of the fused kernels' operands: splash takes [batch, heads, T, head_dim], jax.nn (cuDNN)
# [batch, T, heads, head_dim]; segment ids [batch, T].
SPLASH_Q_AXES = ("act_batch", "q_heads", None, None)
SPLASH_KV_AXES = ("act_batch", "kv_heads", None, None)
BTNH_Q_AXES = ("act_batch", None, "q_heads", None)
BTNH_KV_AXES = ("act_batch", None, "kv_heads", None)
SEGMENT_AXES = ("act_batch", None)
SPLASH_BLOCK = 512  # splash tile (queries and keys); sequences are padded to a multiple of 128 (the lane width)
LANES = 128


def current_platform() -> str:
    """The platform the program being traced is for: the active sharding context's devices (compile-only
    devices of another chip included), else this process's default backend."""
    return parallel.active_platform() or jax.default_backend()


def resolve(setting: str, dtype: str, platform: str | None = None) -> str:
    """The kernel a config's `attention` setting means here: itself, or for "auto" `config.default_attention` of
    `platform` (default `current_platform()`) and the compute `dtype`."""
    if setting == "auto":
        return default_attention(platform or current_platform(), dtype)
    if setting not in IMPLEMENTATIONS:
        raise ValueError(f"attention={setting!r}: expected 'auto' or one of {IMPLEMENTATIONS}")
    return setting


def auto_fallback(impl: str, seq_len: int, head_dim: int, segmented: bool) -> str:
    """For `attention="auto"`: `impl`, or "xla" where the fused kernel refuses the shapes instead of running
    them. cuDNN flash attention needs head_dim a multiple of 8 and <= 128 (256 from Hopper on, which cannot be
    known while compiling elsewhere), and an even length when a mask (packed segments) becomes its bias. An
    explicit kernel choice is never replaced: its error says what does not fit."""
    if impl == "cudnn" and (head_dim % 8 or head_dim > 128 or (segmented and seq_len % 2)):
        return "xla"
    return impl


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, compute_dtype: Any) -> jax.Array:
    """The reference: softmax(q k^T / sqrt(D) masked) v with float32 scores, grouped-query.

    q [B, T, N, D], k and v [B, S, K, D] (N a multiple of K; query head h uses key head h // (N / K), as
    transformers' repeat_kv), mask [B, T, S] bool (True = attend; a fully masked row gives a uniform softmax)
    -> [B, T, N * D] in `compute_dtype`."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(compute_dtype))
    return out.reshape(b, t, n * d)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: query and key in the same segment (padding, id 0, is a segment of its own)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _per_device(fn: Any, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                q_axes: tuple[str | None, ...], kv_axes: tuple[str | None, ...]) -> jax.Array:
    """`fn(q, k, v[, segment_ids])` on each device's block of rows and heads (`parallel.blockwise`; just the
    call outside a sharding context), with the output laid out as q. Key/value heads the rules do not split the
    way they split the query heads (e.g. 4 KV heads on tensor=8) are first repeated to one per query head, so
    that every device holds whole query groups with their key/value head."""
    heads = q_axes.index("q_heads")
    q_spec = parallel.layout_spec(q_axes, q.shape)
    if q_spec is not None and q_spec[heads] != parallel.layout_spec(kv_axes, k.shape)[heads]:
        group = q.shape[heads] // k.shape[heads]
        k, v, kv_axes = jnp.repeat(k, group, axis=heads), jnp.repeat(v, group, axis=heads), q_axes
    args = (q, k, v) + (() if segment_ids is None else (segment_ids,))
    axes = (q_axes, kv_axes, kv_axes) + (() if segment_ids is None else (SEGMENT_AXES,))
    return parallel.blockwise(fn, args, axes, q_axes, q.shape)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                    implementation: str = "cudnn") -> jax.Array:
    """Causal (within segments when `segment_ids` [B, T] int32 is given) grouped-query self-attention through
    `jax.nn.dot_product_attention`. q [B, T, N, D], k and v [B, T, K, D] -> [B, T, N, D].

    `implementation="cudnn"` needs an NVIDIA GPU and bfloat16/float16 (jax raises otherwise);
    `implementation="xla"` runs the same call anywhere (how the CPU tests check the masks). Under a sharding
    context it runs per device block (`_per_device`): cuDNN's own partitioning rule fails inside the decode
    loop's partly manual `shard_map`."""

    def local(qb: jax.Array, kb: jax.Array, vb: jax.Array, *segs: jax.Array) -> jax.Array:
        mask = segment_mask(segs[0]) if segs else None
        return jax.nn.dot_product_attention(qb, kb, vb, mask=mask, is_causal=True, implementation=implementation)

    return _per_device(local, q, k, v, segment_ids, BTNH_Q_AXES, BTNH_KV_AXES)


def _splash_block(length: int) -> int:
    """The largest tile of (SPLASH_BLOCK, 256, 128) dividing `length` (a multiple of 128)."""
    return next(b for b in (SPLASH_BLOCK, 256, LANES) if length % b == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     interpret: bool | None = None) -> jax.Array:
    """Causal (within segments when `segment_ids` [B, T] int32 is given) grouped-query self-attention through
    the Pallas splash kernel. q [B, T, N, D], k and v [B, T, K, D] -> [B, T, N, D] in q's dtype.

    T is padded to a multiple of 128 (padded keys come after every real query, so causality hides them). The
    kernel takes per-head [heads, T, D] blocks and no scale: q is scaled by 1/sqrt(D) first. `interpret`
    (default: off TPU) runs the kernel in Pallas interpret mode. Under a sharding context each device runs its
    rows and heads (`_per_device`): the partitioner cannot split a Mosaic call."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    if interpret is None:
        interpret = current_platform() != "tpu"
    t, d = q.shape[1], q.shape[3]
    padded = -(-t // LANES) * LANES
    block = _splash_block(padded)
    qh = jnp.swapaxes((q.astype(jnp.float32) * d ** -0.5).astype(q.dtype), 1, 2)  # [B, N, T, D]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v.astype(k.dtype), 1, 2)  # [B, K, T, D]
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if padded != t:
        pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
        qh, kh, vh = jnp.pad(qh, pad), jnp.pad(kh, pad), jnp.pad(vh, pad)
        if seg is not None:
            seg = jnp.pad(seg, ((0, 0), (0, padded - t)))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def local(qb: jax.Array, kb: jax.Array, vb: jax.Array, *segs: jax.Array) -> jax.Array:
        heads = qb.shape[1]
        mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded)) for _ in range(heads)])
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        ids = splash.SegmentIds(segs[0], segs[0]) if segs else None
        return jax.vmap(lambda qq, kk, vv, ii: kernel(qq, kk, vv, segment_ids=ii))(qb, kb, vb, ids)

    out = _per_device(local, qh, kh, vh, seg, SPLASH_Q_AXES, SPLASH_KV_AXES)
    return jnp.swapaxes(out[:, :, :t], 1, 2)


def fused_attention(impl: str, q: jax.Array, k: jax.Array, v: jax.Array,
                    segment_ids: jax.Array | None) -> jax.Array:
    """Causal self-attention of a block of T tokens through kernel `impl` ("cudnn" or "splash"), within
    segments when `segment_ids` [B, T] is given. q [B, T, N, D], k and v [B, T, K, D] -> [B, T, N, D]."""
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids)
    raise ValueError(f"fused_attention: {impl!r} is not a fused kernel (expected 'cudnn' or 'splash')")
