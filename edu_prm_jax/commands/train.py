"""`edu-prm train`: PRM training on labelled steps; exports the final PRM to <workdir>/prm/hf."""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import logging

from edu_prm_jax import parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.data.questions import resolve_policy
from edu_prm_jax.data.records import check_fingerprint, write_json_atomic
from edu_prm_jax.models.checkpoints import tokenizer_files
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.expansion import expanded_layers_pattern
from edu_prm_jax.models.prm import PRM, expanded_layers_in, load_prm, prm_loss, save_prm
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.prm_data import separator_ids
from edu_prm_jax.training.prm_train import PackedStream, load_label_records, make_eval_fn, split_records, to_examples

DESCRIPTION = "Train a PRM (policy backbone + reward head) on MC-labelled steps; Orbax checkpoints, resume."


def prm_dir(workdir: pathlib.Path, configured: str = "") -> pathlib.Path:
    """Where a PRM is read from: the configured path, else the one `edu-prm train` exports in the workdir."""
    return pathlib.Path(configured) if configured else workdir / "prm" / "hf"


def tokenizer_source(config: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(config.init_prm) if config.init_prm else resolve_policy(config.policy)


TRAINABLE = ("all", "head", "expanded")


def check_trainable(config: ml_collections.ConfigDict) -> None:
    """Reject inconsistent `trainable` / `expand_layers` / `init_prm` settings before anything is written."""
    if config.trainable not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {config.trainable!r}")
    if config.expand_layers < 0:
        raise ValueError(f"train.expand_layers must be >= 0, got {config.expand_layers}")
    if config.expand_layers and config.init_prm:
        raise ValueError("train.expand_layers applies to a PRM started from train.policy, not train.init_prm")
    if config.trainable == "expanded" and not config.expand_layers:
        if not config.init_prm:
            raise ValueError("train.trainable='expanded' needs train.expand_layers > 0 (the blocks to train), or a "
                             "train.init_prm exported from an expanded PRM")
        if not init_prm_expanded_layers(config.init_prm):
            raise ValueError(f"train.trainable='expanded': train.init_prm={config.init_prm} has no expanded blocks "
                             f"(its config.json has no edu_prm_expanded_layers); use trainable='all' or 'head'")
    if config.trainable == "head" and config.expand_layers:
        raise ValueError("train.trainable='head' would leave the train.expand_layers new blocks as the identity; "
                         "use trainable='expanded' or 'all'")


def init_prm_expanded_layers(path: str) -> int:
    """How many blocks of the PRM at `path` block expansion appended (read from its config.json alone)."""
    config_path = pathlib.Path(path) / "config.json"
    raw = json.loads(config_path.read_text())
    return expanded_layers_in(raw, Qwen2Config.from_hf_dict(raw, str(config_path)), config_path)


def trainable_pattern(config: ml_collections.ConfigDict, prm: PRM) -> str | None:
    """The optimizer's trainable-parameter regex for `config.trainable` (None = every parameter)."""
    if config.trainable == "all":
        return None
    if config.trainable == "head":
        return r"^head\."
    return expanded_layers_pattern(prm.cfg.num_hidden_layers - prm.expanded_layers, prm.expanded_layers)


def build_prm(config: ml_collections.ConfigDict, mesh) -> PRM:
    if config.init_prm:
        prm = load_prm(config.init_prm, mesh, dtype=config.dtype)
    else:
        policy_dir = resolve_policy(config.policy)
        policy = load_model(policy_dir, dtype=config.dtype, mesh=mesh)
        sep = separator_ids(load_tokenizer(policy_dir), config.separator) if config.head == "qwen_math" else None
        prm = PRM.from_policy(policy, head=config.head, seed=config.seed, separator_id=sep, mesh=mesh,
                              expand_layers=config.expand_layers)
    prm.cfg = prm.cfg.replace(remat=config.remat)  # a runtime choice, never exported
    prm.backbone.cfg = prm.backbone.cfg.replace(remat=config.remat)
    return prm


def make_trainer(config: ml_collections.ConfigDict, workdir: pathlib.Path, prm: PRM, eval_fn, mesh) -> Trainer:
    updates = max(1, config.steps // config.accum_steps)
    optim = OptimConfig(learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, updates - 1),
                        total_steps=updates, end_lr_fraction=config.end_lr_fraction,
                        weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                        accum_steps=config.accum_steps, trainable=trainable_pattern(config, prm))
    train_cfg = TrainConfig(steps=config.steps, log_every=10, eval_every=config.eval_every,
                            checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                            best_metric="step_auroc", best_mode="max", peak_flops_per_device=config.peak_flops)
    pos_weight = config.pos_weight
    return Trainer(prm, lambda m, b: prm_loss(m, b, pos_weight), optim, train_cfg, workdir / "prm", mesh=mesh,
                   eval_fn=eval_fn, config=config.to_dict())


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    labels_dir = pathlib.Path(config.labels) if config.labels else workdir / "labels"
    export_dir = prm_dir(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    label_files = sorted(labels_dir.glob("steps-*.jsonl"))
    check_trainable(config)
    check_fingerprint(workdir / "prm", {  # a resumed run must train on the same data and model
        "labels": str(labels_dir.resolve()), "label_shards": [f"{p.name}:{p.stat().st_size}" for p in label_files],
        **{k: config[k] for k in ("policy", "init_prm", "head", "separator", "seq_len", "rows", "seed",
                                  "eval_fraction")},
        **{k: config[k] for k, default in (("supervise", "step_end"), ("expand_layers", 0), ("trainable", "all"))
           if config[k] != default}})  # runs written before these options existed still resume
    records = load_label_records(labels_dir)
    train_records, held = split_records(records, config.eval_fraction)
    prm = build_prm(config, mesh)
    train_ex = to_examples(train_records, prm, config.seq_len, config.supervise)
    eval_kept = [(ex, r.get("question_id", i)) for i, r in enumerate(held)  # metrics read step ends, like scoring
                 for ex in to_examples([r], prm, config.seq_len)]
    eval_ex = [ex for ex, _ in eval_kept]
    dropped = len(train_records) + len(held) - len(train_ex) - len(eval_ex)
    logging.info("PRM data: %d train / %d eval solutions (%d longer than seq_len=%d dropped)", len(train_ex),
                 len(eval_ex), dropped, config.seq_len)
    stream = PackedStream(train_ex, config.seq_len, config.rows, config.seed)
    eval_fn = make_eval_fn(eval_ex, config.rows, config.pos_weight,
                           groups=[question for _, question in eval_kept])
    trainer = make_trainer(config, workdir, prm, eval_fn, mesh)
    try:
        metrics = trainer.train(stream)
    finally:
        trainer.close()
    if metrics.get("preempted"):
        logging.warning("stopped by SIGTERM at step %d; rerun with the same workdir to resume", trainer.step)
        return
    # the run's own export (replaced on rerun); scoring needs the policy's tokenizer beside it
    save_prm(trainer.model, export_dir, overwrite=True, copy_files=tokenizer_files(tokenizer_source(config)))
    summary = {"train_solutions": len(train_ex), "eval_solutions": len(eval_ex), "dropped_too_long": dropped,
               **metrics}
    write_json_atomic(workdir / "prm" / "train_summary.json", summary)
    logging.info("PRM exported to %s\n%s", export_dir, json.dumps(summary, indent=2))
