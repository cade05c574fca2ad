"""Tiny random transformers Qwen2 models: the independent reference the JAX model is checked against."""

from __future__ import annotations

import pathlib

import numpy as np


def make_hf_qwen2(out_dir: pathlib.Path, *, vocab: int = 103, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                  layers: int = 2, inter: int = 48, tied: bool = False, rope_theta: float = 10000.0,
                  seed: int = 0, max_pos: int = 256):
    """Save a random float32 Qwen2ForCausalLM (eager attention) to `out_dir`; return the torch model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      rope_theta=rope_theta, max_position_embeddings=max_pos, attn_implementation="eager",
                      bos_token_id=None, eos_token_id=vocab - 1, pad_token_id=None)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # random biases so the q/k/v bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def make_peaked_qwen2(directory, vocab: int = 48, seed: int = 3):
    """A random tiny HF Qwen2 (hidden 32, 2 layers) whose LM head is scaled up 12x, saved to `directory`, so its
    next-token entropies range from near 0 to near log V: a model whose anchors a test can find."""
    import torch

    hf = make_hf_qwen2(directory, vocab=vocab, hidden=32, layers=2, seed=seed)
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)
    hf.save_pretrained(directory, safe_serialization=True)
    return hf
