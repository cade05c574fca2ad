"""Cache-length buckets and slot refill, measured: what `sampling.decode.cache_lengths` and
`decode.decode_refill` buy, each against the loop without them, in one process, sides interleaved
(`benchmarks.harness`: threads pinned, warm-up excluded, medians with min-max, machine load recorded).

Part `decode`: greedy decode time vs new tokens (every row runs to its length, no EOS) on the decode benchmark's
random model, batch --batch, with cache buckets on and off (`decode(..., cache_buckets=...)`); the tokens of the
two sides are compared before timing, and the largest float difference is reported.

Part `sample`: `edu-prm sample` end to end (the CLI, a fresh output directory per run) with `--config.refill`
true and false, on the embedded toy policy: questions per second and distinct generated tokens per second (the
trees' token cost) over the whole command. Two question sets: --questions (a toy spec) and, when --long-tail > 0,
--long-tail-questions with --long-tail prompts the toy policy cannot answer mixed in at even spacing (its paths
run to max_new_tokens), under --long-tail-new-tokens. The tree shards of the two sides are compared byte for byte.

    python -m benchmarks.sample_refill --threads 1 --json sample_refill.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import harness

# Prompts the toy policy does not read as problems: its paths run on to max_new_tokens (measured: at 200 new
# tokens every one of these has a path that does).
UNANSWERABLE = ["= = = = = =", "* * * *", "7 * 7 * 7 * 7 *", "9 9 9 9 9 9 9 9 9 9 9 9", "8 6 5 2", "3 0 0 0 1 8 6 9"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.model_args import add_model_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="cores (pinned; see benchmarks.harness)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--parts", nargs="+", choices=("decode", "sample"), default=["decode", "sample"])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--batch", type=int, default=64, help="decode rows (greedy) in part decode")
    p.add_argument("--prompt-len", type=int, default=32)
    add_model_args(p, vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", default="toy:train:2048", help="part sample: a toy spec or a JSONL file")
    p.add_argument("--leaves", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--mode", default="edu", choices=("edu", "ht"))
    p.add_argument("--max-new-tokens", type=int, default=96, help="part sample, the toy set")
    p.add_argument("--batch-questions", type=int, default=8)
    p.add_argument("--long-tail", type=int, default=16, help="unanswerable prompts mixed in (0: skip that set)")
    p.add_argument("--long-tail-questions", default="toy:train:512", help="the toy questions they are mixed into")
    p.add_argument("--long-tail-new-tokens", type=int, default=200)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.new_tokens) < 1 or args.long_tail < 0:
        p.error("--repeats and --new-tokens must be >= 1, --long-tail >= 0")
    return args


def decode_curve(args: argparse.Namespace, threads: dict[str, Any]) -> list[harness.Cell]:
    """One Cell per new-token count: greedy decode of --batch random prompts with buckets on / off."""
    from benchmarks.decode import open_tables
    from benchmarks.model_args import build_hf_weights
    from edu_prm_jax.models.checkpoints import load_hf_model
    from edu_prm_jax.sampling.decode import DecodeParams, cache_lengths, decode

    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "weights"
        build_hf_weights(args, weights, max_pos=max(256, args.prompt_len + max(args.new_tokens)))
        model = load_hf_model(weights, param_dtype="float32", dtype="float32")
    tables = open_tables(args.vocab)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    lens, ids = np.full((args.batch,), args.prompt_len, np.int32), np.arange(args.batch, dtype=np.int32)
    for new in args.new_tokens:
        p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=new, stop_at_answer=False, seed=args.seed)
        sides = {"buckets": lambda p=p: decode(p, model, tables, prompts, lens, ids),
                 "one length": lambda p=p: decode(p, model, tables, prompts, lens, ids, cache_buckets=False)}
        timings, results, load = harness.measure(sides, args.repeats)
        a, b = results["buckets"], results["one length"]
        check = {"same tokens": bool(np.array_equal(a["tokens"], b["tokens"])),
                 "max |d entropy|": float(np.abs(a["entropies"] - b["entropies"]).max()),
                 "max |d logprob|": float(np.abs(a["logprobs"] - b["logprobs"]).max())}
        cells.append(harness.Cell(
            "decode_buckets", {"batch": args.batch, "prompt": args.prompt_len, "new tokens": new,
                               "lengths": list(cache_lengths(args.prompt_len, new))},
            timings, {"buckets vs one length": harness.paired_ratio(timings["buckets"], timings["one length"])},
            check, threads, load, {"tokens": args.batch * new}))
        print(f"done decode new_tokens={new}", file=sys.stderr, flush=True)
    return cells


def long_tail_questions(spec: str, extra: int, out: pathlib.Path) -> pathlib.Path:
    """A JSONL of `spec`'s toy questions with `extra` UNANSWERABLE prompts spread evenly among them."""
    from edu_prm_jax.toy.defaults import load_questions

    questions = [{"id": q["id"], "problem": q["problem"]} for q in load_questions(spec)]
    step = max(1, len(questions) // max(extra, 1))
    for i in range(extra):
        questions.insert(min(len(questions), i * step + step // 2 + i),
                         {"id": f"tail-{i}", "problem": UNANSWERABLE[i % len(UNANSWERABLE)]})
    out.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return out


def loop_steps(records: list[dict[str, Any]], batch_questions: int) -> dict[str, int]:
    """Loop iterations of the whole pool, from the trees alone: a question runs as many steps as its longest path
    has tokens; batch by batch, a batch takes its longest question's steps; with refill, each question takes the
    first free block in input order (list scheduling), and the pool runs until the last block is done."""
    import heapq

    steps = [max((len(leaf["token_ids"]) for leaf in r["leaves"]), default=0) for r in records]
    batches = sum(max(steps[i:i + batch_questions]) for i in range(0, len(steps), batch_questions))
    free, end = [0] * batch_questions, 0
    for d in steps:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return {"loop steps, batches": batches, "loop steps, refill": end}


def sample_rate(args: argparse.Namespace, questions: str, max_new_tokens: int, threads: dict[str, Any],
                label: str) -> harness.Cell:
    """`edu-prm sample` with refill on and off on `questions`: one Cell with questions/s and tokens/s per side."""
    from edu_prm_jax import cli
    from edu_prm_jax.io.shards import read_shards

    work = pathlib.Path(tempfile.mkdtemp(prefix="sample_refill_"))
    runs = {"refill": 0, "no refill": 0}
    shards: dict[str, dict[str, bytes]] = {}
    records: dict[str, list[dict[str, Any]]] = {}

    def run(side: str) -> None:
        runs[side] += 1
        out = work / f"{side.replace(' ', '_')}_{runs[side]}"
        argv = ["sample", f"--workdir={out}", f"--config.questions={questions}", "--config.num_shards=1",
                f"--config.batch_questions={args.batch_questions}", f"--config.refill={side == 'refill'}",
                f"--config.sampling.mode={args.mode}", f"--config.sampling.num_leaves={args.leaves}",
                f"--config.sampling.tau={args.tau}", f"--config.sampling.max_new_tokens={max_new_tokens}",
                "--log_level=error"]
        if cli.main(argv) != 0:
            raise RuntimeError(f"edu-prm sample failed: {argv}")
        samples = out / f"samples_{args.mode}"
        shards[side] = {p.name: p.read_bytes() for p in sorted(samples.glob("trees-*.jsonl"))}
        records[side] = list(read_shards(samples, "trees"))
        shutil.rmtree(out)

    try:
        timings, _, load = harness.measure({side: lambda side=side: run(side) for side in runs}, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(records["refill"])
    tokens = sum(r["distinct_tokens"] for r in records["refill"])
    lengths = [len(leaf["token_ids"]) for r in records["refill"] for leaf in r["leaves"]]
    check = {"same tree shards": shards["refill"] == shards["no refill"], "questions": n,
             "distinct tokens": tokens, "paths at max_new_tokens": sum(x == max_new_tokens for x in lengths)}
    units = {"questions": n, "tokens": tokens, **loop_steps(records["refill"], args.batch_questions)}
    for side, t in timings.items():
        units[f"{side} questions/s"] = round(n / t.median, 2)
        units[f"{side} tokens/s"] = round(tokens / t.median, 1)
    return harness.Cell("sample_refill", {"set": label, "mode": args.mode, "leaves": args.leaves,
                                          "max_new_tokens": max_new_tokens, "batch_questions": args.batch_questions},
                        timings, {"refill vs no refill": harness.paired_ratio(timings["refill"], timings["no refill"])},
                        check, threads, load, units)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the command's progress bar
    pinned = harness.pin_threads(args.threads)
    threads = {**pinned, **harness.thread_report()}
    cells = []
    if "decode" in args.parts:
        cells += decode_curve(args, threads)
    if "sample" in args.parts:
        cells.append(sample_rate(args, args.questions, args.max_new_tokens, threads, args.questions))
        print("done sample", file=sys.stderr, flush=True)
        if args.long_tail:
            with tempfile.TemporaryDirectory() as tmp:
                path = long_tail_questions(args.long_tail_questions, args.long_tail,
                                           pathlib.Path(tmp) / "long_tail.jsonl")
                cells.append(sample_rate(args, str(path), args.long_tail_new_tokens, threads,
                                         f"{args.long_tail_questions} + {args.long_tail} unanswerable"))
            print("done long tail", file=sys.stderr, flush=True)
    table = [c.to_json() for c in cells]
    print(harness.markdown_table(table))
    for c in table:
        if c["benchmark"] == "sample_refill":
            print(f"{c['case']['set']}: " + ", ".join(f"{k} {v}" for k, v in c["units"].items()))
    if args.json:
        harness.write_json(str(args.json), cells, {"benchmark": "sample_refill",
                                                    "args": {k: str(v) for k, v in vars(args).items()},
                                                    "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
