"""On-disk records: validated JSONL reading, tiny schemas, atomic files and resumable shards.

Why: every stage of the pipeline hands its output to the next as files. A bad line must fail loudly with
the file, the line and the field (not a KeyError three stages later), and a crash must never leave a
half-written file that a rerun would mistake for finished work. Shards are written to a hidden temp name
in the same directory and `os.replace`d into place, so a shard exists under its final name only once
complete; a rerun skips finished shards and deletes stale temp files.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

PathLike = str | os.PathLike

_TMP_SUFFIX = ".tmp"


class DataError(ValueError):
    """Bad input data; the message names the file, the location (1-based line or item) and the field."""

    def __init__(
        self,
        message: str,
        *,
        path: PathLike | None = None,
        line: int | None = None,
        item: int | None = None,
        field: str | None = None,
    ):
        self.message, self.path, self.line, self.item, self.field = message, path, line, item, field
        super().__init__(self._format())

    def _format(self) -> str:
        where = str(self.path) if self.path is not None else "<record>"
        if self.line is not None:
            where += f":{self.line}"
        if self.item is not None:
            where += f" item {self.item}"
        parts = [where] + ([f"field '{self.field}'"] if self.field is not None else []) + [self.message]
        return ": ".join(parts)

    def located(self, path: PathLike, line: int | None = None, item: int | None = None) -> DataError:
        """The same error with the location filled in (validators do not know where the record came from)."""
        return DataError(
            self.message,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            item=self.item if self.item is not None else item,
            field=self.field,
        )


# --------------------------------------------------------------------------------------------- schemas
class ListOf:
    """A list field whose elements all have the given type(s), e.g. ``ListOf(str)`` for ProcessBench steps."""

    def __init__(self, types: type | tuple[type, ...]):
        self.types = types if isinstance(types, tuple) else (types,)

    def __repr__(self) -> str:
        return f"list[{_type_names(self.types)}]"


TypeSpec = type | tuple[type, ...] | ListOf


def _type_names(types: tuple[type, ...]) -> str:
    return " | ".join("None" if t is type(None) else t.__name__ for t in types)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # bool is a subclass of int in Python; a JSON `true` where a count is expected is still a data error.
    if isinstance(value, bool) and bool not in types:
        return False
    if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
        return True  # JSON writes 1.0 as 1; an int is a fine float
    return isinstance(value, types)


def check_type(value: Any, field: str, types: TypeSpec, where: str = "") -> None:
    """Raise DataError unless `value` matches `types` (a type, a tuple of types, or a ListOf)."""
    prefix = f"{where}: " if where else ""
    if isinstance(types, ListOf):
        if not isinstance(value, list):
            raise DataError(f"{prefix}expected {types!r}, got {type(value).__name__}", field=field)
        for i, element in enumerate(value):
            if not _is_instance(element, types.types):
                raise DataError(
                    f"{prefix}expected {types!r}, element {i} is {type(element).__name__}", field=field
                )
        return
    tup = types if isinstance(types, tuple) else (types,)
    if not _is_instance(value, tup):
        raise DataError(f"{prefix}expected {_type_names(tup)}, got {type(value).__name__}", field=field)


def require(record: Mapping[str, Any], field: str, types: TypeSpec, where: str = "") -> Any:
    """Return ``record[field]`` after checking it exists and has the expected type."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", field=field)
    if field not in record:
        raise DataError(f"{where + ': ' if where else ''}missing required field", field=field)
    value = record[field]
    check_type(value, field, types, where)
    return value


def optional(record: Mapping[str, Any], field: str, types: TypeSpec, default: Any = None, where: str = "") -> Any:
    """Return ``record[field]`` (type-checked) or `default` when the field is absent or null."""
    value = record.get(field)
    if value is None:
        return default
    check_type(value, field, types, where)
    return value


class Schema:
    """A record schema written as data: ``Schema({"id": (str, int), "problem": str}, optional={...})``.

    `required` fields must be present with a matching type; `optional` fields may be absent or null.
    Extra fields are allowed (sources carry metadata we pass through).
    """

    def __init__(self, required: Mapping[str, TypeSpec], optional: Mapping[str, TypeSpec] | None = None):
        self.required = dict(required)
        self.optional = dict(optional or {})

    def validate(self, record: Any) -> None:
        if not isinstance(record, Mapping):
            raise DataError(f"expected a JSON object, got {type(record).__name__}")
        for field, types in self.required.items():
            require(record, field, types)
        for field, types in self.optional.items():
            if record.get(field) is not None:
                check_type(record[field], field, types)

    __call__ = validate


# ------------------------------------------------------------------------------------------ JSONL read
def read_jsonl(path: PathLike, validate: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Yield one dict per non-blank line; bad JSON, a non-object or a failed `validate` raise DataError."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"expected a JSON object, got {type(record).__name__}", path=path, line=lineno
                ) from None
            if validate is not None:
                try:
                    validate(record)
                except DataError as e:
                    raise e.located(path, line=lineno) from None
            yield record


# ------------------------------------------------------------------------------------- atomic writes
def _atomic_write(path: PathLike, write: Callable[[Any], None]) -> pathlib.Path:
    """Write via a hidden temp file in the same directory, fsync, then rename over `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: PathLike, text: str) -> pathlib.Path:
    """Write `text` to `path` so readers see either the old file or the complete new one."""
    return _atomic_write(path, lambda f: f.write(text))


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 2) -> pathlib.Path:
    """Write `obj` as JSON atomically (a trailing newline keeps the file friendly to `cat`)."""
    return _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"))


def write_jsonl_atomic(path: PathLike, records: Iterable[Mapping[str, Any]]) -> pathlib.Path:
    """Write one JSON object per line atomically."""

    def write(f: Any) -> None:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    return _atomic_write(path, write)


# ---------------------------------------------------------------------------------------------- shards
def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """``prefix-00003-of-00010.jsonl``: sorts in shard order and says how many shards make the whole."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.jsonl"


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"-(\d{5})-of-(\d{5})\.jsonl")


def _list_shards(out_dir: PathLike, prefix: str) -> list[tuple[int, int, pathlib.Path]]:
    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = _shard_pattern(prefix)
    found = []
    for p in out_dir.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def stale_temp_files(out_dir: PathLike, prefix: str) -> list[pathlib.Path]:
    """Temp files of `prefix` shards left by a crashed writer (never counted as finished shards)."""
    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(
        p for p in out_dir.iterdir() if p.name.startswith(f".{prefix}-") and p.name.endswith(_TMP_SUFFIX)
    )


def clean_stale_temps(out_dir: PathLike, prefix: str) -> int:
    """Delete leftover temp files of `prefix` shards; returns how many were removed.

    Only call this when no other writer is working on the same prefix (one writer per shard set).
    """
    stale = stale_temp_files(out_dir, prefix)
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def completed_shards(out_dir: PathLike, prefix: str, num_shards: int | None = None) -> set[int]:
    """Indices of shards present under their final name (so complete); temp files never count."""
    return {i for i, n, _ in _list_shards(out_dir, prefix) if num_shards is None or n == num_shards}


def shard_done(out_dir: PathLike, prefix: str, index: int, num_shards: int) -> bool:
    """Whether shard `index` of `num_shards` was finished (renamed into place)."""
    return (pathlib.Path(out_dir) / shard_name(prefix, index, num_shards)).is_file()


def write_shard(
    out_dir: PathLike, prefix: str, index: int, num_shards: int, records: Iterable[Mapping[str, Any]]
) -> pathlib.Path:
    """Write one shard atomically; a crash midway leaves only a temp file that `clean_stale_temps` removes."""
    return write_jsonl_atomic(pathlib.Path(out_dir) / shard_name(prefix, index, num_shards), records)


class ShardedJsonlWriter:
    """Resumable writer for ``num_shards`` JSONL shards of one output.

    Typical use::

        writer = ShardedJsonlWriter(out_dir, "trees", num_shards=8)
        for i in writer.pending():          # cleans stale temps, skips finished shards
            writer.write(i, compute_shard(i))
    """

    def __init__(self, out_dir: PathLike, prefix: str, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_', '.' or inner '-'")
        self.out_dir = pathlib.Path(out_dir)
        self.prefix = prefix
        self.num_shards = num_shards
        others = {n for _, n, _ in _list_shards(self.out_dir, prefix)} - {num_shards}
        if others:
            raise DataError(
                f"holds '{prefix}' shards written with num_shards={sorted(others)}, not {num_shards}; "
                "use a fresh directory or the same shard count",
                path=self.out_dir,
            )

    def completed(self) -> set[int]:
        return completed_shards(self.out_dir, self.prefix, self.num_shards)

    def done(self, index: int) -> bool:
        return shard_done(self.out_dir, self.prefix, index, self.num_shards)

    def pending(self) -> list[int]:
        """Shard indices still to write, after deleting temp files a crashed run left behind."""
        clean_stale_temps(self.out_dir, self.prefix)
        done = self.completed()
        return [i for i in range(self.num_shards) if i not in done]

    def write(self, index: int, records: Iterable[Mapping[str, Any]]) -> pathlib.Path:
        return write_shard(self.out_dir, self.prefix, index, self.num_shards, records)

    def path(self, index: int) -> pathlib.Path:
        return self.out_dir / shard_name(self.prefix, index, self.num_shards)


def read_shards(
    out_dir: PathLike, prefix: str, validate: Callable[[dict], None] | None = None
) -> Iterator[dict]:
    """Yield the records of all `prefix` shards in shard order; a missing shard is an error, not a gap."""
    shards = _list_shards(out_dir, prefix)
    if not shards:
        raise DataError(f"no shards named '{prefix}-NNNNN-of-NNNNN.jsonl'", path=out_dir)
    totals = {n for _, n, _ in shards}
    if len(totals) != 1:
        raise DataError(f"'{prefix}' shards disagree on the shard count: {sorted(totals)}", path=out_dir)
    (num_shards,) = totals
    present = {i for i, _, _ in shards}
    missing = [i for i in range(num_shards) if i not in present]
    if missing:
        names = ", ".join(shard_name(prefix, i, num_shards) for i in missing[:5])
        raise DataError(f"incomplete output: {len(missing)} missing shard(s): {names}", path=out_dir)
    for _, _, p in shards:
        yield from read_jsonl(p, validate)


FINGERPRINT = "fingerprint.json"


def check_fingerprint(out_dir: PathLike, fingerprint: Mapping[str, Any]) -> None:
    """Bind an output directory to the settings that produce it.

    The first run writes `fingerprint.json`; a rerun with different settings would otherwise skip "finished"
    shards made under the old ones and mix results, so it is an error naming the fields that changed."""
    out_dir = pathlib.Path(out_dir)
    path = out_dir / FINGERPRINT
    wanted = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise DataError(f"holds outputs made with other settings (changed: {changed}); use a fresh "
                            "directory or delete it to recompute", path=out_dir)
        return
    write_json_atomic(path, wanted)
