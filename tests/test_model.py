"""The Flax Qwen2 against transformers' Qwen2ForCausalLM (float32, eager attention) on random tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, make_hf_qwen2

from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.qwen2 import KVCache

CONFIGS = [
    dict(tied=False, heads=4, kv_heads=4, rope_theta=10000.0, vocab=103),  # GQA ratio 1
    dict(tied=True, heads=4, kv_heads=2, rope_theta=1_000_000.0, vocab=151),  # ratio 2, tied
    dict(tied=False, heads=7, kv_heads=1, hidden=56, rope_theta=1_000_000.0, vocab=97),  # ratio 7
]


@pytest.mark.parametrize("spec", CONFIGS, ids=["mha-untied", "gqa2-tied", "gqa7"])
def test_logits_match_transformers(tmp_path, spec):
    hf = make_hf_qwen2(tmp_path, **spec)
    tokens = np.random.default_rng(0).integers(0, spec["vocab"], size=(2, 17))
    ref = hf_logits(hf, tokens)
    model = load_hf_model(tmp_path)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_bfloat16_compute_close_in_kl(tmp_path):
    hf = make_hf_qwen2(tmp_path, vocab=211, hidden=64, heads=4, kv_heads=2, inter=96)
    tokens = np.random.default_rng(1).integers(0, 211, size=(2, 24))
    ref = jax.nn.log_softmax(jnp.asarray(hf_logits(hf, tokens)))
    ours = jax.nn.log_softmax(load_hf_model(tmp_path, dtype="bfloat16")(jnp.asarray(tokens)))
    kl = jnp.sum(jnp.exp(ref) * (ref - ours), -1).mean()
    assert float(kl) < 1e-3


@pytest.mark.parametrize("layout", ["heads_first", "positions_first"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, layout):
    """Either cache layout (`Qwen2Config.cache_layout`: the CPU's and the accelerators' default) decodes to the
    full forward's logits."""
    make_hf_qwen2(tmp_path, tied=True)
    model = load_hf_model(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 103, size=(3, 12)))
    full = model(tokens)
    cache = KVCache.zeros(model.cfg.replace(cache_layout=layout), batch=3, length=16)
    kv, d = model.cfg.num_key_value_heads, model.cfg.head_dim
    assert cache.layout == layout and cache.length == 16
    assert cache.k[0].shape == ((3, kv, d, 16) if layout == "heads_first" else (3, 16, kv, d))
    prefill, cache = model(tokens[:, :5], cache=cache, write_index=jnp.zeros(3, jnp.int32))
    steps = [prefill]
    for t in range(5, 12):
        logits, cache = model(tokens[:, t:t + 1], cache=cache, write_index=jnp.full(3, t, jnp.int32))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_packed_segments_do_not_attend_across(tmp_path):
    """Two sequences packed into one row give the same logits as each alone (positions restart)."""
    make_hf_qwen2(tmp_path)
    model = load_hf_model(tmp_path)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 103, 7), rng.integers(0, 103, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None])
    seg = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 2])
    pos = jnp.asarray([list(range(7)) + list(range(5)) + [0, 0]])
    out = np.asarray(model(packed, pos, segment_ids=seg))
    np.testing.assert_allclose(out[0, :7], model(jnp.asarray(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], model(jnp.asarray(b[None]))[0], atol=1e-5)
    assert np.isfinite(out).all()
