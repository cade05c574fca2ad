"""Attention kernels behind one choice (`Qwen2Config.attention`): the XLA reference, cuDNN flash attention and
Pallas splash attention.

- "xla": einsum, mask, float32 softmax, einsum. `dense_attention` (the reference; explicit masks) materialises
  [B, heads, T, S] float32 scores (`cache_attention`: the same over a KV cache, read in place).
  `causal_attention` (training and scoring: causal self-attention within packed segments, no mask array)
  computes the same function by causal query blocks, with a hand-written backward pass: block i of T / n
  queries scores only the keys up to its last query, so (n + 1) / 2n of the score work and memory remain
  (62.5% at n = 4), with q scaled before the dot, the mask as an additive float32 bias (no select in the
  backward pass) and heads moved in front of positions once ([B, kv heads, group, T, D]), so every score and
  value matmul is a plain batched row-major one (XLA:CPU hands those to its fast YNNPACK path; the
  reference's layout made it transpose and copy the scores several times per layer; the backward pass
  transposes the [.., D]-sized operands, never the score-sized ones). Exact at every real token; a padding
  query (segment 0, which sees no key) averages the values of its block's keys instead of all keys, an
  output never read. Both are exact and fine on a CPU, the memory of a whole step on an accelerator at 2-8K
  tokens.
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
CAUSAL_BLOCKS = 4  # query blocks of `causal_attention` (work and score memory (n + 1) / 2n of the dense form)
MIN_CAUSAL_BLOCK = 32  # fewer, larger blocks below this many queries per block (their overhead would dominate)


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


def causal_blocks(length: int) -> list[tuple[int, int]]:
    """The query blocks [(start, end), ...] `causal_attention` splits `length` positions into: `CAUSAL_BLOCKS`
    near-equal blocks, fewer when a block would hold under `MIN_CAUSAL_BLOCK` queries (one for short rows)."""
    count = max(1, min(CAUSAL_BLOCKS, length // MIN_CAUSAL_BLOCK))
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _block_bias(segment_ids: jax.Array | None, start: int, end: int) -> jax.Array:
    """Additive float32 mask of queries start..end-1 over keys 0..end-1: 0 where `qwen2.causal_mask` lets a
    query see a key (key <= query, same segment, key not padding), NEG_INF elsewhere. [B or 1, end-start, end]."""
    causal = jnp.arange(end)[None, None, :] <= jnp.arange(start, end)[None, :, None]
    if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, start:end], segment_ids[:, :end]
        causal = causal & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k != 0)[:, None, :]
    return jnp.where(causal, 0.0, NEG_INF).astype(jnp.float32)


def _core_fwd(qh: jax.Array, keys: jax.Array, values: jax.Array, segment_ids: jax.Array | None
              ) -> tuple[jax.Array, tuple[Any, ...]]:
    """Forward of `_causal_core`: per query block, float32 scores (+ the mask bias), softmax, weighted values.
    Residuals: the inputs and each block's float32 probabilities (what autodiff of this code would keep)."""
    outs, probs_of_blocks = [], []
    for start, end in causal_blocks(qh.shape[3]):
        scores = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, start:end], keys[:, :, :end],
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + _block_bias(segment_ids, start, end)[:, None, None], axis=-1)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(values.dtype), values[:, :, :end]))
        probs_of_blocks.append(probs)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out, (qh, keys, values, tuple(probs_of_blocks))


def _core_bwd(residuals: tuple[Any, ...], dout: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    """Backward of `_causal_core`, the chain rule of `_core_fwd` (softmax: dS = P * (dP - rowsum(dP * P)), as
    `jax.nn.softmax`'s) with every matmul in the form XLA:CPU's fast path takes: the key and value gradients
    are formed transposed (dK^T = Q^T dS, dV^T = dO^T P: the [.., D] operands are copied transposed, not the
    [.., T, S] score-sized ones), summed over blocks in that layout and transposed once at the end."""
    qh, keys, values, probs_of_blocks = residuals
    t, d = qh.shape[3], qh.shape[4]
    f32 = jnp.float32
    dq_blocks = []
    dkt = jnp.zeros((*keys.shape[:2], d, t), f32)  # [B, K, D, T]
    dvt = jnp.zeros((*values.shape[:2], d, t), f32)
    for (start, end), probs in zip(causal_blocks(t), probs_of_blocks):
        dout_b = dout[:, :, :, start:end]
        dprobs = jnp.einsum("bkgtd,bksd->bkgts", dout_b, values[:, :, :end], preferred_element_type=f32)
        dscores = (probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))).astype(qh.dtype)
        dq_blocks.append(jnp.einsum("bkgts,bksd->bkgtd", dscores, keys[:, :, :end], preferred_element_type=f32))
        pad = ((0, 0), (0, 0), (0, 0), (0, t - end))
        dkt = dkt + jnp.pad(jnp.einsum("bkgtd,bkgts->bkds", qh[:, :, :, start:end], dscores,
                                       preferred_element_type=f32), pad)
        dvt = dvt + jnp.pad(jnp.einsum("bkgtd,bkgts->bkds", dout_b, probs.astype(values.dtype),
                                       preferred_element_type=f32), pad)
    dq = dq_blocks[0] if len(dq_blocks) == 1 else jnp.concatenate(dq_blocks, axis=3)
    # the barrier keeps XLA from folding these transposes back into the matmuls (onto the score-sized operand)
    dkt, dvt = jax.lax.optimization_barrier((dkt, dvt))
    return (dq.astype(qh.dtype), jnp.swapaxes(dkt, 2, 3).astype(keys.dtype),
            jnp.swapaxes(dvt, 2, 3).astype(values.dtype), None)


@jax.custom_vjp
def _causal_core(qh: jax.Array, keys: jax.Array, values: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Blocked causal attention in head-major layout: qh [B, K, G, T, D] (already scaled), keys and values
    [B, K, T, D], segment_ids [B, T] or None -> [B, K, G, T, D] in values' dtype. Differentiable in qh, keys
    and values (`_core_bwd`)."""
    return _core_fwd(qh, keys, values, segment_ids)[0]


_causal_core.defvjp(_core_fwd, _core_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     compute_dtype: Any) -> jax.Array:
    """Causal self-attention of T tokens within packed segments: `dense_attention(q, k, v,
    qwen2.causal_mask(segment_ids), compute_dtype)` computed by causal query blocks (module docstring).

    q [B, T, N, D], k and v [B, T, K, D] (N a multiple of K, grouped as in `dense_attention`), `segment_ids`
    [B, T] int (0 = padding, never attended to; None = one segment per row) -> [B, T, N * D] in
    `compute_dtype`. Scores and softmax are float32, as in the reference. Equal to the reference at every
    query that sees a key (float32 rounding apart: q is scaled by 1/sqrt(D) before the dot, not the scores
    after it); a padding query's output (it sees none) differs and is never read. Its gradient is the
    reference's, written out (`_core_bwd`)."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    scaled = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    qh = scaled.reshape(b, t, kh, n // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    keys = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, K, T, D]
    values = v.astype(compute_dtype).transpose(0, 2, 1, 3)
    out = _causal_core(qh, keys, values, segment_ids)  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * d).astype(compute_dtype)


def cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
                    compute_dtype: Any) -> jax.Array:
    """`dense_attention` of T new queries over a KV cache in the cache's own layout, read in place.

    q [B, T, N, D]; k_cache [B, K, D, S] and v_cache [B, K, S, D] (`qwen2.K_CACHE_AXES` / `V_CACHE_AXES`; N a
    multiple of K, query head h uses key head h // (N / K), as transformers' repeat_kv); mask [B, T, S] bool
    (True = attend) -> [B, T, N * D] in `compute_dtype`. The T x N / K queries of a key head form the rows of one
    batched matmul against its [D, S] keys, then its [S, D] values: both plain row-major, so no copy of the
    cache (the [B, S, K, D] layout cost a transposed copy of every layer's cache per decode step). q is scaled
    by 1/sqrt(D) before the dot (float32 rounding apart, the reference's scores); scores and softmax float32."""
    b, t, n, d = q.shape
    kh = k_cache.shape[1]
    g = n // kh
    scaled = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    rows = scaled.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, d)  # row = (t, g)
    scores = jnp.einsum("bkqd,bkds->bkqs", rows, k_cache.astype(rows.dtype), preferred_element_type=jnp.float32)
    visible = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, g, mask.shape[-1])).reshape(b, 1, t * g, -1)
    scores = jnp.where(visible, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache.astype(compute_dtype))  # [B, K, T * G, D]
    return out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, n * d).astype(compute_dtype)


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
