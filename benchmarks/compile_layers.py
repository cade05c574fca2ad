"""Compile time and step time of the training step, scanned vs unrolled decoder layers, by depth.

    python -m benchmarks.compile_layers [--depths 16 32 --hidden 64 --batch 4 --seq 64 --steps 5]

For each depth and layout (`Qwen2Config.scan_layers`): the library's own train step (`training.loop.
make_train_step`: next-token loss, value_and_grad, AdamW update) on a tiny random Qwen2 of that depth, jitted;
the time to lower (trace) and to compile it, then the median time of `--steps` steps after one warm-up step.
Both layouts start from the same weights (same seed), and the first step's losses are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from edu_prm_jax.models.config import Qwen2Config  # noqa: E402
from edu_prm_jax.models.qwen2 import Qwen2  # noqa: E402
from edu_prm_jax.training.lm import lm_loss  # noqa: E402
from edu_prm_jax.training.loop import make_train_step, new_train_state  # noqa: E402


def measure(cfg: Qwen2Config, batch: dict[str, jax.Array], steps: int) -> dict[str, float]:
    """{lower_s, compile_s, step_s (median), loss (first step)} of the train step for model config `cfg`."""
    graphdef, state = nnx.split(new_train_state(Qwen2(cfg, nnx.Rngs(0)), optax.adamw(1e-3)))
    step = jax.jit(make_train_step(graphdef, lm_loss), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_s": statistics.median(times), "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1))
    batch = {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "weights": jnp.ones((args.batch, args.seq), jnp.float32),
             "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))}
    rows = []
    print(f"{jax.devices()[0].platform} x{len(jax.devices())}; hidden={args.hidden} heads={args.heads}/"
          f"{args.kv_heads} inter={args.inter} vocab={args.vocab}; batch {args.batch}x{args.seq}; remat {args.remat}")
    print(f"{'layers':>6} {'layout':>9} {'lower s':>8} {'compile s':>10} {'step ms':>8}")
    for depth in args.depths:
        losses = {}
        for scan in (False, True):
            cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                              num_hidden_layers=depth, num_attention_heads=args.heads,
                              num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                              scan_layers=scan, remat=args.remat)
            r = measure(cfg, batch, args.steps)
            losses[scan] = r["loss"]
            layout = "scanned" if scan else "unrolled"
            rows.append({"layers": depth, "layout": layout, **r})
            print(f"{depth:>6} {layout:>9} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} {1e3 * r['step_s']:>8.2f}")
        if not np.isclose(losses[False], losses[True], rtol=1e-5):
            raise SystemExit(f"first-step losses differ between layouts: {losses}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
