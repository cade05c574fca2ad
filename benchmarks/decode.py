"""Greedy decode speed: the project's jitted sampler vs transformers `generate` and google-tunix's sampler, and EDU
vs HT token cost.

Part 1 (speed): one random Qwen2 (`tests/hf_reference.make_hf_qwen2`) is saved as safetensors and loaded by every
side, so all run identical float32 weights. Every row generates exactly --new-tokens tokens after a --prompt-len
prompt (EOS disabled on all sides). Sides: `jax` (`sampling.decode.decode`, greedy, batch B = B questions of one
slot), `transformers` (`generate(do_sample=False)`, KV cache, `torch.no_grad`, sdpa attention) and `tunix`
(`tunix.generate.sampler.Sampler`, optional: skipped with a message when not installed). Before timing, the sides'
tokens are compared: the benchmark stops if any row differs (a near-tie argmax can flip in float32; then the
seed must change, the figures would not be for the same work).

Part 2 (EDU vs HT at equal N, --slots): distinct tokens each method generates (EDU shares prefixes) and wall time.
A random model's entropies sit near log V, so tau is the --tau-quantile of the greedy-path entropies.

Timing, threads and load: `benchmarks.harness` (sides interleaved, warm-up excluded, medians and min-max, paired
ratios). Run through `python -m benchmarks`, or alone:

    python -m benchmarks.decode --threads 1 --batch-sizes 1 8 64 --json decode.json
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    p.add_argument("--sides", nargs="+", choices=("jax", "transformers", "tunix"),
                   default=["jax", "transformers", "tunix"])
    p.add_argument("--slots", type=int, nargs="*", default=[], help="N for EDU vs HT (none: skip)")
    p.add_argument("--questions", type=int, default=4, help="prompts for EDU vs HT")
    p.add_argument("--tau-quantile", type=float, default=0.9, help="tau = this quantile of greedy entropies")
    p.add_argument("--temperature", type=float, default=0.7, help="HT sampling temperature")
    p.add_argument("--branch-k", type=int, default=2)
    add_model_args(p, vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        p.error("--repeats, --new-tokens and --prompt-len must be >= 1")
    if not 0.0 < args.tau_quantile < 1.0:
        p.error("--tau-quantile must be in (0, 1)")
    if "jax" not in args.sides:
        p.error("--sides must include jax (the ratios are its speed-ups)")
    return args


def open_tables(vocab: int) -> Any:
    """Tables with no EOS, no stop strings and no symbol tokens: every row runs to max_new_tokens."""
    from edu_prm_jax.sampling.decode import Tables
    from edu_prm_jax.sampling.stopping import build_stop_tables

    stop = build_stop_tables([f"t{i}" for i in range(vocab)], vocab, [])
    return Tables.build(stop, np.zeros(vocab, bool), vocab, vocab)


class JaxSide:
    """The project's sampler on the safetensors weights."""

    def __init__(self, weights: pathlib.Path, vocab: int):
        from edu_prm_jax.models.checkpoints import load_hf_model

        self.model = load_hf_model(weights, param_dtype="float32", dtype="float32")
        self.tables = open_tables(vocab)

    def run(self, params: Any, prompts: np.ndarray) -> dict[str, np.ndarray]:
        from edu_prm_jax.sampling.decode import decode

        q = prompts.shape[0]
        return decode(params, self.model, self.tables, prompts, np.full((q,), prompts.shape[1], np.int32),
                      np.arange(q, dtype=np.int32))


def hf_generate(weights: pathlib.Path, new_tokens: int) -> Any:
    """prompts [B, P] -> greedy tokens [B, new_tokens] through transformers `generate` (sdpa, KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # every row generates exactly max_new_tokens

    def run(prompts: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return run


def speed(args: argparse.Namespace, weights: pathlib.Path, threads: dict[str, Any]) -> tuple[list[harness.Cell],
                                                                                             list[str]]:
    """One Cell per batch size: each side's greedy decode of the same prompts, tokens cross-checked first."""
    from edu_prm_jax.sampling.decode import DecodeParams

    notes = []
    jax_side = JaxSide(weights, args.vocab)
    params = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=args.new_tokens, stop_at_answer=False,
                          seed=args.seed)
    runners = {"jax": lambda x: jax_side.run(params, x)["tokens"][:, :args.new_tokens]}
    if "transformers" in args.sides:
        runners["transformers"] = hf_generate(weights, args.new_tokens)
    if "tunix" in args.sides:
        from benchmarks import tunix_peer

        why = tunix_peer.available()
        if why is None:
            config = json.loads((weights / "config.json").read_text())
            runners["tunix"] = tunix_peer.tunix_generate(weights, config, args.prompt_len, args.new_tokens)
        else:
            notes.append(f"tunix skipped: {why}")
            print(f"decode: {notes[-1]}", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    model = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "inter")}
    cells = []
    for batch in args.batch_sizes:
        prompts = rng.integers(0, args.vocab, size=(batch, args.prompt_len)).astype(np.int32)
        sides = {name: (lambda fn=fn, x=prompts: fn(x)) for name, fn in runners.items()}
        timings, outs, load = harness.measure(sides, args.repeats)
        check = {}
        for name, tokens in outs.items():
            if name == "jax":
                continue
            same = float(np.mean((np.asarray(tokens) == outs["jax"]).all(axis=1)))
            if same < 1.0:
                raise RuntimeError(f"decode batch {batch}: {name}'s greedy tokens differ from jax's in "
                                   f"{1 - same:.0%} of rows; the sides would not be doing the same work")
            check[f"tokens = {name}"] = "all rows"
        ratios = {f"jax vs {name}": harness.paired_ratio(timings["jax"], t) for name, t in timings.items()
                  if name != "jax"}
        cells.append(harness.Cell("decode (greedy)", {"batch": batch, "prompt": args.prompt_len,
                                                      "new tokens": args.new_tokens},
                                  timings, ratios, check, threads, load,
                                  units={"tokens": batch * args.new_tokens, **{f"model {k}": v
                                                                              for k, v in model.items()}}))
        print(f"done batch={batch}: " + ", ".join(f"{k} {v.text()}" for k, v in ratios.items()), file=sys.stderr,
              flush=True)
    return cells, notes


def edu_vs_ht(args: argparse.Namespace, weights: pathlib.Path) -> dict[str, Any]:
    """Distinct tokens and wall time of EDU and HT at each N in --slots on --questions prompts."""
    from edu_prm_jax.sampling.decode import DecodeParams
    from edu_prm_jax.sampling.engine import distinct_tokens, slots_to_leaves

    jax_side = JaxSide(weights, args.vocab)
    n, q = args.new_tokens, args.questions
    prompts = np.random.default_rng(args.seed + 1).integers(0, args.vocab, size=(q, args.prompt_len)).astype(np.int32)
    greedy = jax_side.run(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=n, stop_at_answer=False),
                          prompts)
    ents = greedy["entropies"][:, :n].ravel()
    tau = float(np.quantile(ents, args.tau_quantile))
    info: dict[str, Any] = {"tau": tau, "tau_quantile": args.tau_quantile, "log_vocab": float(np.log(args.vocab)),
                            "questions": q, "rows": []}
    for m in args.slots:
        sides, params = {}, {}
        for mode in ("edu", "ht"):
            params[mode] = DecodeParams(mode=mode, num_leaves=m, max_new_tokens=n, temperature=args.temperature,
                                        tau=tau, branch_k=args.branch_k, max_anchors=max(16, m),
                                        stop_at_answer=False, seed=args.seed)
            sides[mode] = lambda p=params[mode]: jax_side.run(p, prompts)
        timings, outs, load = harness.measure(sides, args.repeats)
        row: dict[str, Any] = {"N": m, "load": load.to_json()}
        for mode in ("edu", "ht"):
            leaves = [slots_to_leaves(outs[mode], i * m, m) for i in range(q)]
            row[mode] = {"distinct_tokens": sum(distinct_tokens(ls) for ls in leaves),
                         "leaves": sum(len(ls) for ls in leaves), **timings[mode].to_json()}
        row["token_ratio"] = row["edu"]["distinct_tokens"] / row["ht"]["distinct_tokens"]
        row["time_ratio"] = harness.paired_ratio(timings["ht"], timings["edu"]).to_json()  # EDU time / HT time
        info["rows"].append(row)
        print(f"done N={m}", file=sys.stderr, flush=True)
    return info


def format_edu(info: dict[str, Any]) -> str:
    lines = [f"tau = {info['tau']:.4f} nats = the {info['tau_quantile']:.0%} quantile of greedy-path entropies "
             f"(log V = {info['log_vocab']:.3f}); {info['questions']} questions",
             "| N | EDU tokens | HT tokens | EDU/HT tokens | EDU leaves | EDU/HT time, median (min-max) |",
             "|---|---|---|---|---|---|"]
    for r in info["rows"]:
        t = r["time_ratio"]
        lines.append(f"| {r['N']} | {r['edu']['distinct_tokens']} | {r['ht']['distinct_tokens']} | "
                     f"{r['token_ratio']:.3f} | {r['edu']['leaves']} | {t['median']:.2f} ({t['min']:.2f}-"
                     f"{t['max']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = harness.pin_threads(args.threads)
    harness.set_torch_threads(args.threads)
    from benchmarks.model_args import build_hf_weights

    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "weights"
        build_hf_weights(args, weights, max_pos=max(256, args.prompt_len + args.new_tokens))
        threads = {**pinned, **harness.thread_report()}
        cells, notes = speed(args, weights, threads) if args.batch_sizes else ([], [])
        edu = edu_vs_ht(args, weights) if args.slots else None
    if cells:
        print(harness.markdown_table([c.to_json() for c in cells]))
    for note in notes:
        print(note)
    if edu:
        print("\nEDU vs HT at equal N (distinct generated tokens, wall time)")
        print(format_edu(edu))
    if args.json:
        harness.write_json(str(args.json), cells, {"benchmark": "decode", "notes": notes, "edu_vs_ht": edu,
                                                    "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
