"""Work split, barriers, small gathers and failure reports across the processes of a multi-host job.

Rollouts and scoring run process-local (README "How work is split across hosts"): each process decodes or scores
its own share on its own devices, so no collective runs inside a decode and nothing here touches an accelerator.
The processes meet only at named barriers and small gathers, which go through the key-value store of JAX's
coordination service (`jax.distributed`), never through device collectives, so that a waiting process keeps
checking on the others:

- a process whose command failed with an error publishes it (`report_failure`; the CLI does this for every
  command), and every other process stops at its next barrier, gather or `check_peers` (sampling calls it between
  decode batches) with `PeerFailedError` naming that process and its error;
- a process that died (killed, out of memory, its host lost) stops sending heartbeats; after
  `heartbeat_timeout_seconds` (`EDU_PRM_HEARTBEAT_TIMEOUT`, `parallel.maybe_initialize_distributed`) JAX's
  coordination service ends every other process with "The following tasks are unhealthy (stopped sending
  heartbeats): N".

Every process must call the same barriers and gathers in the same order (each carries a name; a mismatch is an
error naming both). In a single-process run every function here is a no-op or the identity.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax

_ROOT = "edu_prm"
_CHUNK = 1 << 20  # characters per key-value entry of a gather (gRPC messages stay well below their 4 MiB limit)
_seq = 0  # barriers and gathers so far; all processes count in step, so equal counts name the same meeting


class PeerFailedError(RuntimeError):
    """Another process of the job failed (its error is in the message) or stopped responding."""


def process_index() -> int:
    """This process's index in the job (0 in a single-process run)."""
    return jax.process_index()


def process_count() -> int:
    """Processes in the job (1 in a single-process run)."""
    return jax.process_count()


def is_lead() -> bool:
    """Whether this process writes the job's single files (summaries, fingerprints, reports): process 0."""
    return process_index() == 0


def owner(index: int) -> int:
    """The process that computes and writes work item `index` (a shard, a scoring batch): index mod processes."""
    return index % process_count()


def owned(indices: Iterable[int]) -> list[int]:
    """The items of `indices` this process owns (`owner(i) == process_index()`), in the given order."""
    me = process_index()
    return [i for i in indices if owner(i) == me]


def _client() -> Any:
    """The coordination service client of an initialised multi-process job, else None."""
    if process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed  # the public API has no handle on the key-value store

    return jax_distributed.global_state.client


def _failures(client: Any) -> dict[int, dict[str, Any]]:
    """{process: {"error": text, "secondary": bool}} for every process that reported a failure."""
    found = {}
    for key, value in client.key_value_dir_get(f"{_ROOT}/failed/"):
        found[int(key.rsplit("/", 1)[1])] = json.loads(value)
    return found


def _raise_if_failed(client: Any, waiting_for: str) -> None:
    failed = {p: f for p, f in _failures(client).items() if p != process_index()}
    if not failed:
        return
    primary = {p: f for p, f in failed.items() if not f.get("secondary")} or failed  # the cause, not its echoes
    p = min(primary)
    raise PeerFailedError(f"process {p} of {process_count()} failed ({primary[p]['error']}); process "
                          f"{process_index()} stopped while {waiting_for}")


def check_peers(doing: str = "working") -> None:
    """Raise PeerFailedError when another process has reported a failure (cheap: one key-value lookup)."""
    client = _client()
    if client is not None:
        _raise_if_failed(client, doing)


def report_failure(error: BaseException | str) -> None:
    """Publish this process's failure so that the others stop at their next meeting point instead of waiting.

    Best effort: a coordination service that is already gone is ignored (the others then see this process stop
    sending heartbeats). A PeerFailedError is recorded as secondary, so the others name the process that failed
    first."""
    client = _client()
    if client is None:
        return
    text = error if isinstance(error, str) else (f"{type(error).__name__}: {error}".strip().rstrip(":")
                                                  if str(error) else type(error).__name__)
    secondary = isinstance(error, PeerFailedError)
    try:
        client.key_value_set(f"{_ROOT}/failed/{process_index()}",
                             json.dumps({"error": text.splitlines()[0] if text else "", "secondary": secondary}),
                             allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service may be down already; the heartbeat timeout covers that case
        pass


@contextlib.contextmanager
def failures_reported() -> Iterator[None]:
    """Run a block; an exception leaving it is reported to the other processes (`report_failure`), then
    re-raised."""
    try:
        yield
    except BaseException as e:
        report_failure(e)
        raise


def _wait_all(client: Any, prefix: str, what: str) -> dict[int, str]:
    """{process: value} of the `prefix/<process>` keys once every process has set its own; polls with backoff
    (never `get_live_nodes`, itself a barrier) and raises PeerFailedError when a process reports a failure."""
    delay = 0.02
    n = process_count()
    while True:
        entries = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(prefix + "/")}
        if len(entries) == n:
            return entries
        _raise_if_failed(client, what)  # (a dead process: the coordination service ends this one, module doc)
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _next_key(kind: str) -> str:
    global _seq
    _seq += 1
    return f"{_ROOT}/{kind}/{_seq}"


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier `name` (the same name, in the same order everywhere).

    Raises PeerFailedError naming a process that failed or died meanwhile, and RuntimeError when processes meet
    at different barriers (a bug: the message names both)."""
    client = _client()
    if client is None:
        return
    key = _next_key("barrier")
    client.key_value_set(f"{key}/{process_index()}", name)
    names = _wait_all(client, key, f"waiting at barrier {name!r}")
    _check_names(names, name)


def _check_names(names: dict[int, str], name: str) -> None:
    other = {p: n for p, n in names.items() if n != name}
    if other:
        p = min(other)
        raise RuntimeError(f"process {process_index()} is at {name!r} but process {p} at {other[p]!r}: the "
                           "processes of the job run different code paths")


def allgather(name: str, value: Any) -> list[Any]:
    """Every process's `value` (JSON: dicts, lists, strings, numbers; a float comes back bit-identical), in
    process order. A meeting point like `barrier(name)`; values are small (scores, counts), not tensors."""
    client = _client()
    if client is None:
        return [json.loads(json.dumps(value))]
    key = _next_key("gather")
    me = process_index()
    text = json.dumps({"name": name, "value": value})
    chunks = [text[i:i + _CHUNK] for i in range(0, len(text), _CHUNK)] or [""]
    for k, chunk in enumerate(chunks):
        client.key_value_set(f"{key}/data/{me}/{k}", chunk)
    client.key_value_set(f"{key}/count/{me}", str(len(chunks)))  # set last: the data is complete
    counts = _wait_all(client, f"{key}/count", f"gathering {name!r}")
    out = []
    for p in range(process_count()):
        parts = [client.blocking_key_value_get(f"{key}/data/{p}/{k}", 60_000) for k in range(int(counts[p]))]
        message = json.loads("".join(parts))
        _check_names({p: message["name"]}, name)
        out.append(message["value"])
    barrier(f"{name}: read")  # nobody deletes before everyone has read
    for k in range(len(chunks)):
        client.key_value_delete(f"{key}/data/{me}/{k}")
    return out
