"""Test setup: 8 simulated CPU devices, shared paths, tiny-model factories, the `needs_devices(n)` marker; LLVM
-O0 on the CPU and one JAX compilation cache per run (both below: compiling is most of the suite's time).

A run on a GPU (`JAX_PLATFORMS=cuda`, what `benchmarks/accelerator.sh` does) gets the numerics the CPU run has:
- float32 matmuls in full float32 (`jax_default_matmul_precision="highest"`). XLA:GPU's default runs them in
  TF32 (10 mantissa bits, ~5e-4 relative error) on NVIDIA GPUs, far above the float32 tolerances of the checks
  against transformers (float32, on the CPU) and numpy float64;
- run-to-run deterministic kernels (`--xla_gpu_deterministic_ops=true`, set before JAX initialises): no atomics
  in scatter-adds (the embedding gradient) or reductions, and no autotuning, so a resumed run can be bitwise
  equal to an uninterrupted one, as the checkpoint tests require.
A GPU has 1 device where the CPU run simulates 8: tests that build a bigger mesh carry `needs_devices(n)` and
are skipped, with the count in the reason, when fewer devices are present.
"""

import os

# 8 simulated devices whatever the caller's XLA_FLAGS (the multi-device tests need them)
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One JAX persistent compilation cache for the whole run: the xdist workers and every `edu-prm` subprocess the tests
# start inherit it, so the tiny models' steps, compiled again by each test that builds them (new jit objects, the
# same HLO), compile once per run. The controller makes the folder before the workers start (they inherit the
# variable) and removes it at the end; a caller's own JAX_COMPILATION_CACHE_DIR is kept and left alone. The key
# covers the HLO, the flags and the JAX/XLA versions, so a hit is the executable a compile would have made.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_JAX_CACHE = tempfile.mkdtemp(prefix="edu_prm_jax-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
    _RUN_JAX_CACHE = None

GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_platforms = [p.strip().lower() for p in os.environ["JAX_PLATFORMS"].split(",") if p.strip()]
# The default backend is the first platform listed; an empty JAX_PLATFORMS lets JAX pick, possibly a GPU.
MAY_RUN_ON_GPU = not _platforms or _platforms[0] in GPU_PLATFORMS
# XLA:CPU's LLVM backend at -O0: the tests compile hundreds of tiny programs that then run for milliseconds, and
# compiling was most of the suite's time (the whole suite took 17.5 instead of 20.6 minutes on 2 cores at -O0,
# 2026-12-01). The HLO passes (fusion, layouts, the conditional that keeps the RoPE tables in one place) are the
# same at every level; only LLVM's code generation differs. A level the caller sets is kept
# (`XLA_FLAGS=--xla_backend_optimization_level=3` runs at the default), and a GPU run keeps the default.
if not MAY_RUN_ON_GPU and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
if MAY_RUN_ON_GPU and "xla_gpu_deterministic_ops" not in os.environ["XLA_FLAGS"]:  # an explicit choice stays
    os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"

import pathlib  # noqa: E402

import pytest  # noqa: E402

if MAY_RUN_ON_GPU:  # a CPU run does not touch JAX here; JAX_PLATFORMS=cuda initialises no backend here either
    import jax

    if (_platforms[0] if _platforms else jax.default_backend()) in GPU_PLATFORMS:
        jax.config.update("jax_default_matmul_precision", "highest")  # 32-bit inputs only: bf16 stays bf16

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_devices(n): skip unless JAX sees at least n devices (the CPU run simulates 8)")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process that made the run's compilation cache removes it (workers inherited it and leave it)."""
    if _RUN_JAX_CACHE is not None:
        import shutil

        shutil.rmtree(_RUN_JAX_CACHE, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test marked `needs_devices(n)` when this process has fewer than n devices (e.g. one GPU)."""
    marker = item.get_closest_marker("needs_devices")
    if marker is None:
        return
    import jax

    need, have = int(marker.args[0]), len(jax.devices())
    if have < need:
        pytest.skip(f"needs {need} devices for its mesh, {have} {jax.default_backend()} device(s) here "
                    f"(the CPU run simulates 8)")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
