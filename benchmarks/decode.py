"""Decode throughput of the jitted JAX sampler vs transformers `generate`, and EDU vs HT token cost.

Part 1 (throughput): one random Qwen2 is built with `tests/hf_reference.make_hf_qwen2`, saved as safetensors
and loaded by both sides, so both run identical float32 weights. Every row generates exactly --new-tokens
tokens (EOS disabled on both sides: an empty EOS table and no answer stop for JAX; no eos_token_id for
transformers). JAX runs `decode` in "greedy" mode (and "ht" sampling mode) with batch B as B questions of one
slot; transformers runs `generate(do_sample=False, use_cache=True)` under `torch.no_grad`. Times are medians of
--repeats runs after one warm-up; the warm-up's extra time over a steady run is reported as JAX compile time.

Part 2 (EDU vs HT at equal N): on the same --questions prompts, the distinct tokens each method generates
(EDU: shared prefixes counted once, `distinct_tokens`; HT: N independent paths) and the wall time of each.
A random model's entropies sit near log(V) everywhere, so a fixed tau is meaningless: tau is set to the
--tau-quantile of the entropies along the greedy paths of the same prompts, and the output says so.

On a CPU shared with other jobs, pass --threads 1: with torch's default of one thread per core, OpenMP
barriers on busy cores made `generate` 10-100x slower, which measures the contention, not transformers.

    python -m benchmarks.decode --threads 1 --batch-sizes 1 8 64 --slots 4 16 64 --json decode.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.model_args import add_model_args, build_hf_weights
from benchmarks.timing import timed_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell after the warm-up (median reported)")
    p.add_argument("--jax-modes", nargs="+", choices=("greedy", "ht"), default=["greedy", "ht"])
    p.add_argument("--temperature", type=float, default=0.7, help="HT sampling temperature")
    p.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attention")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: all available; use 1 on a busy machine, see README)")
    p.add_argument("--slots", type=int, nargs="*", default=[4, 16, 64], help="N for EDU vs HT (none: skip)")
    p.add_argument("--questions", type=int, default=4, help="prompts for EDU vs HT")
    p.add_argument("--tau-quantile", type=float, default=0.9, help="tau = this quantile of greedy entropies")
    p.add_argument("--branch-k", type=int, default=2)
    add_model_args(p, vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        p.error("--repeats, --new-tokens and --prompt-len must be >= 1")
    if not 0.0 < args.tau_quantile < 1.0:
        p.error("--tau-quantile must be in (0, 1)")
    return args


def open_tables(vocab: int) -> Any:
    """Tables with no EOS, no stop strings and no symbol tokens: every row runs to max_new_tokens."""
    from edu_prm_jax.sampling.decode import Tables
    from edu_prm_jax.sampling.stopping import build_stop_tables

    stop = build_stop_tables([f"t{i}" for i in range(vocab)], vocab, [])
    return Tables.build(stop, np.zeros(vocab, bool), vocab, vocab)


def median_time(fn: Callable[[], Any], repeats: int, warmup: Callable[[], Any] | None = None
                ) -> tuple[float, float, Any]:
    """(warm-up seconds, median timed seconds, last result); the warm-up is `fn` itself unless given."""
    first, times, out = timed_runs(fn, repeats, warmup)
    return first, statistics.median(times), out


class JaxSide:
    def __init__(self, weights: pathlib.Path, vocab: int):
        from edu_prm_jax.models.checkpoints import load_hf_model

        self.model = load_hf_model(weights, param_dtype="float32", dtype="float32")
        self.tables = open_tables(vocab)

    def run(self, params: Any, prompts: np.ndarray) -> dict[str, np.ndarray]:
        from edu_prm_jax.sampling.decode import decode

        q = prompts.shape[0]
        return decode(params, self.model, self.tables, prompts, np.full((q,), prompts.shape[1], np.int32),
                      np.arange(q, dtype=np.int32))


def hf_generate(weights: pathlib.Path, attn: str) -> Callable[[np.ndarray, int], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # every row generates exactly max_new_tokens

    def run(prompts: np.ndarray, new_tokens: int) -> np.ndarray:
        ids = torch.as_tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return run


def throughput(args: argparse.Namespace, jax_side: JaxSide, hf: Callable, rng: np.random.Generator
               ) -> list[dict[str, Any]]:
    from edu_prm_jax.sampling.decode import DecodeParams

    rows = []
    n = args.new_tokens
    for batch in args.batch_sizes:
        prompts = rng.integers(0, args.vocab, size=(batch, args.prompt_len)).astype(np.int32)
        row: dict[str, Any] = {"batch": batch, "new_tokens": batch * n}
        for mode in args.jax_modes:
            params = DecodeParams(mode=mode, num_leaves=1, max_new_tokens=n, temperature=args.temperature,
                                  stop_at_answer=False, seed=args.seed)
            first, med, out = median_time(lambda p=params, x=prompts: jax_side.run(p, x), args.repeats)
            if not (out["gen_len"] == n).all():
                raise RuntimeError(f"JAX {mode}: rows stopped early: gen_len {sorted(set(out['gen_len']))}")
            row[f"jax_{mode}"] = {"median_s": med, "tokens_per_s": batch * n / med, "compile_s": first - med}
            if mode == "greedy":
                jax_tokens = out["tokens"]
        # transformers compiles nothing: a 2-token warm-up suffices (allocator, first-call paths)
        first, med, hf_tokens = median_time(lambda x=prompts: hf(x, n), args.repeats, lambda x=prompts: hf(x, 2))
        if hf_tokens.shape != (batch, n):
            raise RuntimeError(f"transformers generated {hf_tokens.shape}, expected {(batch, n)}")
        row["hf"] = {"median_s": med, "tokens_per_s": batch * n / med, "warmup_s": first}
        if "greedy" in args.jax_modes:
            # near-uniform random logits can flip a near-tie argmax in float32; report, do not abort
            row["greedy_rows_identical"] = float(np.mean((jax_tokens == hf_tokens).all(axis=1)))
            row["greedy_first_token_agree"] = float(np.mean(jax_tokens[:, 0] == hf_tokens[:, 0]))
        for mode in args.jax_modes:
            row[f"ratio_{mode}"] = row[f"jax_{mode}"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        rows.append(row)
        print(f"done batch={batch}", file=sys.stderr, flush=True)
    return rows


def edu_vs_ht(args: argparse.Namespace, jax_side: JaxSide, rng: np.random.Generator) -> dict[str, Any]:
    from edu_prm_jax.sampling.decode import DecodeParams
    from edu_prm_jax.sampling.engine import distinct_tokens, slots_to_leaves

    n, q = args.new_tokens, args.questions
    prompts = rng.integers(0, args.vocab, size=(q, args.prompt_len)).astype(np.int32)
    greedy = jax_side.run(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False),
                          prompts)
    ents = greedy["entropies"][:, :n].ravel()
    tau = float(np.quantile(ents, args.tau_quantile))
    info = {"tau": tau, "tau_quantile": args.tau_quantile, "log_vocab": float(np.log(args.vocab)),
            "greedy_entropy_min": float(ents.min()), "greedy_entropy_median": float(np.median(ents)),
            "greedy_entropy_max": float(ents.max()), "questions": q, "rows": []}
    for m in args.slots:
        row: dict[str, Any] = {"N": m}
        for mode in ("edu", "ht"):
            params = DecodeParams(mode=mode, num_leaves=m, max_new_tokens=n, temperature=args.temperature,
                                  tau=tau, branch_k=args.branch_k, max_anchors=max(16, m), stop_at_answer=False,
                                  seed=args.seed)
            first, med, out = median_time(lambda p=params: jax_side.run(p, prompts), args.repeats)
            leaves = [slots_to_leaves(out, i * m, m) for i in range(q)]
            row[mode] = {"distinct_tokens": sum(distinct_tokens(ls) for ls in leaves),
                         "leaves": sum(len(ls) for ls in leaves), "median_s": med, "compile_s": first - med}
        row["token_ratio"] = row["edu"]["distinct_tokens"] / row["ht"]["distinct_tokens"]
        row["time_ratio"] = row["edu"]["median_s"] / row["ht"]["median_s"]
        info["rows"].append(row)
        print(f"done N={m}", file=sys.stderr, flush=True)
    return info


def format_throughput(rows: list[dict[str, Any]], modes: list[str]) -> str:
    head = ["batch", "new tokens"] + [f"jax {m} tok/s" for m in modes] + ["hf tok/s"]
    head += [f"jax {m}/hf" for m in modes] + [f"{m} compile s" for m in modes]
    if "greedy" in modes:
        head.append("greedy = hf")
    lines = [" | ".join(f"{h:>15}" for h in head)]
    for r in rows:
        cells = [str(r["batch"]), str(r["new_tokens"])] + [f"{r[f'jax_{m}']['tokens_per_s']:.0f}" for m in modes]
        cells += [f"{r['hf']['tokens_per_s']:.0f}"] + [f"{r[f'ratio_{m}']:.2f}" for m in modes]
        cells += [f"{r[f'jax_{m}']['compile_s']:.1f}" for m in modes]
        if "greedy" in modes:
            cells.append(f"{r['greedy_rows_identical']:.0%} rows")
        lines.append(" | ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def format_edu(info: dict[str, Any]) -> str:
    lines = [f"tau = {info['tau']:.4f} nats = the {info['tau_quantile']:.0%} quantile of greedy-path entropies "
             f"(min {info['greedy_entropy_min']:.3f}, median {info['greedy_entropy_median']:.3f}, max "
             f"{info['greedy_entropy_max']:.3f}; log V = {info['log_vocab']:.3f}): a random model's entropies "
             f"are near log V everywhere, so tau is set relative to them, not to a fixed value",
             f"{info['questions']} questions"]
    head = ["N", "EDU tokens", "HT tokens", "EDU/HT tokens", "EDU leaves", "EDU s", "HT s", "EDU/HT time"]
    lines.append(" | ".join(f"{h:>13}" for h in head))
    for r in info["rows"]:
        cells = [r["N"], r["edu"]["distinct_tokens"], r["ht"]["distinct_tokens"], f"{r['token_ratio']:.3f}",
                 r["edu"]["leaves"], f"{r['edu']['median_s']:.3f}", f"{r['ht']['median_s']:.3f}",
                 f"{r['time_ratio']:.2f}"]
        lines.append(" | ".join(f"{c!s:>13}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    import jax

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "weights"
        build_hf_weights(args, weights, max_pos=max(256, args.prompt_len + args.new_tokens))
        jax_side = JaxSide(weights, args.vocab)
        hf = hf_generate(weights, args.hf_attn)
        rows = throughput(args, jax_side, hf, rng) if args.batch_sizes else []
        edu = edu_vs_ht(args, jax_side, rng) if args.slots else None

    env = {"jax": jax.__version__, "jax_backend": jax.default_backend(), "jax_devices": jax.device_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "hf_attn": args.hf_attn, "platform": platform.platform()}
    model = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "inter")}
    print(f"model {model}, float32, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
          f"repeats {args.repeats} (median), EOS disabled on both sides")
    print(f"env {env}")
    if rows:
        print("\n== decode throughput: JAX sampler vs transformers generate (compile excluded) ==")
        print(format_throughput(rows, args.jax_modes))
    if edu:
        print("\n== EDU vs HT at equal N (distinct generated tokens, wall time) ==")
        print(format_edu(edu))
    if args.json:
        result = {"benchmark": "decode", "model": model, "env": env, "args": {
            k: v for k, v in vars(args).items() if k != "json"}, "throughput": rows, "edu_vs_ht": edu}
        from edu_prm_jax.io.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
