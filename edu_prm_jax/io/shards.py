"""Resumable JSONL shards and output fingerprints.

Shards are written to a hidden temp name in the same directory and renamed into place, so a shard exists under
its final name only once complete; a rerun skips finished shards and deletes stale temp files. On an object store
(gs://) a shard is uploaded whole and then marked complete (`storage.is_complete`); a shard object without its
marker (a crash between the two uploads) is not finished and is rewritten by the rerun. A fingerprint
binds an output directory to the settings that made it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import TMP_SUFFIX, write_json_atomic, write_jsonl_atomic
from edu_prm_jax.io.jsonl import DataError, PathLike, read_jsonl


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """``prefix-00003-of-00010.jsonl``: sorts in shard order and says how many shards make the whole."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.jsonl"


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"-(\d{5})-of-(\d{5})\.jsonl")


def _list_shards(out_dir: PathLike, prefix: str) -> list[tuple[int, int, epath.Path]]:
    out_dir = storage.as_path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = _shard_pattern(prefix)
    entries = list(out_dir.iterdir())
    marked = None if storage.is_local(out_dir) else {p.name for p in entries}
    found = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and (marked is None or storage.marker_of(p).name in marked):  # an unmarked object is unfinished
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def stale_temp_files(out_dir: PathLike, prefix: str) -> list[epath.Path]:
    """Temp files of `prefix` shards left by a crashed writer (never counted as finished shards). An object store
    has none: a shard is uploaded whole, and one left without its marker is simply rewritten."""
    out_dir = storage.as_path(out_dir)
    if not storage.is_local(out_dir) or not out_dir.is_dir():
        return []
    return sorted(
        p for p in out_dir.iterdir() if p.name.startswith(f".{prefix}-") and p.name.endswith(TMP_SUFFIX)
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
    """Whether shard `index` of `num_shards` was finished (renamed into place; on a store: marked complete)."""
    return storage.is_complete(storage.as_path(out_dir) / shard_name(prefix, index, num_shards))


def write_shard(
    out_dir: PathLike, prefix: str, index: int, num_shards: int, records: Iterable[Mapping[str, Any]]
) -> epath.Path:
    """Write one shard atomically; a crash midway leaves only a temp file that `clean_stale_temps` removes (on
    an object store: an upload that never completed, or an object without its completion marker)."""
    return write_jsonl_atomic(storage.as_path(out_dir) / shard_name(prefix, index, num_shards), records,
                              mark_complete=True)


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
        self.out_dir = storage.as_path(out_dir)
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

    def write(self, index: int, records: Iterable[Mapping[str, Any]]) -> epath.Path:
        return write_shard(self.out_dir, self.prefix, index, self.num_shards, records)

    def path(self, index: int) -> epath.Path:
        return self.out_dir / shard_name(self.prefix, index, self.num_shards)


def shard_paths(directory: PathLike, prefix: str, made_by: str = "") -> list[epath.Path]:
    """The `prefix-NNNNN-of-NNNNN.jsonl` shards of `directory` in order, checked complete (a missing shard is an
    error, not a gap). `made_by` names the command that writes them, for the error message."""
    directory = storage.as_path(directory)
    found = _list_shards(directory, prefix)
    hint = f" (run `{made_by}` first)" if made_by else ""
    if not found:
        raise DataError(f"no shards named '{prefix}-NNNNN-of-NNNNN.jsonl'{hint}", path=directory)
    totals = {n for _, n, _ in found}
    if len(totals) != 1:
        raise DataError(f"'{prefix}' shards disagree on the shard count: {sorted(totals)}", path=directory)
    (num_shards,) = totals
    present = {i for i, _, _ in found}
    missing = sorted(set(range(num_shards)) - present)
    if missing:
        names = ", ".join(shard_name(prefix, i, num_shards) for i in missing[:5])
        raise DataError(f"incomplete output: {len(missing)} missing shard(s): {names}", path=directory)
    if max(present) >= num_shards:
        raise DataError(f"a '{prefix}' shard index is not below the shard count {num_shards}", path=directory)
    return [p for *_, p in found]


def read_shards(
    out_dir: PathLike, prefix: str, validate: Callable[[dict], None] | None = None
) -> Iterator[dict]:
    """Yield the records of all `prefix` shards in shard order; a missing shard is an error, not a gap."""
    for path in shard_paths(out_dir, prefix):
        yield from read_jsonl(path, validate)


FINGERPRINT = "fingerprint.json"


def check_fingerprint(out_dir: PathLike, fingerprint: Mapping[str, Any],
                      has_outputs: Callable[[], bool] | None = None) -> None:
    """Bind an output directory to the settings that produce it.

    The first run writes `fingerprint.json`; a rerun with different settings would otherwise skip "finished"
    shards made under the old ones and mix results, so it is an error naming the fields that changed. While the
    directory holds no outputs yet (`has_outputs`, by default: any file besides the fingerprint and hidden temp
    files), a different fingerprint is simply replaced: a run that failed before writing anything (a typo in a
    path, a model that did not load) must not refuse the corrected one."""
    out_dir = storage.as_path(out_dir)
    path = out_dir / FINGERPRINT
    wanted = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if path.is_file():
        found = json.loads(path.read_text())
        if found == wanted:
            return
        outputs = has_outputs() if has_outputs is not None else any(
            p.is_file() and p.name != FINGERPRINT and not p.name.startswith(".") for p in storage.walk_files(out_dir))
        if outputs:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise DataError(f"holds outputs made with other settings (changed: {changed}); use a fresh "
                            "directory or delete it to recompute", path=out_dir)
    write_json_atomic(path, wanted)


def content_digest(paths: Iterable[PathLike]) -> list[str]:
    """`name:sha256` of each file, read in 1 MiB blocks (fingerprints bind outputs to their inputs' content)."""
    out = []
    for p in map(storage.as_path, paths):
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append(f"{p.name}:{h.hexdigest()}")
    return out
