"""The same jitted forward on 8 simulated CPU devices, sharded several ways, gives the single-device logits;
the logical-axis rules never produce an invalid PartitionSpec."""

from __future__ import annotations

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
    assert tokens.addressable_shards[0].data.shape[0] == BATCH // parallel.batch_divisor(mesh)
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
