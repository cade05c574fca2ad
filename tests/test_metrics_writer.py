"""One metrics writer: the progress bar and log lines whatever the sinks, TensorBoard events when enabled."""

import logging
import struct

import jax
import numpy as np
from flax import nnx
from tensorboardX.proto import event_pb2

from edu_prm_jax import parallel
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.training.lm import lm_example, lm_loss
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.packing import PackedRowLoader, pack_examples

CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=True)


def _train_two_steps(workdir, tensorboard):
    rng = np.random.default_rng(0)
    rows = pack_examples([lm_example(rng.integers(1, 64, 4).tolist(), rng.integers(1, 64, 6).tolist())
                          for _ in range(8)], 16)
    trainer = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(learning_rate=1e-3, total_steps=2),
                      TrainConfig(steps=2, log_every=1, progress=True, tensorboard=tensorboard,
                                  async_checkpointing=False),
                      workdir, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    try:
        trainer.train(PackedRowLoader(rows, 2))
    finally:
        trainer.close()


def _event_tags(logdir):
    """Scalar tags of every event file under `logdir` (TFRecord framing: length, crc, payload, crc)."""
    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_progress_bar_and_log_lines_without_tensorboard(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    _train_two_steps(tmp_path, tensorboard=False)
    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err and "step/s" in err  # the bar, with its throughput
    assert "tokens_per_s=" in err  # the latest tokens/s on the bar's postfix
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1 train", "step 2 train"]
    assert all(" loss=" in line and " tokens_per_s=" in line for line in lines)
    assert not (tmp_path / "tb").exists()


def test_tensorboard_events_are_written(tmp_path, capsys):
    _train_two_steps(tmp_path, tensorboard=True)
    assert "2/2" in capsys.readouterr().err
    tags = _event_tags(tmp_path / "tb")
    assert {"train/loss", "train/tokens_per_s", "train/lr"} <= tags


def _full_disk_close(monkeypatch):
    """tensorboardX's close as on a full disk: its flush fails with ENOSPC."""
    import errno

    import tensorboardX

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboardX.SummaryWriter, "close", close)


def test_an_event_file_on_a_full_disk_names_its_directory(tmp_path, monkeypatch):
    import errno

    import pytest

    from edu_prm_jax.training.metrics import MetricsWriter

    _full_disk_close(monkeypatch)
    writer = MetricsWriter(tmp_path / "tb", 2, progress=False)
    writer.write(1, {"loss": 1.0})
    with pytest.raises(OSError) as raised:
        writer.close()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "tb")
    assert "TensorBoard" in str(raised.value)


def test_a_failing_event_file_does_not_replace_the_error_that_stopped_training(tmp_path, monkeypatch, caplog):
    """The checkpoint's own disk-full error is the one `train` raises; the event file failing after it on the
    same disk is a warning (before: the event file's OSError, raised in `finally`, replaced it)."""
    import pytest

    _full_disk_close(monkeypatch)
    rows = pack_examples([lm_example([1, 2, 3], [4, 5]) for _ in range(8)], 16)
    trainer = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(learning_rate=1e-3, total_steps=2),
                      TrainConfig(steps=2, log_every=1, progress=False, tensorboard=True, async_checkpointing=False),
                      tmp_path, mesh=parallel.make_mesh(devices=jax.devices()[:1]))

    def save_on_a_full_disk(*args, **kwargs):
        raise RuntimeError("the checkpoint failed first")

    monkeypatch.setattr(trainer, "save", save_on_a_full_disk)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="the checkpoint failed first"):
        trainer.train(iter(PackedRowLoader(rows, 2, seed=0)))
    assert any("TensorBoard events under" in r.getMessage() for r in caplog.records)


def test_after_a_disk_full_error_exit_time_write_failures_print_no_traceback():
    """A process that reported a disk-full error (the CLI's one line) then exits: an OSError from an atexit hook
    and from a thread (what tensorboardX's exit flush and writer thread raise there) print no traceback; any
    other exception still does."""
    import subprocess
    import sys

    script = """
import atexit, threading
from edu_prm_jax import cli
cli._fold_exit_time_write_errors()
def flush_at_exit(): raise OSError(28, "No space left on device")
atexit.register(flush_at_exit)
t = threading.Thread(target=lambda: (_ for _ in ()).throw(OSError("handle is closed"))); t.start(); t.join()
"""
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "Traceback" not in quiet.stderr and "Error" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", script.replace("OSError(28, ", "KeyError(")],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" in loud.stderr and "KeyError" in loud.stderr, loud.stderr
