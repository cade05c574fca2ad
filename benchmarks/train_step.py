"""Training throughput of the JAX step vs an equivalent PyTorch step (same tiny Qwen2, batch, AdamW, fp32).

    python benchmarks/train_step.py [--hidden 128 --layers 4 --batch 8 --seq 256 --steps 10]

Both sides: full next-token loss on the same random tokens, AdamW (same hyper-parameters), one optimizer
update per step, float32 everywhere. Prints tokens/s of each and the ratio JAX / PyTorch from one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.model_args import add_model_args  # noqa: E402
from edu_prm_jax.models.config import Qwen2Config  # noqa: E402
from edu_prm_jax.models.qwen2 import Qwen2  # noqa: E402
from edu_prm_jax.training.lm import lm_loss  # noqa: E402
from edu_prm_jax.training.loop import TrainConfig, Trainer  # noqa: E402


def jax_tokens_per_s(cfg: Qwen2Config, batch: dict[str, np.ndarray], steps: int, workdir: str) -> float:
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    trainer = Trainer(Qwen2(cfg, nnx.Rngs(0)), lm_loss, tx,
                      TrainConfig(steps=steps, progress=False, tensorboard=False, async_checkpointing=False),
                      workdir)
    jax.block_until_ready(trainer.train_step(batch))  # compile
    t = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step(batch)
    jax.block_until_ready(metrics)
    return steps * batch["tokens"].size / (time.perf_counter() - t)


def torch_tokens_per_s(cfg: Qwen2Config, batch: dict[str, np.ndarray], steps: int) -> float:
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    model = Qwen2ForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)

    def step():
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens.numel() / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=192, hidden=128, layers=4, heads=4, kv_heads=2, inter=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                      rope_theta=10000.0, tie_word_embeddings=True,
                      max_position_embeddings=args.seq, torch_dtype="float32")
    rng = np.random.default_rng(0)
    seq = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((args.batch, args.seq), np.float32),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    with tempfile.TemporaryDirectory() as tmp:
        jax_tps = jax_tokens_per_s(cfg, batch, args.steps, tmp)
    torch_tps = torch_tokens_per_s(cfg, batch, args.steps)
    print(f"model hidden={args.hidden} layers={args.layers} vocab={args.vocab}; batch {args.batch}x{args.seq}; "
          f"{args.steps} steps; device {jax.devices()[0].platform}")
    print(f"jax   tokens/s: {jax_tps:10.0f}")
    print(f"torch tokens/s: {torch_tps:10.0f}")
    print(f"ratio jax/torch: {jax_tps / torch_tps:.2f}")


if __name__ == "__main__":
    main()
