"""`--workdir=gs://bucket/run` against a real GCS JSON API: `gcp-storage-emulator` on loopback (issue 16 part 2).

The pipeline `sample -> label -> train (a checkpoint) -> export -> eval-bon` runs on the shipped toy policy twice,
once on a local workdir and once on the bucket; every output is compared byte for byte (the independent
reference is the local run, whose code path is the long-tested one). Orbax reaches the emulator through
tensorstore's GCS driver (`TENSORSTORE_GCS_HTTP_URL`), epath through gcsfs (`STORAGE_EMULATOR_HOST`), TensorBoard
through google-cloud-storage (the same variable). The emulator gets one fix, the generation headers GCS sends on
downloads, without which tensorstore's conditional (OCDBT manifest) writes fail: see tests/gcs_emulator.py.
The bucket run's `train` is a subprocess killed with SIGKILL once its first checkpoint is committed in the bucket;
the rerun resumes from that checkpoint, and the rest of the bucket pipeline goes on from the resumed PRM, so the
byte comparison with the local (uninterrupted) run also shows that the resumed run ends with the same PRM.

Sizes are the smallest that run every stage (4 questions, 2 leaves, 4 train steps with a checkpoint every 2, one
N). `sample`, `label`, `export` and `eval-bon` run in-process, so the bucket run reuses the local run's decode
compiles (same shapes, same process); the three `train`s (local, killed, rerun) are processes of their own sharing
JAX's persistent compilation cache, so only the first compiles (an in-process `train` jits its step anew each time).
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import portpicker
import pytest
from determinism import comparable
from etils import epath

from edu_prm_jax import cli
from edu_prm_jax.io import storage
from edu_prm_jax.io.destinations import OWNER_MARKER

BUCKET = "bucket"
EMULATOR = pathlib.Path(__file__).with_name("gcs_emulator.py")
# 4 questions decoded as one batch of 4 by both `sample` (EDU, 2 leaves) and `eval-bon` (EDU at N=2): one compile
SAMPLE = ["--config.questions=toy:train:4", "--config.sampling.num_leaves=2", "--config.batch_questions=4",
          "--config.num_shards=2"]
STEPS = 4
TRAIN = [f"--config.steps={STEPS}", "--config.rows=8", "--config.seq_len=128", "--config.eval_every=0",
         "--config.checkpoint_every=2"]
# P-EDU off: a fourth sampler whose runs are written like the EDU and HT ones (its own compile, ~10 s)
EVAL_BON = ["--config.questions=toy:test:4", "--config.n_grid=2", "--config.seeds=0", "--config.batch_questions=4",
            "--config.p_edu=False"]
# `edu-prm train` whose first checkpoint save, once started, holds the process until the test kills it: the kill
# lands during training with a checkpoint committed and steps left (a free-running process may finish first).
HELD_TRAIN = """import sys, threading
from edu_prm_jax import cli
from edu_prm_jax.training import checkpointing
save = checkpointing.Checkpointer.save
def save_then_hold(self, *args, **kwargs):
    save(self, *args, **kwargs)
    threading.Event().wait()  # Orbax commits the save on its own thread meanwhile
checkpointing.Checkpointer.save = save_then_hold
sys.exit(cli.main(sys.argv[1:]))
"""
# Files whose bytes are not a function of the inputs: TensorBoard event files (host name and wall-clock time in
# their names and records), Orbax's own checkpoint files (commit timestamps; their content is compared through
# `export --config.which=latest`, which restores a checkpoint and writes its parameters) and the wall-clock
# metrics of the train summary (compared field by field below).
NOT_DETERMINISTIC = ("prm/tb/", "prm/checkpoints/", "prm/last_metrics.json", "prm/train_summary.json")


@pytest.fixture(scope="module")
def gcs():
    """The emulator on a free loopback port (with GCS's download generation headers: tests/gcs_emulator.py), a
    bucket, and the variables that point every client at it."""
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(EMULATOR), "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (epath) and google-cloud-storage (tensorboardX)
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes each bucket over gRPC for 60 s
           "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays go through tensorstore's own GCS driver
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed bearer token, no metadata server
           "GOOGLE_CLOUD_PROJECT": "test"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "gcp-storage-emulator did not start"
                time.sleep(0.2)
        yield env
        # tensorboardX's GCS event writer uploads its whole buffer again from __del__, even after close(), and
        # here the writers live until the interpreter exits, after the emulator: each would retry for 120 s.
        # Their last upload is done now, while the emulator runs, and the duplicate at exit is skipped.
        from tensorboardX.record_writer import GCSRecordWriter

        gc.collect()
        for writer in [o for o in gc.get_objects() if isinstance(o, GCSRecordWriter)]:
            writer.flush()
        GCSRecordWriter.__del__ = lambda self: None
    proc.kill()
    proc.wait()


def _stages(workdir: str, *names: str) -> None:
    """The named pipeline stages, in-process, on `workdir` (each must succeed)."""
    common = [f"--workdir={workdir}", "--config.policy=toy"]
    argv = {"sample": ["sample", *common, *SAMPLE], "label": ["label", *common],
            "export": ["export", f"--workdir={workdir}", "--config.which=latest"],
            "eval-bon": ["eval-bon", *common, *EVAL_BON]}
    for name in names:
        assert cli.main(argv[name]) == 0, name


def _train(workdir: str, cache: pathlib.Path, log: pathlib.Path, held: bool = False) -> subprocess.Popen:
    """`edu-prm train` on `workdir` as a process of its own (stderr to `log`; `held`: HELD_TRAIN). Its compiles go
    through JAX's persistent cache in `cache`, so only the first of the test's train processes compiles."""
    code = ["-c", HELD_TRAIN] if held else ["-m", "edu_prm_jax.cli"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    with log.open("wb") as err:  # a file, not a pipe: nothing reads it while train runs
        return subprocess.Popen([sys.executable, *code, "train", f"--workdir={workdir}", "--config.policy=toy",
                                 *TRAIN], stdout=subprocess.DEVNULL, stderr=err, env=env)


def _finished(proc: subprocess.Popen, log: pathlib.Path) -> None:
    """Waits for a `_train` process (10 min at most, then kills it); it must have succeeded."""
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]


def _forget_listings() -> None:
    """Drops this process's gcsfs listing cache (it never expires, and invalidating a path spares the listings
    below it), so that what another process wrote in the bucket since is seen."""
    epath.backend.fsspec_backend.fs(f"gs://{BUCKET}").invalidate_cache()


def _committed(checkpoints) -> list[int]:
    """Steps with Orbax's `commit_success.txt` under `checkpoints` (an epath in the bucket), ascending."""
    _forget_listings()
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def _files(root: str) -> dict[str, bytes]:
    """Relative name -> bytes of every file under `root`; the workdir's own spelling replaced by `<workdir>` (it
    is recorded in fingerprints and summaries, and naturally differs between the two runs), wall times left out
    (`determinism.comparable`)."""
    base = str(storage.as_path(root))
    out = {}
    for f in storage.walk_files(root):
        rel = str(f)[len(base):].lstrip("/")
        if not rel.startswith(NOT_DETERMINISTIC):
            out[rel] = comparable(rel, f.read_bytes().replace(base.encode(), b"<workdir>"))
    return out


def test_gs_workdir_matches_a_local_one_byte_for_byte_and_resumes_after_kill_9(tmp_path, gcs):
    local, remote = str((tmp_path / "run").absolute()), f"gs://{BUCKET}/run"
    cache, logs = tmp_path / "jax_cache", [tmp_path / f"train_{i}.log" for i in range(3)]
    _stages(local, "sample", "label")
    _finished(_train(local, cache, logs[0]), logs[0])
    _stages(local, "export", "eval-bon")
    _stages(remote, "sample", "label")

    # kill -9 during train on the bucket, once a checkpoint is committed there; the rerun resumes from it
    checkpoints = storage.as_path(remote) / "prm" / "checkpoints"
    proc = _train(remote, cache, logs[1], held=True)
    try:
        deadline = time.monotonic() + 300
        while not _committed(checkpoints):
            assert proc.poll() is None, logs[1].read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = _committed(checkpoints)
    assert saved and max(saved) < STEPS, saved  # killed mid-run
    assert not (storage.as_path(remote) / "prm" / "train_summary.json").exists()
    _finished(_train(remote, cache, logs[2]), logs[2])
    rerun = logs[2].read_text()
    _forget_listings()  # the train processes wrote in the bucket
    assert f"restored checkpoint step {max(saved)} from {checkpoints}" in rerun, rerun[-3000:]
    _stages(remote, "export", "eval-bon")
    assert not os.path.exists("gs:")  # nothing went to a local directory `gs:` (what pathlib made of gs://)

    want, got = _files(local), _files(remote)
    markers = {n for n in got if storage.as_path(n).name.endswith(storage.COMPLETE_SUFFIX)}
    # every shard in the bucket carries its completion marker; a local shard needs none (the rename commits it)
    shards = {n for n in got if n.endswith(".jsonl") and "-of-" in n}
    assert shards and {str(storage.marker_of(n)) for n in shards} == markers
    # each staged directory (the exports) is marked as ours on both sides; in the bucket the marker came last
    assert {n for n in got if n.endswith(OWNER_MARKER)} == {n for n in want if n.endswith(OWNER_MARKER)} != set()
    got = {n: b for n, b in got.items() if n not in markers}
    # eval-bon keys its cache on the PRM files' modification times: equal structure, other clock
    for name in [n for n in want if n.startswith("eval_bon/runs/") and n.endswith("fingerprint.json")]:
        a, b = json.loads(want.pop(name)), json.loads(got.pop(name))
        assert [p.split(":")[:2] for p in a.pop("prm") or []] == [p.split(":")[:2] for p in b.pop("prm") or []]
        assert a == b, name
    assert sorted(got) == sorted(want)
    differ = [n for n in want if got[n] != want[n]]
    assert not differ, differ
    for name in ("samples_edu", "labels/tfds", "prm/hf/model.safetensors", "prm/hf_latest/model.safetensors",
                 "eval_bon/results.json", "eval_bon/bon_accuracy_vs_n.png"):
        assert any(n.startswith(name) for n in want), name  # the comparison covered every stage
    # the resumed run ends where the uninterrupted (local) one did: the same PRM, bit for bit
    assert got["prm/hf/model.safetensors"] == want["prm/hf/model.safetensors"]
    summaries = [json.loads(storage.as_path(w).joinpath("prm/train_summary.json").read_text())
                 for w in (local, remote)]
    assert summaries[0]["step"] == summaries[1]["step"] == STEPS
    assert summaries[0]["loss"] == summaries[1]["loss"]
    bucket_prm = storage.as_path(remote) / "prm"
    assert any(p.name.startswith("events.out.tfevents") for p in storage.walk_files(bucket_prm / "tb"))
    assert _committed(bucket_prm / "checkpoints")[-1] == STEPS


def test_a_user_path_with_a_scheme_stays_remote():
    # what the issue is about: pathlib.Path("gs://b/x") is the local relative directory gs:/b/x
    assert str(pathlib.Path("gs://b/x")) == "gs:/b/x"
    assert str(storage.as_path("gs://b/x") / "y") == "gs://b/x/y" and not storage.is_local("gs://b/x")
    assert str(storage.absolute("gs://b/x")) == "gs://b/x" and str(storage.resolved("gs://b/x")) == "gs://b/x"
    assert storage.is_local("rel/x") and storage.is_local("/abs/x") and str(storage.as_path("file:///a/b")) == "/a/b"


def test_a_listing_sees_what_another_process_wrote_since(gcs):
    """A directory listed once and then written by someone else (another host's shard, a rerun's checkpoint) is
    listed afresh: fsspec's listing cache, which never expires, is off for object stores (io/storage.py)."""
    import gcsfs

    other = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)  # stands for another process
    directory = storage.as_path(f"gs://{BUCKET}/listing")
    (directory / "a.txt").write_text("a")
    assert sorted(p.name for p in directory.iterdir()) == ["a.txt"]
    other.pipe(f"{BUCKET}/listing/b.txt", b"b")
    assert sorted(p.name for p in directory.iterdir()) == ["a.txt", "b.txt"]


def test_object_writes_and_shard_markers_on_the_emulator(gcs):
    from edu_prm_jax.io.atomic import write_jsonl_atomic, write_text_atomic
    from edu_prm_jax.io.shards import ShardedJsonlWriter, shard_paths

    root = storage.as_path(f"gs://{BUCKET}/units")

    def records():
        yield {"a": 1}
        raise RuntimeError("writer failed midway")

    # a write that fails midway uploads nothing (the content is rendered in memory before the one upload)
    with pytest.raises(RuntimeError, match="midway"):
        write_jsonl_atomic(root / "half.jsonl", records())
    assert not (root / "half.jsonl").exists()
    write_text_atomic(root / "whole.txt", "x" * 10)
    assert (root / "whole.txt").read_text() == "x" * 10

    writer = ShardedJsonlWriter(root / "shards", "trees", num_shards=2)
    writer.write(0, [{"i": 0}])
    assert storage.marker_of(writer.path(0)).is_file() and writer.pending() == [1]
    # shard 1 uploaded but its marker never written (a crash between the two uploads): not finished, rewritten
    (root / "shards" / "trees-00001-of-00002.jsonl").write_text('{"i": "partial"}\n')
    assert writer.pending() == [1] and not writer.done(1)
    with pytest.raises(ValueError, match="missing shard"):
        shard_paths(root / "shards", "trees")
    writer.write(1, [{"i": 1}])
    assert [p.name for p in shard_paths(root / "shards", "trees")] == ["trees-00000-of-00002.jsonl",
                                                                       "trees-00001-of-00002.jsonl"]
    assert (root / "shards" / "trees-00001-of-00002.jsonl").read_text() == '{"i": 1}\n'


def test_a_bucket_destination_keeps_the_ownership_rules(gcs):
    from edu_prm_jax.io.destinations import DestinationError, output_complete, staged_directory

    theirs = storage.as_path(f"gs://{BUCKET}/theirs")
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not written by edu_prm_jax"):
        with staged_directory(theirs, overwrite=True):
            pass
    assert (theirs / "notes.txt").read_text() == "mine"

    ours = storage.as_path(f"gs://{BUCKET}/ours")
    with staged_directory(ours, overwrite=False) as tmp:
        assert storage.is_local(tmp)
        (tmp / "config.json").write_text('{"v": 1}')
    assert output_complete(ours) and json.loads((ours / "config.json").read_text()) == {"v": 1}
    with pytest.raises(DestinationError, match="overwrite=True"):
        with staged_directory(ours, overwrite=False):
            pass
    with pytest.raises(RuntimeError):  # a failed rewrite leaves the earlier output as it was
        with staged_directory(ours, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"v": 2}')
            raise RuntimeError("export failed")
    assert output_complete(ours) and json.loads((ours / "config.json").read_text()) == {"v": 1}
    with staged_directory(ours, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"v": 3}')
    assert json.loads((ours / "config.json").read_text()) == {"v": 3}
    (ours / OWNER_MARKER).unlink()  # an upload that never reached its marker is not trusted
    assert not output_complete(ours)
