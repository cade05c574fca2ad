"""The same jitted forward on 8 simulated CPU devices, sharded several ways, gives the single-device logits;
the logical-axis rules never produce an invalid PartitionSpec."""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import make_hf_qwen2
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from edu_prm_jax import parallel
from edu_prm_jax.models.checkpoints import flat_params, load_hf_model
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2

decode_module = importlib.import_module("edu_prm_jax.sampling.decode")  # the package re-exports a `decode` function

VOCAB = 103  # odd on purpose: the vocab dimension cannot be split and must fall back to replication
BATCH, SEQ = 8, 16


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_qwen2(d, vocab=VOCAB, hidden=32, heads=4, kv_heads=2, layers=2, inter=48, tied=False)
    return d


def jitted_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, segment_ids):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)

    return lambda tokens, seg: forward(state, tokens, seg)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ))
    seg = np.ones((BATCH, SEQ), np.int32)
    seg[1, 9:] = 0  # right padding in one row, two packed segments in another
    seg[2, 6:] = 2
    return tokens, seg


@pytest.fixture(scope="module")
def single_device_logits(ckpt_dir, batch):
    model = load_hf_model(ckpt_dir)
    assert all(len(v[...].sharding.device_set) == 1 for v in flat_params(nnx.state(model)).values())
    return np.asarray(jitted_forward(model)(jnp.asarray(batch[0]), jnp.asarray(batch[1])))


MESHES = {"fsdp4_tensor2": dict(fsdp=4, tensor=2), "data8": dict(data=8),
          "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
def test_sharded_forward_matches_single_device(ckpt_dir, batch, single_device_logits, mesh_shape):
    mesh = parallel.make_mesh(**mesh_shape)
    assert mesh.devices.size == 8
    model = parallel.shard_model(load_hf_model(ckpt_dir), mesh)
    q = model.layers[0].attn.q_proj.kernel[...]
    want_q = P("fsdp" if mesh.shape["fsdp"] > 1 else None, "tensor" if mesh.shape["tensor"] > 1 else None)
    assert q.sharding.spec == want_q
    tokens = jax.device_put(jnp.asarray(batch[0]), parallel.batch_sharding(mesh, 2))
    seg = jax.device_put(jnp.asarray(batch[1]), parallel.batch_sharding(mesh, 2))
    assert len(tokens.addressable_shards) == 8
    # batch rows split over data x fsdp (the default rules), counted from the mesh shape, not by the code under test
    rows_split = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    assert tokens.addressable_shards[0].data.shape[0] == BATCH // rows_split
    logits = jitted_forward(model)(tokens, seg)
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), single_device_logits, atol=1e-5, rtol=0)


def test_batch_divisor_and_sharding():
    assert parallel.batch_divisor(parallel.make_mesh(data=8)) == 8
    assert parallel.batch_divisor(parallel.make_mesh(fsdp=4, tensor=2)) == 4
    assert parallel.batch_divisor(parallel.make_mesh(data=2, fsdp=2, tensor=2)) == 4
    assert parallel.batch_sharding(parallel.make_mesh(data=2, fsdp=2, tensor=2), 3).spec == \
        P(("data", "fsdp"), None, None)
    assert parallel.batch_sharding(parallel.make_mesh(fsdp=4, tensor=2), 2).spec == P("fsdp", None)


def test_odd_dimension_is_replicated():
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    assert parallel.logical_to_spec(("vocab", "embed"), (103, 32), mesh) == P(None, "fsdp")
    assert parallel.logical_to_spec(("vocab", "embed"), (104, 32), mesh) == P("tensor", "fsdp")
    assert parallel.logical_to_spec(("vocab", "embed"), (104, 30), mesh) == P("tensor", None)  # 30 % 4 != 0
    # an axis of size 1 is dropped rather than named
    data_only = parallel.make_mesh(data=8)
    assert parallel.logical_to_spec(("vocab", "embed"), (104, 32), data_only) == P(None, None)


def test_mesh_axis_never_used_twice():
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    assert parallel.logical_to_spec(("embed", "embed"), (32, 32), mesh) == P("fsdp", None)
    rules = {"a": ("fsdp", "tensor"), "b": "tensor", "c": ("tensor", "fsdp")}
    assert parallel.logical_to_spec(("a", "b"), (64, 64), mesh, rules) == P(("fsdp", "tensor"), None)
    assert parallel.logical_to_spec(("b", "c"), (64, 64), mesh, rules) == P("tensor", "fsdp")


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


@pytest.mark.parametrize("mesh_shape", [dict(fsdp=4, tensor=2), dict(fsdp=2, tensor=4), dict(data=2, fsdp=4),
                                        dict(fsdp=8), dict(tensor=8)], ids=str)
def test_every_parameter_spec_is_valid(ckpt_dir, mesh_shape):
    """Property over the whole model: axes unique per spec, every split divides, and the spec is placeable."""
    mesh = parallel.make_mesh(**mesh_shape)
    cfg = Qwen2Config.from_file(ckpt_dir)
    model = nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0)))
    any_sharded = False
    for path, var in flat_params(nnx.state(model)).items():
        axes = var.get_metadata()["out_sharding"]
        spec = parallel.logical_to_spec(axes, var.shape, mesh)
        used = [a for entry in spec for a in _mesh_axes(entry)]
        assert len(used) == len(set(used)), (path, spec)
        for dim, entry in zip(var.shape, spec):
            assert dim % math.prod(mesh.shape[a] for a in _mesh_axes(entry)) == 0, (path, spec)
        any_sharded |= bool(used)
        jax.device_put(np.zeros(var.shape, np.float32), NamedSharding(mesh, spec))  # raises if invalid
    assert any_sharded


# --------------------------------------------------------------------------------------- the rules object
def test_config_rules_are_the_default_table_and_overrides_change_a_parameter_spec():
    from edu_prm_jax.configs.common import mesh_config

    config = mesh_config()
    assert parallel.rules_from_config(config.rules) == parallel.ShardingRules.default()  # no drift
    assert set(config.rules.keys()) == set(parallel.LOGICAL_AXES)
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    gate = ("embed", "mlp")
    assert parallel.logical_to_spec(gate, (32, 48), mesh) == P("fsdp", "tensor")
    config.rules.embed = ""
    config.rules.mlp = "fsdp,tensor"
    rules = parallel.rules_from_config(config.rules)
    assert rules.spec(gate, (32, 48), mesh) == P(None, ("fsdp", "tensor"))
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = parallel.shard_model(Qwen2(cfg, nnx.Rngs(0)), mesh, rules)
    assert model.layers[0].mlp.gate_proj.kernel[...].sharding.spec == P(None, ("fsdp", "tensor"))
    assert model.layers[0].attn.q_proj.kernel[...].sharding.spec == P(None, "tensor")  # embed now replicated


def test_unknown_axis_names_are_errors_naming_the_field():
    from edu_prm_jax.configs.common import mesh_config

    config = mesh_config()
    config.rules.embed = "fsdb"
    with pytest.raises(ValueError, match=r"mesh\.rules\.embed='fsdb': unknown mesh axis 'fsdb'"):
        parallel.rules_from_config(config.rules)
    config = mesh_config()
    config.rules.embd = "fsdp"  # a logical axis nobody names
    with pytest.raises(ValueError, match=r"mesh\.rules\.embd: no such logical axis"):
        parallel.rules_from_config(config.rules)
    with pytest.raises(ValueError, match="'rolout'"):
        parallel.ShardingRules.default().with_overrides({"rolout": "data"})
    with pytest.raises(ValueError, match="'seq'"):
        parallel.logical_to_spec(("seq",), (4,), parallel.make_mesh(data=8))


def test_rules_are_hashable_and_old_mappings_still_work():
    rules = parallel.ShardingRules.default()
    assert hash(rules) == hash(parallel.ShardingRules.default().with_overrides({}))
    assert rules.with_overrides({"rollout": "fsdp"}) != rules
    assert rules.with_overrides({"rollout": "fsdp"}).mesh_axes("rollout") == ("fsdp",)
    assert parallel.as_rules({"batch": "fsdp"}).mesh_axes("batch") == ("fsdp",)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert parallel.batch_sharding(mesh, 2, rules.with_overrides({"batch": "data"})).spec == P("data", None)
    assert parallel.batch_divisor(mesh, rules.with_overrides({"batch": ""})) == 1


def test_make_mesh_builds_auto_axes_in_device_order():
    mesh = parallel.make_mesh(fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    assert parallel.make_mesh(data=1, fsdp=4).devices.size == 4  # the first 4 devices
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh(data=16)


# ------------------------------------------------------------------------- KV cache and activation layouts
def _trimmed(spec: P) -> tuple:
    """A spec without trailing Nones (jax drops them from the shardings it reports)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _spy_constraints(monkeypatch) -> list:
    """Record (logical axes, trimmed spec after propagation) of every `parallel.constrain` while tracing."""
    seen = []
    real = parallel.constrain

    def spy(x, axes):
        y = real(x, axes)
        jax.debug.inspect_array_sharding(y, callback=lambda s, axes=tuple(axes): seen.append((axes, _trimmed(s.spec))))
        return y

    monkeypatch.setattr(parallel, "constrain", spy)
    return seen


def test_kv_cache_and_activations_follow_the_rules(monkeypatch):
    from edu_prm_jax.models.qwen2 import ACTIVATION_AXES, K_CACHE_AXES, V_CACHE_AXES, KVCache

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    mesh = parallel.make_mesh(data=4, tensor=2)
    rules = parallel.ShardingRules.default().with_overrides({"act_embed": "tensor"})
    model = parallel.shard_model(Qwen2(cfg, nnx.Rngs(0)), mesh, rules)
    graphdef, state = nnx.split(model)
    seen = _spy_constraints(monkeypatch)

    @jax.jit
    def prefill(state, tokens):
        with parallel.sharding_context(mesh, rules):
            cache = KVCache.zeros(cfg, tokens.shape[0], 16)
            _, cache = nnx.merge(graphdef, state).backbone(tokens, cache=cache,
                                                           write_index=jnp.zeros((tokens.shape[0],), jnp.int32))
            return cache

    cache = prefill(state, jnp.ones((8, 4), jnp.int32))
    # keys [batch, kv_heads, head_dim, seq], values [batch, kv_heads, seq, head_dim]: cache_batch on data,
    # kv_heads on tensor
    assert _trimmed(cache.k[0].sharding.spec) == ("data", "tensor")
    assert _trimmed(cache.v[0].sharding.spec) == ("data", "tensor")
    cache_specs = {spec for axes, spec in seen if axes in (K_CACHE_AXES, V_CACHE_AXES)}
    act_specs = [spec for axes, spec in seen if axes == ACTIVATION_AXES]
    assert cache_specs == {("data", "tensor")}
    assert act_specs == [("data", None, "tensor")] * (cfg.num_hidden_layers + 1)  # embedding + every block

    # inside a shard_map manual over the rollout axis ('data'), only the other axes are named
    seen.clear()

    def local(tokens):
        with parallel.sharding_context(mesh, rules):
            return KVCache.zeros(cfg, tokens.shape[0], 16).k[0].sum(axis=(1, 2, 3)) + tokens[:, 0]

    jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"},
                          check_vma=False))(jnp.ones((8, 4), jnp.float32))
    assert {spec for axes, spec in seen if axes in (K_CACHE_AXES, V_CACHE_AXES)} == {(None, "tensor")}


def test_constraints_are_no_ops_outside_a_context_and_on_one_device():
    x = jnp.ones((4, 3, 8))
    assert parallel.constrain(x, ("act_batch", "act_seq", "act_embed")) is x
    with parallel.sharding_context(parallel.make_mesh(devices=jax.devices()[:1])):
        assert parallel.constrain(x, ("act_batch", "act_seq", "act_embed")) is x
    with parallel.sharding_context(None):
        assert parallel.constrain(x, ("act_batch", "act_seq", "act_embed")) is x


def test_trainer_places_batches_by_its_rules(tmp_path):
    from edu_prm_jax.training.lm import lm_loss
    from edu_prm_jax.training.loop import TrainConfig, Trainer
    from edu_prm_jax.training.optim import OptimConfig

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    rules = parallel.ShardingRules.default().with_overrides({"batch": "data"})
    trainer = Trainer(Qwen2(cfg, nnx.Rngs(0)), lm_loss, OptimConfig(learning_rate=1e-3, total_steps=1),
                      TrainConfig(steps=1, progress=False, tensorboard=False, async_checkpointing=False), tmp_path,
                      mesh=parallel.make_mesh(data=2, fsdp=2, tensor=2), rules=rules)
    batch = trainer.shard_batch({"tokens": np.zeros((2, 8), np.int32)})  # 2 rows: divisible by data alone
    assert batch["tokens"].sharding.spec == P("data", None)
    trainer.close()


# --------------------------------------------------------------------------------- rollouts under the rules
ROLLOUT_VOCAB = 48


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A tiny Qwen2 (2 KV heads, so tensor=2 splits them) whose entropies range from near 0 to near log V."""
    import torch

    d = tmp_path_factory.mktemp("peaked")
    hf = make_hf_qwen2(d, vocab=ROLLOUT_VOCAB, hidden=32, kv_heads=2, layers=2, seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)
    hf.save_pretrained(d, safe_serialization=True)
    return load_hf_model(d)


def _rollout_args(model, mode):
    from edu_prm_jax.sampling.decode import DecodeParams, Tables
    from edu_prm_jax.sampling.stopping import build_stop_tables

    stop = build_stop_tables([f"t{i}" for i in range(ROLLOUT_VOCAB)], ROLLOUT_VOCAB, [ROLLOUT_VOCAB - 1])
    tables = Tables.build(stop, np.zeros(ROLLOUT_VOCAB, bool), ROLLOUT_VOCAB, ROLLOUT_VOCAB)
    prompts = np.random.default_rng(6).integers(0, ROLLOUT_VOCAB - 1, (8, 6)).astype(np.int32)
    p = DecodeParams(mode=mode, num_leaves=4, max_new_tokens=10, tau=0.6, temperature=1.0)
    return p, model, tables, prompts, np.full(8, 6), np.arange(8)


def _assert_same_rollouts(single, sharded):
    for key in single:
        if single[key].dtype.kind == "f":  # rows per device change float reduction order slightly
            np.testing.assert_allclose(single[key], sharded[key], atol=1e-5, err_msg=key)
        else:  # tokens, tree structure and stop reasons must be identical
            np.testing.assert_array_equal(single[key], sharded[key], err_msg=key)


@pytest.mark.parametrize("mode", ["edu", "ht"])
def test_rollout_axis_mapped_to_fsdp_matches_one_device(peaked_model, mode, monkeypatch):
    args = _rollout_args(peaked_model, mode)
    single = decode_module.decode(*args)
    mesh = parallel.make_mesh(data=1, fsdp=4)
    rules = parallel.ShardingRules.default().with_overrides({"rollout": "fsdp", "cache_batch": "fsdp"})
    traced = []  # (question rows, manual mesh axes) each traced rollout loop sees
    loop = decode_module._decode_loop
    monkeypatch.setattr(decode_module, "_decode_loop", lambda *a: traced.append(
        (a[4].shape[0], jax.sharding.get_abstract_mesh().manual_axes)) or loop(*a))
    decode_module._sharded_decode.cache_clear()
    sharded = decode_module.decode(*args, mesh=mesh, rules=rules)
    assert traced == [(2, ("fsdp",))]  # 8 questions over fsdp=4, manual over fsdp only
    _assert_same_rollouts(single, sharded)


def test_rollouts_with_a_tensor_parallel_cache_match_one_device(peaked_model, monkeypatch):
    from edu_prm_jax.models.qwen2 import K_CACHE_AXES, V_CACHE_AXES

    args = _rollout_args(peaked_model, "edu")
    single = decode_module.decode(*args)
    seen = _spy_constraints(monkeypatch)
    decode_module._sharded_decode.cache_clear()  # trace again, so the constraints are seen
    sharded = decode_module.decode(*args, mesh=parallel.make_mesh(data=4, tensor=2))
    cache_specs = {spec for axes, spec in seen if axes in (K_CACHE_AXES, V_CACHE_AXES)}
    assert cache_specs == {(None, "tensor")}  # rows are manual ('data'); heads over 'tensor'
    _assert_same_rollouts(single, sharded)
