"""Compile-only devices of a target, from libtpu (TPU) or JAX's CUDA plugin (GPU), on a host without either.

`jax.experimental.topologies.get_topology_desc` asks the PJRT plugin for a topology and returns devices that
can only be compiled for: `jax.jit(f).lower(...).compile()` on a mesh of them runs the target's own compiler
(with its out-of-memory check on TPU) on this CPU. Nothing here is a runtime need: the packages are the
`[plan]` extra, and their absence is an error that says what to install.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from edu_prm_jax.planning.hardware import H100_TARGET_CONFIG, Target

INSTALL_TPU = "pip install 'edu_prm_jax[plan]'  (jax[tpu]: libtpu, the TPU compiler; no TPU needed)"
INSTALL_CUDA = ("pip install 'edu_prm_jax[plan-cuda]'  (jax-cuda12-plugin and jax-cuda12-pjrt at jax's version: "
                "the GPU compiler; no GPU needed)")


class PlannerUnavailableError(RuntimeError):
    """The compiler for a target is not installed; the message says what to install."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_compiler(target: Target) -> None:
    """Raise PlannerUnavailableError naming the pip command when `target`'s compiler (libtpu for TPU targets, the
    jax CUDA plugin for GPU ones) is not importable here."""
    if target.chip.platform == "tpu" and not _has_module("libtpu"):
        raise PlannerUnavailableError(f"planning for {target.name} compiles with libtpu, which is not installed: "
                                 f"{INSTALL_TPU}")
    if target.chip.platform == "cuda" and not _has_module("jax_plugins.xla_cuda12"):
        raise PlannerUnavailableError(f"planning for {target.name} compiles with JAX's CUDA plugin, which is not "
                                 f"installed: {INSTALL_CUDA}")


@functools.cache
def target_devices(target: Target) -> tuple[Any, ...]:
    """The `target.devices` compile-only devices of `target` (cached per target).

    libtpu is told not to look for a TPU VM's metadata server (`TPU_SKIP_MDS_QUERY`) and that another process may
    hold it too (`ALLOW_MULTIPLE_LIBTPU_LOAD`, e.g. parallel test workers); both only when unset. Raises
    PlannerUnavailableError when the compiler is missing, RuntimeError when the plugin refuses the topology."""
    check_compiler(target)
    from jax.experimental import topologies

    if target.chip.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
        desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                            chip_config_name=target.chip_config,
                                            chips_per_host_bounds=target.chips_per_host, num_slices=1,
                                            wrap=target.wrap)
    else:
        desc = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                            topology=target.topology)
    devices = tuple(desc.devices)
    if len(devices) != target.devices:
        raise RuntimeError(f"target {target.name}: the {target.chip.platform} plugin gave {len(devices)} devices "
                           f"for topology {target.topology!r}, expected {target.devices}")
    return devices
