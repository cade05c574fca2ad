"""The training-path kernels written for XLA:CPU's fast paths (issue 19) against independent references.

- `qwen2.dense_matmul` (the dense layer's and LM head's matmul with a hand-written backward pass) and
  `qwen2.swiglu`: gradients against the chain rule evaluated in numpy float64, in both of the kernel-gradient
  forms (x transposed, or dy transposed when dy has under half x's features), float32 and bfloat16; the kernel
  gradient keeps the parameter's layout on a sharded mesh; remat policies still see the matmul.
- `attention.causal_attention` (causal query blocks, custom backward) against a numpy float64 softmax over
  packed segments, including segments that cross block boundaries and lengths the blocks do not divide, and
  its gradients against jax.grad of the reference `dense_attention`, for grouped, multi- and single-KV heads.
- The whole model, unrolled and scanned, remat none/full/dots, float32 and bfloat16: logits and lm_loss
  gradients against the same model with the formulations it had before (plain `jnp.dot`, `silu * up`,
  `dense_attention` over `causal_mask`), whose gradients are jax.grad's own.
- The RoPE tables: one cos and one sin in a compiled train step of any depth, where XLA left to itself fuses
  them into every consumer (the count grows with the layers), and the same logits either way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from test_attention import _np_attention  # the float64 packed-segment reference

from edu_prm_jax import parallel
from edu_prm_jax.models import attention, qwen2
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2, causal_mask, dense_matmul, swiglu
from edu_prm_jax.training.lm import lm_loss


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("d_in,d_out", [(48, 16), (16, 48), (32, 16), (24, 24)])
@pytest.mark.parametrize("lead", [(3, 5), (7,)])
def test_dense_matmul_gradients_equal_the_float64_chain_rule(d_in, d_out, lead):
    """loss = sum(r * sin(x W + b)): dy = r cos(x W + b), dx = dy W^T, dW = sum over rows x^T dy, db = sum dy,
    in numpy float64. (48, 16) takes the dy-transposed form, the others the x-transposed one."""
    rng = np.random.default_rng(d_in * 100 + d_out + len(lead))
    x, w, b, r = (rng.normal(size=s) for s in ((*lead, d_in), (d_in, d_out), (d_out,), (*lead, d_out)))

    def loss(x_, w_, b_):
        return jnp.sum(jnp.asarray(r, jnp.float32) * jnp.sin(dense_matmul(x_, w_, (None, None)) + b_))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(a, jnp.float32) for a in (x, w, b)))
    dy = r * np.cos(x @ w + b)
    rows_x, rows_dy = x.reshape(-1, d_in), dy.reshape(-1, d_out)
    want = (dy @ w.T, rows_x.T @ rows_dy, rows_dy.sum(0))
    for name, g, ref in zip(("dx", "dW", "db"), got, want):
        assert g.shape == ref.shape and g.dtype == jnp.float32, name
        assert _rel_err(g, ref) < 2e-6, name
    np.testing.assert_allclose(np.asarray(loss(*(jnp.asarray(a, jnp.float32) for a in (x, w, b)))),
                               np.sum(r * np.sin(x @ w + b)), rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(64, 16), (16, 64)])
def test_dense_matmul_in_bfloat16_keeps_dtypes_and_the_float64_gradient(d_in, d_out):
    rng = np.random.default_rng(3)
    x, w, r = (rng.normal(size=s) for s in ((4, 8, d_in), (d_in, d_out), (4, 8, d_out)))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def loss(x_, w_):
        return jnp.sum(jnp.asarray(r, jnp.float32) * dense_matmul(x_, w_, (None, None)).astype(jnp.float32))

    dx, dw = jax.grad(loss, argnums=(0, 1))(xb, wb)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    x64, w64 = np.asarray(xb, np.float64), np.asarray(wb, np.float64)  # the rounded inputs
    assert _rel_err(dx, r @ w64.T) < 2e-2
    assert _rel_err(dw, x64.reshape(-1, d_in).T @ r.reshape(-1, d_out)) < 2e-2


def test_swiglu_gradients_equal_the_float64_derivative_of_silu():
    rng = np.random.default_rng(5)
    g, u, r = (rng.normal(size=(3, 7, 11)) * 3 for _ in range(3))

    def loss(g_, u_):
        return jnp.sum(jnp.asarray(r, jnp.float32) * swiglu(g_, u_))

    dg, du = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32))
    s = 1 / (1 + np.exp(-g))
    assert _rel_err(dg, r * u * (s + g * s * (1 - s))) < 2e-6  # d/dg [g s(g)] = s + g s (1 - s)
    assert _rel_err(du, r * g * s) < 2e-6
    np.testing.assert_allclose(np.asarray(swiglu(jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32))),
                               g * s * u, rtol=2e-6, atol=1e-6)


@pytest.mark.needs_devices(8)
@pytest.mark.parametrize("d_in,d_out", [(64, 16), (16, 64)])
def test_dense_kernel_gradient_keeps_the_parameter_layout_on_a_mesh(d_in, d_out):
    """On a data x fsdp x tensor mesh, the kernel gradient comes out laid out as the kernel ('embed', 'mlp')
    and equals the single-device gradient."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    axes = ("embed", "mlp")
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(8, 6, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)

    def loss(w_, x_):
        return jnp.sum(jnp.tanh(dense_matmul(x_, w_, axes)))

    single = jax.grad(loss)(w, x)

    @jax.jit
    def sharded_grad(w_, x_):
        with parallel.sharding_context(mesh):
            return jax.grad(loss)(w_, x_)

    w_sharded = jax.device_put(w, parallel.named_sharding(axes, w.shape, mesh))
    x_sharded = jax.device_put(x, parallel.batch_sharding(mesh, 3))
    got = sharded_grad(w_sharded, x_sharded)
    want_sharding = parallel.named_sharding(axes, w.shape, mesh)
    assert want_sharding.spec != jax.sharding.PartitionSpec()  # the mesh really splits this kernel
    assert got.sharding.is_equivalent_to(want_sharding, 2), got.sharding
    assert _rel_err(got, single) < 1e-5  # partial sums over devices: float32 rounding only


def test_remat_dots_policy_still_saves_the_dense_matmul_outputs(capsys):
    """The `dots` remat policy saves matmul outputs without batch dimensions: the custom-gradient matmul must
    stay visible to it (the same residuals as with jnp.dot), or remat 'dots' silently becomes 'full'."""
    w1, w2, x = jnp.ones((16, 32)), jnp.ones((32, 16)), jnp.ones((4, 8, 16))
    policy = qwen2.remat_policy("dots")

    def with_kernel(w1_, w2_, x_):
        return jnp.sum(dense_matmul(jnp.sin(dense_matmul(x_, w1_, (None, None))), w2_, (None, None)))

    def with_dot(w1_, w2_, x_):
        return jnp.sum(jnp.dot(jnp.sin(jnp.dot(x_, w1_)), w2_))

    def saved(f):  # the shapes of what remat keeps for the backward pass, e.g. "f32[4,8,32]"
        capsys.readouterr()
        print_saved_residuals(jax.checkpoint(f, policy=policy), w1, w2, x)
        return sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())

    assert saved(with_kernel) == saved(with_dot)
    assert "f32[4,8,32]" in saved(with_kernel)  # the first matmul's output is kept


@pytest.mark.parametrize("scan", [False, True])
def test_rotary_tables_are_computed_once_per_train_step(scan, monkeypatch):
    """A 3-layer train step on XLA:CPU evaluates cos once (in each of the conditional's two identical branches:
    the tables `Qwen2.backbone` builds once and hands to every layer), forward and backward. With the tables
    computed plainly, the unrolled model re-evaluates them in every consumer fusion (a scanned one hoists them
    out of the loop either way), with the same loss."""
    import re

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, scan_layers=scan)
    graphdef, state = nnx.split(Qwen2(cfg, nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)

    def loss(st):
        hidden, _ = nnx.merge(graphdef, st).backbone(tokens, segment_ids=jnp.ones_like(tokens))
        return jnp.sum(hidden ** 2)

    def compiled() -> tuple[int, float]:
        step = jax.jit(jax.value_and_grad(loss))
        text = step.lower(state).compile().as_text()
        return len(re.findall(r"\bcosine\(", text)), float(step(state)[0])

    once, loss_once = compiled()
    assert once <= 2

    monkeypatch.setattr(qwen2, "rotary_tables", qwen2.plain_rotary_tables)
    fused, loss_fused = compiled()
    assert fused <= 2 if scan else fused >= 3 * 2 * 2  # unrolled: at least q and k of 3 layers, fwd and bwd
    assert loss_once == pytest.approx(loss_fused, rel=1e-6)


# --------------------------------------------------------------------------------------- attention
def _packed_segments(t: int) -> np.ndarray:
    """Row 0: three segments, the middle one crossing the first two block boundaries, then padding; row 1: a
    segment from the start to past the middle, one short segment, one to the end."""
    seg = np.zeros((2, t), np.int32)
    a, b, c = t // 5, (3 * t) // 5, (4 * t) // 5
    seg[0, :a], seg[0, a:b], seg[0, b:c] = 1, 2, 3
    seg[1, : t // 2 + 3], seg[1, t // 2 + 3: t // 2 + 7], seg[1, t // 2 + 7:] = 4, 5, 6
    return seg


def test_causal_blocks_hand_worked():
    assert attention.causal_blocks(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert attention.causal_blocks(100) == [(0, 33), (33, 67), (67, 100)]  # round(i * 100 / 3)
    assert attention.causal_blocks(40) == [(0, 40)]  # under two blocks of MIN_CAUSAL_BLOCK: one block
    assert attention.causal_blocks(1) == [(0, 1)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("t", [128, 100])
def test_causal_attention_equals_numpy_float64_on_packed_segments(heads, kv_heads, t):
    blocks = attention.causal_blocks(t)
    seg = _packed_segments(t)
    # the middle segment of row 0 spans a block boundary: the test covers keys from an earlier block
    assert any(seg[0, s - 1] == seg[0, s] == 2 for s, _ in blocks[1:])
    rng = np.random.default_rng(heads * 10 + kv_heads + t)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, n, 16)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    out = attention.causal_attention(q, k, v, jnp.asarray(seg), jnp.float32)
    assert out.shape == (2, t, heads * 16) and out.dtype == jnp.float32
    want = _np_attention(q, k, v, seg)
    valid = seg > 0
    np.testing.assert_allclose(np.asarray(out).reshape(want.shape)[valid], want[valid], atol=3e-6)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1)])
@pytest.mark.parametrize("t", [128, 100])
def test_causal_attention_gradients_equal_the_reference(heads, kv_heads, t):
    """jax.grad through the custom backward pass vs jax.grad of `dense_attention` over `causal_mask`, with a
    loss on the real tokens (padding outputs are never read)."""
    seg = jnp.asarray(_packed_segments(t))
    rng = np.random.default_rng(heads + t)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, n, 16)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    r = jnp.asarray(rng.normal(size=(2, t, heads * 16)), jnp.float32) * (seg > 0)[:, :, None]

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(jnp.sin(fn(q_, k_, v_)) * r)

    new = jax.jit(jax.grad(loss(lambda *a: attention.causal_attention(*a, seg, jnp.float32)), argnums=(0, 1, 2)))
    ref = jax.grad(loss(lambda *a: attention.dense_attention(*a, causal_mask(seg), jnp.float32)),
                   argnums=(0, 1, 2))
    for name, a, b in zip("qkv", new(q, k, v), ref(q, k, v)):
        assert a.shape == b.shape, name
        assert _rel_err(a, b) < 1e-5, f"d{name}"


def test_causal_attention_without_segments_is_plain_causal_and_bfloat16_runs():
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 96, n, 8)), jnp.float32) for n in (2, 1, 1))
    out = attention.causal_attention(q, k, v, None, jnp.float32)
    want = _np_attention(q, k, v, np.ones((1, 96), np.int32))
    np.testing.assert_allclose(np.asarray(out).reshape(want.shape), want, atol=3e-6)
    half = attention.causal_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), None, jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32).reshape(want.shape), want, atol=5e-2)


# ------------------------------------------------------------------------------------- whole model
def _reference_formulations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model as it was before the fast kernels: jax.grad's own gradients everywhere."""
    monkeypatch.setattr(qwen2, "dense_matmul", lambda x, kernel, axes: jnp.dot(x, kernel))
    monkeypatch.setattr(qwen2, "swiglu", lambda gate, up: jax.nn.silu(gate) * up)

    def masked(q, k, v, segment_ids, compute_dtype):
        seg = segment_ids if segment_ids is not None else jnp.ones(q.shape[:2], jnp.int32)
        return attention.dense_attention(q, k, v, causal_mask(seg), compute_dtype)

    monkeypatch.setattr(attention, "causal_attention", masked)


def _packed_batch(vocab: int, t: int = 80) -> dict[str, jax.Array]:
    seg = _packed_segments(t)
    positions = np.zeros_like(seg)
    for row in range(seg.shape[0]):
        for s in range(t):
            positions[row, s] = 0 if s == 0 or seg[row, s] != seg[row, s - 1] else positions[row, s - 1] + 1
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, vocab, seg.shape).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
            "weights": jnp.asarray((seg > 0).astype(np.float32)), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(positions)}


@pytest.mark.parametrize("scan,remat,dtype,tied", [
    (False, "none", "float32", True), (True, "none", "float32", False), (False, "full", "float32", False),
    (True, "dots", "float32", True), (False, "none", "bfloat16", False), (True, "full", "bfloat16", True)])
def test_model_logits_and_gradients_equal_the_previous_formulation(monkeypatch, scan, remat, dtype, tied):
    cfg = Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                      scan_layers=scan, remat=remat, param_dtype="float32", dtype=dtype, attention="xla")
    batch = _packed_batch(cfg.vocab_size)
    graphdef, params = nnx.split(Qwen2(cfg, nnx.Rngs(0)))

    def run():
        def loss(p):
            return lm_loss(nnx.merge(graphdef, p), batch)[0]

        logits = jax.jit(lambda p: nnx.merge(graphdef, p)(batch["tokens"], batch["positions"],
                                                          segment_ids=batch["segment_ids"]))(params)
        return logits, jax.jit(jax.value_and_grad(loss))(params)

    logits, (loss, grads) = run()
    with monkeypatch.context() as patch:
        _reference_formulations(patch)
        ref_logits, (ref_loss, ref_grads) = run()
    valid = np.asarray(batch["segment_ids"]) > 0
    tol = 2e-5 if dtype == "float32" else 3e-2
    assert _rel_err(np.asarray(logits)[valid], np.asarray(ref_logits)[valid]) < tol
    assert abs(float(loss) - float(ref_loss)) < tol * abs(float(ref_loss))
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) > 0
    for g, ref in zip(flat, ref_flat):
        assert g.shape == ref.shape and g.dtype == ref.dtype
        assert _rel_err(g, ref) < (1e-4 if dtype == "float32" else 5e-2)
