"""`edu-prm plan`: compile a run's programs for a named TPU slice or GPU host on this CPU, and report.

For each program the planned config runs (the PRM train step with its accumulation, remat and sharding; the
EDU/HT decode loop of `sample`; Best-of-N's largest decode, P-EDU when configured; the PRM scoring forward), the
library's own function is compiled by the target's compiler on abstract inputs (`edu_prm_jax.planning`):
per-device HBM, FITS / DOES NOT FIT, FLOPs per step, a step-time lower bound and the MFU at it, as a table
(`<workdir>/plan.md`, also printed) and JSON. `--config.search` finds the smallest slice, the largest batch or
the most slots that fit.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.commands.common.builders import (
    PRM_COUNT_KEY,
    abstract_prm,
    check_trainable,
    decode_params,
    optim_config,
    prm_loss_fn,
    saved_config,
)
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_text_atomic
from edu_prm_jax.models.config import ATTENTION_IMPLS, Qwen2Config
from edu_prm_jax.models.prm import PRM
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.planning import architectures, compiler, devices, hardware, programs, report, search
from edu_prm_jax.toy.defaults import resolve_policy
from edu_prm_jax.training.optim import make_optimizer

DESCRIPTION = ("Compile the train step, decode loop and scoring forward for a TPU slice or GPU host (no accelerator "
               "needed): per-chip HBM, fits or not, FLOPs, a step-time bound; --config.search finds what fits.")

PROGRAMS = ("train", "decode", "decode_eval", "score")
SCAN_CHOICES = ("auto", "true", "false")
SEARCHES = ("", "slice", "batch", "slots")


@dataclasses.dataclass
class Stage:
    """A program's settings: the stage config it reads, the model it runs and the compute dtype."""

    cfg: ml_collections.ConfigDict
    policy: str
    dtype: str


def stages(run: ml_collections.ConfigDict) -> tuple[dict[str, Stage], dict[str, str]]:
    """({program: its Stage}, {program: why the planned config has none}) for a pipeline, train, sample or
    eval-bon config."""
    have: dict[str, Stage] = {}
    if "stages" in run and "train" in run:  # a pipeline config
        train = Stage(run.train, run.prm_backbone or run.policy, run.dtype)
        have = {"train": train, "score": train, "decode": Stage(run.sample, run.policy, run.dtype),
                "decode_eval": Stage(run.eval_bon, run.policy, run.dtype)}
    elif "seq_len" in run and "rows" in run:  # a train config
        have = {"train": Stage(run, run.policy, run.dtype), "score": Stage(run, run.policy, run.dtype)}
    elif "n_grid" in run:  # an eval-bon config
        have = {"decode_eval": Stage(run, run.policy, run.dtype)}
    elif "sampling" in run and "batch_questions" in run:  # a sample config
        have = {"decode": Stage(run, run.policy, run.dtype)}
    else:
        raise ValueError("config.run is neither a pipeline, train, sample nor eval-bon config")
    missing = {p: "the planned config has no such stage" for p in PROGRAMS if p not in have}
    return have, missing


def eval_sampling(run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """eval-bon's sampler settings: its own fields, and in a pipeline sample's value for each it leaves unset."""
    s = run.eval_bon.sampling if "eval_bon" in run else run.sampling
    base = run.sample.sampling if "sample" in run else ml_collections.ConfigDict()
    return ml_collections.ConfigDict({k: base[k] if v is None and k in base else v for k, v in s.items()})


class Planner:
    """Builds and compiles one config's programs for targets (at full or reduced depth)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.run = config.run
        self.depths = [int(x) for x in str(config.layers).split(",") if x.strip()]
        if len(self.depths) > 2 or any(d < 1 for d in self.depths):
            raise ValueError(f"config.layers={config.layers!r}: one depth ('8') or two ('4,8'), each >= 1")
        if len(self.depths) == 2 and self.depths[0] == self.depths[1]:
            raise ValueError(f"config.layers={config.layers!r}: two different depths are needed to extrapolate")

    # ------------------------------------------------------------------------------------- architectures
    def _arch(self, model_dir: str, field: str, given: str) -> Qwen2Config:
        if given:
            return architectures.architecture(given, field)
        path = resolve_policy(model_dir)
        if not path.is_dir():
            raise ValueError(f"{model_dir}: no such model directory here; pass --config.{field}=NAME (known: "
                             f"{', '.join(architectures.ARCHITECTURES)}) or a config.json")
        return saved_config(path)

    def policy_arch(self, stage: Stage) -> Qwen2Config:
        return self._arch(stage.policy, "arch", self.config.arch)

    def backbone_arch(self, stage: Stage) -> Qwen2Config:
        return self._arch(stage.policy, "prm_arch", self.config.prm_arch or self.config.arch)

    # ------------------------------------------------------------------------------------------ builders
    def _mesh(self, mesh_cfg: Any, target: hardware.Target, fill: str, one_host: bool = False):
        """The stage's mesh on the target's devices; `one_host`: on one host's, as rollouts run (each process
        decodes its own questions on a process-local mesh, README "How work is split across hosts"), compiled
        for the one-host slice of the target's family (`hardware.host_target`)."""
        shape = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
        if fill and -1 not in shape.values():  # a slice search: `fill` takes the devices the fixed axes leave
            shape[fill] = -1
        if one_host:  # libtpu compiles for a whole topology: a host of a pod is the one-host slice of its family
            target = hardware.host_target(target)
        mesh = parallel.make_mesh(**shape, devices=list(devices.target_devices(target)))
        return mesh, parallel.rules_from_config(mesh_cfg.rules)

    def _prm_shape(self, stage: Stage, cfg: ml_collections.ConfigDict, depth: int | None) -> PRM:
        backbone = self.backbone_arch(stage)
        if depth is not None:
            backbone = backbone.replace(num_hidden_layers=depth)
        return abstract_prm(cfg, backbone)

    def for_target(self, cfg: Qwen2Config, target: hardware.Target, expanded_layers: int = 0) -> Qwen2Config:
        """`cfg` as a run on `target` builds it: the layer layout and attention kernel the target's platform
        defaults to (`Qwen2Config.for_platform`: scanned layers and splash / cuDNN attention), unless
        `config.scan_layers` / `config.attention` pin them. A block-expanded PRM stays unrolled, as at run time.
        Raises ValueError for a value outside the documented choices."""
        scan = str(self.config.scan_layers).lower()
        if scan not in SCAN_CHOICES:
            raise ValueError(f"config.scan_layers={self.config.scan_layers!r}: expected one of {SCAN_CHOICES}")
        if self.config.attention not in ATTENTION_IMPLS:
            raise ValueError(f"config.attention={self.config.attention!r}: expected one of {ATTENTION_IMPLS}")
        layout = {"auto": cfg.scan_layers, "true": True, "false": False}[scan]
        if expanded_layers and layout is None:
            layout = False
        attention = cfg.attention if self.config.attention == "auto" else self.config.attention
        return cfg.replace(scan_layers=layout, attention=attention).for_platform(target.chip.platform)

    def _prm_factory(self, shape: PRM, cfg: Qwen2Config, target: hardware.Target) -> Callable[[], PRM]:
        cfg = self.for_target(cfg, target, shape.expanded_layers)
        return lambda: PRM(cfg, shape.head_spec.name, rngs=nnx.Rngs(0), separator_id=shape.separator_id,
                           expanded_layers=shape.expanded_layers)

    def train(self, stage: Stage, target: hardware.Target, depth: int | None, over: dict[str, int],
              fill: str = "") -> tuple[programs.Program, Any]:
        cfg = ml_collections.ConfigDict({**stage.cfg.to_dict(), "policy": stage.policy, "dtype": stage.dtype,
                                         **over})
        if not cfg.init_prm:
            check_trainable(cfg)
        mesh, rules = self._mesh(cfg.mesh, target, fill and "fsdp")
        shape = self._prm_shape(stage, cfg, depth)
        optim = optim_config(cfg, shape)
        text = (f"PRM train step ({shape.head_spec.name} head), {cfg.rows} rows x {cfg.seq_len} tokens, remat "
                f"{cfg.remat}, accum_steps {cfg.accum_steps}, {cfg.dtype} compute, float32 master weights + AdamW")
        program = programs.train_program(self._prm_factory(shape, shape.cfg, target), make_optimizer(optim),
                                         prm_loss_fn(cfg), mesh, rules, cfg.rows, cfg.seq_len,
                                         PRM_COUNT_KEY if cfg.accum_steps > 1 else None, text)
        return program, mesh

    def score(self, stage: Stage, target: hardware.Target, depth: int | None, over: dict[str, int],
              fill: str = "") -> tuple[programs.Program, Any]:
        cfg = ml_collections.ConfigDict({**stage.cfg.to_dict(), "policy": stage.policy, "dtype": stage.dtype})
        rows = over.get("rows") or self.config.score_rows or cfg.rows
        seq_len = self.config.score_len or cfg.seq_len
        mesh, rules = self._mesh(cfg.mesh, target, fill and "fsdp")
        shape = self._prm_shape(stage, cfg, depth)
        saved = self.backbone_arch(stage).torch_dtype  # an exported PRM keeps its backbone's dtype
        prm_cfg = shape.cfg.replace(param_dtype=saved, dtype=stage.dtype, remat="none")
        text = (f"PRM scoring forward, {rows} rows x {seq_len} tokens, {saved} weights (as eval-bon loads an "
                f"exported PRM), {stage.dtype} compute, on the train mesh")
        factory = self._prm_factory(shape, prm_cfg, target)
        return programs.score_program(factory, mesh, rules, rows, seq_len, text), mesh

    def decode(self, name: str, stage: Stage, target: hardware.Target, depth: int | None, over: dict[str, int],
               fill: str = "") -> tuple[programs.Program, Any]:
        cfg = stage.cfg
        evaluating = name == "decode_eval"
        sampling = eval_sampling(self.run) if evaluating else cfg.sampling
        settings: dict[str, Any] = {}
        with_prm = False
        if evaluating:  # Best-of-N's largest run: an EDU (P-EDU) tree budget of max(n_grid)
            settings = {"mode": "edu", "num_leaves": max(int(n) for n in str(cfg.n_grid).split(",") if n.strip()),
                        "prune_below": cfg.prune_below}
            with_prm = bool(cfg.p_edu)
        if "num_leaves" in over:
            settings["num_leaves"] = over["num_leaves"]
        params = decode_params(sampling, **settings)
        mesh, rules = self._mesh(cfg.mesh, target, fill and "data", one_host=True)
        arch = self.policy_arch(stage)
        if depth is not None:
            arch = arch.replace(num_hidden_layers=depth)
        # as the sampler loads it: the checkpoint's dtype, the target platform's layer layout and kernel
        policy_cfg = self.for_target(arch.replace(param_dtype=arch.torch_dtype, dtype=stage.dtype), target)
        prm_factory = None
        if with_prm:
            train_stage = Stage(self.run.train, self.run.prm_backbone or self.run.policy, stage.dtype) \
                if "train" in self.run else Stage(ml_collections.ConfigDict({"head": "scalar", "expand_layers": 0}),
                                                  stage.policy, stage.dtype)
            train_cfg = ml_collections.ConfigDict({**train_stage.cfg.to_dict(), "policy": train_stage.policy,
                                                   "dtype": stage.dtype, "remat": "none", "init_prm": "",
                                                   "separator": "<extra_0>"})
            shape = self._prm_shape(train_stage, train_cfg, depth)
            if shape.head_spec.inserts_separator:
                raise ValueError(f"eval_bon.p_edu=True needs a scalar-head PRM; the planned PRM has the "
                                 f"{shape.head_spec.name} head (eval-bon would refuse it)")
            saved = self.backbone_arch(train_stage).torch_dtype
            prm_factory = self._prm_factory(shape, shape.cfg.replace(param_dtype=saved, dtype=stage.dtype), target)
        split = parallel.as_rules(rules).axis_size("rollout", mesh)
        questions = over.get("batch_questions", cfg.batch_questions)
        questions = -(-questions // split) * split  # as the Sampler pads a batch
        bucket = cfg.prompt_bucket
        prompt_len = -(-self.config.prompt_len // bucket) * bucket
        stops = [x for x in str(sampling.get("stop_strings", "")).split("|") if x]
        stop_shape = (max(1, len(stops)), 16 if stops else 1)
        program = programs.decode_program(params, lambda: Qwen2(policy_cfg, nnx.Rngs(0)), mesh, rules, questions,
                                          prompt_len, prm_factory, stop_shape, name=name)
        program.description += f", {arch.torch_dtype} weights, {stage.dtype} compute"
        if mesh.devices.size < target.devices:
            program.description += (f", on one host's {mesh.devices.size} devices (every host decodes its own "
                                    "questions on its own devices)")
        return program, mesh

    def build(self, name: str, stage: Stage, target: hardware.Target, depth: int | None,
              over: dict[str, int], fill: str = "") -> tuple[programs.Program, Any]:
        if name == "train":
            return self.train(stage, target, depth, over, fill)
        if name == "score":
            return self.score(stage, target, depth, over, fill)
        return self.decode(name, stage, target, depth, over, fill)

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, name: str, stage: Stage, target: hardware.Target, over: dict[str, int] | None = None,
             fill: str = "") -> compiler.ProgramPlan:
        """Compile `name` for `target` at the configured depth(s): full depth, one reduced depth, or two reduced
        depths extrapolated to the full one."""
        over = over or {}
        if not self.depths:
            program, mesh = self.build(name, stage, target, None, over, fill)
            return compiler.compile_program(program, target, mesh)
        compiled = {}
        for depth in self.depths:
            program, mesh = self.build(name, stage, target, depth, over, fill)
            logging.info("plan: compiling %s for %s at %d layers", name, target.name, depth)
            compiled[depth] = compiler.compile_program(program, target, mesh, layers=depth)
        if len(self.depths) == 1:
            compiled[self.depths[0]].notes.append(f"compiled at {self.depths[0]} decoder layers, not the model's")
            return compiled[self.depths[0]]
        arch = self.backbone_arch(stage) if name in ("train", "score") else self.policy_arch(stage)
        full = arch.num_hidden_layers
        return compiler.extrapolate(compiled, full, target)


def _search(planner: Planner, kind: str, name: str, stage: Stage, target: hardware.Target) -> dict[str, Any]:
    """One program's search: the smallest slice of the target's family that fits, or the largest batch (train
    and score: rows, on multiples of the batch split; decode: questions per batch, on multiples of the rollout
    split) or slot count (decode: num_leaves) that fits, starting from the configured value."""
    if kind == "slice":
        best, tried = search.smallest_fitting(
            hardware.family_targets(target), lambda t: planner.plan(name, stage, t, fill="yes").fits)
        return {"search": "slice", "smallest": best.name if best else None,
                "tried": {t.name: ok for t, ok in tried}}
    decoding = name.startswith("decode")
    if kind == "slots" and not decoding:
        return {"search": "slots", "skipped": "slots apply to the decode programs"}
    program, mesh = planner.build(name, stage, target, planner.depths[0] if planner.depths else None, {})
    rules = parallel.rules_from_config(stage.cfg.mesh.rules)
    if kind == "slots":
        field, multiple, start = "num_leaves", 1, program.tokens_per_step // program.args[4].shape[0]
    elif decoding:
        field, multiple, start = "batch_questions", rules.axis_size("rollout", mesh), program.args[4].shape[0]
    else:
        tokens = program.args[1]["tokens"] if name == "train" else program.args[1]
        field, multiple, start = "rows", parallel.batch_divisor(mesh, rules), tokens.shape[0]
    best, tried = search.largest_fitting(lambda n: planner.plan(name, stage, target, {field: n}).fits, start,
                                         multiple, limit=1 << 16)
    return {"search": field, "largest": best, "tried": {str(k): v for k, v in sorted(tried.items())}}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    wanted = [p.strip() for p in str(config.programs).split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PROGRAMS]
    if unknown or not wanted:
        raise ValueError(f"config.programs={config.programs!r}: programs are {', '.join(PROGRAMS)}")
    if config.search not in SEARCHES:
        raise ValueError(f"config.search={config.search!r}: expected one of {SEARCHES}")
    default = hardware.get_target(config.topology)
    targets = {"train": config.train_topology, "score": config.train_topology, "decode": config.decode_topology,
               "decode_eval": config.decode_topology}
    targets = {p: hardware.get_target(t) if t else default for p, t in targets.items()}
    for p in wanted:
        devices.check_compiler(targets[p])  # what to install, before any work
    planner = Planner(config)
    have, missing = stages(config.run)
    out = storage.as_path(config.output) if config.output else workdir / "plan.json"
    plans: list[compiler.ProgramPlan] = []
    skipped = {name: missing[name] for name in wanted if name not in have}
    searches: dict[str, Any] = {}

    def write() -> str:  # after every program, so a long run keeps what it finished
        table = report.format_table(plans)
        table += "".join(f"\n- {name}: skipped ({why})" for name, why in skipped.items())
        table += "".join(f"\n- search {name}: {result}" for name, result in searches.items())
        report.write_plans(out, plans, {"planned": config.planned, "skipped": skipped, "search": searches})
        write_text_atomic(out.with_suffix(".md"), table + "\n")
        return table

    for name in wanted:
        if name not in have:
            continue
        logging.info("plan: compiling %s for %s", name, targets[name].name)
        plan = planner.plan(name, have[name], targets[name])
        plans.append(plan)
        logging.info("plan: %s on %s: %s, %s GiB per device, compiled in %.0f s", name, targets[name].name,
                     report.verdict(plan), "-" if plan.total_bytes is None else f"{plan.total_bytes / 2**30:.2f}",
                     plan.compile_s)
        if config.search:
            searches[name] = _search(planner, config.search, name, have[name], targets[name])
        write()
    print(write())
    logging.info("plan written to %s and %s", out, out.with_suffix(".md"))
