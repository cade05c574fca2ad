"""Train-step speed: the project's Trainer step vs the same step in PyTorch, on the same weights.

Both sides start from one random Qwen2 (`tests/hf_reference.make_hf_qwen2`, saved as safetensors; JAX loads it with
`load_hf_model`, PyTorch with transformers' `Qwen2ForCausalLM`, sdpa attention) and run the same update on the same
packed batch: mean next-token cross-entropy over all tokens, AdamW (lr 1e-4, betas 0.9 / 0.95, eps 1e-8, weight
decay 0.01, no clipping), float32. JAX runs `training.loop.Trainer.train_step` (the step `edu-prm train` runs, with
the LM objective so both sides compute the same loss; the PRM heads add one small projection); PyTorch runs
forward, `backward()` and `optimizer.step()`.

Correctness: both sides take the same number of steps (warm-up + every round), so after timing they must hold the
same loss to 1e-3 (relative), and their first losses must agree to 1e-4: the benchmark stops otherwise.

    python -m benchmarks.train_step --threads 1 --json train_step.json
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.model_args import add_model_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="cores for each side (pinned; see benchmarks.harness)")
    add_model_args(p, vocab=192, hidden=128, layers=4, heads=4, kv_heads=2, inter=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    p.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or min(args.seq_lens) < 2:
        p.error("--repeats and --batch must be >= 1 and --seq-lens >= 2")
    return args


def jax_step(weights: pathlib.Path, batch: dict[str, np.ndarray], workdir: str) -> Any:
    """A function running one Trainer step on `batch` and returning its loss (a host float)."""
    import optax

    from edu_prm_jax.models.checkpoints import load_hf_model
    from edu_prm_jax.training.lm import lm_loss
    from edu_prm_jax.training.loop import TrainConfig, Trainer

    model = load_hf_model(weights, param_dtype="float32", dtype="float32")
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    trainer = Trainer(model, lm_loss, tx, TrainConfig(steps=10**6, progress=False, tensorboard=False,
                                                      async_checkpointing=False), workdir)
    return lambda: float(trainer.train_step(batch)["loss"])


def torch_step(weights: pathlib.Path, batch: dict[str, np.ndarray]) -> Any:
    """The same step in PyTorch; returns its loss (a float)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)

    def step() -> float:
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def make_batch(rng: np.random.Generator, vocab: int, rows: int, seq: int) -> dict[str, np.ndarray]:
    """Random tokens, one segment per row, every target weighted: what both sides train on."""
    ids = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((rows, seq), np.float32),
            "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def run_cells(args: argparse.Namespace, threads: dict[str, Any]) -> list[harness.Cell]:
    from benchmarks.model_args import build_hf_weights

    cells = []
    rng = np.random.default_rng(args.seed)
    model = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "inter")}
    for seq in args.seq_lens:
        with tempfile.TemporaryDirectory() as tmp:
            weights = pathlib.Path(tmp) / "weights"
            build_hf_weights(args, weights, max_pos=max(256, seq))
            batch = make_batch(rng, args.vocab, args.batch, seq)
            sides = {"jax": jax_step(weights, batch, str(pathlib.Path(tmp) / "run")), "torch": torch_step(weights,
                                                                                                        batch)}
            first = {name: fn() for name, fn in sides.items()}  # the first step doubles as the warm-up
            if abs(first["jax"] - first["torch"]) > 1e-4 * max(1.0, abs(first["torch"])):
                raise RuntimeError(f"train step seq {seq}: first losses differ (jax {first['jax']:.6f}, torch "
                                   f"{first['torch']:.6f}); the sides would not be training the same model")
            timings, last, load = harness.measure(sides, args.repeats, warmup=0)
        if abs(last["jax"] - last["torch"]) > 1e-3 * max(1.0, abs(last["torch"])):
            raise RuntimeError(f"train step seq {seq}: after {args.repeats + 1} steps the losses differ (jax "
                               f"{last['jax']:.6f}, torch {last['torch']:.6f})")
        check = {"first loss": f"{first['jax']:.5f} = {first['torch']:.5f}",
                 f"loss after {args.repeats + 1} steps": f"{last['jax']:.5f} = {last['torch']:.5f}"}
        cells.append(harness.Cell("train step (AdamW, f32)", {"batch": args.batch, "seq": seq}, timings,
                                  {"jax vs torch": harness.paired_ratio(timings["jax"], timings["torch"])},
                                  check, threads, load,
                                  units={"tokens": args.batch * seq, **{f"model {k}": v for k, v in model.items()}}))
        print(f"done seq={seq}: jax vs torch {cells[-1].ratios['jax vs torch'].text()}", file=sys.stderr, flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = harness.pin_threads(args.threads)
    harness.set_torch_threads(args.threads)
    import jax  # noqa: F401  (imported after pinning, so thread_report sees the final pools)

    cells = run_cells(args, {**pinned, **harness.thread_report()})
    print(harness.markdown_table([c.to_json() for c in cells]))
    if args.json:
        harness.write_json(str(args.json), cells, {"benchmark": "train_step",
                                                    "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
