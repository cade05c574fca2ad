"""`edu-prm pipeline`: sample -> label -> train -> eval-bon -> eval-processbench, then one report.md.

Each stage is the same code as its own subcommand, reads only the previous stage's files in the workdir and
resumes where it stopped (finished shards are skipped, training restarts from its last checkpoint, sampling
runs of the evaluation are cached), so rerunning the command after an interruption finishes the job.

`policy` and `dtype` are set once for every stage; eval_bon samples with sample's settings except the
eval_bon.sampling fields the user set. The processbench stage needs `processbench.data` (ProcessBench is not
shipped): without it the stage is skipped, with the reason logged and written in the report.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import time

import ml_collections
from absl import logging

from edu_prm_jax import config_utils
from edu_prm_jax.commands import registry
from edu_prm_jax.commands.common.paths import train_finished
from edu_prm_jax.configs.pipeline import SHARED
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_text_atomic
from edu_prm_jax.toy.processbench import is_toy_spec

DESCRIPTION = "Run the whole method (sample, label, train, eval-bon, eval-processbench) and write report.md."

# Stage name (a field of the pipeline config) -> the command that runs it.
STAGES = {"sample": "sample", "label": "label", "train": "train", "eval_bon": "eval-bon",
          "processbench": "eval-processbench"}
# Fields through which a stage would read or write somewhere other than the workdir: in the pipeline each stage
# reads the previous stage's output from the workdir, so setting one of these would break the hand-off.
WIRED_BY_PIPELINE = {"sample": ("output",), "label": ("samples", "output"), "train": ("labels",),
                     "eval_bon": ("prm",), "processbench": ("prm",)}
PROCESSBENCH_HINT = ("pass --config.processbench.data=DIR, the dir holding ProcessBench's gsm8k.json, math.json, "
                     "olympiadbench.json and omnimath.json")


def stage_defaults(name: str) -> ml_collections.ConfigDict:
    """The shipped config of the command that runs stage `name` (which fields that command has)."""
    return importlib.import_module(f"edu_prm_jax.configs.{STAGES[name].replace('-', '_')}").get_config()


def eval_bon_sampling(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """eval_bon's sampler settings: each eval_bon.sampling field the user set, else sample.sampling's value
    (so Best-of-N cuts steps by the anchor rule the PRM was trained on unless told otherwise)."""
    base, out = config.sample.sampling, {}
    for key, value in config.eval_bon.sampling.items():
        if value is None:
            if key not in base:
                raise ValueError(f"eval_bon.sampling.{key} is unset and sample.sampling has no {key} to take: "
                                 f"set --config.eval_bon.sampling.{key}")
            value = base[key]
        out[key] = value
    return ml_collections.ConfigDict(out)


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """What the pipeline hands stage `name`: its sub-config plus the shared fields the stage's command takes
    (`policy`, `dtype`; train's policy is `prm_backbone` when set) and, for eval_bon, the resolved sampling."""
    sub = config[name].to_dict()
    for field in SHARED:
        if field in sub:
            raise ValueError(f"{name}.{field}: the pipeline sets {field} once for every stage from "
                             f"--config.{field}; remove {name}.{field} from the config")
    for field in WIRED_BY_PIPELINE[name]:
        if sub.get(field):
            raise ValueError(f"{name}.{field}={sub[field]!r}: the pipeline hands each stage the previous stage's "
                             f"output through the workdir; run `edu-prm {STAGES[name]}` on its own to use another "
                             "path")
    if name == "sample" and sub["sampling"]["mode"] != "edu":
        raise ValueError(f"sample.sampling.mode={sub['sampling']['mode']!r}: the pipeline labels EDU trees (an HT "
                         "sample has no anchors to cut steps at); Best-of-N's HT runs are eval_bon's")
    own = stage_defaults(name)
    for field in SHARED:
        if field in own:
            sub[field] = config[field]
    if name == "train" and config.get("prm_backbone"):
        sub["policy"] = config.prm_backbone
    if name == "eval_bon":
        sub["sampling"] = eval_bon_sampling(config).to_dict()
    ordered = {k: sub[k] for k in own.keys() if k in sub}  # the command's own field order, as in its --help
    return ml_collections.ConfigDict({**ordered, **sub})


def check_unchanged(name: str, sub: ml_collections.ConfigDict, recorded: pathlib.Path) -> None:
    """A finished stage is skipped only when it ran with the settings asked for now; otherwise stop and name the
    settings that differ (rerunning it silently, or skipping it while the report claims the new values, would
    both mislead)."""
    if not recorded.is_file():
        return
    before = json.loads(recorded.read_text())
    now = json.loads(sub.to_json_best_effort())  # as `config_utils.write_config_json` recorded it
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ValueError(f"{name} finished earlier in this workdir with other settings ({shown}); use a fresh "
                         "--workdir, or put the earlier settings back")


def processbench_skip_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why the processbench stage cannot run (None: it can). A dir that is set but missing is an error, raised
    before any stage runs rather than after hours of training."""
    data = config.processbench.data
    if not data:
        return f"no ProcessBench data dir ({PROCESSBENCH_HINT})"
    if is_toy_spec(data):  # toy-processbench is built from the policy, nothing to find
        return None
    if not storage.as_path(data).is_dir():
        raise FileNotFoundError(f"processbench.data={data!r}: no such directory ({PROCESSBENCH_HINT})")
    return None


def effective_config(config: ml_collections.ConfigDict, skipped: dict[str, str] | None = None) -> dict:
    """The pipeline's own fields plus each selected stage's config after `stage_config`, i.e. what the pipeline
    hands that stage (the raw config would show, e.g., eval_bon.sampling.tau unset while the stage uses
    sample's). Stages not in `config.stages`, or skipped, are left out."""
    selected = [s for s in config.stages.split(",") if s and s not in (skipped or {})]
    top = {k: v for k, v in config.to_dict().items() if k not in STAGES}
    return {**top, **{name: stage_config(config, name).to_dict() for name in STAGES if name in selected}}


def _section(path: pathlib.Path, image_prefix: str) -> str:
    if not path.is_file():
        return ""
    text = path.read_text()
    return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", rf"![\1]({image_prefix}/\2)", text)


def _json_table(title: str, path: pathlib.Path, key: str) -> list[str]:
    """A flat JSON file as a two-column markdown table (nothing when the stage has not run)."""
    if not path.is_file():
        return []
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in json.loads(path.read_text()).items()]
    return [f"## {title}", "", f"| {key} | value |", "|---|---|", *rows, ""]


def write_report(config: ml_collections.ConfigDict, workdir: pathlib.Path, timings: dict[str, float],
                 skipped: dict[str, str] | None = None) -> pathlib.Path:
    skipped = skipped or {}
    parts = ["# EDU-PRM pipeline report", "", f"Workdir: `{workdir}`", ""]
    parts += _json_table("Labels", workdir / "labels" / "label_stats.json", "statistic")
    parts += _json_table("PRM training", workdir / "prm" / "train_summary.json", "metric")
    parts.append(_section(workdir / "eval_bon" / "report.md", "eval_bon"))
    parts.append(_section(workdir / "processbench" / "report.md", "processbench"))
    parts += ["## Stage wall times (this invocation)", "", "| stage | seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    parts += [f"| {k} | skipped: {why} |" for k, why in skipped.items()]
    parts += ["", "## Config", "", "What the pipeline hands each selected stage (shared fields and eval_bon's "
              "sampling resolved; a stage finished by an earlier invocation kept the config it ran with, in "
              "`<stage>_config.json`).", "",
              "```json", json.dumps(effective_config(config, skipped), indent=2, default=str), "```", ""]
    out = workdir / "report.md"
    write_text_atomic(out, "\n".join(parts))
    return out


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    stages = [s for s in config.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    skipped: dict[str, str] = {}
    if "processbench" in stages and (reason := processbench_skip_reason(config)):
        skipped["processbench"] = reason
    subs = {name: stage_config(config, name) for name in STAGES if name in stages}  # every error before any run
    timings: dict[str, float] = {}
    for name, sub in subs.items():
        if name in skipped:
            logging.warning("pipeline stage %s skipped: %s", name, skipped[name])
            continue
        if name == "train" and train_finished(workdir) is not None:
            check_unchanged(name, sub, workdir / f"{name}_config.json")
            logging.info("train: finished earlier (%s), skipped", workdir / "prm" / "train_summary.json")
            continue
        config_utils.write_config_json(sub, workdir / f"{name}_config.json")
        logging.info("pipeline stage %s", name)
        start = time.time()
        registry.load(STAGES[name]).run(sub, workdir)
        timings[name] = time.time() - start
    report = write_report(config, workdir, timings, skipped)
    logging.info("pipeline report: %s", report)
