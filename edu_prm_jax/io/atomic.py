"""Atomic file writes: readers see either the old file or the complete new one, never a half-written file.

The one helper every writer of the project uses: a hidden temp file in the same directory, fsync, then
`os.replace` over the destination. A crash leaves only the temp file (named `.<name>.<random>.tmp`). The file
gets the permissions a plain `open(path, "w")` would give (mkstemp's private 0600 would otherwise survive the
rename and hide exports from other users).

On an object store (`gs://`, see `io.storage`) there is no rename: the content is rendered in memory and
uploaded as one object, which the store creates only when the upload completes (`storage.write_object`); a
`write` that fails midway uploads nothing.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.jsonl import PathLike

TMP_SUFFIX = ".tmp"


def _process_umask() -> int:
    """The umask, read once at import (setting and restoring it later could race with other threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = False, *,
                 mark_complete: bool = False) -> epath.Path:
    """Call `write(f)` on a hidden temp file in the same directory, fsync, then rename it over `path`.

    `f` is a text file (UTF-8) unless `binary`. On any error the temp file is removed and the error re-raised.
    A remote `path` (gs://...) is rendered in memory and uploaded as one object; with `mark_complete` its
    completion marker follows (`storage.is_complete`), for outputs whose presence means "finished" (shards).
    A local path needs no marker (the rename is the commit), so `mark_complete` changes nothing there.
    """
    path = storage.as_path(path)
    if not storage.is_local(path):
        buffer = io.BytesIO() if binary else io.StringIO()
        write(buffer)
        data = buffer.getvalue()
        return storage.write_object(path, data if binary else data.encode("utf-8"), mark_complete=mark_complete)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(path, written) from None
        raise
    return path


class DiskFullError(OSError):
    """No space left while writing `path`; what was partly written is removed, so a rerun finds nothing to trust.

    `written` is how many bytes had been written when the disk filled (a lower bound on the need); `message`
    replaces the default sentence (a checkpoint save says what it needed and what was free).
    """

    def __init__(self, path: PathLike, written: int = 0, message: str | None = None):
        super().__init__(errno.ENOSPC, message or (
            f"no space left on device writing {path} (the disk filled after {written:,} bytes of it; at least "
            "that much more must be free); nothing partial was left"), str(path))
        self.path, self.written = path, written

    def __str__(self) -> str:
        return self.strerror


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
    """Write `text` to `path` so readers see either the old file or the complete new one."""
    return atomic_write(path, lambda f: f.write(text))


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 2) -> epath.Path:
    """Write `obj` as JSON atomically (a trailing newline keeps the file friendly to `cat`)."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"))


def write_jsonl_atomic(path: PathLike, records: Iterable[Mapping[str, Any]], *,
                       mark_complete: bool = False) -> epath.Path:
    """Write one JSON object per line atomically (`mark_complete`: see `atomic_write`)."""

    def write(f: Any) -> None:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    return atomic_write(path, write, mark_complete=mark_complete)


def write_bytes_atomic(path: PathLike, data: bytes) -> epath.Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda f: f.write(data), binary=True)
