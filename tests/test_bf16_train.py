"""bfloat16 compute with float32 master weights: the step runs, keeps float32 params, and tracks float32."""

import numpy as np
from flax import nnx

from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.prm import PRM, prm_loss
from edu_prm_jax.scoring.examples import build_example
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.prm_train import PackedStream


def _losses(tmp_path, dtype):
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype=dtype)
    rng = np.random.default_rng(0)
    examples = [build_example({"prompt_ids": [1, 2], "step_ids": [rng.integers(3, 64, 4).tolist() for _ in range(3)],
                               "labels": [1.0, 0.5, 0.0]}, head="scalar", record_id=i) for i in range(32)]
    trainer = Trainer(PRM(cfg, "scalar", rngs=nnx.Rngs(0)), prm_loss,
                      OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4),
                      TrainConfig(steps=4, log_every=1, progress=False, tensorboard=False, async_checkpointing=False),
                      tmp_path / dtype)
    stream = PackedStream(examples, 64, 4, seed=0)
    losses = [float(trainer.train_step(next(stream))["loss"]) for _ in range(4)]
    dtypes = {v.dtype for v in trainer.params().values()}
    trainer.close()
    return np.array(losses), dtypes


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    f32, f32_dtypes = _losses(tmp_path, "float32")
    bf16, bf16_dtypes = _losses(tmp_path, "bfloat16")
    assert f32_dtypes == bf16_dtypes == {np.dtype(np.float32)}
    assert np.isfinite(bf16).all()
    np.testing.assert_allclose(bf16, f32, rtol=0.05)  # same trajectory up to bf16 rounding
    assert not np.array_equal(bf16, f32)  # ... and the bf16 run really computed in bf16
