"""Device meshes and the logical-axis rule table that maps parameter/activation names onto them.

Every parameter names its axes (`embed`, `q_heads`, `kv_heads`, `mlp`, `vocab`, `norm`); a rule table maps each
name to mesh axes ('data', 'fsdp', 'tensor'). The same model code then runs on one CPU, 8 simulated devices, a
GPU or a TPU pod slice; only the mesh shape changes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "cache_seq": None,
    "head_dim": None,
    "seq": None,
    "head_out": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes; -1 in one place takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh dimension may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        if math.prod(shape) > len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                             f"{len(devices)} available")
        devices = devices[: math.prod(shape)]
    grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, target: Any) -> int:
    if target is None:
        return 1
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] | None = None
) -> PartitionSpec:
    """PartitionSpec for one array. A dimension the mesh axes do not divide (odd vocab sizes) is replicated,
    and a mesh axis is used at most once per array."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is not None:
            names = tuple(n for n in (target if isinstance(target, tuple) else (target,))
                          if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
            target = names if names else None
            if target is not None and dim % _axis_size(mesh, target):
                target = None
        if target is not None:
            used.update(target)
            target = target[0] if len(target) == 1 else target
        spec.append(target)
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str, Any] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _leaf_axes(var: Any) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names")


def variable_sharding(var: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """NamedSharding of one Variable from its logical axis names (replicated when it has none, or when it holds
    no array, like optax's MaskedNode in the optimizer state of a frozen parameter)."""
    axes = _leaf_axes(var)
    if axes is None or (isinstance(var, nnx.Variable) and not hasattr(var.get_raw_value(), "shape")):
        return NamedSharding(mesh, PartitionSpec())
    return named_sharding(axes, var.shape, mesh, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> nnx.State:
    """A pytree of NamedShardings matching `state` (abstract or concrete), from each Variable's axis names."""

    return jax.tree.map(lambda var: variable_sharding(var, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> nnx.Module:
    """Place every parameter of `model` onto `mesh` according to its logical axes (in place; returns model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    sharded = jax.tree.map(
        lambda var, sh: var.replace(jax.device_put(var[...], sh)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(model, sharded)
    return model


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Shard dimension 0 over the batch axes, replicate the rest."""
    target = (rules or DEFAULT_RULES)["batch"]
    names = tuple(n for n in (target if isinstance(target, tuple) else (target,)) if mesh.shape.get(n, 1) > 1)
    first = None if not names else (names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> int:
    """How many ways the batch dimension is split; batch sizes are padded to a multiple of this."""
    target = (rules or DEFAULT_RULES)["batch"]
    return _axis_size(mesh, tuple(n for n in target if n in mesh.shape))


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when the environment describes a multi-process job.

    Cloud TPU pod slices (TPU_WORKER_HOSTNAMES with several hosts) auto-detect everything; elsewhere
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID select the process.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return True
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    logging.debug("single-process run: jax.distributed not initialised")
    return False
