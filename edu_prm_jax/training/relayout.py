"""Restore a checkpoint saved with the other decoder-layer layout (scanned vs unrolled) transparently.

Why: a model's layers are stacked (`Qwen2Config.scan_layers=True`, the TPU/GPU default) or a list (the CPU
default), and a train state saved by one is a different pytree from the other's: the stacked run stores
`.../layers/attn/q_proj/kernel` as one [L, ...] array, the unrolled run `.../layers/<i>/attn/q_proj/kernel` per
layer, and so do the optimizer's moments, which mirror the parameters. A run trained on a TPU pod must still
export on a CPU host, and a run may resume on another platform. So a restore reads the saved layout from the
checkpoint's tree metadata and, when it differs from the wanted one, reads the saved layout and converts every
layer-indexed leaf (parameters and optimizer moments alike) by one rule on pytree paths: stacked[i] ==
unrolled layer i. The conversion holds both layouts for a moment (one transient copy of the state).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from edu_prm_jax.models.qwen2 import LAYERS_AXIS

LAYERS_KEY = "layers"  # the attribute every Qwen2 keeps its decoder layers under (models/qwen2.py)

Path = tuple[Any, ...]


def _key(k: Any) -> Any:
    """A pytree path entry as a plain value (jax's DictKey / SequenceKey / GetAttrKey, or already plain)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _is_index(k: Any) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def _layers_at(path: Path) -> int | None:
    """Position of the `layers` entry in `path` that a layer index or a stacked leaf follows, else None."""
    for j, k in enumerate(path[:-1]):
        if k == LAYERS_KEY:
            return j
    return None


def layout_of(paths: Iterable[Sequence[Any]]) -> bool | None:
    """Whether the leaves at `paths` (pytree paths, entries plain or jax path keys) hold stacked layers (True),
    per-layer ones (False), or no decoder layers at all (None). Raises ValueError when both layouts appear."""
    seen = set()
    for raw in paths:
        path = tuple(_key(k) for k in raw)
        j = _layers_at(path)
        if j is not None:
            seen.add(not _is_index(path[j + 1]))
    if len(seen) > 1:
        raise ValueError("the state holds both stacked and per-layer decoder layers")
    return seen.pop() if seen else None


def state_layout(state: nnx.State) -> bool | None:
    """`layout_of` an nnx.State (a model's or a train state's)."""
    return layout_of(path for path, _ in nnx.to_flat_state(state))


def _stacked_path(path: Path, j: int) -> Path:
    return path[:j + 1] + path[j + 2:]


def _layer_path(path: Path, j: int, i: int) -> Path:
    return path[:j + 1] + (i,) + path[j + 1:]


def _with_value(var: Any, value: Any, drop_layer_axis: bool | None = None) -> Any:
    """`var` holding `value`; `drop_layer_axis` True/False also removes/prepends the layers axis of its
    logical-axes metadata, which is part of the pytree structure a restore must match."""
    if not isinstance(var, nnx.Variable):
        return value
    axes = var.get_metadata().get("out_sharding")
    if drop_layer_axis is None or axes is None:
        return var.replace(value)
    return var.replace(value, out_sharding=tuple(axes)[1:] if drop_layer_axis else (LAYERS_AXIS, *axes))


def _leaf(var: Any) -> Any:
    return var.get_value() if isinstance(var, nnx.Variable) else var


def _spec(sharding: Any) -> tuple:
    return tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()


def saved_like(like: nnx.State, stacked: bool) -> nnx.State:
    """`like` (abstract leaves: ShapeDtypeStructs with shardings, in the wanted layout) rewritten to the other
    layout (`stacked`: the saved one), for a restore to read the checkpoint into. The stacked axis is
    replicated (the `layers` rule's default) and every other axis keeps its sharding."""
    out: dict[Path, Any] = {}
    groups: dict[Path, list[tuple[int, Any]]] = {}
    for path, var in nnx.to_flat_state(like):
        j = _layers_at(path)
        leaf = _leaf(var)
        if j is None:
            out[path] = var
        elif stacked:  # wanted per-layer, saved stacked: gather the layers of each stacked leaf
            groups.setdefault(_stacked_path(path, j), []).append((int(path[j + 1]), var))
        else:  # wanted stacked, saved per layer: one leaf per layer
            sharding = leaf.sharding
            per = (NamedSharding(sharding.mesh, PartitionSpec(*_spec(sharding)[1:]))
                   if isinstance(sharding, NamedSharding) else sharding)
            for i in range(leaf.shape[0]):
                out[_layer_path(path, j, i)] = _with_value(
                    var, jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=per), drop_layer_axis=True)
    for path, layers in groups.items():
        layers.sort(key=lambda x: x[0])
        if [i for i, _ in layers] != list(range(len(layers))):
            raise ValueError(f"{'/'.join(map(str, path))}: layers {[i for i, _ in layers]} are not 0..L-1")
        var = layers[0][1]
        leaf = _leaf(var)
        sharding = leaf.sharding
        whole = (NamedSharding(sharding.mesh, PartitionSpec(None, *_spec(sharding)))
                 if isinstance(sharding, NamedSharding) else sharding)
        out[path] = _with_value(var, jax.ShapeDtypeStruct((len(layers), *leaf.shape), leaf.dtype, sharding=whole),
                                drop_layer_axis=False)
    return nnx.from_flat_state(out)


def convert(restored: nnx.State, like: nnx.State) -> nnx.State:
    """`restored` (read in the other layout) in `like`'s layout, each leaf placed on `like`'s sharding:
    stacked[i] == layer i, for parameters and optimizer moments alike."""
    source = {path: _leaf(var) for path, var in nnx.to_flat_state(restored)}
    out: dict[Path, Any] = {}
    for path, var in nnx.to_flat_state(like):
        want = _leaf(var)
        j = _layers_at(path)
        if j is None:
            value = source[path]
        elif _is_index(path[j + 1]):  # wanted per-layer: a slice of the stacked leaf
            value = source[_stacked_path(path, j)][int(path[j + 1])]
        else:  # wanted stacked: the per-layer leaves stacked
            value = jnp.stack([source[_layer_path(path, j, i)] for i in range(want.shape[0])])
        out[path] = _with_value(var, jax.device_put(value, want.sharding) if want.sharding is not None else value)
    return nnx.from_flat_state(out)
