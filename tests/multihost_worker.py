"""One process of a multi-process (multi-host style) PRM training run on CPU; see test_multihost.py.

Usage: python multihost_worker.py OUT_DIR [PROCESS_ID NUM_PROCESSES PORT [SIGTERM_AT]]
Without process arguments it runs single-process on 2 local CPU devices (the reference). With SIGTERM_AT, the
last process sends itself SIGTERM when it hands out that batch (a preemption notice reaching one host)."""

import os
import signal
import sys

out_dir = sys.argv[1]
multi = len(sys.argv) > 2
if multi:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{sys.argv[4]}"
    os.environ["JAX_NUM_PROCESSES"] = sys.argv[3]
    os.environ["JAX_PROCESS_ID"] = sys.argv[2]
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from edu_prm_jax import parallel  # noqa: E402
from edu_prm_jax.models.config import Qwen2Config  # noqa: E402
from edu_prm_jax.models.prm import PRM, prm_loss  # noqa: E402
from edu_prm_jax.scoring.examples import build_example  # noqa: E402
from edu_prm_jax.training.loop import TrainConfig, Trainer  # noqa: E402
from edu_prm_jax.training.optim import OptimConfig  # noqa: E402
from edu_prm_jax.training.prm_train import PackedStream  # noqa: E402

parallel.maybe_initialize_distributed()
assert jax.device_count() == 2, jax.devices()
cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
rng = np.random.default_rng(0)
examples = []
for i in range(64):
    steps = [rng.integers(1, 64, rng.integers(2, 6)).tolist() for _ in range(3)]
    labels = [float(33 not in s) for s in steps]
    examples.append(build_example({"prompt_ids": [1, 2, 3], "step_ids": steps, "labels": labels},
                                  head="scalar", record_id=i))
sigterm_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0


class Stream(PackedStream):
    handed = 0

    def __next__(self):
        self.handed += 1
        if self.handed == sigterm_at and jax.process_index() == jax.process_count() - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


mesh = parallel.make_mesh(data=2)
prm = PRM(cfg, "scalar", rngs=nnx.Rngs(0))
trainer = Trainer(prm, prm_loss, OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=8),
                  TrainConfig(steps=8, log_every=4, progress=False, tensorboard=False, async_checkpointing=False),
                  out_dir, mesh=mesh)
metrics = trainer.train(Stream(examples, 64, 4, seed=0))
print(f"process {jax.process_index()} left the loop at step {trainer.step}, preempted={metrics['preempted']}")
params = {k: v for k, v in trainer.params().items()}
if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "params.npz"), **params)
    print("final loss", metrics["loss"])
trainer.close()
