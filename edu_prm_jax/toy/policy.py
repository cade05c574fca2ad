"""Build THE embedded toy policy: tokenizer + a tiny Qwen2 trained on toy arithmetic, in HF format.

    python -m edu_prm_jax.toy.policy --out edu_prm_jax/assets/toy_policy --seed 0

Everything is a function of the seed: problems (toy/world.py), tokenizer (single-threaded SentencePiece),
init (nnx.Rngs(seed)), batch order (PackedRowLoader) and the XLA CPU computation, so two builds on the same
machine and device count give byte-identical safetensors.

The policy carries one systematic flaw, planted in its training corpus (`misread_corpus`): every 6 in a problem
is drawn as 9 with probability 0.6 (50.7% applied: draws that would leave the bounds are dropped), and that
solution's chain is computed from the misread number. Greedy decoding therefore misreads (teacher-forced where
the reference copies a 6, the policy gives 6 and 9 about even odds and ranks 9 first 71% of the time), majority
vote repeats the misreading, the entropy there is about 0.68 nats (an EDU anchor at tau = 0.5), and the
outcome-checked Monte Carlo labels below it tell a PRM which reading is right. Why a planted flaw: an
undertrained policy's slips are unsystematic, and a PRM started from it knows no more arithmetic than it does,
so no reranker built from it beat its greedy answer (the previous asset: 800 clean updates, greedy 56.6%, PRM
Best-of-N 35.9% at N=16).

Shipped build (seed 0, defaults): 1.0M params, 1600 updates of 8x256 packed tokens, greedy accuracy 64.1% on
512 test problems (18.7% on the 182 that contain a 6, 89.1% on the others), max-entropy AUROC for wrong answers
0.88; about 9 minutes on a 2-core CPU, see assets/toy_policy/training_report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from edu_prm_jax.io import storage
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.scoring.metrics import auroc  # re-exported: the report's entropy AUROC
from edu_prm_jax.tokenization import Tokenizer, load_tokenizer
from edu_prm_jax.toy import world as toy
from edu_prm_jax.training.lm import lm_example, lm_loss
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.packing import PackedRowLoader, pack_examples

REPORT = "training_report.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class ToyPolicyConfig:
    """Size and training budget of the toy policy (defaults: the shipped asset)."""

    toy: toy.ToyConfig = toy.ToyConfig(max_ops=3, max_operand_digits=1, max_value=100)
    n_train: int = 30_000  # distinct train problems (a small slice of the problem space)
    n_tokenizer_texts: int = 4000  # texts the SentencePiece model is trained on
    tokenizer_vocab: int = 256  # upper bound; BPE stops earlier on the toy alphabet
    n_test: int = 512  # test problems for the greedy-accuracy report
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    steps: int = 1600  # optimizer updates
    batch_rows: int = 8  # packed rows per step
    seq_len: int = 256  # packed row length
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    max_new_tokens: int = 96  # greedy decoding budget (longest toy solution is ~70 tokens)
    monitor_every: int = 0  # greedy accuracy on `monitor_n` test problems every n steps (0 = off)
    monitor_n: int = 64
    # A systematic flaw in the policy's training corpus (see `misread_solution`): each occurrence of the number
    # `misread_from` in a problem is drawn as `misread_to` with probability `misread_rate` (0 = a clean corpus);
    # draws that would leave the toy world's bounds are dropped, so the applied rate is lower (report:
    # misread_applied_rate).
    misread_from: int = 6
    misread_to: int = 9
    misread_rate: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.misread_rate <= 1.0:
            raise ValueError(f"ToyPolicyConfig.misread_rate must be a probability in [0, 1], got {self.misread_rate}")
        if self.misread_to < 1:
            raise ValueError(f"ToyPolicyConfig.misread_to must be >= 1 (an operand), got {self.misread_to}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config(cfg: ToyPolicyConfig, tokenizer: Tokenizer) -> Qwen2Config:
    vocab = -(-tokenizer.vocab_size // 64) * 64
    eos = tokenizer.eos_token_ids[0]
    return Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        rope_theta=10_000.0, tie_word_embeddings=True, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=None, eos_token_id=eos, torch_dtype="float32")


def misread_solution(problem: dict, rng: random.Random, cfg: ToyPolicyConfig) -> dict:
    """`problem` with its solution as a policy that misreads would write it: each number of the problem text
    equal to cfg.misread_from (the start value or an operand) is independently drawn as cfg.misread_to with
    probability cfg.misread_rate, and the chain is computed from what was read, so the slip propagates to the
    answer. If the misread chain would leave the toy world's bounds (`toy.in_bounds`, or an inexact division), the
    problem keeps its clean solution. The problem text, and so its gold answer, is unchanged; `misread_count`
    says how many numbers were misread.

    Why: an undertrained policy's slips are unsystematic, and a PRM initialised from it knows no more arithmetic
    than it does, so no reranker built from the policy itself beat its greedy answer. Real policies also carry
    systematic errors that greedy decoding and majority vote repeat but that outcome-checked (Monte Carlo) labels
    expose; a misreading is the simplest such error a PRM can learn to catch by reading the question against the
    lines.
    """
    start, ops = toy.ToyTask.parse_problem(problem["problem"])

    def read(x: int) -> int:
        return cfg.misread_to if x == cfg.misread_from and rng.random() < cfg.misread_rate else x

    read_start, read_ops = read(start), [(op, read(b)) for op, b in ops]
    if (read_start, read_ops) == (start, ops):
        return problem
    value = read_start
    for op, b in read_ops:
        if op == "/" and value % b:
            return problem
        value = toy.apply_op(op, value, b)
        if not toy.in_bounds(value, cfg.toy):
            return problem
    misread = toy.render(read_start, read_ops)
    count = (read_start != start) + sum(r != b for (_, r), (_, b) in zip(read_ops, ops))
    return {**problem, "solution": misread["solution"], "misread_count": count}


def count_number(problem: str, number: int) -> int:
    """How many times `number` is the start value or an operand of a toy problem (results do not count)."""
    start, ops = toy.ToyTask.parse_problem(problem)
    return (start == number) + sum(b == number for _, b in ops)


def misread_corpus(problems: Sequence[dict], cfg: ToyPolicyConfig, seed: int) -> list[dict]:
    """The training problems with `misread_solution` applied, deterministic in (seed, problems)."""
    rng = random.Random(f"edu_prm_toy_misread:{seed}")
    return [misread_solution(p, rng, cfg) for p in problems]


def encode_examples(problems: Sequence[dict], tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
    """LM examples: prompt = plain_prompt(problem), weighted answer = solution + EOS."""
    eos = tokenizer.eos_token_ids[0]
    return [lm_example(tokenizer.encode(toy.plain_prompt(p["problem"])), [*tokenizer.encode(p["solution"]), eos])
            for p in problems]


# ------------------------------------------------------------------------------------------ greedy decoding
def greedy_decode(model: Qwen2, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 96,
                  batch_size: int = 128) -> list[dict[str, Any]]:
    """[{'text', 'tokens', 'entropies'}] per prompt: greedy until EOS (excluded from text, included in the
    entropies: the decision to stop is a token too). Runs the project's sampler in greedy mode."""
    from edu_prm_jax.sampling import DecodeParams, Sampler

    params = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=max_new_tokens, stop_at_answer=False)
    sampler = Sampler(model, tokenizer, params, batch_questions=batch_size, prompt_bucket=16)
    eos = set(tokenizer.eos_token_ids)
    out: list[dict[str, Any]] = []
    for leaves in sampler.sample_ids([tokenizer.encode(p) for p in prompts], list(range(len(prompts)))):
        toks = leaves[0].token_ids
        text = tokenizer.decode(toks[:-1] if toks and toks[-1] in eos else toks)
        out.append({"text": text, "tokens": toks, "entropies": leaves[0].entropies})
    return out


def evaluate_greedy(model: Qwen2, tokenizer: Tokenizer, problems: Sequence[dict],
                    max_new_tokens: int = 96) -> dict[str, Any]:
    """Greedy accuracy, and how well the max per-token entropy predicts a wrong answer (AUROC)."""
    gens = greedy_decode(model, tokenizer, [toy.plain_prompt(p["problem"]) for p in problems], max_new_tokens)
    correct = [toy.ToyTask.check(g["text"], p["answer"]) for g, p in zip(gens, problems)]
    max_ent = [max(g["entropies"]) if g["entropies"] else 0.0 for g in gens]
    return {
        "greedy_accuracy": float(np.mean(correct)),
        "n_test": len(problems),
        "auroc_max_entropy_predicts_wrong": auroc(max_ent, [not c for c in correct]),
        "mean_max_entropy_correct": float(np.mean([e for e, c in zip(max_ent, correct) if c] or [np.nan])),
        "mean_max_entropy_wrong": float(np.mean([e for e, c in zip(max_ent, correct) if not c] or [np.nan])),
        "correct": correct,
    }


# ------------------------------------------------------------------------------------------------ build
def build_toy_policy(out_dir: str | os.PathLike, seed: int = 0, steps: int | None = None,
                     cfg: ToyPolicyConfig | None = None, progress: bool = True,
                     workdir: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the toy policy and write it (HF config + safetensors + tokenizer + report) to `out_dir`.

    Returns the report dict (greedy accuracy on cfg.n_test test problems, entropy AUROC, wall time, ...).
    Raises DestinationError before training when `out_dir` may not be written (see `io.destinations`).
    """
    from edu_prm_jax.io.destinations import check_destination
    from edu_prm_jax.models.checkpoints import save_hf_model

    check_destination(out_dir, overwrite=overwrite, field="output")

    cfg = cfg or ToyPolicyConfig()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    t_start = time.perf_counter()
    out = storage.as_path(out_dir)
    with tempfile.TemporaryDirectory(prefix="toy_policy_") as tmp:
        tmp = pathlib.Path(tmp)
        train = toy.generate_split("train", cfg.n_train, cfg.toy, seed)
        test = toy.generate_split("test", cfg.n_test, cfg.toy, seed)
        texts = [toy.plain_prompt(p["problem"]) + p["solution"] + toy.EOS for p in train[:cfg.n_tokenizer_texts]]
        toy.train_toy_tokenizer(texts, tmp / "tok", cfg.tokenizer_vocab, seed=seed)
        tokenizer = load_tokenizer(tmp / "tok")
        mcfg = model_config(cfg, tokenizer)
        corpus = misread_corpus(train, cfg, seed)
        rows = pack_examples(encode_examples(corpus, tokenizer), cfg.seq_len, pad_id=tokenizer.pad_token_id)
        loader = PackedRowLoader(rows, cfg.batch_rows, seed=seed)
        model = Qwen2(mcfg, nnx.Rngs(seed))
        optim = OptimConfig(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                            weight_decay=0.01, clip_norm=1.0)
        tcfg = TrainConfig(steps=cfg.steps, log_every=max(1, min(50, cfg.steps)), progress=progress,
                           async_checkpointing=False, keep_checkpoints=1)
        tcfg = dataclasses.replace(tcfg, eval_every=cfg.monitor_every)

        def monitor(m: Qwen2, step: int) -> dict[str, float]:
            ev = evaluate_greedy(m, tokenizer, test[:cfg.monitor_n], cfg.max_new_tokens)
            return {"greedy_accuracy": ev["greedy_accuracy"], "auroc": ev["auroc_max_entropy_predicts_wrong"]}

        trainer = Trainer(model, lm_loss, optim, tcfg, workdir or tmp / "work",
                          eval_fn=monitor if cfg.monitor_every else None,
                          config={"toy_policy": cfg.to_dict(), "seed": seed})
        t_train = time.perf_counter()
        last = trainer.train(loader)
        train_s = time.perf_counter() - t_train
        model = trainer.model
        trainer.close()
        t_eval = time.perf_counter()
        ev = evaluate_greedy(model, tokenizer, test, cfg.max_new_tokens)
        eval_s = time.perf_counter() - t_eval
        correct = np.asarray(ev["correct"], bool)
        with_number = np.asarray([count_number(p["problem"], cfg.misread_from) > 0 for p in test], bool)
        occurrences = sum(count_number(p["problem"], cfg.misread_from) for p in train)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        report = {
            "seed": seed,
            "greedy_accuracy": ev["greedy_accuracy"],
            "n_test": ev["n_test"],
            "auroc_max_entropy_predicts_wrong": ev["auroc_max_entropy_predicts_wrong"],
            "mean_max_entropy_correct": ev["mean_max_entropy_correct"],
            "mean_max_entropy_wrong": ev["mean_max_entropy_wrong"],
            "sample_64_greedy_accuracy": float(np.mean(ev["correct"][:64])),
            "train_steps": cfg.steps,
            "train_tokens": cfg.steps * cfg.batch_rows * cfg.seq_len,
            "packed_rows": int(len(rows["tokens"])),
            "misread_solutions": sum(c is not p for c, p in zip(corpus, train)),
            "misread_applied_rate": sum(c.get("misread_count", 0) for c in corpus) / max(1, occurrences),
            "test_problems_with_misread_number": int(sum(with_number)),
            "greedy_accuracy_with_misread_number": float(np.mean(correct[with_number])) if with_number.any() else None,
            "greedy_accuracy_without": float(np.mean(correct[~with_number])) if (~with_number).any() else None,
            "final_train_loss": last.get("loss"),
            "final_token_accuracy": last.get("token_accuracy"),
            "n_params": n_params,
            "vocab_size": mcfg.vocab_size,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "train_wall_s": round(train_s, 1),
            "eval_wall_s": round(eval_s, 1),
            "total_wall_s": round(time.perf_counter() - t_start, 1),
            "device": f"{jax.devices()[0].platform} x{len(jax.devices())} (trained on 1)",
            "toy_config": dataclasses.asdict(cfg.toy),
            "policy_config": {k: v for k, v in cfg.to_dict().items() if k != "toy"},
        }
        save_hf_model(model, out, dtype="float32", overwrite=overwrite,
                      copy_files=[tmp / "tok" / name for name in TOKENIZER_FILES],
                      extra_files={REPORT: json.dumps(report, indent=2, ensure_ascii=False) + "\n"})
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an earlier build with "
                        "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build of this tool at --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer updates (default: shipped config)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = build_toy_policy(args.out, args.seed, args.steps, progress=not args.no_progress,
                              overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in report.items() if k not in ("toy_config", "policy_config")}, indent=2))


if __name__ == "__main__":
    main()
