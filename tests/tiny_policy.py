"""A tiny random policy with a real (toy SentencePiece) tokenizer, in HF format, for command-level tests."""

from __future__ import annotations

import pathlib

from hf_reference import make_hf_qwen2

from edu_prm_jax.toy import world as toy


def make_tiny_policy(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    cfg = toy.ToyConfig()
    toy.train_toy_tokenizer(list(toy.toy_corpus(400, cfg, seed=1)), out_dir, vocab_size=128)
    from edu_prm_jax.tokenization import load_tokenizer

    vocab = load_tokenizer(out_dir).vocab_size
    make_hf_qwen2(out_dir, vocab=-(-vocab // 16) * 16, hidden=32, layers=2, seed=seed)
    return out_dir


def sample_and_label(common: list[str], questions: int, max_new_tokens: int, num_leaves: int, *extra: str) -> None:
    """`edu-prm sample` (EDU trees of `questions` toy training problems, tau 0.5) then `label` in one workdir;
    `common` holds the shared --workdir / --config.policy flags, `extra` more sample flags."""
    from edu_prm_jax import cli

    assert cli.main(["sample", *common, f"--config.questions=toy:train:{questions}",
                     f"--config.sampling.max_new_tokens={max_new_tokens}", f"--config.sampling.num_leaves={num_leaves}",
                     "--config.sampling.tau=0.5", *extra]) == 0
    assert cli.main(["label", *common]) == 0
