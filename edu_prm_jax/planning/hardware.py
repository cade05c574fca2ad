"""What `edu-prm plan` compiles for: accelerator chips (memory, peak FLOP/s, HBM bandwidth) and named slices.

Every number below has its source next to it. Two kinds:
- datasheet figures (peak dense bf16 FLOP/s, HBM size, HBM bandwidth per chip), from the vendors' pages:
  Cloud TPU v4 https://cloud.google.com/tpu/docs/v4, v5e https://cloud.google.com/tpu/docs/v5e,
  v5p https://cloud.google.com/tpu/docs/v5p, v6e (Trillium) https://cloud.google.com/tpu/docs/v6e, and the
  NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB: 989 TFLOP/s dense bf16, 1979 with 2:4 sparsity;
  3.35 TB/s HBM3);
- usable memory: what a program may allocate. For a TPU it is the limit libtpu's compiler checks, read off its
  out-of-memory message ("... exceeds available HBM (15.75G)") when compiling a program too large for one chip
  with libtpu 0.0.42.1 on this project's CPU host (v4 30.75 GiB, v5e 15.75 GiB, v5p 95.74 GiB, v6e
  31.25 GiB). For a GPU the compiler checks nothing, so it is the card's memory times the share JAX's allocator
  takes (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75, read from the environment).

On TPU v4 and v5p one JAX device is one chip (the "megacore" configuration fuses its two TensorCores); v5e
and v6e chips have one TensorCore. A slice name counts TensorCores for v4/v5p (`v4-8` = 4 chips) and chips for
v5e/v6e (`v5e-4` = 4 chips), as Google names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator device as the planner sees it (all figures per device)."""

    name: str  # e.g. "TPU v5e"
    platform: str  # "tpu" or "cuda"
    hbm_bytes: int  # nominal device memory
    usable_hbm_bytes: int  # what one program may allocate (see the module docstring)
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    source: str  # where the figures come from

    def capacity_bytes(self) -> int:
        """Bytes a program may use on one device: the TPU compiler's limit, or for a GPU the card's memory times
        JAX's allocator share (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75)."""
        if self.platform != "cuda":
            return self.usable_hbm_bytes
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return int(self.hbm_bytes * fraction)


TPU_V4 = Chip("TPU v4", "tpu", 32 * GIB, int(30.75 * GIB), 275e12, 1200e9,
              "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s; usable: libtpu's limit")
TPU_V5E = Chip("TPU v5e", "tpu", 16 * GIB, int(15.75 * GIB), 197e12, 819e9,
               "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s; usable: libtpu's limit")
TPU_V5P = Chip("TPU v5p", "tpu", 95 * GIB, int(95.74 * GIB), 459e12, 2765e9,
               "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s; usable: libtpu's limit")
TPU_V6E = Chip("TPU v6e", "tpu", 32 * GIB, int(31.25 * GIB), 918e12, 1640e9,
               "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s; usable: libtpu's limit")
H100 = Chip("NVIDIA H100 SXM5 80GB", "cuda", 84_929_347_584, 84_929_347_584, 989e12, 3.35e12,
            "NVIDIA H100 datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 (84,929,347,584 bytes as the device "
            "reports it), 3.35 TB/s")
H200 = Chip("NVIDIA H200 SXM 141GB", "cuda", 141 * 10**9, 141 * 10**9, 989e12, 4.8e12,
            "NVIDIA H200 datasheet: 989 TFLOP/s dense bf16 (as H100), 141 GB HBM3e, 4.8 TB/s")
# What `jax.Device.device_kind` reports -> the chip, for measured runs (MFU and the HBM roofline share)
DEVICE_KINDS: dict[str, Chip] = {"TPU v4": TPU_V4, "TPU v5 lite": TPU_V5E, "TPU v5e": TPU_V5E, "TPU v5p": TPU_V5P,
                                 "TPU v5": TPU_V5P, "TPU v6 lite": TPU_V6E, "TPU v6e": TPU_V6E,
                                 "NVIDIA H100 80GB HBM3": H100, "NVIDIA H100": H100, "NVIDIA H200": H200}


def chip_of_device_kind(kind: str) -> Chip | None:
    """The chip whose `device_kind` is `kind` (exact, else the longest table entry `kind` starts with); None for
    a device the table does not know (a CPU, another GPU)."""
    if kind in DEVICE_KINDS:
        return DEVICE_KINDS[kind]
    matches = [k for k in DEVICE_KINDS if kind.startswith(k)]
    return DEVICE_KINDS[max(matches, key=len)] if matches else None

# XLA's GPU target description of an H100 SXM5 80GB (what the CUDA plugin compiles for without a GPU present):
# 132 SMs at 1.98 GHz boost, compute capability 9.0, 50 MiB L2, the datasheet's memory and bandwidth.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 8 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A named slice (or GPU host): its chip, device count and how libtpu / the CUDA plugin names its topology."""

    name: str  # e.g. "v5e-4", "h100-8"
    chip: Chip
    devices: int  # JAX devices (chips)
    topology: str  # TPU: "v5e:2x2" (generation:chip grid); GPU: "1x1x8" (slices x hosts x devices per host)
    chip_config: str = "default"  # TPU: "megacore" for v4/v5p (one device per chip), "default" otherwise
    wrap: tuple[bool, bool, bool] = (False, False, False)  # TPU: torus wrap-around links per dimension

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        """TPU: the chip grid of one host (2x2x1, or the whole slice when it is smaller)."""
        grid = [int(n) for n in self.topology.split(":")[-1].split("x")] + [1]
        return (min(grid[0], 2), min(grid[1], 2), 1)

    @property
    def family(self) -> str:
        """The slice family a `--search=slice` walks through ("v5e", "v4", "h100" ...)."""
        return self.name.rsplit("-", 1)[0]


def _tpu(name: str, chip: Chip, grid: str, megacore: bool, wrap: tuple[bool, bool, bool] = (False,) * 3) -> Target:
    generation = {TPU_V4: "v4", TPU_V5E: "v5e", TPU_V5P: "v5", TPU_V6E: "v6e"}[chip]
    devices = 1
    for n in grid.split("x"):
        devices *= int(n)
    return Target(name, chip, devices, f"{generation}:{grid}", "megacore" if megacore else "default", wrap)


_FULL_WRAP, _V5E_WRAP = (True, True, True), (True, True, False)
TARGETS: dict[str, Target] = {t.name: t for t in [
    _tpu("v4-8", TPU_V4, "2x2x1", True), _tpu("v4-16", TPU_V4, "2x2x2", True),
    _tpu("v4-32", TPU_V4, "2x2x4", True), _tpu("v4-64", TPU_V4, "2x4x4", True),
    _tpu("v4-128", TPU_V4, "4x4x4", True, _FULL_WRAP),
    _tpu("v5e-1", TPU_V5E, "1x1", False), _tpu("v5e-4", TPU_V5E, "2x2", False),
    _tpu("v5e-8", TPU_V5E, "2x4", False), _tpu("v5e-16", TPU_V5E, "4x4", False),
    _tpu("v5e-32", TPU_V5E, "4x8", False), _tpu("v5e-64", TPU_V5E, "8x8", False),
    _tpu("v5e-128", TPU_V5E, "8x16", False, (False, True, False)), _tpu("v5e-256", TPU_V5E, "16x16", False, _V5E_WRAP),
    _tpu("v5p-8", TPU_V5P, "2x2x1", True), _tpu("v5p-16", TPU_V5P, "2x2x2", True),
    _tpu("v5p-32", TPU_V5P, "2x2x4", True), _tpu("v5p-64", TPU_V5P, "2x4x4", True),
    _tpu("v5p-128", TPU_V5P, "4x4x4", True, _FULL_WRAP),
    _tpu("v6e-1", TPU_V6E, "1x1", False), _tpu("v6e-4", TPU_V6E, "2x2", False), _tpu("v6e-8", TPU_V6E, "2x4", False),
    _tpu("v6e-16", TPU_V6E, "4x4", False), _tpu("v6e-32", TPU_V6E, "4x8", False), _tpu("v6e-64", TPU_V6E, "8x8", False),
    _tpu("v6e-128", TPU_V6E, "8x16", False, (False, True, False)), _tpu("v6e-256", TPU_V6E, "16x16", False, _V5E_WRAP),
    *[Target(f"h100-{n}", H100, n, f"1x1x{n}", "") for n in (1, 2, 4, 8)],
]}


def get_target(name: str) -> Target:
    """The target called `name` (e.g. "v5e-4", "v5p-128", "h100-8"); ValueError naming the nearest ones."""
    try:
        return TARGETS[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(TARGETS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown target {name!r}{hint}; targets: {', '.join(TARGETS)}") from None


def host_target(target: Target) -> Target:
    """The slice of one host of `target` (its family's target with as many chips as one host has: v5e-16 ->
    v5e-4, v5p-128 -> v5p-8); `target` itself when it is one host (a GPU host, a v5e-4)."""
    per_host = 1
    for n in target.chips_per_host if target.chip.platform == "tpu" else (target.devices,):
        per_host *= n
    if per_host >= target.devices:
        return target
    return next(t for t in family_targets(target) if t.devices == per_host)


def family_targets(target: Target) -> list[Target]:
    """The targets of `target`'s family, smallest first: what a slice search walks through."""
    return sorted((t for t in TARGETS.values() if t.family == target.family), key=lambda t: t.devices)
