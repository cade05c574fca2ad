"""Hugging Face safetensors <-> NNX parameters, and Orbax save/restore.

The name mapping is a table of rules, separate from the model (the model never knows HF names). Import streams
one tensor at a time straight into its target sharding: each device's slice is read from the memory-mapped file
by `jax.make_array_from_callback`, so even a 72B import never holds two host copies of a tensor.

Both layer layouts (`Qwen2Config.scan_layers`) are seen through one per-layer naming (`layer_view`): a scanned
model's stacked parameter 'layers.attn.q_proj.kernel' [L, ...] appears as 'layers.0.attn.q_proj.kernel', ...,
one name per layer, exactly the unrolled model's names. So the HF rules, the missing/unexpected-tensor checks
and exports are the same for both (an export of either layout is byte-identical), and an import fills a stacked
parameter from its L per-layer tensors, each device reading only its slice of each. `save_orbax` records the
layout it saved; `restore_orbax_into` converts a checkpoint of the other layout (`qwen2.set_scan_layers`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from jax.typing import DTypeLike

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.io.destinations import staged_directory
from edu_prm_jax.models.config import Qwen2Config, as_dtype, dtype_name
from edu_prm_jax.models.qwen2 import LAYERS_AXIS, Qwen2, is_stacked, scan_layers_in, set_scan_layers
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


def tokenizer_files(src: str | os.PathLike) -> list[epath.Path]:
    """The `TOKENIZER_FILES` present in directory `src` (for `copy_files=` of the export functions)."""
    return [storage.as_path(src) / name for name in TOKENIZER_FILES if (storage.as_path(src) / name).is_file()]


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


INDEX_FILE = "model.safetensors.index.json"
CANONICAL_FILE = "model.safetensors"
# Names of the one tensor a tied-embedding model shares between its input embedding and output projection.
# `safetensors.torch.save_model` keeps only the alphabetically first name of shared tensors, so a tied Qwen2
# saved that way stores it as lm_head.weight alone; `save_pretrained` stores model.embed_tokens.weight.
TIED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _config_ties_embeddings(directory: epath.Path) -> bool:
    """config.json's `tie_word_embeddings` (False when absent or unreadable: the loaders report a bad config)."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("tie_word_embeddings", False))


class HFCheckpoint:
    """The tensors of an HF model directory, seen as transformers sees it:

    1. `model.safetensors.index.json` when present: exactly the shards and names its weight_map lists;
    2. else `model.safetensors` when present; any other *.safetensors beside it (a stale `model_old.safetensors`,
       a backup) is ignored, as transformers ignores it;
    3. else every *.safetensors file, provided no tensor is defined in two of them.

    Every ambiguity raises CheckpointError naming the files: a tensor defined in two files of view 3, or an
    index beside a `model.safetensors` it does not list (the two tools would then load different weights).

    Tied embeddings (`tied_embeddings`, default: config.json's `tie_word_embeddings`): the shared tensor may be
    stored under either of `TIED_NAMES`; the missing name is an alias of the stored one, so both resolve.
    """

    def __init__(self, directory: str | os.PathLike, tied_embeddings: bool | None = None):
        self.dir = storage.as_path(directory)
        index = self.dir / INDEX_FILE
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # stored tensor name -> file name
        self.aliases: dict[str, str] = {}  # alias -> stored tensor name (tied embeddings)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            if (self.dir / CANONICAL_FILE).is_file() and CANONICAL_FILE not in set(weight_map.values()):
                raise CheckpointError(f"{self.dir}: holds both {INDEX_FILE} and a {CANONICAL_FILE} the index does "
                                      "not list; which one is the model is ambiguous (transformers would read "
                                      f"{CANONICAL_FILE}): remove the stale one")
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise CheckpointError(f"{index}: lists shard {fname!r}, which is missing from {self.dir}")
                self.files[fname] = SafetensorsFile(self.dir / fname)
            for name, fname in weight_map.items():
                if name not in self.files[fname]:
                    raise CheckpointError(f"{self.dir / fname}: index says it holds tensor {name!r}; it does not")
                self.where[name] = fname
        else:
            canonical = self.dir / CANONICAL_FILE
            shards = [canonical] if canonical.is_file() else sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no {CANONICAL_FILE}, no {INDEX_FILE} and no other "
                                      "*.safetensors file")
            for shard in shards:
                self.files[shard.name] = SafetensorsFile(shard)
                for name in self.files[shard.name].keys():
                    if name in self.where:
                        raise CheckpointError(
                            f"{self.dir}: tensor {name!r} is defined in both {self.where[name]} and {shard.name} "
                            f"(no {INDEX_FILE} and no {CANONICAL_FILE} to say which is the model): remove the "
                            "stale file or add an index")
                    self.where[name] = shard.name
        if tied_embeddings is None:
            tied_embeddings = _config_ties_embeddings(self.dir)
        if tied_embeddings:
            stored = [n for n in TIED_NAMES if n in self.where]
            if len(stored) == 1:
                for alias in TIED_NAMES:
                    if alias != stored[0]:
                        self.aliases[alias] = stored[0]

    def stored_name(self, name: str) -> str:
        """The name `name` is stored under (itself, or the tied tensor it aliases)."""
        return self.aliases.get(name, name)

    def names(self) -> list[str]:
        """Every tensor name this view resolves: the stored ones, then the aliases of tied tensors."""
        return [*self.where, *self.aliases]

    def file_of(self, name: str) -> epath.Path:
        return self.dir / self.where[self.stored_name(name)]

    def array(self, name: str) -> np.ndarray:
        """A memory-mapped view of tensor `name` (an alias reads the tensor it names)."""
        stored = self.stored_name(name)
        return self.files[self.where[stored]].array(stored)

    def describe(self, name: str) -> str:
        """'name' (or 'name' (stored as 'other')) for error messages."""
        stored = self.stored_name(name)
        return repr(name) if stored == name else f"{name!r} (stored as {stored!r})"


def path_str(path: tuple[Any, ...]) -> str:
    """'layers.0.attn.q_proj.kernel' from a jax key path (the flat parameter names of checkpoints)."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    """{'layers.0.attn.q_proj.kernel': Variable} for every Param in `state` (a scanned model's stacked
    parameters under their own names, 'layers.attn.q_proj.kernel'; `layer_view` splits them per layer)."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {path_str(path): var for path, var in leaves if isinstance(var, nnx.Param)}


def per_layer_name(stacked_path: str, layer: int) -> str:
    """'backbone.layers.3.attn.q_proj.kernel' for the stacked path 'backbone.layers.attn.q_proj.kernel' and
    layer 3: the name the parameter has in an unrolled model."""
    parts = stacked_path.split(".")
    if LAYERS_AXIS not in parts:
        raise KeyError(f"{stacked_path}: not a stacked-layers parameter path (no {LAYERS_AXIS!r} component)")
    at = parts.index(LAYERS_AXIS) + 1
    return ".".join([*parts[:at], str(layer), *parts[at:]])


def layer_view(state: nnx.State) -> dict[str, tuple[nnx.Variable, int | None]]:
    """{per-layer name: (Variable, layer index)} for every Param in `state`: an unrolled parameter under its own
    name with index None; a stacked one ([L, ...], `qwen2.is_stacked`) once per layer, under the name that layer
    has in an unrolled model (`per_layer_name`), with its index into the leading axis."""
    view: dict[str, tuple[nnx.Variable, int | None]] = {}
    for path, var in flat_params(state).items():
        if is_stacked(var):
            for i in range(var.shape[0]):
                view[per_layer_name(path, i)] = (var, i)
        else:
            view[path] = (var, None)
    return view


def _canonical_order(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key giving an unrolled model's parameter order (layer numbers compared as numbers)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def load_tensors_into(
    abstract_model: nnx.Module,
    ckpt: HFCheckpoint,
    name_map: Callable[[str], tuple[str, bool] | None],
    mesh: Mesh | None,
    rules: parallel.RulesLike = None,
    ignore: Callable[[str], bool] = lambda n: False,
) -> nnx.Module:
    """Fill an `nnx.eval_shape`-built model from `ckpt`, checking names and shapes, one tensor at a time.

    `name_map` maps an HF name to (per-layer NNX name, transpose); a scanned model's stacked parameter is filled
    from its per-layer tensors (`layer_view`), each device reading only its slice of each of them."""
    graphdef, state = nnx.split(abstract_model)
    targets = layer_view(state)
    mesh = mesh or parallel.make_mesh(devices=jax.local_devices()[:1])
    found: dict[str, str] = {}
    extra = []
    for name in ckpt.names():
        mapped = name_map(name)
        if mapped is None or mapped[0] not in targets:
            if not (IGNORED.match(name) or ignore(name)):
                extra.append(name)
            continue
        found.setdefault(mapped[0], name)  # a stored name before an alias of the same tensor
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
    views: dict[int, list[np.ndarray]] = {}  # id(Variable) -> its per-layer host views (one when unrolled)
    variables: dict[int, nnx.Variable] = {}
    for path, (var, layer) in targets.items():
        name = found[path]
        transpose = name_map(name)[1]
        src = ckpt.array(name)
        want = tuple(var.shape) if layer is None else tuple(var.shape[1:])
        got = tuple(src.shape[::-1]) if transpose else tuple(src.shape)
        if got != want:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {ckpt.describe(name)} has shape "
                                  f"{tuple(src.shape)}, the config needs {want[::-1] if transpose else want}")
        views.setdefault(id(var), []).append(src.T if transpose else src)
        variables.setdefault(id(var), var)
    loaded = {}
    for key, var in variables.items():
        dtype, parts = var.dtype, views[key]
        sharding = parallel.variable_sharding(var, mesh, rules)
        if is_stacked(var):  # layer_view lists a stacked parameter's layers in order: parts[i] is layer i
            def read(idx: tuple[slice, ...], parts: list[np.ndarray] = parts, d: Any = dtype) -> np.ndarray:
                return np.stack([np.asarray(parts[i][idx[1:]], dtype=d) for i in range(len(parts))[idx[0]]])
        else:
            def read(idx: tuple[slice, ...], v: np.ndarray = parts[0], d: Any = dtype) -> np.ndarray:
                return np.asarray(v[idx], dtype=d)
        loaded[key] = jax.make_array_from_callback(tuple(var.shape), sharding, read)
    new_state = jax.tree_util.tree_map(
        lambda var: var.replace(loaded[id(var)]) if isinstance(var, nnx.Param) else var,
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, new_state)


def load_hf_model(directory: str | os.PathLike, *, param_dtype: DTypeLike | None = None,
                  dtype: DTypeLike | None = None, mesh: Mesh | None = None, rules: parallel.RulesLike = None,
                  scan_layers: bool | None = None):
    """A Qwen2 model from an HF directory (config.json + safetensors, read as `HFCheckpoint` describes), placed
    on `mesh`. `param_dtype`/`dtype` take any spelling `config.dtype_name` accepts; None keeps float32.
    `scan_layers` picks the layers' layout (None: the platform's default, `Qwen2Config.scan_layers`).
    Raises ConfigError / CheckpointError naming the file and field or tensor."""
    cfg = Qwen2Config.from_file(directory).with_dtypes(param_dtype, dtype).replace(scan_layers=scan_layers)
    ckpt = HFCheckpoint(directory, tied_embeddings=cfg.tie_word_embeddings)
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0)))
    # A tied model has no lm_head: its shared tensor loads as the embedding, whichever of `TIED_NAMES` stores
    # it; a stored lm_head.weight beside the embedding (a copy) is not a model tensor.
    ignore = (lambda n: n == "lm_head.weight") if cfg.tie_word_embeddings else (lambda n: False)
    return load_tensors_into(abstract, ckpt, hf_to_nnx, mesh, rules, ignore)


def _host_array(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: nnx.Module, to_hf: Callable[[str], tuple[str, bool]], dtype: Any
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every parameter, gathered one at a time. `to_hf` maps per-layer names
    (`layer_view`): a stacked parameter yields one tensor per layer, sliced on its devices before the gather,
    in the order an unrolled model yields them."""
    view = layer_view(nnx.state(model))
    names = list(view)
    if any(layer is not None for _, layer in view.values()):
        names.sort(key=_canonical_order)
    for path in names:
        var, layer = view[path]
        name, transpose = to_hf(path)
        arr = _host_array(var[...] if layer is None else var[...][layer])
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
        written: list[tuple[epath.Path, list[str]]] = []
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
            storage.copy_file(src, tmp / storage.as_path(src).name)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)


def save_hf_model(model: nnx.Module, out_dir: str | os.PathLike, *, dtype: DTypeLike | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: Mapping[str, str] | None = None,
                  overwrite: bool = False, copy_files: Sequence[str | os.PathLike] = (), field: str = "output",
                  sources: Sequence[str | os.PathLike] = ()) -> None:
    """Export a Qwen2 model to HF format that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `dtype` (any `config.dtype_name` spelling; None = the dtype the weights were loaded from) is the stored
    dtype, written to config.json under its canonical name. Destination rules (what may be replaced, what is
    refused) are those of `write_hf_directory`."""
    cfg: Qwen2Config = model.cfg
    stored = dtype_name(cfg.torch_dtype if dtype is None else dtype, "dtype")
    config = cfg.to_hf_dict() | {"torch_dtype": stored}
    write_hf_directory(out_dir, config, iter_hf_tensors(model, nnx_to_hf, as_dtype(stored)),
                       shard_bytes, overwrite=overwrite, copy_files=copy_files, extra_files=extra_files,
                       field=field, sources=sources)


# ----------------------------------------------------------------------------------------------- Orbax
ORBAX_CONFIG = "edu_prm_config.json"
SCAN_LAYERS_KEY = "scan_layers"  # ORBAX_CONFIG field: the saved layers' layout (absent in older saves: unrolled)


def save_orbax(model: nnx.Module, directory: str | os.PathLike, extra_config: dict[str, Any] | None = None, *,
               overwrite: bool = False, copy_files: Sequence[str | os.PathLike] = (), field: str = "output",
               sources: Sequence[str | os.PathLike] = ()) -> None:
    """Params only (training checkpoints with optimizer state live in training/checkpointing.py), staged and
    renamed into place under the same destination rules as `write_hf_directory`."""
    import orbax.checkpoint as ocp

    directory = storage.absolute(directory)
    state = nnx.state(model, nnx.Param)
    with staged_directory(directory, overwrite=overwrite, field=field, sources=sources,
                          provenance={"kind": "orbax_params"}) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", state)
        meta = {"model": model.cfg.to_hf_dict(), SCAN_LAYERS_KEY: scan_layers_in(model), **(extra_config or {})}
        (tmp / ORBAX_CONFIG).write_text(json.dumps(meta, indent=2))
        for src in copy_files:
            storage.copy_file(src, tmp / storage.as_path(src).name)


def is_orbax_dir(directory: str | os.PathLike) -> bool:
    return (storage.as_path(directory) / ORBAX_CONFIG).is_file()


def saved_scan_layers(directory: str | os.PathLike) -> bool:
    """The layers' layout `save_orbax` saved in `directory` (False for a save older than the field)."""
    meta = json.loads((storage.as_path(directory) / ORBAX_CONFIG).read_text())
    return bool(meta.get(SCAN_LAYERS_KEY, False))


def restore_orbax_into(abstract_model: nnx.Module, directory: str | os.PathLike, mesh: Mesh | None = None,
                       rules: parallel.RulesLike = None, item: str = "params") -> nnx.Module:
    """Restore params into explicit target shardings on `mesh` (a checkpoint saved on one mesh restores onto
    another). A checkpoint saved in the other layer layout is restored in its own layout, converted
    (`qwen2.set_scan_layers`: a transient second copy of the layer parameters) and re-placed on `mesh`."""
    import orbax.checkpoint as ocp

    wanted = scan_layers_in(abstract_model)
    saved = saved_scan_layers(directory) if is_orbax_dir(directory) else wanted
    if saved != wanted:
        abstract_model = set_scan_layers(abstract_model, saved)
    graphdef, state = nnx.split(abstract_model)
    params = nnx.state(abstract_model, nnx.Param)
    mesh = mesh or parallel.make_mesh(devices=jax.local_devices()[:1])
    shardings = parallel.state_shardings(params, mesh, rules)
    target = jax.tree.map(
        lambda var, sh: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh)),
        params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(storage.absolute(directory) / item, target)
    model = nnx.merge(graphdef, state)
    nnx.update(model, restored)
    if saved != wanted:
        parallel.shard_model(set_scan_layers(model, wanted), mesh, rules)
    return model


def load_orbax_model(directory: str | os.PathLike, *, param_dtype: DTypeLike | None = None,
                     dtype: DTypeLike | None = None, mesh: Mesh | None = None, rules: parallel.RulesLike = None,
                     scan_layers: bool | None = None):
    """A Qwen2 model from an Orbax directory written by `save_orbax`, placed on `mesh`; dtypes and `scan_layers`
    as in `load_hf_model` (whatever layout the checkpoint was saved in)."""
    meta = json.loads((storage.as_path(directory) / ORBAX_CONFIG).read_text())
    cfg = Qwen2Config.from_hf_dict(meta["model"], str(storage.as_path(directory) / ORBAX_CONFIG))
    cfg = cfg.with_dtypes(param_dtype, dtype).replace(scan_layers=scan_layers)
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(0)))
    return restore_orbax_into(abstract, directory, mesh, rules)
