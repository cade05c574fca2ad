"""The model-size flags every benchmark takes, and the one random transformers Qwen2 they build from them."""

from __future__ import annotations

import argparse
import pathlib
import sys

TESTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "tests"


def add_model_args(p: argparse.ArgumentParser, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                   inter: int) -> None:
    """--vocab --hidden --layers --heads --kv-heads --inter, with this benchmark's defaults."""
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--inter", type=int, default=inter)


def build_hf_weights(args: argparse.Namespace, out_dir: pathlib.Path, max_pos: int) -> None:
    """The tests' random float32 transformers Qwen2 (perturbed biases and norms), saved as safetensors."""
    sys.path.insert(0, str(TESTS_DIR))
    from hf_reference import make_hf_qwen2

    make_hf_qwen2(out_dir, vocab=args.vocab, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                  layers=args.layers, inter=args.inter, seed=args.seed, max_pos=max_pos)
