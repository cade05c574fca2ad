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
