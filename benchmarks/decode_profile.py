"""Where a decode step's time goes: model, attention over the cache, entropy / top-k, fork bookkeeping, stops.

Split by ablation, each part a jitted `lax.while_loop` of --new-tokens steps on the decode benchmark's model
(`benchmarks.decode`), timed through `benchmarks.harness` (interleaved, warm-up excluded, threads pinned):

- `greedy loop`: the project's rollout loop (`sampling.decode.decode`, greedy, every row to its length);
- `model step`: a bare loop feeding each row's argmax back through the model with its KV cache (no entropy,
  no records, no stop checks): the model's share;
- `model step, no cache attention`: the same with `models.attention.cache_attention` (and the reference
  `dense_attention`) replaced by a function of the same output shape that reads nothing (patched while
  tracing): the difference is attention over the cache;
- `matmuls alone`: a loop of the model's dense matmuls at the same batch and nothing else (`matmul_loop`): the
  floor the model's part cannot go below on this machine (reported inside the model's part);
- `entropy + top-k`: a loop of `stats.entropy_and_logz` and `stats.top_k_small` on [B, V] logits;
- `EDU loop`: the rollout loop in EDU mode with B / --slots questions of --slots slots each (the same B rows),
  tau at the 90% quantile of greedy entropies, against `EDU loop, no forks`: the same with tau = +inf, so no
  position qualifies (slot 0 of each question runs; the other rows are computed all the same): the difference
  is the forks themselves (cache-row copies, anchors, slot assignment).
The rest of the greedy loop (greedy loop - model step - entropy + top-k) is the per-step records and stop
detection. `prefill` is the bare loop with no steps (the prompts' forward alone); each part's time per step =
(loop time - the prefill, for the loops that run one) / steps.

    python -m benchmarks.decode_profile --threads 1 --batch 64 --new-tokens 64 --prompt-len 32
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=8, help="EDU slots per question (batch / slots questions)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.batch % args.slots:
        p.error("--batch must be a multiple of --slots")
    return args


def model_loop(model: Any, batch: int, prompt_len: int, steps: int) -> Any:
    """A jitted fn(state, prompts) running prefill, then `steps` bare model steps on the argmax tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from edu_prm_jax.models.qwen2 import KVCache

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompts):
        m = nnx.merge(graphdef, state)
        cache = KVCache.zeros(m.cfg, batch, prompt_len + steps)
        hidden, cache = m.backbone(prompts, cache=cache)
        logits = m.logits(hidden[:, -1:])[:, 0]

        def body(carry):
            i, logits, cache = carry
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out, cache = m(token[:, None], cache=cache, write_index=jnp.full((batch,), prompt_len + i, jnp.int32))
            return i + 1, out[:, 0], cache

        # the cache is returned too: were it dead after the loop, XLA would drop its writes (and the key / value
        # projections) from the loop of a stand-in attention that never reads it, and bill them to attention
        return jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), logits, cache))[1:]

    return lambda prompts: jax.block_until_ready(run(state, prompts))


def matmul_loop(model: Any, batch: int, steps: int) -> Any:
    """A jitted loop of `steps` steps of the model's dense matmuls alone at `batch` rows (every projection of
    every layer, then the LM head, on the model's own kernels; a few adds keep each product live): the floor a
    decode step's matmuls set on this machine."""
    import jax
    import jax.numpy as jnp

    layers = model.layers
    kernels = [[getattr(getattr(layer, part), name).kernel[...] for part, name in
                (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
                 ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))] for layer in layers]
    head = model.lm_head[...] if model.lm_head is not None else model.embed[...].T
    hidden = head.shape[0]

    @jax.jit
    def run(kernels, head, x):
        def body(i, x):
            for wq, wk, wv, wo, wg, wu, wd in kernels:
                q, k, v = x @ wq, x @ wk, x @ wv
                x = x + q @ wo
                x = x.at[:, : k.shape[1]].add(k + v)
                x = x + ((x @ wg) * (x @ wu)) @ wd
            return x + 1e-6 * (x @ head)[:, :hidden]
        return jax.lax.fori_loop(0, steps, body, x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, hidden)) * 1e-3, jnp.float32)
    return lambda: jax.block_until_ready(run(kernels, head, x))


def stats_loop(batch: int, vocab: int, steps: int, k: int) -> Any:
    import jax
    import jax.numpy as jnp

    from edu_prm_jax.sampling.stats import entropy_and_logz, top_k_small

    @jax.jit
    def run(logits):
        def body(carry):
            i, z, acc = carry
            ent, log_z = entropy_and_logz(z)
            top = top_k_small(z, k)
            # feed the results back so nothing is dead code, and shift the logits so no step is hoisted
            return i + 1, z + 1e-6 * ent[:, None], acc + log_z + top[:, 0].astype(jnp.float32)

        return jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), logits, jnp.zeros(batch)))[2]

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(batch, vocab)), jnp.float32)
    return lambda: jax.block_until_ready(run(logits))


def profile(args: argparse.Namespace, weights: pathlib.Path, vocab: int) -> dict[str, Any]:
    from benchmarks.decode import JaxSide
    from edu_prm_jax.models import attention
    from edu_prm_jax.sampling.decode import DecodeParams

    side = JaxSide(weights, vocab)
    rng = np.random.default_rng(args.seed)
    b, n = args.batch, args.new_tokens
    prompts = rng.integers(0, vocab, (b, args.prompt_len)).astype(np.int32)
    greedy = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False)
    ents = side.run(greedy, prompts)["entropies"][:, :n]
    q = b // args.slots
    edu = DecodeParams(mode="edu", num_leaves=args.slots, max_new_tokens=n, tau=float(np.quantile(ents, 0.9)),
                       branch_k=2, max_anchors=max(16, args.slots), stop_at_answer=False)
    no_forks = dataclasses.replace(edu, tau=float("inf"))
    with_attention = model_loop(side.model, b, args.prompt_len, n)
    prefill_only = model_loop(side.model, b, args.prompt_len, 0)
    real = attention.dense_attention, attention.cache_attention
    try:  # trace a second bare loop whose attention (the reference and the one over the cache) reads nothing
        attention.dense_attention = attention.cache_attention = (
            lambda q_, k_, v_, mask, dtype: q_.reshape(*q_.shape[:2], -1).astype(dtype))
        without_attention = model_loop(side.model, b, args.prompt_len, n)
        without_attention(prompts)  # compiled now, with the stand-in
    finally:
        attention.dense_attention, attention.cache_attention = real
    sides = {
        "greedy loop": lambda: side.run(greedy, prompts),
        "EDU loop": lambda: side.run(edu, prompts[:q]),
        "EDU loop, no forks": lambda: side.run(no_forks, prompts[:q]),
        "model step": lambda: with_attention(prompts),
        "model step, no cache attention": lambda: without_attention(prompts),
        "entropy + top-k": stats_loop(b, vocab, n, 2),
        "prefill": lambda: prefill_only(prompts),
        "matmuls alone": matmul_loop(side.model, b, n),
    }
    timings, outs, load = harness.measure(sides, args.repeats)
    prefill = timings["prefill"].median
    with_prefill = {"greedy loop", "model step", "model step, no cache attention"}  # "prefill" has no steps
    per_step = {k: (t.median - (prefill if k in with_prefill else 0.0)) / n * 1e3 for k, t in timings.items()
                if k != "prefill"}
    parts = {
        "model (matmuls, norms, rotary, cache writes)": per_step["model step, no cache attention"],
        "attention over the cache": per_step["model step"] - per_step["model step, no cache attention"],
        "entropy + top-k": per_step["entropy + top-k"],
        "records + stop detection": per_step["greedy loop"] - per_step["model step"] - per_step["entropy + top-k"],
        "EDU forks (EDU loop - EDU loop that never forks)": per_step["EDU loop"] - per_step["EDU loop, no forks"],
    }
    # the model part again, as the dense matmuls alone (the floor) and what the step adds around them
    parts["of which: dense matmuls alone"] = per_step["matmuls alone"]
    return {"per_step_ms": per_step, "parts_ms": parts, "prefill_ms": prefill * 1e3,
            "timings": {k: v.to_json() for k, v in timings.items()},
            "load": load.to_json(), "edu_leaves": int(outs["EDU loop"]["used"].sum()), "questions_edu": q}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = harness.pin_threads(args.threads)
    harness.set_torch_threads(args.threads)
    from benchmarks.decode import parse_args as decode_args
    from benchmarks.model_args import build_hf_weights

    margs = decode_args(["--seed", str(args.seed)])
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "w"
        build_hf_weights(margs, weights, max_pos=max(256, args.prompt_len + args.new_tokens))
        result = profile(args, weights, margs.vocab)
    result["threads"] = {**pinned, **harness.thread_report()}
    total = result["per_step_ms"]["greedy loop"]
    print(f"decode step split, batch {args.batch}, cache {args.prompt_len} + {args.new_tokens}, "
          f"{args.threads} thread(s); greedy step {total:.2f} ms, after a prefill of {result['prefill_ms']:.1f} ms "
          f"(load {result['load']['load_1m_before']:.2f})")
    print("| part | ms per step | share of the greedy step |\n|---|---|---|")
    for k, v in result["parts_ms"].items():
        print(f"| {k} | {v:.2f} | {v / total:.0%} |")
    if args.json:
        from edu_prm_jax.io.atomic import write_json_atomic

        write_json_atomic(args.json, {"environment": harness.environment(), "args": vars(args) | {"json": None},
                                      **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
