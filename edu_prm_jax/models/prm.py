"""Process reward model: a Qwen2 backbone plus a reward head read at step ends, its loss, and HF IO.

The head is named by `head=` and described by its registry entry (`models/heads.py`: its module, HF tensor
names, HF architecture, step layout). Every head returns one logit per token with sigmoid(logit) = step score,
so training and scoring share one code path whatever the head.

HF layout (what `load_prm` reads and `save_prm` writes):
- backbone tensors under `model.` as in Qwen2ForCausalLM, no `lm_head.weight`;
- the head's own tensors (`HeadSpec.tensors`, e.g. `score.0.*`/`score.2.*` for qwen_math, `score.*` for scalar);
- config.json: `architectures: [HeadSpec.architecture]`, the spec's extra fields, and `"edu_prm_head": <name>`.
  A checkpoint without `"edu_prm_head"` is recognised by its architecture (the public Qwen2.5-Math-PRM-7B/72B
  say "Qwen2ForProcessRewardModel"), else by its head tensor names.
config.json may carry `"edu_prm_separator_id"` (the step separator's token id; public checkpoints do not, so
pass it from the tokenizer, see `scoring.examples.separator_ids`) and `"edu_prm_expanded_layers"` (how many of
the last decoder blocks were appended by block expansion, so a later run can train those alone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import ConfigError, Qwen2Config, dtype_from_name, dtype_name
from edu_prm_jax.models.expansion import expansion_source
from edu_prm_jax.models.heads import HeadSpec, get_head, registered_heads
from edu_prm_jax.models.qwen2 import KVCache, Qwen2
from edu_prm_jax.models.safetensors_io import CheckpointError

BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."
HEAD_CONFIG_KEY = "edu_prm_head"
SEPARATOR_CONFIG_KEY = "edu_prm_separator_id"
EXPANDED_CONFIG_KEY = "edu_prm_expanded_layers"


def _backbone_cfg(cfg: Qwen2Config, expanded_layers: int = 0) -> Qwen2Config:
    """The backbone's config: tied (a PRM has no LM head; marking the backbone tied means Qwen2 allocates none;
    the export keeps cfg as is), and unrolled when block expansion appended layers (models/expansion.py: its
    new blocks are trained alone by a per-parameter regex, which cannot select rows of a stacked parameter).
    Raises ConfigError for `scan_layers=True` with expanded layers."""
    cfg = cfg.replace(tie_word_embeddings=True)
    if expanded_layers:
        if cfg.scan_layers:
            raise ConfigError(f"scan_layers=True with {expanded_layers} block-expanded layers: a block-expanded PRM "
                              "keeps its layers unrolled (its new blocks are trained alone); use scan_layers=False "
                              "or null")
        cfg = cfg.replace(scan_layers=False)
    return cfg


class PRM(nnx.Module):
    """Qwen2 backbone + reward head. `prm(tokens, positions, segment_ids)` -> step logit per token [B, T] float32.

    `head` names a registered head (models/heads.py); `head_spec` is its registry entry."""

    def __init__(
        self,
        cfg: Qwen2Config,
        head: str = "qwen_math",
        *,
        rngs: nnx.Rngs,
        separator_id: int | None = None,
        backbone: Qwen2 | None = None,
        expanded_layers: int = 0,
    ):
        spec = get_head(head)
        self.cfg = cfg
        self._head_name = spec.name  # a string, static in the graphdef; callers read `head_spec`
        self.separator_id = None if separator_id is None else int(separator_id)
        if not 0 <= expanded_layers < cfg.num_hidden_layers:
            raise ValueError(f"expanded_layers must be in [0, {cfg.num_hidden_layers}), got {expanded_layers}")
        self.expanded_layers = int(expanded_layers)  # the last blocks that block expansion appended
        if backbone is not None and expanded_layers and backbone.stacked:
            raise ValueError("a block-expanded PRM needs an unrolled backbone (scan_layers=False): "
                             "see models/expansion.py")
        self.backbone = backbone if backbone is not None else Qwen2(_backbone_cfg(cfg, expanded_layers), rngs)
        self.head = spec.make(cfg, rngs)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        hidden, _ = self.backbone.backbone(tokens, positions, segment_ids=segment_ids)
        return self.head(hidden)

    def prefill(self, prompts: jax.Array, *, cache: KVCache, write_index: jax.Array | None = None) -> KVCache:
        """Write a prompt block into the PRM's own KV cache for incremental scoring (P-EDU, sampling.decode).

        prompts [B, T] int32 written at write_index [B] int32 (None: a fresh prefill from slot 0 of an empty
        cache, which a fused attention kernel runs, `Qwen2.backbone`) -> the updated cache. Nothing is scored:
        a prompt is not a step."""
        _, cache = self.backbone.backbone(prompts, cache=cache, write_index=write_index)
        return cache

    def step(self, tokens: jax.Array, *, cache: KVCache, write_index: jax.Array) -> tuple[jax.Array, KVCache]:
        """Score one newly decoded token per row against the cached prefix: the logit of a step ending here.

        tokens [B] int32 written at write_index [B] int32 -> (step logit [B] float32, sigmoid = score; the
        updated cache). Meaningful for heads read at a step's last token (not at an inserted separator)."""
        hidden, cache = self.backbone.backbone(tokens[:, None], cache=cache, write_index=write_index)
        return self.head(hidden)[:, 0], cache

    @property
    def head_spec(self) -> HeadSpec:
        """The head's registry entry (models/heads.py): its name, HF layout and step layout."""
        return get_head(self._head_name)

    @classmethod
    def from_policy(
        cls,
        policy: Qwen2,
        head: str = "qwen_math",
        *,
        seed: int = 0,
        separator_id: int | None = None,
        mesh: Mesh | None = None,
        expand_layers: int = 0,
        rules: parallel.RulesLike = None,
    ) -> PRM:
        """A PRM whose backbone shares the policy's weights (no copy; the LM head is dropped) and whose head
        is freshly initialised. `expand_layers` appends that many identity-initialised decoder blocks
        (models/expansion.py). With `mesh`, the head (and backbone) are placed by their logical axes (`rules`).

        The backbone keeps the policy's layer layout (`scan_layers`), except that a block-expanded one is
        unrolled (`_backbone_cfg`); from a scanned policy its layers are then sliced out of the stacked
        parameters (a copy)."""
        if expand_layers < 0:
            raise ValueError(f"expand_layers must be >= 0, got {expand_layers}")
        num_layers = policy.cfg.num_hidden_layers
        cfg: Qwen2Config = policy.cfg.replace(num_hidden_layers=num_layers + expand_layers)
        layout = cfg.replace(scan_layers=policy.stacked and not expand_layers)
        abstract = nnx.eval_shape(lambda: Qwen2(_backbone_cfg(layout, expand_layers), nnx.Rngs(0)))
        direct = checkpoints.flat_params(nnx.state(policy))
        per_layer = checkpoints.layer_view(nnx.state(policy))
        graphdef, state = nnx.split(abstract)

        def adopt(path: tuple[Any, ...], var: Any) -> Any:
            if not isinstance(var, nnx.Param):
                return var
            own_name = checkpoints.path_str(path)
            name, zeroed = expansion_source(own_name, num_layers)
            if name == own_name and own_name in direct:  # the same parameter in the same layout: shared
                value = direct[name][...]
            else:
                source, layer = per_layer[name]
                value = source[...] if layer is None else source[...][layer]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"policy parameter {name} has shape {value.shape}, expected {var.shape}")
            if name != own_name:  # a new block: its own buffer (a shared one would be donated twice per step)
                value = jnp.zeros_like(value) if zeroed else jnp.copy(value)
            return var.replace(value)

        state = jax.tree_util.tree_map_with_path(adopt, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        prm = cls(
            cfg, head, rngs=nnx.Rngs(seed), separator_id=separator_id, backbone=nnx.merge(graphdef, state),
            expanded_layers=expand_layers,
        )
        if mesh is not None:
            parallel.shard_model(prm, mesh, rules)
        return prm


# ------------------------------------------------------------------------------------------------- loss


def bce_with_logits(logits: jax.Array, targets: jax.Array, pos_weight: float | jax.Array = 1.0) -> jax.Array:
    """Elementwise -(w * t * log sigmoid(z) + (1 - t) * log sigmoid(-z)) in float32 via log_sigmoid (no
    overflow for large |z|). Soft targets t in [0, 1]; hard labels are the special case t in {0, 1}."""
    z = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    return -(pos_weight * t * jax.nn.log_sigmoid(z) + (1.0 - t) * jax.nn.log_sigmoid(-z))


def masked_bce(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, pos_weight: float | jax.Array = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean BCE over positions where `mask` is set (step ends), plus step metrics.

    The mean is over step ends (a plain count, not the sum of weights), so `pos_weight` scales the positive
    terms without changing what one step counts for. A batch with no step ends gives loss 0.
    Metrics: loss, step_accuracy (sigmoid(z) >= 0.5 vs target >= 0.5), num_steps, num_positive
    (target >= 0.5), mean_score.
    """
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    denom = jnp.maximum(n, 1.0)
    loss = jnp.sum(bce_with_logits(logits, targets, pos_weight) * m) / denom
    z = logits.astype(jnp.float32)
    positive = targets >= 0.5
    correct = ((z >= 0.0) == positive).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "step_accuracy": jnp.sum(correct * m) / denom,
        "num_steps": n,
        "num_positive": jnp.sum(positive.astype(jnp.float32) * m),
        "mean_score": jnp.sum(jax.nn.sigmoid(z) * m) / denom,
    }
    return loss, metrics


def prm_loss(
    prm: PRM, batch: Mapping[str, jax.Array], pos_weight: float | jax.Array = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss on a packed batch {tokens, positions, segment_ids, step_end_mask, targets[, loss_mask]} (see
    scoring.examples): BCE over `loss_mask` (every supervised token) when present, else over step ends."""
    logits = prm(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    mask = batch["loss_mask"] if "loss_mask" in batch else batch["step_end_mask"]
    return masked_bce(logits, batch["targets"], mask, pos_weight)


# ---------------------------------------------------------------------------------------------- HF IO


def head_from_config(raw: dict[str, Any], names: list[str], source: str | os.PathLike) -> str:
    """The checkpoint's head name: config.json's field first, then its HF architecture, then its tensor names."""
    if HEAD_CONFIG_KEY in raw:
        head = raw[HEAD_CONFIG_KEY]
        try:
            return get_head(head).name
        except ValueError as e:
            raise ConfigError(f"{source}: field {HEAD_CONFIG_KEY!r}: {e}") from None
    architectures = raw.get("architectures") or []
    for spec in registered_heads():
        if spec.architecture in architectures:
            return spec.name
    present = set(names)
    for spec in registered_heads():
        if present.issuperset(spec.tensors):
            return spec.name
    raise CheckpointError(
        f"{source}: not a PRM checkpoint: no {HEAD_CONFIG_KEY!r} field, architectures "
        f"{raw.get('architectures')} and no registered head's tensors "
        f"(heads: {[spec.name for spec in registered_heads()]})"
    )


def hf_to_prm(name: str, head: str) -> tuple[str, bool] | None:
    """(PRM NNX path, transpose) for an HF tensor name of a checkpoint with head `head`, or None."""
    in_head = get_head(head).nnx_path(name)
    if in_head is not None:
        return HEAD_PREFIX + in_head[0], in_head[1]
    mapped = checkpoints.hf_to_nnx(name)
    if mapped is None or mapped[0] == "lm_head":
        return None
    return BACKBONE_PREFIX + mapped[0], mapped[1]


def prm_to_hf(path: str, head: str) -> tuple[str, bool]:
    """Inverse of `hf_to_prm`: (HF tensor name, transpose) for a PRM NNX path; KeyError for an unknown one."""
    if path.startswith(HEAD_PREFIX):
        named = get_head(head).hf_name(path[len(HEAD_PREFIX) :])
        if named is None:
            raise KeyError(f"{path} has no HF name in head {head!r}'s tensor table")
        return named
    if not path.startswith(BACKBONE_PREFIX):
        raise KeyError(path)
    return checkpoints.nnx_to_hf(path[len(BACKBONE_PREFIX) :])


def expanded_layers_in(raw: Mapping[str, Any], cfg: Qwen2Config, source: str | os.PathLike) -> int:
    """config.json's count of blocks added by block expansion (0 when absent), validated against the depth."""
    value = raw.get(EXPANDED_CONFIG_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < cfg.num_hidden_layers:
        raise ConfigError(f"{source}: field {EXPANDED_CONFIG_KEY!r} = {value!r}, expected an integer in "
                          f"[0, num_hidden_layers={cfg.num_hidden_layers})")
    return value


def load_prm(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    *,
    head: str | None = None,
    separator_id: int | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    rules: parallel.RulesLike = None,
    scan_layers: bool | None = None,
) -> PRM:
    """Load a PRM from an HF directory (see the module docstring for the layout), streamed onto `mesh`.

    `head` (a registered head's name) overrides the detected one; `separator_id` overrides config.json's. An
    `lm_head.weight` (a causal LM's) is ignored: the PRM never reads it. `scan_layers` picks the backbone's
    layer layout (None: the platform's default; a block-expanded PRM is unrolled, `_backbone_cfg`).
    """
    directory = storage.as_path(path)
    config_path = directory / "config.json"
    cfg = Qwen2Config.from_file(directory)
    cfg = cfg.with_dtypes(param_dtype, dtype).replace(scan_layers=scan_layers)
    raw = json.loads(config_path.read_text())
    ckpt = checkpoints.HFCheckpoint(directory)
    spec = get_head(head or head_from_config(raw, ckpt.names(), config_path))
    head = spec.name
    sep = separator_id if separator_id is not None else raw.get(SEPARATOR_CONFIG_KEY)
    expanded = expanded_layers_in(raw, cfg, config_path)
    abstract = nnx.eval_shape(lambda: PRM(cfg, head, rngs=nnx.Rngs(0), separator_id=sep, expanded_layers=expanded))
    other_head = {n for other in registered_heads() if other.name != head for n in other.tensors}
    stray = sorted(n for n in ckpt.names() if n in other_head)
    if stray:
        raise CheckpointError(
            f"{directory}: head {head!r} expected, but found {stray} (another head's tensors)"
        )
    missing = [n for n in spec.tensors if n not in ckpt.names()]
    if missing:
        raise CheckpointError(f"{directory}: head {head!r} needs tensor(s) {missing}, which are missing")
    return checkpoints.load_tensors_into(
        abstract, ckpt, lambda n: hf_to_prm(n, head), mesh, rules, ignore=lambda n: n == "lm_head.weight"
    )


def prm_hf_config(prm: PRM, dtype_name: str) -> dict[str, Any]:
    """config.json for an exported PRM: the Qwen2 fields, the head's architecture and extra fields, and the
    head/separator/expansion keys."""
    spec = prm.head_spec
    config = prm.cfg.to_hf_dict() | {"torch_dtype": dtype_name, HEAD_CONFIG_KEY: spec.name}
    config["architectures"] = [spec.architecture]
    config.update(spec.hf_config)
    if prm.separator_id is not None:
        config[SEPARATOR_CONFIG_KEY] = prm.separator_id
    if prm.expanded_layers:
        config[EXPANDED_CONFIG_KEY] = prm.expanded_layers
    return config


def save_prm(
    prm: PRM,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    shard_bytes: int = checkpoints.DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    copy_files: Sequence[str | os.PathLike] = (),
    field: str = "output",
) -> None:
    """Export to the HF layout `load_prm` reads (staged, then renamed into place; `copy_files`, e.g. the
    tokenizer, go in with it). Raises DestinationError for a destination the tool may not replace (see
    `checkpoints.write_hf_directory`)."""
    stored = dtype_name(prm.cfg.torch_dtype if dtype is None else dtype)  # canonical: "bf16" -> "bfloat16"
    tensors = checkpoints.iter_hf_tensors(
        prm, lambda p: prm_to_hf(p, prm.head_spec.name), dtype_from_name(stored)
    )
    checkpoints.write_hf_directory(out_dir, prm_hf_config(prm, stored), tensors, shard_bytes,
                                   overwrite=overwrite, copy_files=copy_files, field=field)
