"""Storage paths: every path a user gives or the tool derives goes through `etils.epath` (what Orbax and TFDS use).

Why: `pathlib.Path("gs://bucket/run")` is the *local* relative directory `gs:/bucket/run`, so a `gs://` workdir
silently wrote to the VM's disk. `as_path` turns a string or path into an `epath.Path`: local paths behave as
before (the os backend), `gs://` (and any other scheme epath's backends know: fsspec's, e.g. `s3://` with s3fs)
goes to the object store. Without TensorFlow, epath reaches `gs://` through fsspec's `gcsfs`.

Object stores have no rename, so "atomic" means something else there (see `write_object`): an object exists
only once its one upload completed, and the resumable units (shards) get a small completion marker written after
them, which readers require (`is_complete`). Local paths keep temp file + fsync + rename (`io.atomic`).

Helpers here never call `absolute()`/`resolve()` on a remote path: epath would make `gs://b/x` local there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike
Path = epath.Path


def _fresh_listings() -> None:
    """Open object stores without fsspec's directory-listing cache, which never expires: a process that once
    listed a directory would not see what another process wrote there later (in a multi-host job, the lead
    reading the other hosts' shards; a rerun's checkpoint steps). Set before any filesystem is created; a
    user's own fsspec configuration of the option wins."""
    import fsspec

    for protocol in ("gs", "gcs", "s3"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_fresh_listings()

# A completion marker of object `x` is the empty object `.x.complete` beside it (hidden: never an output itself).
COMPLETE_SUFFIX = ".complete"
_LOCAL_SCHEMES = ("", "file")


def scheme(path: PathLike) -> str:
    """The URI scheme of `path` ("gs" for gs://b/x), or "" for a plain local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head if sep and head.isidentifier() else ""


def is_local(path: PathLike) -> bool:
    """True for a path on this machine's file system (no scheme, or file://); False for gs:// and other stores."""
    return scheme(path) in _LOCAL_SCHEMES


def as_path(path: PathLike) -> epath.Path:
    """`path` (str, pathlib or epath) as an `epath.Path`; `file://x` becomes the local `x`. A local path has `~`
    expanded; remote paths are kept as written (`gs://bucket/run`)."""
    text = os.fspath(path)
    if scheme(text) == "file":
        text = text[len("file://"):]
    p = epath.Path(text)
    return p.expanduser() if is_local(text) else p


def absolute(path: PathLike) -> epath.Path:
    """`path` made absolute when local (relative to the working directory); a remote path is already absolute
    (epath's own `absolute()` would turn `gs://b/x` into a local directory)."""
    p = as_path(path)
    return p.absolute() if is_local(p) else p


def resolved(path: PathLike) -> epath.Path:
    """`path` with symlinks resolved when local; a remote path as written (object stores have no links)."""
    p = as_path(path)
    return p.resolve() if is_local(p) else p


def marker_of(path: PathLike) -> epath.Path:
    """The completion marker of object `path` (`<dir>/.<name>.complete`)."""
    p = as_path(path)
    return p.parent / f".{p.name}{COMPLETE_SUFFIX}"


def is_complete(path: PathLike) -> bool:
    """Whether `path` is a finished file: locally its presence (it appears only by an atomic rename); on an object
    store its presence *and* its completion marker (an object without its marker is never trusted)."""
    p = as_path(path)
    if is_local(p):
        return p.is_file()
    return p.is_file() and marker_of(p).is_file()


def write_object(path: PathLike, data: bytes, *, mark_complete: bool = False) -> epath.Path:
    """Write `data` as the object `path` in one upload (an object store creates the object only when the upload
    completes, so readers never see part of it), then, with `mark_complete`, its empty completion marker.

    Only for remote paths (local writes go through `io.atomic`). A stale marker of an earlier object is removed
    first, so a crash between the two uploads leaves an object that `is_complete` does not trust."""
    p = as_path(path)
    if is_local(p):
        raise ValueError(f"{p}: write_object is for object stores; local files are written by io.atomic")
    marker = marker_of(p)
    if mark_complete and marker.exists():
        marker.unlink()
    p.write_bytes(data)
    if mark_complete:
        marker.write_bytes(b"")
    return p


def walk_files(root: PathLike) -> Iterator[epath.Path]:
    """Every file under directory `root`, depth first in name order (epath's `rglob` refuses object stores)."""
    for p in sorted(as_path(root).iterdir(), key=lambda q: q.name):
        if p.is_dir():
            yield from walk_files(p)
        else:
            yield p


def copy_file(src: PathLike, dst: PathLike, chunk_bytes: int = 1 << 24) -> epath.Path:
    """Copy one file between any two backends (local -> gs://, gs:// -> local, ...), streaming `chunk_bytes` at a
    time. A remote destination is written in one upload (`write_object`'s guarantee); a local one is written
    whole before anyone reads it only if the caller writes into a staging place (as every caller here does)."""
    src, dst = as_path(src), as_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(dst):
        return write_object(dst, src.read_bytes())
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, chunk_bytes)
    return dst


def copy_tree(src: PathLike, dst: PathLike) -> list[epath.Path]:
    """Copy every file under directory `src` to the same relative place under `dst` (any backends); returns
    the files written."""
    src, dst = as_path(src), as_path(dst)
    written = []
    for f in walk_files(src):
        rel = os.fspath(f)[len(os.fspath(src)):].lstrip("/")
        written.append(copy_file(f, dst / rel))
    return written


def remove_tree(path: PathLike) -> None:
    """Delete directory `path` and everything in it (a prefix of objects on a store); a missing one is fine.
    Callers only pass directories this tool made (README "Never delete what the tool did not create")."""
    p = as_path(path)
    if is_local(p):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.rmtree()


def size_and_mtime_ns(path: PathLike) -> tuple[int, int]:
    """(bytes, modification time in ns) of file `path`: os.stat locally; the store's object metadata remotely
    (whole seconds there: epath's resolution). For cache keys that must change when a file is rewritten."""
    p = as_path(path)
    if is_local(p):
        st = os.stat(p)
        return st.st_size, st.st_mtime_ns
    st = p.stat()
    return int(st.length), int(st.mtime) * 1_000_000_000
