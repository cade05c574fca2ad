"""Prefill throughput: the jitted JAX Qwen2 forward vs transformers' Qwen2ForCausalLM on the same weights.

One random tiny Qwen2 is built with transformers, saved as safetensors and loaded back with
`load_hf_model`, so both sides run identical float32 weights (checked by comparing logits before timing).
Each (batch, seq) cell times full-sequence forwards that return all logits, after warm-up (JIT compilation on
the JAX side), and reports tokens/s from the median of the repeats and the JAX/transformers ratio measured in
this same process. On a shared CPU the absolute numbers move with load; the ratios are what to compare.

    python benchmarks/forward.py --batch-sizes 1 8 32 --seq-lens 128 512 --json forward.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.model_args import add_model_args, build_hf_weights

IMPLS = ("jax", "eager", "sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per cell before timing")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    add_model_args(p, vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2, inter=384)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def jax_forward(weights: pathlib.Path) -> Callable[[np.ndarray], Any]:
    import jax
    from flax import nnx

    from edu_prm_jax.models.checkpoints import load_hf_model

    graphdef, state = nnx.split(load_hf_model(weights, param_dtype="float32", dtype="float32"))

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    def run(tokens: np.ndarray):
        return np.asarray(jax.block_until_ready(forward(state, tokens)))

    return run


def torch_forward(weights: pathlib.Path, attn: str) -> Callable[[np.ndarray], Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation=attn)
    model.eval()

    def run(tokens: np.ndarray):
        with torch.no_grad():
            return model(torch.as_tensor(tokens), use_cache=False).logits.numpy()

    return run


def time_cell(fn: Callable[[np.ndarray], Any], tokens: np.ndarray, warmup: int, repeats: int
              ) -> dict[str, float]:
    for _ in range(warmup):
        fn(tokens)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(tokens)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "tokens_per_s": tokens.size / med}


def check_same_weights(runners: dict[str, Callable], vocab: int) -> float:
    """Max |logit difference| between every implementation and the first, on one small batch."""
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 32))
    outs = {k: np.asarray(f(tokens), np.float32) for k, f in runners.items()}
    ref = next(iter(outs.values()))
    return max(float(np.abs(o - ref).max()) for o in outs.values())


def format_table(rows: list[dict[str, Any]], impls: list[str]) -> str:
    head = ["batch", "seq"] + [f"{i} tok/s" for i in impls]
    head += [f"jax/{i}" for i in impls if i != "jax" and "jax" in impls]
    lines = [" | ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = [str(r["batch"]), str(r["seq"])] + [f"{r[i]['tokens_per_s']:.0f}" for i in impls]
        cells += [f"{r['ratio'][i]:.2f}" for i in impls if i != "jax" and "jax" in impls]
        lines.append(" | ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "weights"
        build_hf_weights(args, weights, max_pos=max(args.seq_lens))
        runners: dict[str, Callable] = {}
        for impl in args.impls:
            runners[impl] = jax_forward(weights) if impl == "jax" else torch_forward(weights, impl)
        max_diff = check_same_weights(runners, args.vocab)
        if max_diff > 1e-3:
            print(f"implementations disagree on the same weights (max |dlogit| = {max_diff:.2e})",
                  file=sys.stderr)
            return 1
        rows = []
        rng = np.random.default_rng(args.seed)
        for seq in args.seq_lens:
            for batch in args.batch_sizes:
                tokens = rng.integers(0, args.vocab, size=(batch, seq))
                row: dict[str, Any] = {"batch": batch, "seq": seq}
                for impl, fn in runners.items():
                    row[impl] = time_cell(fn, tokens, args.warmup, args.repeats)
                if "jax" in runners:
                    row["ratio"] = {i: row["jax"]["tokens_per_s"] / row[i]["tokens_per_s"]
                                    for i in runners if i != "jax"}
                rows.append(row)
                print(f"done batch={batch} seq={seq}", file=sys.stderr, flush=True)

    env = {"jax": jax.__version__, "jax_backend": jax.default_backend(), "jax_devices": jax.device_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "max_abs_logit_diff": max_diff}
    model = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "inter")}
    print(f"model {model}, float32, repeats={args.repeats}, warmup={args.warmup}")
    print(f"env {env}")
    print(format_table(rows, list(runners)))
    if args.json:
        result = {"benchmark": "forward_prefill", "model": model, "env": env, "rows": rows}
        from edu_prm_jax.io.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
