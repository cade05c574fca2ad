"""`edu-prm pipeline`: sample -> label -> train -> eval-bon -> eval-processbench, then one report.md.

Each stage is the same code as its own subcommand, reads only the previous stage's files in the workdir and
resumes where it stopped (finished shards are skipped, training restarts from its last checkpoint, sampling
runs of the evaluation are cached), so rerunning the command after an interruption finishes the job.
"""

from __future__ import annotations

import json
import pathlib
import re
import time

import ml_collections
from absl import logging

from edu_prm_jax import config_utils
from edu_prm_jax.commands import registry
from edu_prm_jax.commands.common.paths import prm_dir
from edu_prm_jax.io.atomic import write_text_atomic

DESCRIPTION = "Run the whole method (sample, label, train, eval-bon, eval-processbench) and write report.md."

# Stage name (a field of the pipeline config) -> the command that runs it.
STAGES = {"sample": "sample", "label": "label", "train": "train", "eval_bon": "eval-bon",
          "processbench": "eval-processbench"}
SHARED = ("policy", "dtype")  # set once for all stages; meshes stay per stage (sampling vs training)


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    sub = ml_collections.ConfigDict(config[name].to_dict())
    for field in SHARED:
        if field in sub:
            sub[field] = config[field]
    if name == "train" and config.get("prm_backbone"):
        sub.policy = config.prm_backbone
    if name == "eval_bon":  # evaluate with the anchor rule the PRM's training steps were cut by
        sub.sampling = ml_collections.ConfigDict(config.sample.sampling.to_dict())
    return sub


def effective_config(config: ml_collections.ConfigDict) -> dict:
    """The pipeline's own fields plus each selected stage's config after `stage_config`, i.e. what the pipeline
    hands that stage (the raw config would show, e.g., eval_bon.sampling.tau at its own default while the stage
    uses sample's). Stages not in `config.stages` are left out."""
    selected = [s for s in config.stages.split(",") if s]
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


def write_report(config: ml_collections.ConfigDict, workdir: pathlib.Path, timings: dict[str, float]) -> pathlib.Path:
    parts = ["# EDU-PRM pipeline report", "", f"Workdir: `{workdir}`", ""]
    parts += _json_table("Labels", workdir / "labels" / "label_stats.json", "statistic")
    parts += _json_table("PRM training", workdir / "prm" / "train_summary.json", "metric")
    parts.append(_section(workdir / "eval_bon" / "report.md", "eval_bon"))
    parts.append(_section(workdir / "processbench" / "report.md", "processbench"))
    parts += ["## Stage wall times (this invocation)", "", "| stage | seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    parts += ["", "## Config", "", "What the pipeline hands each selected stage (shared fields and eval_bon's "
              "sampling resolved; a stage finished by an earlier invocation kept the config it ran with, in "
              "`<stage>_config.json`).", "",
              "```json", json.dumps(effective_config(config), indent=2, default=str), "```", ""]
    out = workdir / "report.md"
    write_text_atomic(out, "\n".join(parts))
    return out


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    stages = [s for s in config.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    timings: dict[str, float] = {}
    for name in STAGES:
        if name not in stages:
            continue
        sub = stage_config(config, name)
        if name == "processbench" and not pathlib.Path(sub.data).is_dir():
            logging.warning("ProcessBench data %s not found: stage skipped", sub.data)
            continue
        if name == "train" and (workdir / "prm" / "train_summary.json").is_file() and \
                (prm_dir(workdir) / "config.json").is_file():
            logging.info("train: finished earlier (%s), skipped", workdir / "prm" / "train_summary.json")
            continue
        config_utils.write_config_json(sub, workdir / f"{name}_config.json")
        logging.info("pipeline stage %s", name)
        start = time.time()
        registry.load(STAGES[name]).run(sub, workdir)
        timings[name] = time.time() - start
    report = write_report(config, workdir, timings)
    logging.info("pipeline report: %s", report)
