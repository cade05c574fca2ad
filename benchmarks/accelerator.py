"""Prefill, decode and PRM train-step speed on the accelerator this runs on, at Qwen2.5 0.5B / 1.5B shapes.

Random weights (no download), bfloat16 compute. For each shape:
- **prefill**: the jitted forward (logits included) over [batch, prompt] tokens: tokens/s and MFU (2 N + the
  attention term per token, `training.metrics`, over the chip's peak);
- **decode**: the project's rollout loop (`sampling.decode.decode`, greedy, every row runs to --new-tokens) at
  small batches: tokens/s and the share of the HBM roofline, i.e. (bytes one step must read: the weights + the
  KV cache at its mean filled length) / HBM bandwidth, over the measured time per step;
- **train**: the PRM train step (`training.loop.Trainer`, float32 master weights + AdamW, full remat, packed
  rows): tokens/s and MFU (6 N + attention per token).
Chip peak FLOP/s and HBM bandwidth come from `planning.hardware` by `device_kind`; on a device the table does
not know (a CPU) MFU and the roofline share are left out (None). Times are medians of --repeats runs after a
warm-up (the compile), with the min-max spread. `--shapes tiny` runs a small model anywhere in seconds (what CI
checks). JSON to --json; a markdown table to stdout.

    python -m benchmarks.accelerator --json accelerator.json          # 0.5B and 1.5B
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import harness

SHAPES: dict[str, dict[str, int]] = {  # the architecture part of each model's config.json, plus tiny for CI
    "0.5B": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "1.5B": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["0.5B", "1.5B"])
    p.add_argument("--prompt-len", type=int, default=512, help="prefill tokens per row; decode prompt length")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--train-rows", type=int, default=8)
    p.add_argument("--train-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


@dataclasses.dataclass
class Timing:
    compile_s: float
    median_s: float
    min_s: float
    max_s: float


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Timing, Any]:
    """Run `fn` once (compile + run) and `repeats` more times; `fn` must block until its result is ready."""
    timings, out, _ = harness.measure({"run": fn}, repeats)
    t = timings["run"]
    return Timing(max(t.warmup_s - t.median, 0.0), t.median, t.low, t.high), out["run"]


def model_cfg(shape: str):
    from edu_prm_jax.models.config import Qwen2Config

    head_dim = SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"]
    return Qwen2Config(**SHAPES[shape], head_dim=head_dim, tie_word_embeddings=True, param_dtype="bfloat16",
                       dtype="bfloat16")  # layers and attention kernel: the platform's defaults


def prefill(shape: str, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from edu_prm_jax.models.qwen2 import Qwen2
    from edu_prm_jax.training.metrics import matmul_params

    cfg = model_cfg(shape)
    model = Qwen2(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.prefill_batch, args.prompt_len)),
                         jnp.int32)
    timing, _ = timed(lambda: fwd(state, tokens).block_until_ready(), args.repeats)
    n = args.prefill_batch * args.prompt_len
    flops_per_token = 2.0 * matmul_params(cfg) + 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * \
        cfg.head_dim * args.prompt_len
    tps = n / timing.median_s
    return {"tokens": n, **dataclasses.asdict(timing), "tokens_per_s": tps,
            "mfu": tps * flops_per_token / peak if peak else None}


def decode(shape: str, args: argparse.Namespace, bandwidth: float | None) -> list[dict[str, Any]]:
    import jax
    from flax import nnx

    from benchmarks.decode import open_tables
    from edu_prm_jax.models.qwen2 import Qwen2
    from edu_prm_jax.sampling.decode import DecodeParams
    from edu_prm_jax.sampling.decode import decode as run_decode

    cfg = model_cfg(shape)
    model = Qwen2(cfg, nnx.Rngs(0))
    tables = open_tables(cfg.vocab_size)
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = []
    params = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=args.new_tokens, stop_at_answer=False)
    for batch in args.decode_batches:
        prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        lens = np.full((batch,), args.prompt_len, np.int32)
        timing, out = timed(lambda x=prompts, n=lens, b=batch: run_decode(
            params, model, tables, x, n, np.arange(b, dtype=np.int32)), args.repeats)
        if not (out["gen_len"] == args.new_tokens).all():
            raise RuntimeError(f"decode stopped early: gen_len {sorted(set(out['gen_len'].tolist()))}")
        step_s = timing.median_s / args.new_tokens
        mean_cache = args.prompt_len + args.new_tokens / 2
        kv = 2 * cfg.num_hidden_layers * batch * mean_cache * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16
        rows.append({"batch": batch, "new_tokens": batch * args.new_tokens, **dataclasses.asdict(timing),
                     "tokens_per_s": batch * args.new_tokens / timing.median_s, "step_ms": step_s * 1e3,
                     "bytes_per_step": weights + kv,
                     "hbm_roofline_share": (weights + kv) / bandwidth / step_s if bandwidth else None})
    return rows


def train(shape: str, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    import jax
    from flax import nnx

    from edu_prm_jax.models.prm import PRM, prm_loss
    from edu_prm_jax.training.loop import TrainConfig, Trainer
    from edu_prm_jax.training.metrics import train_flops_per_token
    from edu_prm_jax.training.optim import OptimConfig

    cfg = model_cfg(shape).replace(param_dtype="float32", remat="full")
    rng = np.random.default_rng(0)
    rows, length = args.train_rows, args.train_len
    steps_per_row = 8
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    mask = np.zeros((rows, length), bool)
    mask[:, length // steps_per_row - 1::length // steps_per_row] = True
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32), "positions": positions,
             "segment_ids": np.ones((rows, length), np.int32), "step_end_mask": mask, "loss_mask": mask,
             "targets": rng.integers(0, 2, (rows, length)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(PRM(cfg, "scalar", rngs=nnx.Rngs(0)), prm_loss,
                          OptimConfig(learning_rate=1e-5, warmup_steps=1, total_steps=1000),
                          TrainConfig(steps=1000, progress=False, tensorboard=False), workdir)

        def step() -> Any:
            return jax.block_until_ready(trainer.train_step(batch)["loss"])

        timing, loss = timed(step, args.repeats)
        trainer.close()
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"train step loss is {float(loss)}")
    n = rows * length
    tps = n / timing.median_s
    flops = train_flops_per_token(cfg, length, lm_head=False)
    return {"tokens": n, **dataclasses.asdict(timing), "tokens_per_s": tps,
            "mfu": tps * flops / peak if peak else None}


def environment() -> dict[str, Any]:
    import jax

    from edu_prm_jax.planning.hardware import chip_of_device_kind

    device = jax.devices()[0]
    chip = chip_of_device_kind(device.device_kind)
    return {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "chip": chip.name if chip else None,
            "peak_flops": chip.peak_flops if chip else None,  # every program here runs on one device
            "hbm_bandwidth": chip.hbm_bandwidth if chip else None, "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_1m": os.getloadavg()[0]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = [f"{env['device_kind']} x {env['devices']} ({env['backend']}, jax {env['jax']}), {env['date']}",
             "", "| model | program | shape | tokens/s | median s (min-max) | MFU | HBM roofline share |",
             "|---|---|---|---|---|---|---|"]
    for shape, r in results["shapes"].items():
        p = r["prefill"]
        lines.append(f"| {shape} | prefill | {results['args']['prefill_batch']} x {results['args']['prompt_len']} | "
                     f"{p['tokens_per_s']:,.0f} | {p['median_s']:.4f} ({p['min_s']:.4f}-{p['max_s']:.4f}) | "
                     f"{_pct(p['mfu'])} | - |")
        for d in r["decode"]:
            lines.append(f"| {shape} | decode (greedy) | batch {d['batch']} | {d['tokens_per_s']:,.0f} | "
                         f"{d['median_s']:.3f} ({d['min_s']:.3f}-{d['max_s']:.3f}) | - | "
                         f"{_pct(d['hbm_roofline_share'])} |")
        t = r["train"]
        lines.append(f"| {shape} | PRM train step | {results['args']['train_rows']} x {results['args']['train_len']} | "
                     f"{t['tokens_per_s']:,.0f} | {t['median_s']:.4f} ({t['min_s']:.4f}-{t['max_s']:.4f}) | "
                     f"{_pct(t['mfu'])} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    results: dict[str, Any] = {"benchmark": "accelerator", "env": env, "args": vars(args), "shapes": {}}
    for shape in args.shapes:
        started = time.perf_counter()
        results["shapes"][shape] = {"prefill": prefill(shape, args, env["peak_flops"]),
                                    "decode": decode(shape, args, env["hbm_bandwidth"]),
                                    "train": train(shape, args, env["peak_flops"])}
        print(f"done {shape} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
