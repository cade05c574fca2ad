"""Resumable training checkpoints: params + optimizer state + data-iterator state + step + config.

Orbax `CheckpointManager` with async saves; it keeps the last `keep_last` checkpoints plus the best one by
an eval metric. Items per step: `state` (the train state pytree), `data` and `config` (JSON). The state is
restored into the shardings of a freshly built train state, so a run can resume on another mesh; a part of it
(the model's parameters, for export) can be restored alone, without reading the rest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging as py_logging
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import DiskFullError, write_text_atomic
from edu_prm_jax.training import relayout

T = TypeVar("T")


class DamagedCheckpointError(RuntimeError):
    """No checkpoint of a run could be read; the message names every step tried and why it failed."""


# How a full disk shows up inside Orbax/tensorstore errors (a ValueError "RESOURCE_EXHAUSTED: ... No space left
# on device [os_error_code='28']" raised from a background commit thread), besides a plain OSError.
_DISK_FULL_TEXT = ("No space left on device", "os_error_code='28'", "Disk quota exceeded", "os_error_code='122'")
_TMP_STEP_RE = re.compile(r"(?:^|/)(\d+)\.orbax-checkpoint-tmp")


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a full disk or an exhausted quota."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietDiskFull(py_logging.Filter):
    """Drops the logging of a full disk by Orbax and by asyncio ("Future exception was never retrieved" for each
    aborted write): a traceback from each background thread and write, hundreds of lines. The Checkpointer
    raises one DiskFullError instead. Kept at debug verbosity."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno < py_logging.ERROR or logging.level_debug():
            return True
        if "orbax" not in record.pathname and record.name != "asyncio":
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (any(t in record.getMessage() for t in _DISK_FULL_TEXT) or (exc is not None and _is_disk_full(exc)))


_QUIET_DISK_FULL = _QuietDiskFull()


def _quiet_aborted_writes() -> None:
    """When a save fails, tensorstore's pending writes still complete and try to notify Orbax's event loop, which
    is closed by then: each raises an unraisable "Event loop is closed" RuntimeError (dozens of tracebacks around
    the real error, from threads that may run before the error reaches us). Those alone are dropped, from the
    first writable Checkpointer on; any other unraisable error still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "_edu_prm_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and not logging.level_debug():
            return
        previous(unraisable)

    hook._edu_prm_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
    """Save/restore of (train state pytree, data-iterator state dict, config dict) per step."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, read_only: bool = False):
        """`read_only` opens an existing run's checkpoints to restore from (export): nothing is created,
        saved or deleted."""
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                                   enable_async_checkpointing=False)
        else:
            policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
            if best_metric is not None:
                policies.append(ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: float(m[best_metric]), reverse=best_mode == "min", n=1,
                    keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save, create=True)
        self.directory = storage.absolute(directory)  # gs:// stays remote (Orbax writes it via tensorstore)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._mgr = ocp.CheckpointManager(self.directory, options=options)
        self._state_bytes: dict[int, int] = {}  # step -> bytes of its train state, for a disk-full message
        if not read_only:
            _quiet_aborted_writes()
        for name in ("absl", "asyncio"):
            if _QUIET_DISK_FULL not in py_logging.getLogger(name).filters:
                py_logging.getLogger(name).addFilter(_QUIET_DISK_FULL)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without a metric or any scored checkpoint)."""
        if self.best_metric is None:
            return None
        kept = set(self._mgr.all_steps())
        scored = [(m[self.best_metric], int(step)) for step, m in self._read_metrics().items()
                  if int(step) in kept and self.best_metric in m]
        if not scored:
            return None
        return (min(scored) if self.best_mode == "min" else max(scored, key=lambda x: (x[0], -x[1])))[1]

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], config: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start an (async) save; the device->host copy happens before this returns, so the caller may
        donate `state` to the next step right away."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=str))),
        )
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if metrics:  # a sidecar record, so `best_step` works after a restart too
            table = self._read_metrics()
            table[str(step)] = metrics
            write_text_atomic(self._metrics_path, json.dumps(table, indent=1))
        self._state_bytes[step] = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        with self._disk_full_as_one_error(step):
            return self._mgr.save(step, args=args, metrics=metrics or None, force=True)

    @contextlib.contextmanager
    def _disk_full_as_one_error(self, step: int | None) -> Iterator[None]:
        """Turns a full disk during a save (this one, or an earlier async one whose error surfaces now) into one
        DiskFullError naming the checkpoint, the bytes its state needs and the bytes free; the incomplete
        `<step>.orbax-checkpoint-tmp` directory Orbax was writing is removed (the tool made it; restores never
        read it), so the previous checkpoints stay the newest a rerun sees."""
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            raise self._disk_full(e, step) from None

    def _disk_full(self, error: BaseException, step: int | None) -> DiskFullError:
        # Every save this process started and Orbax did not finish has left `<step>.orbax-checkpoint-tmp*`: the
        # one failing now, and an earlier async one whose error surfaces only at this save (it may not name its
        # step). Those are removed; a temporary directory of a save this process never started is left alone.
        unfinished: dict[int, list[Any]] = {}  # one listing of the directory, not one per save started
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            named = _TMP_STEP_RE.search(tmp.name)
            if named and int(named.group(1)) in self._state_bytes:
                unfinished.setdefault(int(named.group(1)), []).append(tmp)
        match = _TMP_STEP_RE.search(str(error))
        failed = int(match.group(1)) if match else (min(unfinished) if unfinished else step)
        for tmp in (t for paths in unfinished.values() for t in paths):
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(self.directory).free:,} bytes are free there now"
        except OSError:
            free = "free space unknown"
        need = self._state_bytes.get(failed)
        needed = f"its arrays alone take {need:,} bytes, plus Orbax's metadata; " if need else ""
        kept = [s for s in self.all_steps() if (self.directory / str(s)).is_dir()]
        return DiskFullError(self.directory, message=(
            f"no space left on device saving checkpoint {'' if failed is None else f'step {failed} '}to "
            f"{self.directory} ({needed}{free}); "
            f"the incomplete save was removed, " + (f"checkpoint steps {kept} are intact" if kept else
                                                   "no earlier checkpoint exists")))

    @property
    def _metrics_path(self) -> pathlib.Path:
        return self.directory / "eval_metrics.json"

    def _read_metrics(self) -> dict[str, dict[str, float]]:
        return json.loads(self._metrics_path.read_text()) if self._metrics_path.is_file() else {}

    def saved_layout(self, step: int) -> bool | None:
        """Whether `step`'s train state holds stacked decoder layers (True: saved by a scanned model), per-layer
        ones (False) or none (None), read from its tree metadata (no array is read)."""
        meta = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state")  # default step naming
        tree = getattr(meta, "item_metadata", meta)
        return relayout.layout_of(path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])

    def _other_layout(self, step: int, like: Any) -> bool | None:
        """The saved layout of `step` when it differs from `like`'s (an nnx.State or a mapping of them), else
        None; logs the conversion."""
        wanted = relayout.state_layout(nnx.State(dict(like)))
        saved = self.saved_layout(step) if wanted is not None else None
        if saved is None or saved == wanted:
            return None
        layouts = {True: "stacked (scanned)", False: "per-layer (unrolled)"}
        logging.info("checkpoint step %d holds %s decoder layers; converting them to the %s layout this run "
                     "builds", step, layouts[saved], layouts[wanted])
        return saved

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict, dict]:
        """(state, data_state, config) of `step`, the state placed like `like_state` (shapes, dtypes and
        shardings). A state saved with the other decoder-layer layout is converted (`training.relayout`)."""
        saved = self._other_layout(step, like_state)
        read_as = relayout.saved_like(like_state, saved) if saved is not None else like_state
        restored = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(read_as)),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        state = restored["state"] if saved is None else relayout.convert(restored["state"], like_state)
        return state, dict(restored["data"]), dict(restored["config"])

    def restore_part(self, step: int, target: Mapping[str, Any]) -> Any:
        """Only the part of `step`'s train state that `target` names (e.g. {'model': abstract params}), each leaf
        placed as its target says (shape, dtype, sharding). An Orbax partial restore: the leaves not named (the
        optimizer moments) are never read, so memory holds the part alone. A part saved with the other
        decoder-layer layout is converted (`training.relayout`)."""
        saved = self._other_layout(step, target)
        read_as = relayout.saved_like(nnx.State(dict(target)), saved) if saved is not None else target
        restored = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=read_as, restore_args=ocp.checkpoint_utils.construct_restore_args(read_as), partial_restore=True)))
        if saved is None:
            return restored["state"]
        return relayout.convert(nnx.State(dict(restored["state"])), nnx.State(dict(target)))

    def first_intact(self, steps: Sequence[int], restore: Callable[[int], T],
                     set_aside: bool = False) -> tuple[int, T]:
        """`(step, restore(step))` for the first of `steps` that reads back. A step that fails (a data file
        missing or truncated: a crash, a full disk, a bad copy) is skipped with a warning naming it, so a run
        resumes from, or exports, the newest intact checkpoint. With `set_aside` (a resuming run), once an older
        step has restored, each newer step that failed is renamed to `<step>.damaged-<unix time>` (kept, never
        deleted) so later saves can reuse its number; when no step restores (e.g. the train state's structure
        changed, which fails every step alike) nothing is renamed. Raises DamagedCheckpointError then."""
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = restore(step)
            except Exception as e:  # noqa: BLE001 - any read failure means "not usable", reported below
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                failures.append((step, reason))
                logging.warning("checkpoint step %d in %s cannot be read (%s); trying the previous one", step,
                                self.directory, reason)
                continue
            if set_aside and failures:
                for bad, _ in failures:
                    damaged = self.directory / str(bad)
                    if damaged.is_dir():
                        damaged.rename(damaged.with_name(f"{bad}.damaged-{int(time.time())}"))
                self._mgr.reload()
            logging.info("restored checkpoint step %d from %s", step, self.directory)
            return step, restored
        listed = "; ".join(f"step {step} ({reason})" for step, reason in failures)
        raise DamagedCheckpointError(f"{self.directory}: no checkpoint could be read: {listed}")

    def wait(self) -> None:
        with self._disk_full_as_one_error(None):
            self._mgr.wait_until_finished()
            self._mgr.check_for_errors()

    def close(self) -> None:
        with self._disk_full_as_one_error(None):
            self._mgr.wait_until_finished()
            self._mgr.close()
