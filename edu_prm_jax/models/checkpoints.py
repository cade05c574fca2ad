"""Hugging Face safetensors <-> NNX parameters, and Orbax save/restore.

The name mapping is a table of rules, separate from the model (the model never knows HF names). Import streams
one tensor at a time straight into its target sharding: each device's slice is read from the memory-mapped file
by `jax.make_array_from_callback`, so even a 72B import never holds two host copies of a tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.io.destinations import staged_directory
from edu_prm_jax.models.config import Qwen2Config, dtype_from_name
from edu_prm_jax.models.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

# (HF regex, NNX path template, transpose). Kernels are [in, out] here and [out, in] in HF.
_LAYER = r"model\.layers\.(\d+)\."
HF_RULES: list[tuple[str, str, bool]] = [
    (r"model\.embed_tokens\.weight", "embed", False),
    (r"model\.norm\.weight", "final_norm.scale", False),
    (r"lm_head\.weight", "lm_head", True),
    (_LAYER + r"input_layernorm\.weight", "layers.{0}.input_norm.scale", False),
    (_LAYER + r"post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.scale", False),
    (_LAYER + r"self_attn\.([qkvo])_proj\.weight", "layers.{0}.attn.{1}_proj.kernel", True),
    (_LAYER + r"self_attn\.([qkv])_proj\.bias", "layers.{0}.attn.{1}_proj.bias", False),
    (_LAYER + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", True),
]
# Files a tokenizer or generation setup needs next to the weights; exports carry them along when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def tokenizer_files(src: str | os.PathLike) -> list[pathlib.Path]:
    """The `TOKENIZER_FILES` present in directory `src` (for `copy_files=` of the export functions)."""
    return [pathlib.Path(src) / name for name in TOKENIZER_FILES if (pathlib.Path(src) / name).is_file()]


IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
DEFAULT_SHARD_BYTES = 4 * 1024**3


def hf_to_nnx(name: str, prefix: str = "") -> tuple[str, bool] | None:
    """('layers.3.attn.q_proj.kernel', transpose) for an HF tensor name, or None if no rule matches."""
    for pattern, template, transpose in HF_RULES:
        m = re.fullmatch(prefix + pattern, name)
        if m:
            return template.format(*m.groups()), transpose
    return None


def nnx_to_hf(path: str) -> tuple[str, bool]:
    """Inverse of `hf_to_nnx` for the Qwen2 backbone."""
    fixed = {"embed": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
             "lm_head": "lm_head.weight"}
    if path in fixed:
        return fixed[path], path == "lm_head"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    if not m:
        raise KeyError(path)
    i, rest = m.groups()
    table = {"input_norm.scale": ("input_layernorm.weight", False),
             "post_attn_norm.scale": ("post_attention_layernorm.weight", False)}
    if rest in table:
        tail, tr = table[rest]
    else:
        mm = re.fullmatch(r"(attn|mlp)\.(\w+)_proj\.(kernel|bias)", rest)
        if not mm:
            raise KeyError(path)
        block = "self_attn" if mm.group(1) == "attn" else "mlp"
        tail, tr = f"{block}.{mm.group(2)}_proj.{'weight' if mm.group(3) == 'kernel' else 'bias'}", \
            mm.group(3) == "kernel"
    return f"model.layers.{i}.{tail}", tr


class HFCheckpoint:
    """All tensors of an HF directory: one `model.safetensors` or shards listed in the index file."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        index = self.dir / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise CheckpointError(f"{index}: lists shard {fname!r}, which is missing from {self.dir}")
                self.files[fname] = SafetensorsFile(self.dir / fname)
            for name, fname in weight_map.items():
                if name not in self.files[fname]:
                    raise CheckpointError(f"{self.dir / fname}: index says it holds tensor {name!r}; it does not")
                self.where[name] = fname
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no model.safetensors and no model.safetensors.index.json")
            for shard in shards:
                self.files[shard.name] = SafetensorsFile(shard)
                for name in self.files[shard.name].keys():
                    self.where[name] = shard.name

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> pathlib.Path:
        return self.dir / self.where[name]

    def array(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].array(name)


def path_str(path: tuple[Any, ...]) -> str:
    """'layers.0.attn.q_proj.kernel' from a jax key path (the flat parameter names of checkpoints)."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    """{'layers.0.attn.q_proj.kernel': Variable} for every Param in `state`."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {path_str(path): var for path, var in leaves if isinstance(var, nnx.Param)}


def load_tensors_into(
    abstract_model: nnx.Module,
    ckpt: HFCheckpoint,
    name_map: Callable[[str], tuple[str, bool] | None],
    mesh: Mesh | None,
    rules: parallel.RulesLike = None,
    ignore: Callable[[str], bool] = lambda n: False,
) -> nnx.Module:
    """Fill an `nnx.eval_shape`-built model from `ckpt`, checking names and shapes, one tensor at a time."""
    graphdef, state = nnx.split(abstract_model)
    targets = flat_params(state)
    mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
    found: dict[str, str] = {}
    extra = []
    for name in ckpt.names():
        mapped = name_map(name)
        if mapped is None or mapped[0] not in targets:
            if not (IGNORED.match(name) or ignore(name)):
                extra.append(name)
            continue
        found[mapped[0]] = name
    if extra:
        raise CheckpointError(f"{ckpt.dir}: unexpected tensor(s) not in the model: {extra[:8]}"
                              f"{' ...' if len(extra) > 8 else ''} (in {ckpt.file_of(extra[0]).name})")
    missing = [p for p in targets if p not in found]
    if missing:
        hf_names = []
        for p in missing[:8]:
            try:
                hf_names.append(nnx_to_hf(p)[0])
            except KeyError:
                hf_names.append(p)
        raise CheckpointError(f"{ckpt.dir}: missing tensor(s) {hf_names}{' ...' if len(missing) > 8 else ''}")
    loaded = {}
    for path, var in targets.items():
        name = found[path]
        transpose = name_map(name)[1]
        src = ckpt.array(name)
        want = tuple(var.shape)
        got = tuple(src.shape[::-1]) if transpose else tuple(src.shape)
        if got != want:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {tuple(src.shape)}, the "
                                  f"config needs {want[::-1] if transpose else want}")
        dtype = var.dtype
        view = src.T if transpose else src
        sharding = parallel.variable_sharding(var, mesh, rules)
        loaded[path] = jax.make_array_from_callback(
            want, sharding, lambda idx, v=view, d=dtype: np.asarray(v[idx], dtype=d))
    new_state = jax.tree_util.tree_map_with_path(
        lambda p, var: var.replace(loaded[path_str(p)]) if isinstance(var, nnx.Param) else var,
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, new_state)


def load_hf_model(directory: str | os.PathLike, *, param_dtype: str | None = None, dtype: str | None = None,
                  mesh: Mesh | None = None, rules: parallel.RulesLike = None):
    """A Qwen2 model from an HF directory (config.json + safetensors), placed on `mesh`."""
    from edu_prm_jax.models.qwen2 import Qwen2

    cfg = Qwen2Config.from_file(directory)
    cfg = cfg.replace(param_dtype=param_dtype or cfg.param_dtype, dtype=dtype or cfg.dtype)
    ckpt = HFCheckpoint(directory)
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0)))
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); it is not a model tensor.
    ignore = (lambda n: n == "lm_head.weight") if cfg.tie_word_embeddings else (lambda n: False)
    return load_tensors_into(abstract, ckpt, hf_to_nnx, mesh, rules, ignore)


def _host_array(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: nnx.Module, to_hf: Callable[[str], tuple[str, bool]], dtype: Any
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every parameter, gathered one at a time."""
    for path, var in flat_params(nnx.state(model)).items():
        name, transpose = to_hf(path)
        arr = _host_array(var[...])
        if "float" in arr.dtype.name:  # never export NaN/inf weights (bfloat16 included)
            finite = np.isfinite(arr.astype(np.float32, copy=False))
            if not finite.all():
                raise CheckpointError(f"parameter {path} ({name}): {int((~finite).sum())} of {arr.size} values are "
                                      "not finite; refusing to export")
        arr = arr.T if transpose else arr
        yield name, np.ascontiguousarray(arr.astype(dtype))


def write_hf_directory(out_dir: str | os.PathLike, config: dict[str, Any],
                       tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int = DEFAULT_SHARD_BYTES, *,
                       overwrite: bool = False, copy_files: Sequence[str | os.PathLike] = (),
                       extra_files: Mapping[str, str] | None = None, field: str = "output",
                       sources: Sequence[str | os.PathLike] = ()) -> None:
    """config.json + safetensors (sharded with an index above `shard_bytes`) + `copy_files` (e.g. tokenizer
    files, copied by name) + `extra_files` (name -> text), staged and renamed into place, so a crash never leaves
    a directory that looks complete.

    Raises DestinationError (before anything is written) when `out_dir` is a file, a non-empty directory not
    written by this tool, an earlier export without `overwrite`, or overlaps one of `sources`.
    """
    with staged_directory(out_dir, overwrite=overwrite, field=field, sources=sources,
                          provenance={"kind": "hf_model"}) as tmp:
        # Streamed: a shard is written as soon as it is full, so the host holds at most one shard of tensors
        # (not the whole model). Shards get their final `-of-N` names once N is known.
        written: list[tuple[pathlib.Path, list[str]]] = []
        pending: list[tuple[str, np.ndarray]] = []
        size = total = 0

        def flush() -> None:
            path = tmp / f".shard-{len(written):05d}.safetensors"
            write_safetensors(path, pending, {"format": "pt"})
            written.append((path, [name for name, _ in pending]))
            pending.clear()

        for name, arr in tensors:
            if pending and size + arr.nbytes > shard_bytes:
                flush()
                size = 0
            pending.append((name, arr))
            size += arr.nbytes
            total += arr.nbytes
        flush()
        if len(written) == 1:
            written[0][0].rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (path, names) in enumerate(written):
                fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                path.rename(tmp / fname)
                weight_map.update({name: fname for name in names})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for src in copy_files:
            shutil.copyfile(src, tmp / pathlib.Path(src).name)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)


def save_hf_model(model: nnx.Module, out_dir: str | os.PathLike, *, dtype: str | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: Mapping[str, str] | None = None,
                  overwrite: bool = False, copy_files: Sequence[str | os.PathLike] = (), field: str = "output",
                  sources: Sequence[str | os.PathLike] = ()) -> None:
    """Export a Qwen2 model to HF format that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Destination rules (what may be replaced, what is refused) are those of `write_hf_directory`."""
    cfg: Qwen2Config = model.cfg
    dtype_name = dtype or cfg.torch_dtype
    config = cfg.to_hf_dict() | {"torch_dtype": dtype_name}
    write_hf_directory(out_dir, config, iter_hf_tensors(model, nnx_to_hf, dtype_from_name(dtype_name)),
                       shard_bytes, overwrite=overwrite, copy_files=copy_files, extra_files=extra_files,
                       field=field, sources=sources)


# ----------------------------------------------------------------------------------------------- Orbax
ORBAX_CONFIG = "edu_prm_config.json"


def save_orbax(model: nnx.Module, directory: str | os.PathLike, extra_config: dict[str, Any] | None = None, *,
               overwrite: bool = False, copy_files: Sequence[str | os.PathLike] = (), field: str = "output",
               sources: Sequence[str | os.PathLike] = ()) -> None:
    """Params only (training checkpoints with optimizer state live in training/checkpointing.py), staged and
    renamed into place under the same destination rules as `write_hf_directory`."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    state = nnx.state(model, nnx.Param)
    with staged_directory(directory, overwrite=overwrite, field=field, sources=sources,
                          provenance={"kind": "orbax_params"}) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", state)
        meta = {"model": model.cfg.to_hf_dict(), **(extra_config or {})}
        (tmp / ORBAX_CONFIG).write_text(json.dumps(meta, indent=2))
        for src in copy_files:
            shutil.copyfile(src, tmp / pathlib.Path(src).name)


def is_orbax_dir(directory: str | os.PathLike) -> bool:
    return (pathlib.Path(directory) / ORBAX_CONFIG).is_file()


def restore_orbax_into(abstract_model: nnx.Module, directory: str | os.PathLike, mesh: Mesh | None = None,
                       rules: parallel.RulesLike = None, item: str = "params") -> nnx.Module:
    """Restore params into explicit target shardings on `mesh` (a checkpoint saved on one mesh restores onto
    another)."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model)
    params = nnx.state(abstract_model, nnx.Param)
    mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
    shardings = parallel.state_shardings(params, mesh, rules)
    target = jax.tree.map(
        lambda var, sh: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh)),
        params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(pathlib.Path(directory).absolute() / item, target)
    model = nnx.merge(graphdef, state)
    nnx.update(model, restored)
    return model


def load_orbax_model(directory: str | os.PathLike, *, param_dtype: str | None = None, dtype: str | None = None,
                     mesh: Mesh | None = None, rules: parallel.RulesLike = None):
    from edu_prm_jax.models.qwen2 import Qwen2

    meta = json.loads((pathlib.Path(directory) / ORBAX_CONFIG).read_text())
    cfg = Qwen2Config.from_hf_dict(meta["model"], str(pathlib.Path(directory) / ORBAX_CONFIG))
    cfg = cfg.replace(param_dtype=param_dtype or cfg.param_dtype, dtype=dtype or cfg.dtype)
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0)))
    return restore_orbax_into(abstract, directory, mesh, rules)
