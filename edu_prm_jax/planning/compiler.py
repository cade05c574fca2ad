"""Compile a `Program` for a target and turn the compiler's analyses into a `ProgramPlan`.

Fit: on a TPU the compiler itself refuses a program that does not fit in a chip's HBM (RESOURCE_EXHAUSTED),
which is the real test; `memory_analysis()` can overstate, so a program the compiler accepts FITS even when
its total is above the usable figure (noted). The CUDA compiler checks nothing, so on a GPU a program FITS
when `memory_analysis()`'s total is within the card's usable memory (`Chip.capacity_bytes`).

Per-device HBM total = arguments + outputs - outputs aliased onto donated arguments + temporaries +
generated code. Step time lower bound = max(FLOPs per device / peak FLOP/s, bytes per device / HBM bandwidth):
FLOPs are the larger of the compiler's count (TPU only; it includes rematerialised work) and the analytic
model FLOPs (a decode loop's body is counted once by the compiler, so decode uses the analytic figure per step);
bytes are what a step must at least read and write (the arguments and outputs, or for decode the parameters and
KV cache each step reads). MFU at that time = model FLOPs / (bound x peak x devices): the best this program
could reach on the target, not a measurement.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from edu_prm_jax.planning.hardware import Target
from edu_prm_jax.planning.programs import Program

_SIZE = r"([0-9.]+)([KMGT]?)"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_OOM_PATTERNS = (  # libtpu's messages, in the forms seen from 0.0.42.1
    re.compile(rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
    re.compile(rf"[Uu]sed {_SIZE} of {_SIZE} hbm"),
)


@dataclasses.dataclass
class ProgramPlan:
    """What the planner found for one program on one target (bytes per device; FLOPs as labelled)."""

    program: str
    target: str
    chip: str
    devices: int
    mesh: dict[str, int]
    description: str
    step: str
    fits: bool
    compiled: bool  # False: the compiler refused it (its message in `error`)
    capacity_bytes: int
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None  # for a refused program: the compiler's own "required" figure, when it gives one
    compiler_flops: float | None = None  # per device, as cost_analysis() counts (a loop body once); None on GPU
    model_flops: float = 0.0  # one step, whole slice, analytic
    tokens_per_step: int = 0
    time_bound_s: float | None = None
    bound_by: str = ""  # "compute" or "memory"
    mfu_at_bound: float | None = None
    call_time_bound_s: float | None = None  # decode: prefill + every loop step
    compile_s: float = 0.0
    compiler_flops_partial: bool = False  # the compiler counted loop bodies once (decode loop, scanned layers)
    layers: int | None = None  # decoder layers compiled (a reduced-depth plan says so)
    extrapolated_from: list[int] | None = None  # depths a full-depth figure was extrapolated from
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _oom_figures(message: str) -> tuple[int | None, int | None]:
    """(required, available) bytes from a libtpu out-of-memory message, None where it gives none."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            need = float(m.group(1)) * _UNITS[m.group(2)]
            have = float(m.group(3)) * _UNITS[m.group(4)]
            return int(need), int(have)
    return None, None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a compile error is the compiler saying the program does not fit in device memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {str(k): int(v) for k, v in mesh.shape.items()}


def compile_program(program: Program, target: Target, mesh: Mesh, layers: int | None = None) -> ProgramPlan:
    """Lower and compile `program` for `target` (its compile-only devices, laid out as `mesh`) and report.

    A compiler out-of-memory error becomes a plan that does not fit (with the compiler's figures); any other
    compile error propagates."""
    chip = target.chip
    plan = ProgramPlan(program.name, target.name, chip.name, target.devices, mesh_shape(mesh), program.description,
                       program.step, fits=False, compiled=False, capacity_bytes=chip.capacity_bytes(),
                       model_flops=program.model_flops, tokens_per_step=program.tokens_per_step, layers=layers,
                       notes=list(program.notes))
    if mesh.devices.size < target.devices:
        plan.notes.append(f"the mesh uses {mesh.devices.size} of the target's {target.devices} devices")
    start = time.perf_counter()
    try:
        jitted = jax.jit(program.fn, in_shardings=program.in_shardings, out_shardings=program.out_shardings,
                         donate_argnums=program.donate_argnums)
        compiled = jitted.lower(*program.args).compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is a result; others re-raise
        if not is_out_of_memory(e):
            raise
        plan.compile_s = time.perf_counter() - start
        plan.error = str(e).strip().splitlines()[0][:500]
        plan.total_bytes, _ = _oom_figures(str(e))
        return plan
    plan.compile_s = time.perf_counter() - start
    plan.compiled = True
    memory = compiled.memory_analysis()
    plan.argument_bytes = int(memory.argument_size_in_bytes)
    plan.output_bytes = int(memory.output_size_in_bytes)
    plan.alias_bytes = int(memory.alias_size_in_bytes)
    plan.temp_bytes = int(memory.temp_size_in_bytes)
    plan.code_bytes = int(memory.generated_code_size_in_bytes)
    plan.total_bytes = (plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes
                        + plan.code_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence) and not isinstance(cost, dict):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        plan.compiler_flops = float(cost["flops"])
    if chip.platform == "tpu":
        plan.fits = True
        if plan.total_bytes > plan.capacity_bytes:
            plan.notes.append("the compiler accepted it although memory_analysis() totals more than the usable "
                              "HBM (it can overstate)")
    else:
        plan.fits = plan.total_bytes <= plan.capacity_bytes
    if program.loop_steps:
        plan.notes.append(f"compiler FLOPs count the prefill and one of the {program.loop_steps} loop steps")
    if program.scanned_layers:
        plan.notes.append("compiler FLOPs count one scanned layer (a loop body is counted once): the analytic "
                          "FLOPs are used")
    plan.compiler_flops_partial = bool(program.loop_steps or program.scanned_layers)
    _bounds(plan, program, target)
    return plan


def _bounds(plan: ProgramPlan, program: Program, target: Target) -> None:
    """Fill the step-time lower bound, what bounds it and the MFU at it (module docstring)."""
    chip, n = target.chip, target.devices
    flops = program.model_flops / n
    if plan.compiler_flops is not None and not plan.compiler_flops_partial:
        flops = max(flops, plan.compiler_flops)
    moved = program.min_bytes_per_device
    if moved is None:
        moved = (plan.argument_bytes or 0) + (plan.output_bytes or 0)
    compute_s, memory_s = flops / chip.peak_flops, moved / chip.hbm_bandwidth
    plan.time_bound_s = max(compute_s, memory_s)
    plan.bound_by = "compute" if compute_s >= memory_s else "memory"
    if plan.time_bound_s > 0:
        plan.mfu_at_bound = program.model_flops / (plan.time_bound_s * chip.peak_flops * n)
    if program.loop_steps:
        prefill_s = max(program.prefill_flops / n / chip.peak_flops, moved / chip.hbm_bandwidth)
        plan.call_time_bound_s = prefill_s + program.loop_steps * plan.time_bound_s


def extrapolate(plans: dict[int, ProgramPlan], depth: int, target: Target) -> ProgramPlan:
    """A full-depth plan from plans compiled at two smaller depths (decoder layers): every byte and FLOP figure
    and the step-time bound extended linearly in the number of layers (their per-layer growth times the missing
    layers; what does not grow with depth, like the embedding, stays). Fit is then total vs the usable HBM, as
    no full-depth program was compiled. Raises ValueError unless both plans compiled."""
    (d0, a), (d1, b) = sorted(plans.items())[:2]
    if not (a.compiled and b.compiled):
        failed = [d for d, p in plans.items() if not p.compiled]
        raise ValueError(f"cannot extrapolate: the {failed}-layer plan(s) did not compile (out of memory)")

    def line(x: float | None, y: float | None) -> float | None:
        if x is None or y is None:
            return None
        return y + (y - x) * (depth - d1) / (d1 - d0)

    out = dataclasses.replace(b, notes=list(b.notes), layers=depth, extrapolated_from=[d0, d1])
    for field in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "total_bytes"):
        value = line(getattr(a, field), getattr(b, field))
        setattr(out, field, None if value is None else int(round(value)))
    for field in ("compiler_flops", "model_flops", "time_bound_s", "call_time_bound_s"):
        setattr(out, field, line(getattr(a, field), getattr(b, field)))
    out.compile_s = a.compile_s + b.compile_s
    out.fits = out.total_bytes <= out.capacity_bytes
    if out.time_bound_s:
        out.mfu_at_bound = out.model_flops / (out.time_bound_s * target.chip.peak_flops * target.devices)
    out.notes.append(f"extrapolated linearly from {d0}- and {d1}-layer compiles (their compile seconds summed); "
                     "fit is the extrapolated total vs the usable HBM")
    return out
