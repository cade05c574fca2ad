"""Where the time of the train step goes, JAX vs PyTorch, on the same weights (the `train_step` benchmark's model).

    python -m benchmarks.train_profile [--threads 1 2] [--repeats 5] [--json out.json] [--no-baseline]

The model is `benchmarks/train_step.py`'s (vocab 192, hidden 128, 4 layers, 4 heads, 2 KV heads, inter 512,
tied embeddings, batch 8 x 256, float32, AdamW, `lm_loss`), with the tests' random transformers weights
(`tests/hf_reference.make_hf_qwen2`: perturbed biases and norms) saved as safetensors: PyTorch runs
`Qwen2ForCausalLM` (sdpa attention) from that directory, JAX the same tensors through
`models.checkpoints.load_hf_model`. Per side, each part timed separately, every part once per round, JAX and
torch rounds alternating (so load from other jobs hits every cell alike):
- `forward`: the loss of the batch (torch: with autograd recording, as in a step);
- `value_and_grad`: loss and gradients (torch: forward + `backward()`); `backward` is the difference;
- `update`: the AdamW update given gradients (JAX: a jitted `optax.adamw` update with donated buffers;
  torch: `optimizer.step()`);
- `step`: the real train step (JAX: `training.loop.Trainer.train_step`, the benchmark's path; torch:
  zero_grad, forward, backward, step);
- `step_attention_standin`: the step with the attention core (scores, softmax, weighted values) replaced by
  the elementwise q + k + v per head, which keeps every projection and its gradient; the attention share is
  1 - standin / step.
`jax_before` is the JAX step with the formulations this library had before the fast kernels (issue 19):
`jnp.dot` for the dense layers and LM head, `silu(gate) * up`, `dense_attention` over the full causal mask
(jax.grad's own gradients everywhere) and RoPE tables computed in every consumer (`jax_formulation`). A
first-step loss cross-check: every side's loss on the same weights and tokens (must agree to 1e-4).

Threads: `profile(threads, repeats)` runs JAX and torch in two worker processes pinned to `threads` CPUs (the
highest-numbered of this process's allowed CPUs: `taskset -c 1` for one on a 2-core machine), torch with
`torch.set_num_threads(threads)`; XLA:CPU sizes its thread pool from the CPU affinity (it ignores
--xla_cpu_multi_thread_eigen). Times are wall-clock medians (min-max) in ms, plus the median CPU time of the
worker (all its threads), which load from other processes inflates less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 192, 128, 4, 4, 2, 512
BATCH, SEQ = 8, 256
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.01  # benchmarks/train_step.py's AdamW
LOSS_TOLERANCE = 1e-4
PARTS = ("forward", "value_and_grad", "backward", "update", "step", "step_attention_standin")
_WORKER_FLAG = "--_worker"


def pick_cpus(threads: int) -> list[int]:
    """The `threads` highest-numbered CPUs this process may run on (`taskset -c 1` for one on a 2-core box).
    Raises ValueError when fewer are allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(allowed):
        raise ValueError(f"threads={threads}: this process may run on {len(allowed)} CPU(s) {allowed}")
    return allowed[-threads:]


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """`train_step.py`'s batch: random tokens [BATCH, SEQ] int32, next-token targets, all weights 1, one
    segment per row, positions 0..SEQ-1."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((BATCH, SEQ), np.float32),
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}


def stats(wall: Sequence[float], cpu: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of wall times and the median CPU time, in ms (inputs in seconds)."""
    return {"median_ms": 1e3 * float(np.median(wall)), "min_ms": 1e3 * min(wall), "max_ms": 1e3 * max(wall),
            "cpu_median_ms": 1e3 * float(np.median(cpu)), "wall_ms": [round(1e3 * t, 2) for t in wall]}


# ------------------------------------------------------------------------------------------------ JAX
@contextlib.contextmanager
def jax_formulation(name: str, standin: bool = False) -> Iterator[None]:
    """Trace the model, while inside, with formulation `name`: "after" (the library as it is) or "before"
    (the training path before issue 19: `jnp.dot` for `qwen2.dense_matmul`, `silu(gate) * up` for
    `qwen2.swiglu`, `dense_attention` over `qwen2.causal_mask` for `attention.causal_attention`: jax.grad's
    own gradients everywhere; RoPE tables as `qwen2.plain_rotary_tables`, without the conditional, so XLA
    fuses them into every consumer);
    `standin` replaces the attention core by q + k + v per head. Patches module attributes, so only programs
    traced inside see it (compile them inside, by a first call)."""
    import jax
    import jax.numpy as jnp

    from edu_prm_jax.models import attention, qwen2

    if name not in ("before", "after"):
        raise ValueError(f"formulation {name!r}: expected 'before' or 'after'")
    saved = qwen2.dense_matmul, qwen2.swiglu, attention.causal_attention, qwen2.rotary_tables

    def masked_reference(q: Any, k: Any, v: Any, segment_ids: Any, compute_dtype: Any) -> Any:
        seg = segment_ids if segment_ids is not None else jnp.ones(q.shape[:2], jnp.int32)
        return attention.dense_attention(q, k, v, qwen2.causal_mask(seg), compute_dtype)

    def attention_standin(q: Any, k: Any, v: Any, segment_ids: Any, compute_dtype: Any) -> Any:
        group = q.shape[2] // k.shape[2]
        out = q + jnp.repeat(k, group, axis=2) + jnp.repeat(v, group, axis=2)
        return out.reshape(*q.shape[:2], -1).astype(compute_dtype)

    try:
        if name == "before":
            qwen2.dense_matmul = lambda x, kernel, axes: jnp.dot(x, kernel)
            qwen2.swiglu = lambda gate, up: jax.nn.silu(gate) * up
            attention.causal_attention = masked_reference
            qwen2.rotary_tables = qwen2.plain_rotary_tables
        if standin:
            attention.causal_attention = attention_standin
        yield
    finally:
        qwen2.dense_matmul, qwen2.swiglu, attention.causal_attention, qwen2.rotary_tables = saved


def jax_cells(weights_dir: pathlib.Path, batch: dict[str, np.ndarray], formulation: str, workdir: str
              ) -> tuple[dict[str, Callable[[], Any]], float]:
    """The JAX cells of one formulation (compiled here) and its first-step loss."""
    import jax
    import optax
    from flax import nnx

    from edu_prm_jax.models.checkpoints import load_hf_model
    from edu_prm_jax.training.lm import lm_loss
    from edu_prm_jax.training.loop import TrainConfig, Trainer

    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    graphdef, params = nnx.split(load_hf_model(weights_dir))

    def loss_of(p: Any) -> Any:
        return lm_loss(nnx.merge(graphdef, p), device_batch)[0]

    forward = jax.jit(loss_of)
    value_and_grad = jax.jit(jax.value_and_grad(loss_of))

    def adamw(p: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    update = jax.jit(adamw, donate_argnums=(0, 1))
    holder = {"params": jax.tree.map(lambda x: x.copy(), params), "opt": tx.init(params)}
    train_cfg = TrainConfig(steps=10 ** 6, progress=False, tensorboard=False, async_checkpointing=False)
    trainers = {}
    with jax_formulation(formulation):
        loss = float(forward(params))
        _, grads = value_and_grad(params)
        trainers["step"] = Trainer(load_hf_model(weights_dir), lm_loss, tx, train_cfg, f"{workdir}/step")
        jax.block_until_ready(trainers["step"].train_step(batch))
    with jax_formulation(formulation, standin=True):
        trainers["standin"] = Trainer(load_hf_model(weights_dir), lm_loss, tx, train_cfg, f"{workdir}/standin")
        jax.block_until_ready(trainers["standin"].train_step(batch))

    def run_update() -> None:
        holder["params"], holder["opt"] = update(holder["params"], holder["opt"], grads)
        jax.block_until_ready(holder["params"])

    run_update()  # compiles; the second call sees its own outputs' layout (one more compile) and settles
    run_update()
    cells = {"forward": lambda: jax.block_until_ready(forward(params)),
             "value_and_grad": lambda: jax.block_until_ready(value_and_grad(params)),
             "update": run_update,
             "step": lambda: jax.block_until_ready(trainers["step"].train_step(batch)),
             "step_attention_standin": lambda: jax.block_until_ready(trainers["standin"].train_step(batch))}
    return cells, loss


# ---------------------------------------------------------------------------------------------- torch
def torch_cells(weights_dir: pathlib.Path, batch: dict[str, np.ndarray]) -> tuple[dict[str, Callable[[], Any]],
                                                                                     float]:
    """The PyTorch cells (transformers Qwen2ForCausalLM, sdpa attention, float32, AdamW) and its first-step
    loss (mean next-token cross-entropy over every token, what `lm_loss` is with all weights 1)."""
    import torch
    from transformers import AttentionInterface, Qwen2ForCausalLM

    def attention_standin(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> tuple[Any, None]:
        group = q.shape[1] // k.shape[1]  # [B, heads, T, D] in, [B, T, heads, D] out (as sdpa's wrapper)
        out = q + k.repeat_interleave(group, 1) + v.repeat_interleave(group, 1)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("train_profile_standin", attention_standin)
    model = Qwen2ForCausalLM.from_pretrained(weights_dir, attn_implementation="sdpa", dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)

    def loss_fn() -> Any:
        logits = model(input_ids=tokens).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def value_and_grad() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()

    def step() -> None:
        value_and_grad()
        opt.step()

    def standin_step() -> None:
        model.set_attn_implementation("train_profile_standin")
        try:
            step()
        finally:
            model.set_attn_implementation("sdpa")

    with torch.no_grad():
        loss = float(loss_fn())
    value_and_grad()  # gradients for the `update` cell
    cells = {"forward": lambda: loss_fn().detach(), "value_and_grad": value_and_grad, "update": opt.step,
             "step": step, "step_attention_standin": standin_step}
    return cells, loss


# ------------------------------------------------------------------------------------------ measuring
def _derived(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add `backward` (value_and_grad - forward) and `attention_share` (1 - standin / step, medians)."""
    out = dict(parts)
    vg, fw = parts["value_and_grad"], parts["forward"]
    out["backward"] = {"median_ms": vg["median_ms"] - fw["median_ms"],
                       "cpu_median_ms": vg["cpu_median_ms"] - fw["cpu_median_ms"]}
    out["attention_share"] = 1.0 - parts["step_attention_standin"]["median_ms"] / parts["step"]["median_ms"]
    return out


def _worker(role: str, weights: pathlib.Path, threads: int, baseline: bool) -> None:
    """A measuring child: build the cells of `role` ("jax": both formulations; "torch"), print
    {"ready": ..., "loss": {side: loss}} as one JSON line, then on each "run" line from stdin time every cell
    once and print {"times": {side/part: [wall s, cpu s]}}; stop at "quit" or end of input."""
    batch = make_batch()
    sides: dict[str, tuple[dict[str, Callable[[], Any]], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if role == "jax":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            sides["jax"] = jax_cells(weights, batch, "after", f"{tmp}/after")
            if baseline:
                sides["jax_before"] = jax_cells(weights, batch, "before", f"{tmp}/before")
        else:
            import torch

            torch.set_num_threads(threads)
            sides["torch"] = torch_cells(weights, batch)
        cells = {f"{side}/{part}": fn for side, (side_cells, _) in sides.items() for part, fn in side_cells.items()}
        for fn in cells.values():  # warm-up
            fn()
        print(json.dumps({"ready": True, "loss": {side: loss for side, (_, loss) in sides.items()}}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            times = {}
            for name, fn in cells.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[name] = [time.perf_counter() - t, time.process_time() - c]
            print(json.dumps({"times": times}), flush=True)


def _start_worker(role: str, weights: pathlib.Path, threads: int, cpus: list[int], baseline: bool
                  ) -> tuple[subprocess.Popen, dict[str, Any]]:
    cmd = [sys.executable, "-m", "benchmarks.train_profile", _WORKER_FLAG, role, "--weights", str(weights),
           "--threads", str(threads)] + ([] if baseline else ["--no-baseline"])
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu"}
    proc = subprocess.Popen(cmd, cwd=pathlib.Path(__file__).resolve().parent.parent, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    return proc, _read_reply(proc, role)


def _read_reply(proc: subprocess.Popen, role: str) -> dict[str, Any]:
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"train_profile {role} worker ended (exit {proc.wait()}): {proc.stderr.read()[-3000:]}")
        if line.startswith("{"):
            return json.loads(line)


def profile(threads: int = 1, repeats: int = 5, *, baseline: bool = True) -> dict[str, Any]:
    """Time split of the train step, JAX vs PyTorch, on `threads` CPUs (`pick_cpus`), `repeats` rounds.

    JAX and torch each run in a child process pinned to those CPUs (XLA:CPU and torch size their thread pools
    when they start; in one process torch's OpenMP threads and XLA's pool slow each other down by 10x at two
    threads), set up and warmed up one after the other, then driven in alternation: one round of every JAX
    cell, one round of every torch cell, and so on, so load from other jobs hits both alike. Returns {threads,
    cpus, repeats, load_before/after (1, 5, 15-minute load averages), model, jax, jax_before (when
    `baseline`), torch: {part: {median_ms, min_ms, max_ms, cpu_median_ms, wall_ms}} for `PARTS` plus
    attention_share, loss: {jax, jax_before, torch, max_abs_diff_vs_torch, tolerance, match}, ratio: {jax,
    jax_before: torch step / JAX step, i.e. JAX's throughput over torch's}}.
    Raises ValueError for a thread count the CPU affinity cannot give, RuntimeError when a worker fails."""
    cpus = pick_cpus(threads)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from hf_reference import make_hf_qwen2

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "hf"
        make_hf_qwen2(weights, vocab=VOCAB, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS,
                      inter=INTER, tied=True, seed=0, max_pos=SEQ)
        workers, losses = {}, {}
        try:
            for role in ("jax", "torch"):
                workers[role], ready = _start_worker(role, weights, threads, cpus, baseline)
                losses.update(ready["loss"])
            wall: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            for _ in range(repeats):
                for role, proc in workers.items():
                    proc.stdin.write("run\n")
                    proc.stdin.flush()
                    for name, (w, c) in _read_reply(proc, role)["times"].items():
                        wall.setdefault(name, []).append(w)
                        cpu.setdefault(name, []).append(c)
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
                    proc.wait(timeout=120)
    result: dict[str, Any] = {"threads": threads, "cpus": cpus, "repeats": repeats, "load_before": load_before,
                              "load_after": os.getloadavg(),
                              "model": dict(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                                            kv_heads=KV_HEADS, inter=INTER, batch=BATCH, seq=SEQ)}
    for side in losses:
        result[side] = _derived({part: stats(wall[f"{side}/{part}"], cpu[f"{side}/{part}"])
                                 for part in PARTS if f"{side}/{part}" in wall})
    result["loss"] = {**losses, "max_abs_diff_vs_torch": max(abs(v - losses["torch"]) for v in losses.values()),
                      "tolerance": LOSS_TOLERANCE}
    result["loss"]["match"] = result["loss"]["max_abs_diff_vs_torch"] <= LOSS_TOLERANCE
    result["ratio"] = {side: result["torch"]["step"]["median_ms"] / result[side]["step"]["median_ms"]
                       for side in losses if side != "torch"}
    return result


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of one `profile` result: median ms (min-max) per part and side."""
    sides = [s for s in ("jax_before", "jax", "torch") if s in result]
    names = {"jax_before": "JAX before", "jax": "JAX after", "torch": "PyTorch"}
    lines = [f"threads={result['threads']} cpus={result['cpus']} repeats={result['repeats']} "
             f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}",
             "| part | " + " | ".join(names[s] for s in sides) + " |", "|---" * (len(sides) + 1) + "|"]
    for part in PARTS:
        cells = []
        for s in sides:
            p = result[s][part]
            extra = f" ({p['min_ms']:.0f}-{p['max_ms']:.0f})" if "min_ms" in p else ""
            cells.append(f"{p['median_ms']:.1f}{extra}, cpu {p['cpu_median_ms']:.1f}")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| attention share | " + " | ".join(f"{result[s]['attention_share']:.0%}" for s in sides) + " |")
    lines.append("| ratio JAX/torch | " + " | ".join(f"{result['ratio'][s]:.2f}" if s in result["ratio"] else "1"
                                                  for s in sides) + " |")
    loss = result["loss"]
    lines.append("first-step loss: " + ", ".join(f"{names[s]} {loss[s]:.6f}" for s in sides)
                 + f"; max |diff| vs torch {loss['max_abs_diff_vs_torch']:.2e} "
                 f"({'ok' if loss['match'] else 'MISMATCH'}, tolerance {loss['tolerance']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=pathlib.Path, default=None, help="write every result here")
    p.add_argument("--no-baseline", action="store_true", help="skip the pre-issue-19 JAX formulation")
    p.add_argument(_WORKER_FLAG, dest="worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # a measuring child of `profile`
        _worker(args.worker, args.weights, args.threads[0], not args.no_baseline)
        return
    results = []
    for threads in args.threads:
        result = profile(threads, args.repeats, baseline=not args.no_baseline)
        results.append(result)
        print(format_table(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
