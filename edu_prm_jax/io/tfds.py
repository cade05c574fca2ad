"""Training data as TFDS array_record datasets, written and read without TensorFlow.

Why TFDS + array_record: random access (``tfds.data_source``) lets grain shuffle globally and resume
deterministically on any host, and the ``dataset_info.json``/``features.json`` next to the shards documents
the schema. TensorFlow is not a dependency: array_record datasets are produced by a plain
``tfds.core.GeneratorBasedBuilder`` with ``file_format="array_record"`` (TFDS's beam-less writer serialises
with its own protobuf copy) and read back through ``tfds.data_source``.

Two deliberate workarounds, both on the builder class below:
- ``code_path`` is None: TFDS 4.9.x looks up the builder's source file through ``importlib_resources``, a
  backport it does not install on Python >= 3.9; the path only serves download checksums, which an
  in-memory dataset has none of.
- ``AdhocBuilder``/``store_as_tfds_dataset`` are not used: they test ``isinstance(x, tf.data.Dataset)``,
  which imports TensorFlow.

Atomicity: TFDS writes into ``<name>/incomplete.XXXX`` and renames the version directory into place only
after every shard and ``dataset_info.json`` exist, deleting the temp directory on failure; so a failed
build leaves nothing a rerun would trust, and a finished one is skipped by a rerun.

Object stores (gs://): array_record's C++ reader and writer open local files only, so a dataset for a remote
``data_dir`` is built in a local scratch directory and uploaded file by file with ``dataset_info.json`` last
(its presence is what marks a prepared dataset, here and in TFDS); reading one downloads it into a local
directory removed at exit (labels are small next to the model).
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.jsonl import DataError, PathLike

_SCALARS = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "bool": np.bool_}
SPEC_KINDS = (*_SCALARS, "string", *(f"{k}[]" for k in (*_SCALARS, "string")))

# Missing values: TFDS features cannot hold None, so optional strings become "" and PRM800K's unrated
# (human-written) steps get this rating.
MISSING_RATING = -100


def _feature(kind: str | tfds.features.FeatureConnector) -> tfds.features.FeatureConnector:
    if isinstance(kind, tfds.features.FeatureConnector):
        return kind
    if kind not in SPEC_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; use one of {SPEC_KINDS} or a tfds FeatureConnector")
    base = kind.removesuffix("[]")
    inner = tfds.features.Text() if base == "string" else _SCALARS[base]
    return tfds.features.Sequence(inner) if kind.endswith("[]") else inner


def features_from_spec(spec: Mapping[str, str | tfds.features.FeatureConnector]) -> tfds.features.FeaturesDict:
    """``{"tokens": "int32[]", "id": "string", "label": "int64"}`` -> a TFDS FeaturesDict."""
    return tfds.features.FeaturesDict({k: _feature(v) for k, v in spec.items()})


def _check_value(kind: Any, value: Any, field: str) -> None:
    """Catch type errors before TFDS does, so the message names the field (TFDS's does not)."""
    if not isinstance(kind, str):
        return  # a user-supplied FeatureConnector validates itself
    base, is_list = kind.removesuffix("[]"), kind.endswith("[]")
    values = value
    if is_list:
        if isinstance(value, np.ndarray):
            if value.ndim != 1:
                raise DataError(f"expected a 1-D list for {kind}, got shape {value.shape}", field=field)
            values = value.tolist()
        elif not isinstance(value, list | tuple):
            raise DataError(f"expected a list for {kind}, got {type(value).__name__}", field=field)
    else:
        values = [value]
    for v in values:
        v = v.item() if isinstance(v, np.generic) else v
        ok = {
            "string": isinstance(v, str),
            "bool": isinstance(v, bool),
            "float32": isinstance(v, int | float) and not isinstance(v, bool),
        }.get(base, isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise DataError(f"expected {kind}, got {type(v).__name__} {v!r}", field=field)


def _validated(records: Iterable[Mapping[str, Any]], spec: Mapping[str, Any]) -> Iterator[tuple[int, dict]]:
    keys = set(spec)
    for i, r in enumerate(records):
        missing, extra = keys - set(r), set(r) - keys
        try:
            if missing:
                raise DataError("missing", field=sorted(missing)[0])
            if extra:
                raise DataError("not in the features spec", field=sorted(extra)[0])
            for k, kind in spec.items():
                _check_value(kind, r[k], k)
        except DataError as e:
            raise e.located("<records>", item=i) from None
        yield i, dict(r)


def _builder_class(name: str, features: tfds.features.FeaturesDict, version: str) -> type:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r} must be snake_case (a-z, 0-9, _), as TFDS requires")

    class _InMemoryBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        _records: Mapping[str, Iterable[tuple[int, dict]]] = {}

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> None:  # see the module docstring
            return None

        def _info(self) -> tfds.core.DatasetInfo:
            # disable_shuffling keeps the on-disk order = input order; grain shuffles at read time.
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager: Any) -> dict:
            return dict(self._records)

        def _generate_examples(self) -> Iterator[tuple[int, dict]]:
            raise NotImplementedError("examples come from _split_generators")

    _InMemoryBuilder.name = name
    return _InMemoryBuilder


def dataset_dir(data_dir: PathLike, name: str, version: str = "1.0.0") -> epath.Path:
    return storage.as_path(data_dir) / name / version


def write_tfds_dataset(
    records: Iterable[Mapping[str, Any]],
    data_dir: PathLike,
    name: str,
    features_spec: Mapping[str, str | tfds.features.FeatureConnector],
    split: str = "train",
    num_shards: int | None = None,
    version: str = "1.0.0",
) -> epath.Path:
    """Write `records` as the `split` of TFDS dataset `name` (array_record) under `data_dir`.

    `features_spec` maps field -> kind ("string", "int32", "int64", "float32", "bool", or a list kind
    such as "int32[]", "float32[]", "string[]") or a tfds FeatureConnector. Records must have exactly these
    fields. Returns the version directory. A dataset already prepared there is left untouched.
    """
    out = dataset_dir(data_dir, name, version)
    if (out / "dataset_info.json").is_file():
        info = tfds.builder_from_directory(out).info
        if split not in info.splits:
            raise ValueError(f"{out} is already prepared without split {split!r}; use another name/version")
        return out
    builder_cls = _builder_class(name, features_from_spec(features_spec), version)
    builder_cls._records = {split: _validated(records, features_spec)}
    with tempfile.TemporaryDirectory(prefix="tfds-scratch-") as scratch:
        local = storage.is_local(data_dir)
        build_dir = str(storage.as_path(data_dir)) if local else f"{scratch}/data"
        builder = _build_in_scratch(builder_cls, build_dir, scratch)
        builder.download_and_prepare(
            download_dir=scratch, download_config=tfds.download.DownloadConfig(num_shards=num_shards)
        )
        if not local:
            _upload_version_dir(dataset_dir(build_dir, name, version), out)
    return out


def _upload_version_dir(built: epath.Path, out: epath.Path) -> None:
    """Copy a locally built version directory to the object store, `dataset_info.json` last: it is the marker of
    a prepared dataset, so a crash midway leaves one that a rerun rebuilds, never one it trusts."""
    files = list(storage.walk_files(built))
    info = [f for f in files if f.name == "dataset_info.json" and f.parent == built]
    for f in [f for f in files if f not in info] + info:
        storage.copy_file(f, out / str(f)[len(str(built)):].lstrip("/"))


def _build_in_scratch(builder_cls: type, data_dir: str, scratch: str) -> Any:
    """builder_cls(...) with the temp root pointed at `scratch`: a new builder's DatasetInfo makes a
    `mkdtemp("tfds")` directory for GCS metadata (GCS is off, so it stays empty) and never removes it; inside
    `scratch` it goes away with the rest. The builder is made on the calling thread, before any writer runs."""
    saved = tempfile.tempdir
    tempfile.tempdir = scratch
    try:
        return builder_cls(data_dir=data_dir, file_format="array_record")
    finally:
        tempfile.tempdir = saved


def open_tfds_source(data_dir: PathLike, name: str, split: str = "train") -> Any:
    """Random-access source (``len``, ``[i]``) over a prepared dataset; examples come back as TFDS
    decodes them (strings as bytes, lists as lists); `decode_example` turns them into str / numpy."""
    root = storage.as_path(data_dir)
    if not (root / name).is_dir():
        raise FileNotFoundError(f"no prepared TFDS dataset {name!r} under {data_dir}")
    if not storage.is_local(root):  # array_record reads local files only: a local copy, removed at exit
        local = tempfile.mkdtemp(prefix="tfds-copy-")
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        storage.copy_tree(root / name, f"{local}/{name}")
        root = storage.as_path(local)
    return tfds.data_source(name, data_dir=str(root), split=split, download=False)


class ExampleDecoder:
    """Bytes -> str and lists -> typed 1-D numpy arrays (empty lists keep their dtype), per the features."""

    def __init__(self, features: tfds.features.FeaturesDict):
        self.kinds: dict[str, tuple[bool, Any]] = {}
        for key, f in features.items():
            is_list = isinstance(f, tfds.features.Sequence)
            inner = f.feature if is_list else f
            dtype = None if isinstance(inner, tfds.features.Text) else inner.np_dtype
            self.kinds[key] = (is_list, dtype)

    def __call__(self, example: Mapping[str, Any]) -> dict:
        out = {}
        for key, value in example.items():
            is_list, dtype = self.kinds[key]
            if dtype is None:
                out[key] = [v.decode("utf-8") for v in value] if is_list else value.decode("utf-8")
            else:
                out[key] = np.asarray(value, dtype=dtype)
        return out


def grain_loader(
    source: Any,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    batch_size: int | None = None,
    batch_fn: Callable[[Sequence[Any]], Any] | None = None,
    transform: Callable[[dict], Any] | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A deterministic grain pipeline: decode -> (transform) -> shuffle(seed) -> repeat -> (batch).

    The order depends only on `seed` (each epoch reshuffles deterministically), so a run can be resumed
    or reproduced on any host. ``num_epochs=None`` repeats forever.
    """
    ds = grain.MapDataset.source(source)
    if hasattr(source, "dataset_info"):
        ds = ds.map(ExampleDecoder(source.dataset_info.features))
    if transform is not None:
        ds = ds.map(transform)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    return ds
