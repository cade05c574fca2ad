"""Can a PRM learn to check toy arithmetic? The capability the toy Best-of-N figure depends on, without MC noise.

    python -m benchmarks.toy_verifier [--backbone toy --questions 4000 --steps 400 --lr 1e-3 --workdir DIR]
    python -m benchmarks.toy_verifier --backbone DIR --expand-layers 4 --trainable expanded --lr 3e-3

Clean process labels: for each toy train question, its reference solution (every line labelled 1) and a copy
with one result off by a small amount and the later lines recomputed from it (lines before the slip 1, from the
slip on 0). Training is `edu-prm train` itself (packed stream, Trainer, held-out split by question); the
held-out `pair_accuracy` is the share of questions whose reference outscores its corrupted copy under the min
aggregator (0.5 = chance, 1.0 = a perfect checker). `--backbone` takes 'toy' (the shipped policy) or any model
directory with the toy tokenizer, e.g. a longer-trained toy model from
`edu-prm build-toy --config.steps=3200 --config.misread_rate=0`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from edu_prm_jax import cli  # noqa: E402
from edu_prm_jax.io.shards import ShardedJsonlWriter  # noqa: E402
from edu_prm_jax.tokenization import load_tokenizer  # noqa: E402
from edu_prm_jax.toy import world as toy  # noqa: E402
from edu_prm_jax.toy.defaults import resolve_policy, toy_config_of  # noqa: E402

SLIPS = (-10, -2, -1, 1, 2, 10)


def corrupted_lines(start: int, ops: list[tuple[str, int]], slip_at: int, rng: random.Random,
                    allow_negative: bool = False) -> list[str] | None:
    """Solution lines with the result of operation `slip_at` wrong and every later line consistent with it;
    None when no slip keeps the chain valid (a later division turns inexact, or a value goes negative)."""
    for slip in rng.sample(SLIPS, len(SLIPS)):
        lines, value = [], start
        try:
            for i, (op, b) in enumerate(ops):
                result = toy.apply_op(op, value, b) + (slip if i == slip_at else 0)
                if result < 0 and not allow_negative:
                    raise ValueError(f"negative value {result}")
                lines.append(f"{value} {op} {b} = {result}")
                value = result
        except ValueError:
            continue
        return lines + [f"The answer is \\boxed{{{value}}}."]
    return None


def clean_label_records(n_questions: int, tokenizer, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    cfg = toy_config_of()
    for p in toy.generate_split("train", n_questions, cfg):
        start, ops = toy.ToyTask.parse_problem(p["problem"])
        prompt_ids = tokenizer.encode(toy.plain_prompt(p["problem"]))
        slip = rng.randrange(len(ops))
        reference = p["solution"].split("\n")
        wrong = corrupted_lines(start, ops, slip, rng, cfg.allow_negative)
        if wrong is None:
            continue
        for tag, lines, labels in (("ref", reference, [1.0] * len(reference)),
                                   ("slip", wrong, [1.0] * slip + [0.0] * (len(wrong) - slip))):
            steps = [tokenizer.encode(line + ("\n" if i < len(lines) - 1 else "")) for i, line in enumerate(lines)]
            records.append({"id": f"{p['id']}/{tag}", "question_id": p["id"], "prompt_ids": prompt_ids,
                            "step_ids": steps, "labels": labels})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="toy", help="PRM initialisation: 'toy' or a model directory")
    ap.add_argument("--questions", type=int, default=4000, help="toy train questions (two solutions each)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--supervise", default="step_end", choices=("step_end", "step_tokens"))
    ap.add_argument("--expand-layers", type=int, default=0, help="train.expand_layers")
    ap.add_argument("--trainable", default="all", choices=("all", "head", "expanded"))
    ap.add_argument("--workdir", default="", help="default: a temporary directory")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="toy_verifier_"))
    labels = work / "clean_labels"
    writer = ShardedJsonlWriter(labels, "steps", num_shards=1)
    if writer.pending():
        writer.write(0, clean_label_records(args.questions, load_tokenizer(resolve_policy(args.backbone))))
    code = cli.main(["train", f"--workdir={work}", f"--config.labels={labels}", f"--config.policy={args.backbone}",
                     f"--config.steps={args.steps}", f"--config.learning_rate={args.lr}",
                     f"--config.supervise={args.supervise}", f"--config.eval_every={max(1, args.steps // 4)}",
                     f"--config.expand_layers={args.expand_layers}", f"--config.trainable={args.trainable}"])
    if code:
        raise SystemExit(code)
    summary = json.loads((work / "prm" / "train_summary.json").read_text())
    print(json.dumps({"backbone": args.backbone, "steps": args.steps, "lr": args.lr, "supervise": args.supervise,
                      "expand_layers": args.expand_layers, "trainable": args.trainable,
                      "held_out_pair_accuracy": summary["eval_pair_accuracy"],
                      "held_out_step_auroc": summary["eval_step_auroc"], "workdir": str(work)}, indent=2))


if __name__ == "__main__":
    main()
