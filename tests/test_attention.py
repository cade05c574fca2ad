"""The attention kernels (`models/attention.py`) against a numpy float64 formula, and the model with each kernel
against the model with the XLA reference.

The splash kernel runs here in Pallas interpret mode (the same kernel code, executed by XLA:CPU); cuDNN cannot
run on a CPU, so its call (`jax.nn.dot_product_attention` with our masks) is checked with implementation="xla",
and its compilation for a GPU target is checked when JAX's CUDA plugin is installed (the `[plan-cuda]` extra),
as the splash kernel's for a TPU target when libtpu is (`[plan]`).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models import attention
from edu_prm_jax.models.config import Qwen2Config, default_attention
from edu_prm_jax.models.qwen2 import KVCache, Qwen2, causal_mask


def _np_attention(q, k, v, seg):
    """float64 softmax(q k^T / sqrt(D)) v over keys s <= t of the query's own segment (id > 0); query head h
    reads key head h // (N / K). q [B, T, N, D], k, v [B, T, K, D], seg [B, T]. Rows of padding (seg 0) -> NaN."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_n, t_n, n, d = q.shape
    group = n // k.shape[2]
    out = np.full(q.shape, np.nan)
    for b in range(b_n):
        for t in range(t_n):
            if seg[b, t] == 0:
                continue
            keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
            for h in range(n):
                z = np.array([q[b, t, h] @ k[b, s, h // group] for s in keys]) / np.sqrt(d)
                p = np.exp(z - z.max())
                p /= p.sum()
                out[b, t, h] = p @ v[b, keys, h // group]
    return out


def _qkv(b, t, n, kh, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
                 for shape in ((b, t, n, d), (b, t, kh, d), (b, t, kh, d)))


# two packed rows: segments of uneven length, padding at the end of the first
def _segments(t):
    seg = np.ones((2, t), np.int32)
    seg[0, t // 3:] = 2
    seg[0, t - t // 5:] = 0
    seg[1, t // 2:] = 2
    seg[1, t // 2 + 3:] = 3
    return seg


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_reference_and_jax_nn_path_equal_numpy_float64(heads, kv_heads):
    t = 11
    q, k, v = _qkv(2, t, heads, kv_heads, 8, seed=heads)
    seg = _segments(t)
    want = _np_attention(q, k, v, seg)
    valid = seg > 0
    dense = attention.dense_attention(q, k, v, causal_mask(jnp.asarray(seg)), jnp.float32)
    np.testing.assert_allclose(np.asarray(dense).reshape(q.shape)[valid], want[valid], atol=2e-6)
    via_nn = attention.cudnn_attention(q, k, v, jnp.asarray(seg), implementation="xla")  # cudnn's call and masks
    np.testing.assert_allclose(np.asarray(via_nn)[valid], want[valid], atol=2e-6)
    assert np.isfinite(np.asarray(via_nn)).all()  # padding sees padding: no fully masked row


@pytest.mark.parametrize("heads,kv_heads,t", [(4, 2, 200), (2, 1, 128)])
def test_splash_interpret_equals_numpy_and_reference_gradients(heads, kv_heads, t):
    """T=200 is padded to 256 inside (keys past the end are hidden by causality); GQA without repeating K/V."""
    q, k, v = _qkv(2, t, heads, kv_heads, 16, seed=t)
    seg = jnp.asarray(_segments(t))
    valid = np.asarray(seg) > 0
    out = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, seg, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[valid], _np_attention(q, k, v, np.asarray(seg))[valid], atol=2e-5)

    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * valid[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).reshape(q.shape) * w)  # only real positions count

    ref = jax.grad(loss(lambda q, k, v: attention.dense_attention(q, k, v, causal_mask(seg), jnp.float32)),
                   argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: attention.splash_attention(q, k, v, seg, interpret=True)),
                           argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, err_msg=f"d{name}")


@pytest.mark.needs_devices(8)
@pytest.mark.parametrize("kernel", ["splash", "jax.nn"])
def test_fused_kernels_blockwise_on_a_mesh_equal_one_device(kernel):
    """Under a sharding context a fused kernel runs per (row, head) block; 2 key/value heads on tensor=4 cannot
    split like the 4 query heads, so they are repeated per query head first. Same numbers as one device. The
    jax.nn call is cuDNN's, run with implementation="xla"."""
    q, k, v = _qkv(4, 128, 4, 2, 16, seed=7)
    seg = jnp.asarray(np.repeat(_segments(128), 2, axis=0))
    if kernel == "splash":
        fn = lambda q, k, v, seg: attention.splash_attention(q, k, v, seg, interpret=True)  # noqa: E731
    else:
        fn = lambda q, k, v, seg: attention.cudnn_attention(q, k, v, seg, implementation="xla")  # noqa: E731
    single = fn(q, k, v, seg)
    for shape in ((2, 1, 4), (2, 2, 2)):
        mesh = parallel.make_mesh(*shape)

        @jax.jit
        def run(q, k, v, seg, mesh=mesh):
            with parallel.sharding_context(mesh):
                return fn(q, k, v, seg)

        np.testing.assert_allclose(np.asarray(run(q, k, v, seg)), np.asarray(single), atol=1e-6, err_msg=str(shape))

    # inside a shard_map manual over 'data' (the decode loop's), the other axes are blocked by a nested one
    mesh = parallel.make_mesh(2, 1, 4)

    def local(q, k, v, seg):
        with parallel.sharding_context(mesh):
            return fn(q, k, v, seg)

    spec = jax.sharding.PartitionSpec("data")
    nested = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, axis_names={"data"},
                                   check_vma=False))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(nested), np.asarray(single), atol=1e-6)


def test_auto_picks_splash_on_tpu_cudnn_on_gpu_in_half_precision_else_xla():
    assert default_attention("tpu", "float32") == "splash"
    assert default_attention("gpu", "bfloat16") == "cudnn" and default_attention("cuda", "float16") == "cudnn"
    assert default_attention("gpu", "float32") == "xla"  # cuDNN flash attention has no float32 kernel
    assert default_attention("cpu", "bfloat16") == "xla"
    # this process's backend (CPU in the plain run; `accelerator.sh` runs this file on a GPU or TPU)
    assert attention.resolve("auto", "bfloat16") == {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "xla")
    assert attention.resolve("splash", "float32") == "splash"
    assert attention.auto_fallback("cudnn", 511, 128, segmented=True) == "xla"  # a mask bias needs an even T
    assert attention.auto_fallback("cudnn", 511, 128, segmented=False) == "cudnn"
    assert attention.auto_fallback("cudnn", 512, 12, segmented=False) == "xla"  # head_dim not a multiple of 8
    assert attention.auto_fallback("splash", 511, 12, segmented=True) == "splash"
    devices = jax.devices()[:2]  # 2 of the CPU run's 8 simulated devices; a one-GPU run has 1
    with parallel.sharding_context(parallel.make_mesh(data=len(devices), devices=devices)):
        assert parallel.active_platform() == devices[0].platform  # "cpu" in the plain run
    assert parallel.active_platform() is None
    with pytest.raises(Exception, match="attention"):
        Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=4, attention="flash")


CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_model_with_splash_equals_model_with_xla(scan):
    """Packed rows: logits at every real position and the gradient of a loss over them agree; the fresh
    prefill through splash fills the same KV cache the reference prefill does."""
    cfg = CFG.replace(scan_layers=scan, remat="full")
    ref, fused = Qwen2(cfg.replace(attention="xla"), nnx.Rngs(0)), Qwen2(cfg.replace(attention="splash"), nnx.Rngs(0))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 40)))
    seg = _segments(40)
    pos = np.zeros_like(seg)
    for b in range(2):
        for s in set(seg[b]) - {0}:
            pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
    seg, pos, valid = jnp.asarray(seg), jnp.asarray(pos), seg > 0
    a = np.asarray(ref(tokens, pos, segment_ids=seg))
    b = np.asarray(fused(tokens, pos, segment_ids=seg))
    np.testing.assert_allclose(b[valid], a[valid], atol=2e-5)

    def loss(m):
        return jnp.sum(jax.nn.log_softmax(m(tokens, pos, segment_ids=seg))[..., 0] * valid)

    ga, gb = jax.tree.leaves(nnx.grad(loss)(ref)), jax.tree.leaves(jax.jit(nnx.grad(loss))(fused))
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * max(1.0, float(jnp.abs(x).max())))

    prompts = tokens[:, :9]
    ca, cb = KVCache.zeros(ref.cfg, 2, 16), KVCache.zeros(fused.cfg, 2, 16)
    la, ca = ref(prompts, cache=ca)
    lb, cb = jax.jit(lambda p, c: fused(p, cache=c))(prompts, cb)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=2e-5)
    for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_decode_with_splash_prefill_gives_the_reference_tokens():
    from edu_prm_jax.sampling.decode import DecodeParams, Tables, decode
    from edu_prm_jax.sampling.stopping import build_stop_tables

    ref, fused = Qwen2(CFG.replace(attention="xla"), nnx.Rngs(1)), Qwen2(CFG.replace(attention="splash"), nnx.Rngs(1))
    for m in (ref, fused):  # a peaked LM head: greedy paths with clear margins
        m.lm_head[...] = m.lm_head[...] * 40.0
    tables = Tables.build(build_stop_tables([f"t{i}" for i in range(64)], 64, [63]), np.zeros(64, bool), 64, 64)
    prompts = np.random.default_rng(4).integers(0, 63, (2, 7)).astype(np.int32)
    p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=6)
    a = decode(p, ref, tables, prompts, np.array([7, 4]), np.arange(2))
    b = decode(p, fused, tables, prompts, np.array([7, 4]), np.arange(2))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


def _tpu_devices():
    if not _installed("libtpu"):
        pytest.skip("libtpu (the [plan] extra) is not installed: the TPU compiler is needed to lower splash")
    import os

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1,
                                        wrap=(False, False, False)).devices


def _compile_grad_step(mesh, cfg, rows: tuple[int, int]):
    """The compiled loss gradient of an abstract `Qwen2(cfg)` (parameters placed by the default rules) on packed
    int32 rows of shape `rows` split over 'data': what the fused-kernel compile tests inspect."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0))))
    shardings = parallel.state_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
                         shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tokens = jax.ShapeDtypeStruct(rows, jnp.int32, sharding=parallel.batch_sharding(mesh, 2))

    def step(state, tokens, seg):
        with parallel.sharding_context(mesh):
            def loss(state):
                return jnp.mean(nnx.merge(graphdef, state)(tokens, segment_ids=seg)[..., 0])
            return jax.grad(loss)(state)

    return jax.jit(step).lower(state, tokens, tokens).compile()


def test_splash_train_step_compiles_for_a_tpu_slice():
    """The scanned model's loss gradient with attention="auto" (splash, picked from the mesh's devices) lowers
    through Mosaic and compiles for a v5e-4 slice on this CPU host; the compiled program holds the kernel."""
    devices = _tpu_devices()
    mesh = parallel.make_mesh(data=2, tensor=2, devices=devices)
    compiled = _compile_grad_step(mesh, CFG.replace(scan_layers=True, dtype="bfloat16", head_dim=128, remat="full"),
                                  rows=(4, 512))
    assert "splash" in compiled.as_text() or "tpu_custom_call" in compiled.as_text()


def test_cudnn_train_step_compiles_for_a_gpu_target():
    if not _installed("jax_plugins.xla_cuda12"):
        pytest.skip("JAX's CUDA plugin (the [plan-cuda] extra) is not installed: the GPU compiler is needed")
    if not _installed("nvidia.cudnn"):  # jax reads cuDNN's version while tracing the cuDNN kernel
        pytest.skip("cuDNN (the nvidia-cudnn-cu12 wheel) is not installed: tracing the cuDNN kernel needs it")
    from jax.experimental import topologies

    from edu_prm_jax.planning.hardware import H100_TARGET_CONFIG

    devices = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                           topology="1x1x2").devices
    mesh = parallel.make_mesh(data=2, devices=devices)
    compiled = _compile_grad_step(mesh, CFG.replace(scan_layers=True, dtype="bfloat16", head_dim=128),
                                  rows=(4, 256))
    assert "cudnn" in compiled.as_text()
