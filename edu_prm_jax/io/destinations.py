"""Output directories the tool writes as a unit (HF exports, Orbax params, the toy policy): refuse, never delete.

Why: `export`, `convert` and `build-toy` replace a whole directory. The rule is that the tool deletes only what it
created. So a directory is written into a staging sibling (`<dst>.partial`) that carries an ownership marker from
its first byte, and renamed into place only when complete. An existing destination is replaced only when it looks
like this tool's output *and* the caller allows it; a non-empty directory that holds anything else, a file, or a
destination that overlaps the source is refused before anything is written. A failed write removes the staging
directory it made, so no `.partial` is left behind.

On an object store (gs://) there is no directory rename. There the staging directory is a local temporary one
(writers keep using plain file operations: safetensors, Orbax, copies), and on success its files are uploaded
as objects under `<dst>/`, the ownership marker last: `output_complete` trusts a remote output only once its
marker exists. An earlier output of ours being replaced loses its marker first, then its other objects; a
crash midway leaves an unmarked prefix that readers do not trust and a rerun (`overwrite`) replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from etils import epath

from edu_prm_jax.io import storage

PathLike = str | os.PathLike

# Written into every directory the tool stages; its presence means "made by edu_prm_jax, safe to replace".
OWNER_MARKER = ".edu_prm_jax_output.json"

# Names this tool writes into the directories it owns. A directory holding only these (an export made before the
# marker existed) also counts as ours; anything else in it (a user's notes.txt) makes it someone else's.
OWNED_NAMES = re.compile(
    r"^(config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer\.json|vocab\.json|merges\.txt|tokenizer\.model|tokenizer_config\.json|special_tokens_map\.json"
    r"|added_tokens\.json|chat_template\.jinja|generation_config\.json|edu_prm_config\.json|params"
    r"|training_report\.json|" + re.escape(OWNER_MARKER) + r")$")


OUR_CONFIG_KEY = "edu_prm_head"  # every PRM export of this tool writes it into config.json


class DestinationError(ValueError):
    """A destination the tool refuses to write (the message names the config field and the path)."""


def staging_path(dst: PathLike) -> epath.Path:
    """Where a local `dst` is staged (`<dst>.partial`); a remote one is staged in a local temp directory."""
    dst = storage.as_path(dst)
    return dst.with_name(dst.name + ".partial")


def output_complete(directory: PathLike, name: str = "config.json") -> bool:
    """Whether `directory` holds a finished output of this tool with file `name`: locally the file's presence
    (the directory was renamed into place whole); on an object store also the ownership marker, uploaded last."""
    directory = storage.as_path(directory)
    if not (directory / name).is_file():
        return False
    return storage.is_local(directory) or (directory / OWNER_MARKER).is_file()


def is_tool_output(directory: PathLike) -> bool:
    """True when `directory` holds only names this tool writes and either carries the ownership marker or is an
    export made before the marker existed, with a file only this tool writes (`edu_prm_config.json` of an Orbax export,
    `training_report.json` of a toy build, or a config.json with our PRM head key). A model directory written by
    anything else (e.g. `save_pretrained`) has none of those and is never replaced."""
    directory = storage.as_path(directory)
    names = [p.name for p in directory.iterdir()]
    if not names or not all(OWNED_NAMES.match(n) for n in names):
        return False  # a file this tool never writes (a user's notes.txt) makes it someone else's, marker or not
    if (directory / OWNER_MARKER).is_file():
        return True
    if (directory / "edu_prm_config.json").is_file() or (directory / "training_report.json").is_file():
        return True
    try:
        return OUR_CONFIG_KEY in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _overlaps(a: epath.Path, b: epath.Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_destination(dst: PathLike, *, overwrite: bool, field: str = "output",
                      sources: Iterable[PathLike] = ()) -> epath.Path:
    """Raise DestinationError unless `dst` may be (re)written; nothing is touched either way.

    Allowed: a path that does not exist, an empty directory, or (with `overwrite`) a directory that
    `is_tool_output`. Refused: a file, a non-empty directory of someone else's, a previous output of ours without
    `overwrite`, and any destination equal to, inside, or containing one of `sources`.
    """
    dst = storage.as_path(dst)
    resolved = storage.resolved(dst)
    for src in sources:
        src_resolved = storage.resolved(src)
        if _overlaps(resolved, src_resolved):
            raise DestinationError(f"config.{field}={str(dst)!r} overlaps the source {str(src)!r} (equal, inside or "
                                   "containing it); writing there could destroy the source: choose another path")
    if (storage.is_local(dst) and os.path.islink(dst)) or (dst.exists() and not dst.is_dir()):
        raise DestinationError(f"config.{field}={str(dst)!r} exists and is not a directory; choose a directory path")
    if dst.is_dir() and any(dst.iterdir()):
        if not is_tool_output(dst):
            raise DestinationError(
                f"config.{field}={str(dst)!r} is a non-empty directory that was not written by edu_prm_jax; "
                "refusing to replace it (choose an empty or new directory)")
        if not overwrite:
            raise DestinationError(
                f"config.{field}={str(dst)!r} holds an earlier output of edu_prm_jax; pass "
                f"--config.overwrite=True to replace it")
    if not storage.is_local(dst):
        return dst  # staged in a fresh local temp directory: nothing of the user's can be there
    staging = staging_path(dst)
    if staging.exists() and not (staging.is_dir() and (staging / OWNER_MARKER).is_file()):
        raise DestinationError(f"{staging}: exists and was not made by edu_prm_jax; move it away (it is where "
                               f"config.{field} is staged)")
    return dst


@contextlib.contextmanager
def staged_directory(dst: PathLike, *, overwrite: bool, field: str = "output", sources: Iterable[PathLike] = (),
                     provenance: dict | None = None) -> Iterator[epath.Path]:
    """Yield an empty staging directory; on success it replaces `dst`, on any error it is removed.

    The checks of `check_destination` run first, so a refused destination costs nothing. The old `dst` (ours, by
    then) is removed only after the new one is complete.
    """
    dst = check_destination(dst, overwrite=overwrite, field=field, sources=sources)
    if not storage.is_local(dst):
        with _staged_remote(dst, field, provenance) as staging:
            yield staging
        return
    staging = staging_path(dst)
    if staging.exists():  # a crashed earlier run of ours (it carries the marker: checked above)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        (staging / OWNER_MARKER).write_text(json.dumps({"tool": "edu_prm_jax", **(provenance or {})}) + "\n")
        yield staging
        if dst.is_dir():
            if any(dst.iterdir()):
                if not is_tool_output(dst):  # checked again: something else may have landed there meanwhile
                    raise DestinationError(f"config.{field}={str(dst)!r} changed while it was being written and "
                                           "now holds files edu_prm_jax did not write; refusing to replace it")
                shutil.rmtree(dst)
            else:
                dst.rmdir()
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _staged_remote(dst: epath.Path, field: str, provenance: dict | None) -> Iterator[epath.Path]:
    """`staged_directory` for an object-store `dst`: a local temp staging directory, uploaded under `dst` on
    success with the ownership marker last (see the module docstring); the temp directory goes either way."""
    with tempfile.TemporaryDirectory(prefix=".edu_prm_stage-") as tmp:
        staging = storage.as_path(tmp)
        (staging / OWNER_MARKER).write_text(json.dumps({"tool": "edu_prm_jax", **(provenance or {})}) + "\n")
        yield staging
        if dst.is_dir() and any(dst.iterdir()):
            if not is_tool_output(dst):  # checked again: something else may have landed there meanwhile
                raise DestinationError(f"config.{field}={str(dst)!r} changed while it was being written and "
                                       "now holds files edu_prm_jax did not write; refusing to replace it")
            if (dst / OWNER_MARKER).exists():
                (dst / OWNER_MARKER).unlink()  # untrusted from here until the new marker lands
            storage.remove_tree(dst)
        files = list(storage.walk_files(staging))
        marker = staging / OWNER_MARKER
        for f in [f for f in files if f != marker] + [marker]:
            storage.copy_file(f, dst / str(f)[len(str(staging)):].lstrip("/"))
