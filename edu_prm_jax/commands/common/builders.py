"""Objects several commands build the same way from their configs: the sampler, the PRM and its trainer."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.io import storage
from edu_prm_jax.models.checkpoints import ORBAX_CONFIG, HFCheckpoint, is_orbax_dir
from edu_prm_jax.models.config import Qwen2Config, dtype_name
from edu_prm_jax.models.expansion import expanded_layers_pattern
from edu_prm_jax.models.heads import get_head
from edu_prm_jax.models.prm import (
    PRM,
    SEPARATOR_CONFIG_KEY,
    expanded_layers_in,
    head_from_config,
    load_prm,
    prm_loss,
)
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.sampling.engine import Sampler
from edu_prm_jax.scoring.examples import separator_ids
from edu_prm_jax.toy.defaults import resolve_policy
from edu_prm_jax.training.checkpointing import Checkpointer
from edu_prm_jax.training.loop import CHECKPOINT_SUBDIR, TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig

# Sampling-config fields the Sampler takes itself (`build_sampler` and eval-bon pass them), not DecodeParams.
SAMPLER_FIELDS = {"stop_strings": "", "extra_symbols": "", "disable_symbols": False}


def decode_params(s: ml_collections.ConfigDict, **override: Any) -> DecodeParams:
    """DecodeParams from a sampling config (fields by name; greedy decodes one path) and per-run `override`s. A
    config field that neither a decode setting nor a Sampler argument reads is an error, never silently dropped."""
    names = [f.name for f in dataclasses.fields(DecodeParams)]
    for key in s.keys():
        if key not in names and key not in SAMPLER_FIELDS:
            raise ValueError(f"sampling.{key}: no sampler setting reads this field (sampling fields: "
                             f"{sorted([*names, *SAMPLER_FIELDS])})")
    values = {k: v for k, v in s.items() if k in names}
    values.update(override)
    if values.get("mode") == "greedy" and "num_leaves" not in override:
        values["num_leaves"] = 1
    return DecodeParams(**values)


def sampler_options(s: ml_collections.ConfigDict) -> dict[str, Any]:
    """The Sampler's own keyword arguments from a sampling config (defaults for fields the config leaves out)."""
    opts = {k: s.get(k, default) for k, default in SAMPLER_FIELDS.items()}
    return {"stop_strings": [x for x in opts["stop_strings"].split("|") if x],
            "extra_symbols": opts["extra_symbols"], "disable_symbols": opts["disable_symbols"]}


def sampling_fingerprint(policy_dir: pathlib.Path, dtype: str, s: ml_collections.ConfigDict) -> dict[str, Any]:
    """What shapes tree shards besides DecodeParams and the questions (which `sample_to_shards` adds itself):
    the policy, its dtype, stop strings and the anchor symbol set. The layout written is unchanged."""
    return {"policy": str(storage.resolved(policy_dir)), "dtype": dtype_name(dtype),
            "stop_strings": s.stop_strings, "symbols": [s.extra_symbols, s.disable_symbols]}


def saved_config(model_dir: str | pathlib.Path) -> Qwen2Config:
    """The architecture of the model (policy or PRM) saved at `model_dir`, an HF or Orbax directory, read from its
    config files alone (no weight is read)."""
    model_dir = storage.as_path(model_dir)
    if is_orbax_dir(model_dir):
        meta_path = model_dir / ORBAX_CONFIG
        return Qwen2Config.from_hf_dict(json.loads(meta_path.read_text())["model"], str(meta_path))
    return Qwen2Config.from_file(model_dir)


def checkpoint_dtype(model_dir: str | pathlib.Path) -> str:
    """The dtype the weights at `model_dir` were saved in (config.json's `torch_dtype`): what inference loads them
    in. Holding them wider would cost memory and change no number: a matmul casts its weights to the compute
    dtype, and widening a saved value is exact."""
    return saved_config(model_dir).torch_dtype


def build_sampler(policy: str, tokenizer_dir: str, s: ml_collections.ConfigDict, mesh_cfg: Any, dtype: str,
                  batch_questions: int = 8, prompt_bucket: int = 32, refill: bool = True, **override: Any) -> Sampler:
    params = decode_params(s, **override)  # a bad field fails before the model loads
    policy_dir = resolve_policy(policy)
    mesh = parallel.local_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)  # multi-host: this host's devices
    rules = parallel.rules_from_config(mesh_cfg.rules)  # the sampling layout: this command's own mesh.rules
    model = load_model(policy_dir, dtype=dtype, param_dtype=checkpoint_dtype(policy_dir), mesh=mesh, rules=rules)
    tokenizer = load_tokenizer(tokenizer_dir or policy_dir)
    return Sampler(model, tokenizer, params, mesh=mesh, batch_questions=batch_questions,
                   prompt_bucket=prompt_bucket, rules=rules, refill=refill, **sampler_options(s))


TRAINABLE = ("all", "head", "expanded")


def check_trainable(config: ml_collections.ConfigDict) -> None:
    """Reject inconsistent `trainable` / `expand_layers` / `init_prm` settings before anything is written."""
    if config.trainable not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {config.trainable!r}")
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
    config_path = storage.as_path(path) / "config.json"
    raw = json.loads(config_path.read_text())
    return expanded_layers_in(raw, Qwen2Config.from_hf_dict(raw, str(config_path)), config_path)


def trainable_pattern(config: ml_collections.ConfigDict, prm: PRM) -> str | None:
    """The optimizer's trainable-parameter regex for `config.trainable` (None = every parameter)."""
    if config.trainable == "all":
        return None
    if config.trainable == "head":
        return r"^head\."
    return expanded_layers_pattern(prm.cfg.num_hidden_layers - prm.expanded_layers, prm.expanded_layers)


def build_prm(config: ml_collections.ConfigDict, mesh, rules: parallel.RulesLike = None) -> PRM:
    if config.init_prm:
        prm = load_prm(config.init_prm, mesh, dtype=config.dtype, rules=rules)
    else:
        policy_dir = resolve_policy(config.policy)
        policy = load_model(policy_dir, dtype=config.dtype, mesh=mesh, rules=rules)
        inserts_separator = get_head(config.head).inserts_separator
        sep = separator_ids(load_tokenizer(policy_dir), config.separator) if inserts_separator else None
        prm = PRM.from_policy(policy, head=config.head, seed=config.seed, separator_id=sep, mesh=mesh,
                              expand_layers=config.expand_layers, rules=rules)
    prm.cfg = prm.cfg.replace(remat=config.remat)  # a runtime choice, never exported
    prm.backbone.cfg = prm.backbone.cfg.replace(remat=config.remat)
    return prm


def abstract_prm(config: ml_collections.ConfigDict, backbone: Qwen2Config | None = None) -> PRM:
    """The PRM `build_prm(config, mesh)` builds, as shapes and dtypes only (`nnx.eval_shape`), read from config
    files: no weight is loaded. What a trained PRM is restored into (export), so that the policy's weights are
    never held beside the trained ones. Keep in step with `build_prm`.

    `backbone` (an architecture, e.g. from `edu-prm plan --config.arch`) replaces the policy's files, which need
    not exist here: the PRM starts from it as from `config.policy` (the separator id, a plain integer, is then
    left unset)."""
    if backbone is not None:
        cfg = backbone.replace(num_hidden_layers=backbone.num_hidden_layers + config.expand_layers)
        head, sep, expanded = config.head, None, config.expand_layers
    elif config.init_prm:
        directory = storage.as_path(config.init_prm)
        config_path = directory / "config.json"
        raw = json.loads(config_path.read_text())
        cfg = Qwen2Config.from_hf_dict(raw, str(config_path))
        head = head_from_config(raw, HFCheckpoint(directory).names(), config_path)
        sep = raw.get(SEPARATOR_CONFIG_KEY)
        expanded = expanded_layers_in(raw, cfg, config_path)
    else:
        policy_dir = resolve_policy(config.policy)
        if is_orbax_dir(policy_dir):
            meta_path = policy_dir / ORBAX_CONFIG
            cfg = Qwen2Config.from_hf_dict(json.loads(meta_path.read_text())["model"], str(meta_path))
        else:
            cfg = Qwen2Config.from_file(policy_dir)
        cfg = cfg.replace(num_hidden_layers=cfg.num_hidden_layers + config.expand_layers)
        head = config.head
        inserts_separator = get_head(head).inserts_separator
        sep = separator_ids(load_tokenizer(policy_dir), config.separator) if inserts_separator else None
        expanded = config.expand_layers
    cfg = cfg.with_dtypes(dtype=config.dtype).replace(remat=config.remat)
    return nnx.eval_shape(lambda: PRM(cfg, head, rngs=nnx.Rngs(0), separator_id=sep, expanded_layers=expanded))


BEST_METRIC, BEST_MODE = "step_auroc", "max"  # the held-out metric that picks a PRM run's 'best' checkpoint


def prm_checkpoints(workdir: pathlib.Path) -> Checkpointer:
    """The checkpoints an `edu-prm train` run left in `workdir`, opened read-only and ranked as `make_trainer`
    ranks them."""
    return Checkpointer(workdir / "prm" / CHECKPOINT_SUBDIR, best_metric=BEST_METRIC, best_mode=BEST_MODE,
                        read_only=True)


PRM_COUNT_KEY = "num_steps"  # the prm_loss aux field its mean is over (the Trainer's count_key when accumulating)


def optim_config(config: ml_collections.ConfigDict, prm: PRM) -> OptimConfig:
    """The optimizer settings of a PRM run (`config` a train config): what `make_trainer` and `edu-prm plan` use."""
    updates = max(1, config.steps // config.accum_steps)
    return OptimConfig(learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, updates - 1),
                       total_steps=updates, end_lr_fraction=config.end_lr_fraction,
                       weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                       accum_steps=config.accum_steps, trainable=trainable_pattern(config, prm))


def prm_loss_fn(config: ml_collections.ConfigDict):
    """The loss a PRM run trains with: `prm_loss` at the config's `pos_weight`."""
    pos_weight = config.pos_weight
    return lambda m, b: prm_loss(m, b, pos_weight)


def make_trainer(config: ml_collections.ConfigDict, workdir: pathlib.Path, prm: PRM, eval_fn, mesh,
                 rules: parallel.RulesLike = None) -> Trainer:
    optim = optim_config(config, prm)
    train_cfg = TrainConfig(steps=config.steps, log_every=10, eval_every=config.eval_every,
                            checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                            best_metric=BEST_METRIC, best_mode=BEST_MODE, peak_flops_per_device=config.peak_flops)
    return Trainer(prm, prm_loss_fn(config), optim, train_cfg, workdir / "prm", mesh=mesh,
                   eval_fn=eval_fn, config=config.to_dict(), rules=rules, count_key=PRM_COUNT_KEY)


