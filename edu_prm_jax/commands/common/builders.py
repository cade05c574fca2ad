"""Objects several commands build the same way from their configs: the sampler, the PRM and its trainer."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections

from edu_prm_jax import parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.expansion import expanded_layers_pattern
from edu_prm_jax.models.prm import PRM, expanded_layers_in, load_prm, prm_loss
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.sampling.engine import Sampler
from edu_prm_jax.scoring.examples import separator_ids
from edu_prm_jax.toy.defaults import resolve_policy
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig


def decode_params(s: ml_collections.ConfigDict, **override: Any) -> DecodeParams:
    fields = {f.name for f in dataclasses.fields(DecodeParams)}
    values = {k: v for k, v in s.to_dict().items() if k in fields}
    values["num_slots"] = 1 if s.mode == "greedy" else s.num_leaves
    values.update(override)
    return DecodeParams(**values)


def build_sampler(policy: str, tokenizer_dir: str, s: ml_collections.ConfigDict, mesh_cfg: Any, dtype: str,
                  batch_questions: int = 8, prompt_bucket: int = 32, **override: Any) -> Sampler:
    policy_dir = resolve_policy(policy)
    mesh = parallel.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    model = load_model(policy_dir, dtype=dtype, mesh=mesh)
    tokenizer = load_tokenizer(tokenizer_dir or policy_dir)
    stops = [x for x in s.stop_strings.split("|") if x]
    return Sampler(model, tokenizer, decode_params(s, **override), mesh=mesh, batch_questions=batch_questions,
                   prompt_bucket=prompt_bucket, stop_strings=stops, extra_symbols=s.extra_symbols,
                   disable_symbols=s.disable_symbols)


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


