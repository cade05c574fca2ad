"""Prefill throughput: the jitted JAX Qwen2 forward vs transformers' Qwen2ForCausalLM on the same weights.

One random tiny Qwen2 is built with transformers, saved as safetensors and loaded back with
`load_hf_model`, so both sides run identical float32 weights (checked by comparing logits before timing).
Each (batch, seq) cell times full-sequence forwards that return all logits through `benchmarks.harness` (warm-up
excluded, sides interleaved, threads pinned, paired ratios with their min-max, load recorded).

    python -m benchmarks.forward --threads 1 --batch-sizes 1 8 32 --seq-lens 128 512 --json forward.json
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.model_args import add_model_args, build_hf_weights

IMPLS = ("jax", "eager", "sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per cell before timing")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    add_model_args(p, vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2, inter=384)
    p.add_argument("--threads", type=int, default=1, help="cores for each side (pinned; see benchmarks.harness)")
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


def check_same_weights(runners: dict[str, Callable], vocab: int) -> float:
    """Max |logit difference| between every implementation and the first, on one small batch."""
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 32))
    outs = {k: np.asarray(f(tokens), np.float32) for k, f in runners.items()}
    ref = next(iter(outs.values()))
    return max(float(np.abs(o - ref).max()) for o in outs.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = harness.pin_threads(args.threads)
    harness.set_torch_threads(args.threads)
    threads = {**pinned, **harness.thread_report()}
    cells = []
    model = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "inter")}
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
        rng = np.random.default_rng(args.seed)
        for seq in args.seq_lens:
            for batch in args.batch_sizes:
                tokens = rng.integers(0, args.vocab, size=(batch, seq))
                sides = {impl: (lambda fn=fn, t=tokens: fn(t)) for impl, fn in runners.items()}
                timings, _, load = harness.measure(sides, args.repeats, args.warmup)
                ratios = {f"jax vs {i}": harness.paired_ratio(timings["jax"], t) for i, t in timings.items()
                          if i != "jax" and "jax" in timings}
                cells.append(harness.Cell("prefill forward", {"batch": batch, "seq": seq}, timings, ratios,
                                          {"max abs logit diff": f"{max_diff:.1e}"}, threads, load,
                                          units={"tokens": batch * seq, **{f"model {k}": v for k, v in
                                                                           model.items()}}))
                print(f"done batch={batch} seq={seq}", file=sys.stderr, flush=True)
    print(harness.markdown_table([c.to_json() for c in cells]))
    if args.json:
        harness.write_json(str(args.json), cells, {"benchmark": "forward",
                                                    "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
