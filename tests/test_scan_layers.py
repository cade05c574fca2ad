"""Scanned (stacked) decoder layers against the unrolled ones and against transformers.

Same weights in both layouts must give the same logits, gradients (every remat mode), KV-cache decoding and
sampled trees; the scanned model must match transformers' Qwen2 as the unrolled one does; checkpoints must
not see the layout (HF exports byte-identical, Orbax saves restore into either layout).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, make_hf_qwen2

from edu_prm_jax import parallel
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import ConfigError, Qwen2Config, default_scan_layers
from edu_prm_jax.models.prm import PRM
from edu_prm_jax.models.qwen2 import KVCache, Qwen2, is_stacked, set_scan_layers, stack_layers, unstack_layers

CONFIGS = [
    dict(tied=False, heads=4, kv_heads=4, rope_theta=10000.0, vocab=103),
    dict(tied=True, heads=4, kv_heads=2, rope_theta=1_000_000.0, vocab=151),
    dict(tied=False, heads=7, kv_heads=1, hidden=56, rope_theta=1_000_000.0, vocab=97),
]


@pytest.mark.parametrize("spec", CONFIGS, ids=["mha-untied", "gqa2-tied", "gqa7"])
def test_scanned_logits_match_transformers(tmp_path, spec):
    hf = make_hf_qwen2(tmp_path, layers=3, **spec)
    tokens = np.random.default_rng(0).integers(0, spec["vocab"], size=(2, 17))
    model = checkpoints.load_hf_model(tmp_path, scan_layers=True)
    assert model.stacked and model.cfg.scan_layers
    q = model.layers.attn.q_proj.kernel
    assert q.shape == (3, spec.get("hidden", 32), spec["heads"] * spec.get("hidden", 32) // spec["heads"])
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def _pair(tmp_path, **spec):
    make_hf_qwen2(tmp_path, layers=3, **spec)
    return checkpoints.load_hf_model(tmp_path, scan_layers=False), checkpoints.load_hf_model(tmp_path, scan_layers=True)


def _packed(vocab, rows=2, t=16, seed=1):
    rng = np.random.default_rng(seed)
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])[:rows, :t]
    pos = np.array([list(range(6)) + list(range(7)) + [0] * 3, list(range(16))])[:rows, :t]
    return jnp.asarray(rng.integers(0, vocab, (rows, t))), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_same_weights_same_logits_and_gradients(tmp_path, remat):
    unrolled, scanned = _pair(tmp_path, heads=4, kv_heads=2, vocab=101)
    tokens, pos, seg = _packed(101)
    for m in (unrolled, scanned):
        m.cfg = m.cfg.replace(remat=remat)
    np.testing.assert_allclose(np.asarray(scanned(tokens, pos, segment_ids=seg)),
                               np.asarray(unrolled(tokens, pos, segment_ids=seg)), atol=1e-5, rtol=0)

    def nll(model):  # next-token NLL inside the segments
        logp = jax.nn.log_softmax(model(tokens, pos, segment_ids=seg))[:, :-1]
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return -jnp.sum(picked * ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)))

    grads = [checkpoints.layer_view(jax.jit(nnx.grad(nll))(m)) for m in (unrolled, scanned)]
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 3 * 12 + 3  # 12 tensors per layer + embed/norm/head
    for name, (var, layer) in grads[0].items():
        other, index = grads[1][name]
        assert layer is None and (index is not None) == (name.startswith("layers."))
        a = np.asarray(var[...])
        b = np.asarray(other[...] if index is None else other[...][index])
        scale = max(float(np.abs(a).max()), 1e-3)
        np.testing.assert_allclose(b, a, atol=2e-5 * scale, rtol=0, err_msg=name)


def test_remat_in_the_scan_saves_activation_memory(tmp_path):
    """Full remat inside the scanned body must cut the compiled step's temporaries (the property a remat placed
    around the whole scan, or dropped, would break)."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, scan_layers=True)
    tokens = jnp.zeros((8, 128), jnp.int32)
    temps = {}
    for remat in ("none", "full"):
        graphdef, state = nnx.split(Qwen2(cfg.replace(remat=remat), nnx.Rngs(0)))

        def loss(s, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)

        temps[remat] = jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes
    assert temps["full"] < 0.6 * temps["none"], temps


@pytest.mark.parametrize("layout", ["heads_first", "positions_first"])
def test_kv_cache_decoding_equals_full_forward_and_the_unrolled_cache(tmp_path, layout):
    unrolled, scanned = _pair(tmp_path, heads=4, kv_heads=2, vocab=103, tied=True)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 103, size=(3, 12)))
    full = scanned(tokens)
    caches, outs = {}, {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        cache = KVCache.zeros(model.cfg.replace(cache_layout=layout), batch=3, length=16)
        assert cache.stacked == model.stacked
        prefill, cache = model(tokens[:, :5], cache=cache)  # fresh prefill
        steps = [prefill]
        for t in range(5, 12):
            logits, cache = model(tokens[:, t:t + 1], cache=cache, write_index=jnp.full(3, t, jnp.int32))
            steps.append(logits)
        outs[name], caches[name] = np.concatenate(steps, 1), cache
    np.testing.assert_allclose(outs["scanned"], full, atol=1e-5)
    np.testing.assert_allclose(outs["scanned"], outs["unrolled"], atol=1e-5)
    if layout == "heads_first":
        assert caches["scanned"].k.shape == (3, 3, 2, 8, 16)  # [layers, batch, kv heads, head_dim, positions]
        assert caches["scanned"].v.shape == (3, 3, 2, 16, 8)  # [layers, batch, kv heads, positions, head_dim]
    else:
        assert caches["scanned"].k.shape == caches["scanned"].v.shape == (3, 3, 16, 2, 8)  # [L, B, S, K, D]
    for i in range(3):
        np.testing.assert_allclose(np.asarray(caches["scanned"].k[i]), np.asarray(caches["unrolled"].k[i]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(caches["scanned"].v[i]), np.asarray(caches["unrolled"].v[i]), atol=1e-5)
    rows = jnp.asarray([2, 0, 0])
    np.testing.assert_array_equal(np.asarray(caches["scanned"].gather_rows(rows).k[1]),
                                  np.asarray(caches["scanned"].k[1][rows]))
    with pytest.raises(ValueError, match="layout"):
        scanned(tokens[:, :1], cache=KVCache.zeros(unrolled.cfg, 3, 16), write_index=jnp.zeros(3, jnp.int32))


def test_a_decode_step_writes_the_stacked_cache_in_place():
    """A jitted decode loop over a donated cache needs no temporary the size of the cache in either layout (a
    copy of the stacked cache per step, e.g. from a layout change around the scan, would show here), and at most
    one layer's keys and values: the scanned step reads its layer's slice of the stacked cache into one; the
    unrolled one attends over each layer's buffer in place (before the [B, K, D, S] / [B, K, S, D] cache
    layouts, it copied each layer's cache into a transposed layout for the attention matmuls)."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    temps = {}
    for scan in (False, True):
        graphdef, state = nnx.split(Qwen2(cfg.replace(scan_layers=scan), nnx.Rngs(0)))
        cache = KVCache.zeros(cfg.replace(scan_layers=scan), 8, 4096)
        size = sum(x.nbytes for x in jax.tree.leaves(cache))

        def steps(state, cache, graphdef=graphdef):
            def body(i, c):
                _, c = nnx.merge(graphdef, state)(jnp.zeros((8, 1), jnp.int32), cache=c,
                                                  write_index=jnp.full((8,), i, jnp.int32))
                return c
            return jax.lax.fori_loop(0, 3, body, cache)

        compiled = jax.jit(steps, donate_argnums=1).lower(state, cache).compile()
        temps[scan] = compiled.memory_analysis().temp_size_in_bytes
    # both layouts are measured before either is judged, so that a failure reports the two (keyed by scan_layers)
    one_layer = size / cfg.num_hidden_layers
    assert all(t < 1.1 * one_layer for t in temps.values()), (temps, one_layer)
    assert temps[False] < 0.25 * one_layer, temps


@pytest.mark.parametrize("mode", ["edu", "ht"])
def test_sampled_trees_are_the_same_in_both_layouts(tmp_path, mode):
    """EDU forks copy cache rows inside the loop; P-EDU runs the PRM's own (stacked) cache beside the policy's.
    Both layer layouts, and both cache layouts, give the same trees."""
    import torch

    from edu_prm_jax.sampling.decode import DecodeParams, Tables, decode
    from edu_prm_jax.sampling.stopping import build_stop_tables

    hf = make_hf_qwen2(tmp_path, vocab=48, hidden=32, layers=3, seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)  # entropies from ~0 to ~log V: anchors and forks happen
    hf.save_pretrained(tmp_path, safe_serialization=True)
    unrolled = checkpoints.load_hf_model(tmp_path, scan_layers=False)
    scanned = checkpoints.load_hf_model(tmp_path, scan_layers=True)
    tables = Tables.build(build_stop_tables([f"t{i}" for i in range(48)], 48, [47]), np.zeros(48, bool), 48, 48)
    prompts = np.random.default_rng(6).integers(0, 47, (3, 6)).astype(np.int32)
    p = DecodeParams(mode=mode, num_leaves=4, max_new_tokens=12, tau=0.6, temperature=1.0, prune_below=0.3)
    runs = []
    # both layer layouts with the default cache layout, then the scanned one with the positions-first cache
    for model, layout in ((unrolled, "heads_first"), (scanned, "heads_first"), (scanned, "positions_first")):
        model.cfg = model.cfg.replace(cache_layout=layout)
        prm = PRM.from_policy(model, head="scalar", seed=0)
        assert prm.backbone.stacked == model.stacked and prm.backbone.cfg.cache_layout == layout
        runs.append(decode(p, model, tables, prompts, np.array([6, 4, 5]), np.arange(3), prm=prm))
    a = runs[0]
    if mode == "edu":
        assert (a["parent"] >= 0).any()  # forks happened
    for b in runs[1:]:
        for key in a:
            if a[key].dtype.kind == "f":
                np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)
            else:
                np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_hf_export_is_byte_identical_and_reimports_into_either_layout(tmp_path):
    unrolled, scanned = _pair(tmp_path / "src", heads=4, kv_heads=2, vocab=103)
    checkpoints.save_hf_model(unrolled, tmp_path / "a", dtype="float32")
    checkpoints.save_hf_model(scanned, tmp_path / "b", dtype="float32")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    again = checkpoints.load_hf_model(tmp_path / "b", scan_layers=True)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 103, (2, 9)))
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(scanned(tokens)))


def test_missing_or_misshapen_layer_tensor_is_named_for_a_scanned_model(tmp_path):
    from edu_prm_jax.models.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

    make_hf_qwen2(tmp_path, layers=3)
    src = SafetensorsFile(tmp_path / "model.safetensors")
    tensors = {n: np.array(src.array(n)) for n in src.keys()}
    del src
    del tensors["model.layers.2.mlp.up_proj.weight"]
    write_safetensors(tmp_path / "model.safetensors", tensors.items())
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.mlp\.up_proj\.weight"):
        checkpoints.load_hf_model(tmp_path, scan_layers=True)
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 31), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors.items())
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*\(48, 31\)"):
        checkpoints.load_hf_model(tmp_path, scan_layers=True)


@pytest.mark.needs_devices(4)
@pytest.mark.parametrize("saved,restored", [(True, False), (False, True), (True, True)])
def test_orbax_save_restores_into_either_layout(tmp_path, saved, restored):
    unrolled, scanned = _pair(tmp_path / "hf", heads=4, kv_heads=2, vocab=103)
    source = scanned if saved else unrolled
    checkpoints.save_orbax(source, tmp_path / "orbax")
    assert checkpoints.saved_scan_layers(tmp_path / "orbax") == saved
    mesh = parallel.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
    model = checkpoints.load_orbax_model(tmp_path / "orbax", scan_layers=restored, mesh=mesh)
    assert model.stacked == restored and model.cfg.scan_layers == restored
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 103, (2, 9)))
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(source(tokens)), atol=1e-5)
    kernel = model.layers.attn.q_proj.kernel[...] if restored else model.layers[0].attn.q_proj.kernel[...]
    want = ("fsdp", "tensor") if not restored else (None, "fsdp", "tensor")  # the layers axis stays replicated
    assert tuple(kernel.sharding.spec) == want


def test_stacking_round_trip_and_metadata():
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    unrolled = Qwen2(cfg.replace(scan_layers=False), nnx.Rngs(0))
    scanned = Qwen2(cfg.replace(scan_layers=True), nnx.Rngs(0))  # the same seed gives the same weights
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(scanned.layers.mlp.up_proj.kernel[...][i]),
                                      np.asarray(unrolled.layers[i].mlp.up_proj.kernel[...]))
    assert is_stacked(scanned.layers.attn.q_proj.kernel) and not is_stacked(unrolled.layers[0].attn.q_proj.kernel)
    assert scanned.layers.attn.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads")
    back = unstack_layers(stack_layers(list(unrolled.layers)))
    assert back[2].attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "q_heads")
    np.testing.assert_array_equal(np.asarray(back[2].attn.q_proj.bias[...]),
                                  np.asarray(unrolled.layers[2].attn.q_proj.bias[...]))
    abstract = nnx.eval_shape(lambda: Qwen2(cfg.replace(scan_layers=False), nnx.Rngs(0)))
    set_scan_layers(abstract, True)  # shapes only
    assert abstract.layers.mlp.down_proj.kernel.shape == (3, 24, 16) and abstract.cfg.scan_layers
    assert default_scan_layers("tpu") and default_scan_layers("gpu") and not default_scan_layers("cpu")
    # scan_layers=None takes this process's default: unrolled in the plain (CPU) run, scanned on a GPU or TPU
    assert Qwen2(cfg, nnx.Rngs(0)).stacked is default_scan_layers(jax.default_backend())
    assert cfg.for_platform("tpu").scan_layers is True and cfg.for_platform("tpu").attention == "splash"
    with pytest.raises(ConfigError, match="scan_layers"):
        cfg.replace(scan_layers="yes")


def test_block_expansion_from_a_scanned_policy(tmp_path):
    """A PRM grown from a scanned policy equals one grown from the unrolled policy; it is unrolled (its new
    blocks are trained alone by a name regex), and asking for a scanned expanded PRM is an error."""
    unrolled, scanned = _pair(tmp_path, heads=4, kv_heads=2, vocab=103)
    a = PRM.from_policy(unrolled, head="scalar", seed=0, expand_layers=2)
    b = PRM.from_policy(scanned, head="scalar", seed=0, expand_layers=2)
    assert not b.backbone.stacked and b.cfg.num_hidden_layers == 5
    tokens, pos, seg = _packed(103)
    np.testing.assert_allclose(np.asarray(b(tokens, pos, seg)), np.asarray(a(tokens, pos, seg)), atol=1e-5)
    assert not np.any(np.asarray(b.backbone.layers[4].attn.o_proj.kernel[...]))
    same = PRM.from_policy(scanned, head="scalar", seed=0)
    assert same.backbone.stacked
    assert same.backbone.layers.attn.q_proj.kernel[...] is scanned.layers.attn.q_proj.kernel[...]  # shared
    with pytest.raises(ConfigError, match="expanded"):
        PRM(scanned.cfg.replace(num_hidden_layers=5, scan_layers=True), "scalar", rngs=nnx.Rngs(0),
            expanded_layers=2)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the [plan] extra)")
def test_a_fork_gathers_the_stacked_cache_without_a_second_copy_on_tpu():
    """An EDU fork copies parent rows into slots (`KVCache.gather_rows`). Compiled for a TPU (v5p, one chip) with
    the cache donated, gathering the stacked cache layer by layer needs a small fraction of the cache in
    temporaries; `k[:, rows]` in one go needed a whole second copy (1.06x), which a 7B decode at N = 64 cannot
    spare. Rows of another count (prefill to slots) still give the gathered rows."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from edu_prm_jax.planning import devices, hardware

    cfg = Qwen2Config(vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=128, scan_layers=True, dtype="bfloat16")
    chip = devices.target_devices(hardware.get_target("v5p-8"))[0]
    one = NamedSharding(Mesh(np.array([chip]), ("x",)), PartitionSpec())
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, 16, 1024))
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), cache)
    rows = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=one)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    compiled = jax.jit(lambda c, r: c.gather_rows(r), donate_argnums=0).lower(cache, rows).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * size
    small = KVCache.zeros(cfg.replace(num_hidden_layers=2, hidden_size=32, head_dim=8), 3, 5)
    small = KVCache(jnp.arange(small.k.size, dtype=jnp.float32).reshape(small.k.shape), small.v)
    for pick in ([2, 0, 2], [1, 1, 0, 2, 2, 0]):
        np.testing.assert_array_equal(np.asarray(small.gather_rows(jnp.asarray(pick)).k),
                                      np.asarray(small.k)[:, pick])
