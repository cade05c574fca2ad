"""`edu-prm plan` and the public programs it compiles.

The compile tests build a tiny PRM / policy (2 layers, hidden 128) and compile for a TPU v5e-4 with libtpu on this
CPU (seconds each); they skip, saying what to install, when libtpu (the `[plan]` extra) or JAX's CUDA plugin
(`[plan-cuda]`, for the H100 target) is absent. The rest runs anywhere: the public train step against the
Trainer's, the searches, depth extrapolation, the target table, and what the planner says without libtpu.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edu_prm_jax import cli, parallel
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.prm import PRM, prm_loss
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.planning import compiler, devices, hardware, programs, search
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.training.loop import TrainConfig, Trainer, make_train_step, new_train_state
from edu_prm_jax.training.metrics import matmul_params
from edu_prm_jax.training.optim import OptimConfig, make_optimizer

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[plan]'): the "
                                                         "planner compiles TPU programs with it")
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (pip install "
                                                                   "-e '.[plan-cuda]'): needed for GPU targets")

CFG = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _prm(cfg: Qwen2Config = CFG):
    return lambda: PRM(cfg, "scalar", rngs=nnx.Rngs(0))


def _mesh(target: hardware.Target):
    return parallel.make_mesh(-1, 1, 1, devices=list(devices.target_devices(target)))


V5E_4 = hardware.get_target("v5e-4")


# ------------------------------------------------------------------------------- the public train step
def test_public_train_step_is_the_trainers_step(tmp_path):
    """`make_train_step` on `new_train_state` gives the same parameters and metrics as `Trainer.train_step`
    after two updates (one device), so the planner compiles exactly what training runs."""
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (4, 16)).astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, 16), np.int32), "targets": rng.random((4, 16)).astype(np.float32),
             "step_end_mask": rng.random((4, 16)) < 0.3}
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    trainer = Trainer(_prm()(), prm_loss, optim, TrainConfig(steps=2, tensorboard=False, progress=False),
                      tmp_path, mesh=mesh)
    graphdef, state = nnx.split(new_train_state(_prm()(), make_optimizer(optim)))
    step = jax.jit(make_train_step(graphdef, prm_loss, mesh))
    for _ in range(2):
        want = trainer.train_step(batch)
        state, got = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        for key in ("loss", "grad_norm", "num_steps"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, err_msg=key)
    theirs = trainer.params()
    mine = nnx.merge(graphdef, state).model
    from edu_prm_jax.models.checkpoints import flat_params

    ours = {k: np.asarray(v[...]) for k, v in flat_params(nnx.state(mine)).items()}
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7, err_msg=key)
    trainer.close()


def test_planned_batch_fields_are_the_packed_streams():
    """The abstract PRM batch has exactly the fields and dtypes `PackedStream` yields."""
    from edu_prm_jax.scoring.examples import PRMExample
    from edu_prm_jax.training.prm_train import PackedStream

    ex = PRMExample(0, np.arange(5, dtype=np.int32), np.array([0, 0, 1, 0, 1], bool),
                    np.array([0, 0, 1, 0, 0], np.float32))
    real = next(PackedStream([ex], seq_len=8, rows=2, seed=0))
    assert {k: np.dtype(v.dtype) for k, v in real.items()} == \
        {k: np.dtype(v) for k, v in programs.PRM_BATCH_FIELDS.items()}


# ------------------------------------------------------------------------------------------ searches
@pytest.mark.parametrize("limit", [1, 3, 4, 7, 8, 9, 100, 5000])
@pytest.mark.parametrize("start,multiple", [(1, 1), (8, 1), (64, 4), (6, 4)])
def test_largest_fitting_finds_the_boundary(limit, start, multiple):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= limit

    best, tried = search.largest_fitting(fits, start, multiple, limit=1024)
    expected = min(limit, 1024) // multiple * multiple or None
    assert best == expected
    assert all(n % multiple == 0 for n in calls) and len(calls) == len(set(calls)) <= 24
    assert tried == {n: n <= limit for n in calls}


def test_smallest_slice_is_the_first_that_fits():
    family = hardware.family_targets(V5E_4)
    assert [t.devices for t in family] == sorted(t.devices for t in family) and family[0].name == "v5e-1"
    best, tried = search.smallest_fitting(family, lambda t: t.devices >= 16)
    assert best.name == "v5e-16" and [t.name for t, _ in tried] == ["v5e-1", "v5e-4", "v5e-8", "v5e-16"]


def _fake_plan(layers: int, per_layer: int, fixed: int) -> compiler.ProgramPlan:
    total = fixed + per_layer * layers
    return compiler.ProgramPlan("train", "v5e-4", "TPU v5e", 4, {"data": 4}, "", "micro-batch", True, True,
                                hardware.TPU_V5E.capacity_bytes(), argument_bytes=total // 2, output_bytes=total // 2,
                                alias_bytes=0, temp_bytes=0, code_bytes=0, total_bytes=total,
                                compiler_flops=1e9 * layers, model_flops=4e9 * layers + 1e8,
                                time_bound_s=0.01 * layers, layers=layers)


def test_extrapolation_is_linear_in_depth_and_decides_fit_against_usable_hbm():
    gib = hardware.GIB
    full = compiler.extrapolate({4: _fake_plan(4, gib, 2 * gib), 8: _fake_plan(8, gib, 2 * gib)}, 80, V5E_4)
    assert full.total_bytes == 82 * gib and full.layers == 80 and full.extrapolated_from == [4, 8]
    assert full.model_flops == pytest.approx(4e9 * 80 + 1e8) and full.time_bound_s == pytest.approx(0.8)
    assert not full.fits  # 82 GiB > 15.75 GiB
    small = compiler.extrapolate({4: _fake_plan(4, gib // 8, gib), 8: _fake_plan(8, gib // 8, gib)}, 28, V5E_4)
    assert small.fits and small.total_bytes == gib + 28 * (gib // 8)


# ----------------------------------------------------------------------------------- targets and installs
def test_every_target_names_a_documented_chip():
    for target in hardware.TARGETS.values():
        assert target.devices >= 1 and target.chip.peak_flops > 0 and target.chip.hbm_bandwidth > 0
        assert "cloud.google.com/tpu/docs" in target.chip.source or "datasheet" in target.chip.source
    for name in ("v4-8", "v5e-4", "v5e-8", "v5e-16", "v5e-64", "v5e-256", "v5p-8", "v5p-128", "v6e-4", "v6e-8",
                 "v6e-16", "h100-8"):
        assert name in hardware.TARGETS
    assert hardware.get_target("v4-8").devices == 4 and hardware.get_target("v5p-128").devices == 64
    with pytest.raises(ValueError, match="did you mean v5e-4"):
        hardware.get_target("v5e4")


def test_without_libtpu_plan_says_what_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(devices.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(devices.PlannerUnavailableError, match=r"pip install 'edu_prm_jax\[plan\]'"):
        devices.check_compiler(V5E_4)
    assert cli.main(["plan", f"--workdir={tmp_path}", "--config.programs=score"]) == 1
    err = capsys.readouterr().err
    assert "libtpu, which is not installed" in err and "pip install 'edu_prm_jax[plan]'" in err
    assert not (tmp_path / "plan.json").exists()


@needs_libtpu
def test_every_tpu_target_gives_its_devices():
    for target in hardware.TARGETS.values():
        if target.chip.platform == "tpu":
            assert len(devices.target_devices(target)) == target.devices, target.name


# ------------------------------------------------------------------------------------ compiles for a v5e-4
@needs_libtpu
def test_train_step_fits_and_its_flops_match_6n_per_token_and_remat_adds_a_forward():
    """Compiler FLOPs of the train step vs 6 N tokens + 12 L H D T tokens (PaLM appendix B): within 15% for a
    matmul-dominated tiny model (measured 1.04 with XLA attention; the rest is norms, softmax and AdamW; a fused
    attention kernel's FLOPs, 12% of the formula here, may be invisible to cost_analysis, hence 0.85). Full remat
    recomputes one forward: the count grows by 1.15-1.40x (theory 4/3 if all of it is recomputed; measured 1.25)."""
    mesh = _mesh(V5E_4)
    counts = {}
    for remat in ("none", "full"):
        cfg = CFG.replace(remat=remat)
        program = programs.train_program(_prm(cfg), optax.adamw(1e-3), prm_loss, mesh, None, 8, 128)
        plan = compiler.compile_program(program, V5E_4, mesh)
        assert plan.fits and plan.compiled and plan.total_bytes < plan.capacity_bytes
        counts[remat] = plan.compiler_flops * V5E_4.devices  # cost_analysis counts one device's program
        hand = 8 * 128 * (6 * matmul_params(CFG, lm_head=False) + 12 * 2 * 4 * 32 * 128)
        assert plan.model_flops == pytest.approx(hand)
    assert 0.85 < counts["none"] / plan.model_flops < 1.15
    assert 1.15 < counts["full"] / counts["none"] < 1.40
    # the donated state aliases its outputs; the lower bound and MFU are derived from the documented chip table
    assert plan.alias_bytes > 0 and plan.time_bound_s > 0 and 0 < plan.mfu_at_bound <= 1
    # scanned layers: the compiler counts the scan body once (well under the unrolled count), so the bound and the
    # table use the analytic FLOPs instead
    scanned = compiler.compile_program(programs.train_program(_prm(CFG.replace(scan_layers=True, remat="none")),
                                                              optax.adamw(1e-3), prm_loss, mesh, None, 8, 128),
                                       V5E_4, mesh)
    assert scanned.compiler_flops_partial and scanned.compiler_flops * V5E_4.devices < 0.8 * counts["none"]
    assert scanned.time_bound_s >= scanned.model_flops / V5E_4.devices / V5E_4.chip.peak_flops * 0.999


@needs_libtpu
def test_a_model_too_large_for_the_chip_does_not_fit_and_the_compiler_says_how_much_it_needs():
    """A 2^20-token vocabulary at hidden 4096 is a 16 GiB float32 embedding on every v5e chip (replicated over
    data=4), more than its 15.75 usable GiB whatever the attention kernel: the compiler refuses it."""
    mesh = _mesh(V5E_4)
    big = CFG.replace(vocab_size=1 << 20, hidden_size=4096, num_hidden_layers=1)
    plan = compiler.compile_program(programs.score_program(_prm(big), mesh, None, 8, 128), V5E_4, mesh)
    assert not plan.fits and not plan.compiled
    assert "RESOURCE_EXHAUSTED" in plan.error
    assert plan.total_bytes > (1 << 20) * 4096 * 4 > plan.capacity_bytes  # the compiler's own "required" figure
    fits = compiler.compile_program(programs.score_program(_prm(big.replace(vocab_size=1 << 18)), mesh, None, 8,
                                                           128), V5E_4, mesh)
    assert fits.fits and fits.compiled  # the same model with a 4 GiB embedding fits


@needs_libtpu
def test_search_finds_the_largest_batch_that_fits(tmp_path):
    """`--config.search=batch` from the console entry point on a v5e-4: the largest rows (a multiple of the
    data=4 split) that fit, and the next multiple does not. Run as its own process: the console entry raises the
    stack limit libtpu needs for programs this large (in-process, pytest's 8 MiB stack would be overflowed). The
    search starts at 4096 rows, near the boundary (~4360 rows of 2048 tokens at one layer): each doubling below it
    is one more compile, and the bisection steps depend only on the gap to the first failure."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != cli.STACK_RAISED}
    proc = subprocess.run([sys.executable, "-m", "edu_prm_jax.cli", "plan", f"--workdir={tmp_path}",
                           "--config.programs=score", "--config.layers=1", "--config.run.train.seq_len=2048",
                           "--config.run.train.rows=4096",
                           "--config.search=batch", f"--config.output={out}"], env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["search"]["score"]
    best, tried = result["largest"], result["tried"]
    assert result["search"] == "rows" and best % 4 == 0 and tried[str(best)] is True
    assert tried[str(best + 4)] is False
    assert all(ok == (int(n) <= best) for n, ok in tried.items())


@needs_libtpu
def test_p_edu_decode_compiles_and_its_cache_is_in_the_bytes_per_step():
    """EDU with a PRM in lockstep (P-EDU), questions over data=4: the per-step bytes are the parameters plus
    both KV caches, each [rows/4, prompt + new, kv_heads, head_dim] float32 per layer (hand count)."""
    mesh = _mesh(V5E_4)
    p = DecodeParams(mode="edu", num_leaves=4, max_new_tokens=16)
    program = programs.decode_program(p, lambda: Qwen2(CFG, nnx.Rngs(0)), mesh, None, 8, 32, prm_factory=_prm())
    plan = compiler.compile_program(program, V5E_4, mesh)
    assert plan.fits and program.loop_steps == 16 and plan.call_time_bound_s > 16 * plan.time_bound_s
    cache = 2 * (2 * 2 * (32 // 4) * 48 * 2 * 32 * 4)  # models x (k, v) x layers x rows x S x kv x D x 4 B
    params = 4 * (sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(_prm()))))
                  + sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(
                      lambda: Qwen2(CFG, nnx.Rngs(0)))))))
    assert program.min_bytes_per_device == cache + params
    with pytest.raises(ValueError, match="do not divide over the rollout"):
        programs.decode_program(p, lambda: Qwen2(CFG, nnx.Rngs(0)), mesh, None, 6, 32)


@needs_libtpu
def test_extrapolated_memory_matches_a_full_compile():
    """Score memory extrapolated from 1- and 2-layer compiles to 4 layers is within 10% of the 4-layer compile."""
    mesh = _mesh(V5E_4)

    def plan(layers):
        cfg = CFG.replace(num_hidden_layers=layers)
        return compiler.compile_program(programs.score_program(_prm(cfg), mesh, None, 16, 256), V5E_4, mesh, layers)

    full = plan(4)
    guess = compiler.extrapolate({1: plan(1), 2: plan(2)}, 4, V5E_4)
    assert guess.argument_bytes == pytest.approx(full.argument_bytes, rel=0.01)
    assert guess.total_bytes == pytest.approx(full.total_bytes, rel=0.10)


@needs_libtpu
def test_plan_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "p" / "plan.json"
    rc = cli.main(["plan", f"--workdir={tmp_path}", "--config.programs=score,decode", "--config.layers=1",
                   "--config.run.train.rows=8", "--config.run.train.seq_len=64",
                   "--config.run.sample.batch_questions=4", "--config.run.sample.sampling.max_new_tokens=8",
                   "--config.prompt_len=32", "--config.search=slice", f"--config.output={out}"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| score [1 layers] | v5e-4 |" in table and "FITS" in table
    data = json.loads(out.read_text())
    assert [p["program"] for p in data["plans"]] == ["score", "decode"]
    assert all(p["fits"] and p["layers"] == 1 and p["total_bytes"] > 0 for p in data["plans"])
    assert (tmp_path / "p" / "plan.md").read_text().startswith("| program |")
    # compiled as a TPU run builds the models (not as this CPU would): scanned layers, splash attention
    assert all("scanned layers, splash attention" in p["notes"] for p in data["plans"])
    # a tiny model fits the smallest slice of the family: the search stops at the first one it compiles
    assert data["search"]["score"] == {"search": "slice", "smallest": "v5e-1", "tried": {"v5e-1": True}}
    assert data["search"]["decode"]["smallest"] == "v5e-1"


def test_planned_models_take_the_targets_layout_unless_pinned():
    """`for_target`: a TPU or GPU target gets the platform's defaults (scanned layers; splash on TPU, cuDNN for
    bfloat16 on GPU), `config.scan_layers` / `config.attention` pin them, a block-expanded PRM stays unrolled (as
    `train` builds it), and a value outside the choices is refused naming the field."""
    from edu_prm_jax.commands.plan import Planner
    from edu_prm_jax.configs import plan as plan_config

    def planned(**fields):
        config = plan_config.get_config()
        config.update(fields)
        return Planner(config)

    bf16 = CFG.replace(dtype="bfloat16")
    tpu, gpu = hardware.get_target("v5p-8"), hardware.get_target("h100-8")
    assert (planned().for_target(bf16, tpu).scan_layers, planned().for_target(bf16, tpu).attention) == (True, "splash")
    assert planned().for_target(bf16, gpu).attention == "cudnn"
    assert planned().for_target(CFG, gpu).attention == "xla"  # cuDNN has no float32 kernel
    pinned = planned(scan_layers="false", attention="xla").for_target(bf16, tpu)
    assert (pinned.scan_layers, pinned.attention) == (False, "xla")
    assert planned().for_target(bf16, tpu, expanded_layers=2).scan_layers is False
    with pytest.raises(ValueError, match="config.scan_layers"):
        planned(scan_layers="yes").for_target(bf16, tpu)
    with pytest.raises(ValueError, match="config.attention"):
        planned(attention="flash").for_target(bf16, tpu)


@needs_libtpu
def test_decode_is_planned_on_one_hosts_devices():
    """Rollouts run on process-local meshes (each host decodes its own questions), so on a 4-host v5e-16 the
    decode program is built on one host's 4 chips, while training spans the slice."""
    from edu_prm_jax.commands.plan import Planner, stages
    from edu_prm_jax.configs import plan as plan_config

    planner = Planner(plan_config.get_config())
    have, _ = stages(planner.run)
    target = hardware.get_target("v5e-16")
    program, mesh = planner.decode("decode", have["decode"], target, 1, {})
    assert mesh.devices.size == 4 and len({d.process_index for d in mesh.devices.flat}) == 1
    assert [hardware.host_target(hardware.get_target(n)).name for n in ("v5e-16", "v5p-128", "v4-8", "h100-8")] \
        == ["v5e-4", "v5p-8", "v4-8", "h100-8"]
    assert "on one host's 4 devices" in program.description
    _, train_mesh = planner.train(have["train"], target, 1, {})
    assert train_mesh.devices.size == 16


# ------------------------------------------------------------------------------------------- a GPU target
@needs_cuda_plugin
def test_gpu_fit_is_computed_from_memory_analysis(monkeypatch):
    """The CUDA compiler gives no FLOPs and no out-of-memory verdict: fit is the total vs the usable memory."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    h100 = hardware.get_target("h100-8")
    mesh = _mesh(h100)
    small = compiler.compile_program(programs.score_program(_prm(), mesh, None, 8, 128), h100, mesh)
    assert small.compiled and small.fits and small.compiler_flops is None
    assert small.capacity_bytes == int(hardware.H100.hbm_bytes * 0.75)
    huge = compiler.compile_program(programs.score_program(_prm(), mesh, None, 2048, 4096), h100, mesh)
    assert huge.compiled and not huge.fits and huge.total_bytes > huge.capacity_bytes


def test_plan_dataclass_round_trips_to_json():
    plan = _fake_plan(4, 1, 2)
    assert json.loads(json.dumps(plan.to_json())) == dataclasses.asdict(plan)


@needs_libtpu
def test_a_tpu_decode_holds_one_kv_cache_unless_buckets_are_asked_for():
    """EDU at 64 slots per question on a v5e-4 (one question per chip), scanned layers, bfloat16: the TPU default
    (one cache length) holds the KV cache once in temporaries (it is built inside the program) plus activations;
    cache-length buckets, the CPU's default, hold the last two buckets' caches at once across a transition (a 7B
    Best-of-N decode on a v4-8 went from 8.7 to 18.5 GiB of temporaries that way)."""
    cfg = CFG.replace(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=128, num_hidden_layers=4,
                      dtype="bfloat16", param_dtype="bfloat16").for_platform("tpu")
    assert cfg.scan_layers
    mesh = _mesh(V5E_4)
    p = DecodeParams(mode="edu", num_leaves=64, max_new_tokens=960)
    temps = {}
    for buckets in (None, True):
        program = programs.decode_program(p, lambda: Qwen2(cfg, nnx.Rngs(0)), mesh, None, 4, 64,
                                          cache_buckets=buckets)
        temps[buckets] = compiler.compile_program(program, V5E_4, mesh).temp_bytes
    cache = 2 * 4 * 64 * 1024 * 4 * 128 * 2  # (k, v) x layers x rows per chip x positions x kv heads x D x 2 B
    assert temps[None] < 1.3 * cache, (temps, cache)
    assert temps[True] > temps[None] + 0.4 * cache, (temps, cache)
