"""How cost grows: decode time vs new tokens, vs cache length and vs EDU slots per question; train-step time vs
sequence length (JAX and PyTorch). One process, threads pinned (`benchmarks.harness`), medians with min-max.

    python -m benchmarks.curves --threads 1 --out benchmarks/results   # curves.json + cost_curves.png

The decode curves use the decode benchmark's model and every row runs to its length (no EOS); EDU's tau is the
90% quantile of the greedy entropies (a random model's entropies are near log V). The train-step curve uses the
train-step benchmark's model and step (`benchmarks.train_step`), both sides on the same weights.
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--batch", type=int, default=8, help="decode rows for the length curves")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 128, 512, 1024],
                   help="cache-length curve: prompt lengths, each followed by --cache-new-tokens")
    p.add_argument("--cache-new-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="EDU slots per question")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--edu-new-tokens", type=int, default=128)
    p.add_argument("--train-seq-lens", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[], choices=("new_tokens", "cache", "slots", "train"))
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _decode_model_args(seed: int) -> argparse.Namespace:
    from benchmarks.decode import parse_args as decode_args

    return decode_args(["--seed", str(seed)])


def _timing_json(t: harness.Timing, load: harness.Load) -> dict[str, Any]:
    return {**t.to_json(), "load": load.to_json()}


def decode_curves(args: argparse.Namespace, weights: pathlib.Path, margs: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.decode import JaxSide
    from edu_prm_jax.sampling.decode import DecodeParams

    side = JaxSide(weights, margs.vocab)
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {}
    if "new_tokens" not in args.skip:
        prompts = rng.integers(0, margs.vocab, (args.batch, 32)).astype(np.int32)
        rows = []
        for n in args.new_tokens:
            p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False)
            timings, _, load = harness.measure({"jax": lambda p=p: side.run(p, prompts)}, args.repeats)
            rows.append({"new_tokens": n, **_timing_json(timings["jax"], load)})
            print(f"new tokens {n}: {timings['jax'].median:.2f} s", file=sys.stderr, flush=True)
        out["decode_vs_new_tokens"] = {"batch": args.batch, "prompt": 32, "rows": rows}
    if "cache" not in args.skip:
        rows = []
        n = args.cache_new_tokens
        for plen in args.prompt_lens:
            prompts = rng.integers(0, margs.vocab, (args.batch, plen)).astype(np.int32)
            p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False)
            timings, _, load = harness.measure({"jax": lambda p=p, x=prompts: side.run(p, x)}, args.repeats)
            rows.append({"prompt": plen, "cache_len": plen + n, **_timing_json(timings["jax"], load)})
            print(f"prompt {plen}: {timings['jax'].median:.2f} s", file=sys.stderr, flush=True)
        out["decode_vs_cache_length"] = {"batch": args.batch, "new_tokens": n, "rows": rows,
                                         "note": "includes the prefill of the prompt"}
    if "slots" not in args.skip:
        n, q = args.edu_new_tokens, args.questions
        prompts = rng.integers(0, margs.vocab, (q, 32)).astype(np.int32)
        greedy = side.run(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False), prompts)
        tau = float(np.quantile(greedy["entropies"][:, :n], 0.9))
        rows = []
        for m in args.slots:
            p = DecodeParams(mode="edu", num_leaves=m, max_new_tokens=n, tau=tau, branch_k=2, max_anchors=max(16, m),
                             stop_at_answer=False)
            timings, res, load = harness.measure({"edu": lambda p=p: side.run(p, prompts)}, args.repeats)
            rows.append({"slots": m, "leaves": int(res["edu"]["used"].sum()), **_timing_json(timings["edu"], load)})
            print(f"EDU slots {m}: {timings['edu'].median:.2f} s", file=sys.stderr, flush=True)
        out["edu_vs_slots"] = {"questions": q, "new_tokens": n, "tau": tau, "rows": rows}
    return out


def train_curve(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    from benchmarks.model_args import build_hf_weights
    from benchmarks.train_step import jax_step, make_batch, torch_step
    from benchmarks.train_step import parse_args as train_args

    targs = train_args(["--seed", str(args.seed)])
    rng = np.random.default_rng(args.seed)
    rows = []
    for seq in args.train_seq_lens:
        weights = tmp / f"train-{seq}"
        build_hf_weights(targs, weights, max_pos=max(256, seq))
        batch = make_batch(rng, targs.vocab, args.train_batch, seq)
        sides = {"jax": jax_step(weights, batch, str(tmp / f"run-{seq}")), "torch": torch_step(weights, batch)}
        timings, _, load = harness.measure(sides, args.repeats)
        rows.append({"seq": seq, "tokens": args.train_batch * seq, "load": load.to_json(),
                     **{k: v.to_json() for k, v in timings.items()},
                     "jax_vs_torch": harness.paired_ratio(timings["jax"], timings["torch"]).to_json()})
        print(f"train seq {seq}: jax {timings['jax'].median:.3f} s, torch {timings['torch'].median:.3f} s",
              file=sys.stderr, flush=True)
    return {"train_step_vs_seq": {"batch": args.train_batch, "rows": rows}}


def plot(curves: dict[str, Any], path: pathlib.Path, title: str) -> None:
    """The four curves as one PNG (2 x 2 panels, log-log where growth is the question)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    def panel(ax, rows, x, series, xlabel, ylabel, loglog=True):
        xs = [r[x] for r in rows]
        for label, key in series:
            med = [r[key]["median_s"] if key else r["median_s"] for r in rows]
            lo = [r[key]["min_s"] if key else r["min_s"] for r in rows]
            hi = [r[key]["max_s"] if key else r["max_s"] for r in rows]
            ax.errorbar(xs, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], marker="o", capsize=3,
                        label=label)
        if loglog:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()

    if "decode_vs_new_tokens" in curves:
        c = curves["decode_vs_new_tokens"]
        panel(axes[0, 0], c["rows"], "new_tokens", [("greedy", None)], "new tokens per row",
              f"seconds (batch {c['batch']})")
        axes[0, 0].set_title("decode time vs new tokens")
    if "decode_vs_cache_length" in curves:
        c = curves["decode_vs_cache_length"]
        panel(axes[0, 1], c["rows"], "cache_len", [("prefill + decode", None)], "cache length (prompt + new)",
              f"seconds ({c['new_tokens']} new tokens)")
        axes[0, 1].set_title("decode time vs cache length")
    if "edu_vs_slots" in curves:
        c = curves["edu_vs_slots"]
        panel(axes[1, 0], c["rows"], "slots", [("EDU", None)], "slots per question",
              f"seconds ({c['questions']} questions, {c['new_tokens']} tokens)")
        axes[1, 0].set_title("EDU time vs slots per question")
    if "train_step_vs_seq" in curves:
        c = curves["train_step_vs_seq"]
        panel(axes[1, 1], c["rows"], "seq", [("jax", "jax"), ("torch", "torch")], "sequence length",
              f"seconds per step (batch {c['batch']})")
        axes[1, 1].set_title("train step time vs sequence length")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    from edu_prm_jax.io.atomic import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = harness.pin_threads(args.threads)
    harness.set_torch_threads(args.threads)
    from benchmarks.model_args import build_hf_weights

    curves: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if {"new_tokens", "cache", "slots"} - set(args.skip):
            margs = _decode_model_args(args.seed)
            weights = tmp / "decode"
            longest = max(max(args.new_tokens) + 32, max(args.prompt_lens) + args.cache_new_tokens,
                          args.edu_new_tokens + 32)
            build_hf_weights(margs, weights, max_pos=longest)
            curves.update(decode_curves(args, weights, margs))
        if "train" not in args.skip:
            curves.update(train_curve(args, tmp))
    env = harness.environment()
    result = {"environment": env, "threads": {**pinned, **harness.thread_report()}, "curves": curves}
    args.out.mkdir(parents=True, exist_ok=True)
    from edu_prm_jax.io.atomic import write_json_atomic

    write_json_atomic(args.out / "curves.json", result)
    plot(curves, args.out / "cost_curves.png", f"{env['date']}, {env['cpu']}, {args.threads} thread(s) per side")
    print(f"wrote {args.out / 'curves.json'} and {args.out / 'cost_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
