"""The planner's table and JSON: one row per (program, target), FITS / DOES NOT FIT in plain words."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from edu_prm_jax.io.atomic import write_json_atomic
from edu_prm_jax.planning.compiler import ProgramPlan
from edu_prm_jax.planning.hardware import GIB

COLUMNS = ("program", "target", "mesh", "args GiB", "out GiB", "temp GiB", "total GiB", "usable GiB", "fit",
           "FLOPs/step", "bound s/step", "MFU@bound", "compile s")


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def verdict(plan: ProgramPlan) -> str:
    """FITS / DOES NOT FIT, marked when extrapolated or refused by the compiler."""
    text = "FITS" if plan.fits else "DOES NOT FIT"
    if plan.extrapolated_from:
        text += " (extrapolated)"
    elif not plan.compiled:
        text += " (compiler: out of memory)"
    return text


def row(plan: ProgramPlan) -> list[str]:
    mesh = "x".join(f"{k}{v}" for k, v in plan.mesh.items() if v > 1) or "1"
    name = plan.program + (f" [{plan.layers} layers]" if plan.layers is not None else "")
    whole = plan.compiler_flops is not None and not plan.compiler_flops_partial and "decode" not in plan.program
    flops = plan.compiler_flops * plan.devices if whole else plan.model_flops
    return [name, plan.target, mesh, _gib(plan.argument_bytes), _gib(plan.output_bytes), _gib(plan.temp_bytes),
            _gib(plan.total_bytes), _gib(plan.capacity_bytes), verdict(plan), f"{flops:.3g}",
            "-" if plan.time_bound_s is None else f"{plan.time_bound_s:.3g}",
            "-" if plan.mfu_at_bound is None else f"{plan.mfu_at_bound:.0%}", f"{plan.compile_s:.0f}"]


def format_table(plans: Sequence[ProgramPlan]) -> str:
    """A Markdown table of `plans` (bytes per device; FLOPs per step on the whole slice: the compiler's count
    where it has one, else the analytic model FLOPs), then each plan's description and notes."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(p)) + " |" for p in plans]
    for p in plans:
        extra = [p.description] + ([p.error] if p.error else []) + p.notes
        lines.append(f"- {p.program} on {p.target}: " + "; ".join(extra))
    return "\n".join(lines)


def write_plans(path: str | pathlib.Path, plans: Sequence[ProgramPlan], extra: dict[str, Any] | None = None) -> None:
    """`{"plans": [...], **extra}` as JSON at `path`, written atomically."""
    write_json_atomic(path, {"plans": [p.to_json() for p in plans], **(extra or {})})
