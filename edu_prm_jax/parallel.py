"""Device meshes, and the one rule table that maps logical axis names onto them.

Parameters, training batches, rollouts, the KV cache and the residual stream between decoder layers each name
their axes logically (`embed`, `kv_heads`, `rollout`, `cache_batch`, `act_batch`, ...); a `ShardingRules` table
maps every name to mesh axes ('data', 'fsdp', 'tensor'). The same model code then runs on one CPU, 8 simulated
devices, a GPU or a TPU pod slice; only the mesh shape changes, and the table when a command's `mesh.rules`
config group overrides it (`rules_from_config`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis: (its default mesh axes, what it names). The KV cache shares `kv_heads` with the parameters.
_AXES: dict[str, tuple[tuple[str, ...], str]] = {
    "vocab": (("tensor",), "parameters: vocabulary rows of the embedding and the LM head"),
    "embed": (("fsdp",), "parameters: the hidden size (d_model) of every kernel and of the embedding"),
    "q_heads": (("tensor",), "parameters: query heads x head_dim (q_proj outputs, o_proj inputs)"),
    "kv_heads": (("tensor",), "parameters and KV cache: key/value heads (k/v_proj outputs; the cache's heads)"),
    "mlp": (("tensor",), "parameters: the MLP's intermediate size (and a reward head's hidden layer)"),
    "norm": ((), "parameters: RMSNorm scales"),
    "head_dim": ((), "KV cache: features per head"),
    "layers": ((), "parameters and KV cache: the stacked-layers axis of a scanned model (`scan_layers`); keep it "
                   "replicated: the scan slices one layer per iteration"),
    "head_out": ((), "parameters: a reward head's output columns (1 or 2)"),
    "batch": (("data", "fsdp"), "training batches: rows of a micro-batch"),
    "rollout": (("data",), "rollouts: questions of a decode batch; decode's shard_map is manual over these mesh "
                           "axes (parameters split over them are gathered for decoding)"),
    "cache_batch": (("data",), "KV cache: rows (path slots); inside decode's shard_map the manual axes drop out"),
    "cache_seq": ((), "KV cache: positions (prompt + generated)"),
    "act_batch": (("data", "fsdp"), "activations: rows of the residual stream between decoder layers"),
    "act_seq": ((), "activations: positions of the residual stream between decoder layers"),
    "act_embed": ((), "activations: hidden features of the residual stream between decoder layers"),
}
LOGICAL_AXES: dict[str, str] = {name: meaning for name, (_, meaning) in _AXES.items()}

# One rule's target: a mesh axis, several ('data,fsdp' or a tuple), or replicated (None, '' or ()).
MeshAxes = str | Sequence[str] | None


def _parse_mesh_axes(target: MeshAxes, where: str) -> tuple[str, ...]:
    """('data', 'fsdp') from 'data,fsdp', ('data', 'fsdp'), 'data' -> ('data',), None or '' -> ()."""
    if target is None:
        return ()
    names = target.split(",") if isinstance(target, str) else list(target)
    axes = tuple(str(n).strip() for n in names if str(n).strip())
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(f"{where}={target!r}: unknown mesh axis {axis!r} (mesh axes: {', '.join(MESH_AXES)}; "
                             f"'' = replicated)")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{where}={target!r}: a mesh axis is named twice")
    return axes


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes, for parameters, training batches, rollouts, the KV cache and activations.

    `table` is ((logical axis, (mesh axis, ...)), ...); an empty tuple means replicated. Frozen and hashable, so
    it can be a static `jit` argument or an `lru_cache` key. A dimension the mesh axes do not divide (an odd
    vocabulary) is replicated, and a mesh axis is used at most once per array (the first dimension wins). The
    logical axes and what each names: `LOGICAL_AXES`."""

    table: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        for name, axes in self.table:
            _parse_mesh_axes(axes, f"sharding rule {name!r}")

    @classmethod
    def default(cls) -> ShardingRules:
        return _DEFAULT_RULES

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, MeshAxes]) -> ShardingRules:
        """A table from {logical axis: mesh axes} (any names; `default()` is the project's table)."""
        return cls(tuple((name, _parse_mesh_axes(target, f"sharding rule {name!r}"))
                         for name, target in mapping.items()))

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    @functools.cached_property
    def _lookup(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def mesh_axes(self, name: str) -> tuple[str, ...]:
        """The mesh axes logical axis `name` maps to (all of them, whatever a mesh's sizes)."""
        if name not in self._lookup:
            raise ValueError(f"no sharding rule for logical axis {name!r} (rules: {sorted(self._lookup)})")
        return self._lookup[name]

    def with_overrides(self, overrides: Mapping[str, MeshAxes]) -> ShardingRules:
        """These rules with some entries replaced; an unknown logical axis is an error naming it."""
        table = self.as_dict()
        for name, target in overrides.items():
            if name not in table:
                raise ValueError(f"sharding rule {name!r}: no such logical axis (axes: {sorted(table)})")
            table[name] = _parse_mesh_axes(target, f"sharding rule {name!r}")
        return ShardingRules(tuple(table.items()))

    def split_axes(self, name: str, mesh: Mesh) -> tuple[str, ...]:
        """The mesh axes `name` maps to that really split on `mesh` (present, size > 1)."""
        return tuple(a for a in self.mesh_axes(name) if mesh.shape.get(a, 1) > 1)

    def axis_size(self, name: str, mesh: Mesh) -> int:
        """How many ways logical axis `name` is split on `mesh` (1 when replicated)."""
        return math.prod(mesh.shape[a] for a in self.split_axes(name, mesh))

    def spec(self, axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *,
             manual: frozenset[str] | set[str] = frozenset()) -> PartitionSpec:
        """PartitionSpec of an array whose dimensions are named `axes` (None: replicated) and sized `shape`.

        `manual` mesh axes (those a surrounding `shard_map` is manual over) are never named: each device
        already holds its own block along them."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
        used = set(manual)
        entries: list[str | tuple[str, ...] | None] = []
        for name, dim in zip(axes, shape):
            target: tuple[str, ...] = ()
            if name is not None:
                target = tuple(a for a in self.split_axes(name, mesh) if a not in used)
                if target and dim % math.prod(mesh.shape[a] for a in target):
                    target = ()
            used.update(target)
            entries.append(None if not target else target[0] if len(target) == 1 else target)
        return PartitionSpec(*entries)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, shape, mesh))

    def rows_sharding(self, name: str, mesh: Mesh, ndim: int) -> NamedSharding:
        """Dimension 0 over logical axis `name`'s mesh axes (`batch` or `rollout`), the rest replicated."""
        split = self.split_axes(name, mesh)
        first = None if not split else split[0] if len(split) == 1 else split
        return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


_DEFAULT_RULES = ShardingRules(tuple((name, axes) for name, (axes, _) in _AXES.items()))

# What every function taking `rules` accepts: a ShardingRules, a plain {logical axis: mesh axes} mapping, or
# None for the default table.
RulesLike = ShardingRules | Mapping[str, MeshAxes] | None


def as_rules(rules: RulesLike) -> ShardingRules:
    """None -> the default table; a mapping -> a complete table of its own (a logical axis it lacks is an error
    when asked for, never silently replicated)."""
    if rules is None:
        return _DEFAULT_RULES
    if isinstance(rules, ShardingRules):
        return rules
    return ShardingRules.from_mapping(rules)


def rules_from_config(group: Mapping[str, Any] | None, field: str = "mesh.rules") -> ShardingRules:
    """ShardingRules from a config's `mesh.rules` group: {logical axis: 'mesh axis', 'a,b' for several, or ''
    for replicated}. Fields the group leaves out (a config written before they existed) keep their defaults;
    an unknown logical or mesh axis is an error naming the field."""
    if group is None:
        return _DEFAULT_RULES
    overrides: dict[str, tuple[str, ...]] = {}
    for name, value in group.items():
        where = f"{field}.{name}"
        if name not in LOGICAL_AXES:
            raise ValueError(f"{where}: no such logical axis (logical axes: {', '.join(LOGICAL_AXES)})")
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r}: expected a mesh axis name, comma-separated names or '' "
                             f"(replicated)")
        overrides[name] = _parse_mesh_axes(value, where)
    return _DEFAULT_RULES.with_overrides(overrides)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None,
              where: str = "") -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes; -1 in one place takes the remaining devices.

    `jax.make_mesh` lays the devices out (topology-aware on TPU); a mesh smaller than the device list uses its
    first devices (all of the job's devices by default; `where` says which ones in an error). Raises ValueError
    when the shape does not fit the devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh dimension may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices{where} do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"{len(devices)} available{where}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[: math.prod(shape)])


def local_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """`make_mesh` over this process's own devices (`jax.local_devices()`): the mesh rollouts and scoring run on.

    In a multi-host job each process samples, labels and scores its own share of the work on it (README "How
    work is split across hosts"), so a policy or PRM must fit one host's devices there; in a single-process run
    it is the `make_mesh` of all devices."""
    where = f" on this host (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    return make_mesh(data, fsdp, tensor, devices=jax.local_devices(), where=where)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: RulesLike = None) -> PartitionSpec:
    """PartitionSpec for one array (`ShardingRules.spec` of `rules`, default table when None)."""
    return as_rules(rules).spec(axes, shape, mesh)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: RulesLike = None) -> NamedSharding:
    return as_rules(rules).sharding(axes, shape, mesh)


def _leaf_axes(var: Any) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names")


def variable_sharding(var: Any, mesh: Mesh, rules: RulesLike = None) -> NamedSharding:
    """NamedSharding of one Variable from its logical axis names (replicated when it has none, or when it holds
    no array, like optax's MaskedNode in the optimizer state of a frozen parameter)."""
    axes = _leaf_axes(var)
    if axes is None or (isinstance(var, nnx.Variable) and not hasattr(var.get_raw_value(), "shape")):
        return NamedSharding(mesh, PartitionSpec())
    return named_sharding(axes, var.shape, mesh, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules: RulesLike = None) -> nnx.State:
    """A pytree of NamedShardings matching `state` (abstract or concrete), from each Variable's axis names."""
    rules = as_rules(rules)
    return jax.tree.map(lambda var: variable_sharding(var, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: RulesLike = None) -> nnx.Module:
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


def batch_sharding(mesh: Mesh, ndim: int, rules: RulesLike = None) -> NamedSharding:
    """Shard dimension 0 over the `batch` rule's mesh axes, replicate the rest."""
    return as_rules(rules).rows_sharding("batch", mesh, ndim)


def batch_divisor(mesh: Mesh, rules: RulesLike = None) -> int:
    """How many ways the batch dimension is split; batch sizes are padded to a multiple of this."""
    return as_rules(rules).axis_size("batch", mesh)


# ------------------------------------------------------------------------------ constraints while tracing
_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "edu_prm_jax_sharding", default=None)


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules: RulesLike = None) -> Iterator[None]:
    """Within it, `constrain` pins arrays (the KV cache, activations at block boundaries) to `rules` on `mesh`;
    with `mesh=None` it is a no-op. Enter it inside the traced function (a jit's body, a shard_map's local
    function) and make (mesh, rules) part of that jit's cache key: the constraints are fixed at trace time."""
    token = _ACTIVE.set(None if mesh is None else (mesh, as_rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned (`with_sharding_constraint`) to the layout the active rules give logical `axes`.

    Unchanged outside a `sharding_context`, and where the mesh has one device along every axis not manual
    here (one device: numerics are untouched). Inside a `shard_map` the manual axes are left out of the spec,
    and the sharding names the shard_map's own (partly manual) mesh, as later ops there require."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    context_mesh, manual = _manual_context()
    if math.prod(size for axis, size in mesh.shape.items() if axis not in manual) == 1:
        return x
    spec = rules.spec(axes, x.shape, mesh, manual=manual)
    return jax.lax.with_sharding_constraint(x, NamedSharding(context_mesh if manual else mesh, spec))


def _manual_context() -> tuple[Any, frozenset[str]]:
    """(the abstract mesh being traced under, the axes a surrounding `shard_map` is manual over)."""
    context_mesh = jax.sharding.get_abstract_mesh()
    return context_mesh, frozenset(() if context_mesh.empty else context_mesh.manual_axes)


def active_platform() -> str | None:
    """The platform ('tpu', 'gpu', 'cuda', 'cpu') of the devices of the active `sharding_context`'s mesh (what a
    program traced there is compiled for, also compile-only devices of another chip), None outside one."""
    active = _ACTIVE.get()
    if active is None:
        return None
    return str(active[0].devices.flat[0].platform)


def layout_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec the active sharding context gives an array with logical `axes` and `shape` (axes a
    surrounding `shard_map` is manual over left out), None outside a sharding context."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return rules.spec(axes, shape, mesh, manual=_manual_context()[1])


def blockwise(fn: Any, args: Sequence[jax.Array], in_axes: Sequence[Sequence[str | None]],
              out_axes: Sequence[str | None], out_shape: Sequence[int]) -> jax.Array:
    """`fn(*args)` run on each device's block (`jax.shard_map` manual over every axis of the active mesh that is
    not manual already), each argument blocked by the layout the active rules give its logical `in_axes`, the
    result (global shape `out_shape`) by `out_axes`. For kernels the XLA partitioner cannot split (Pallas/Mosaic
    calls such as splash attention, which must sit where every mesh axis is manual). Outside a
    `sharding_context`, or on a one-device mesh, it is just `fn(*args)`. `fn` must compute each block
    independently (e.g. over rows and heads)."""
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    context_mesh = jax.sharding.get_abstract_mesh()
    manual = frozenset(() if context_mesh.empty else context_mesh.manual_axes)
    split = frozenset(a for a in mesh.axis_names if a not in manual)
    if not split or (not manual and mesh.size == 1):
        return fn(*args)
    in_specs = tuple(rules.spec(axes, x.shape, mesh, manual=manual) for x, axes in zip(args, in_axes))
    out_spec = rules.spec(out_axes, out_shape, mesh, manual=manual)
    return jax.shard_map(fn, mesh=context_mesh if manual else mesh, in_specs=in_specs, out_specs=out_spec,
                         axis_names=split, check_vma=False)(*args)


HEARTBEAT_ENV = "EDU_PRM_HEARTBEAT_TIMEOUT"  # seconds without a heartbeat before a process counts as dead
DEFAULT_HEARTBEAT_TIMEOUT = 100  # jax.distributed's own default


def heartbeat_timeout() -> int:
    """Seconds after which the coordination service declares a silent process dead and ends the others (with a
    message naming it): `EDU_PRM_HEARTBEAT_TIMEOUT`, default 100. Raises ValueError for a value that is not a
    positive integer."""
    text = os.environ.get(HEARTBEAT_ENV, "")
    if not text:
        return DEFAULT_HEARTBEAT_TIMEOUT
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{HEARTBEAT_ENV}={text!r}: expected a positive number of seconds")
    return value


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when the environment describes a multi-process job.

    Cloud TPU pod slices (TPU_WORKER_HOSTNAMES with several hosts) auto-detect everything; elsewhere
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID select the process. A process that stops
    sending heartbeats for `heartbeat_timeout()` seconds ends the job (every other process exits naming it).
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return True
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=heartbeat_timeout(),
        )
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout())
        return True
    logging.debug("single-process run: jax.distributed not initialised")
    return False
