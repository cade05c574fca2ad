"""Throughput accounting (FLOPs, MFU) and metric sinks: console progress bar and TensorBoard events."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from edu_prm_jax.models.config import Qwen2Config


def matmul_params(cfg: Qwen2Config, lm_head: bool = True) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded; the LM head only when the
    model has one: a PRM reads a reward head of negligible size instead)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp) + (h * cfg.vocab_size if lm_head else 0)


def train_flops_per_token(cfg: Qwen2Config, seq_len: int, lm_head: bool = True) -> float:
    """6 * N (forward + backward matmuls) plus the attention score/value term 12 * L * heads * head_dim *
    seq_len (PaLM appendix B convention: full, not causal-halved, attention)."""
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg, lm_head) + attn


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (all devices)."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else math.nan


class MetricsWriter:
    """Writes scalars to TensorBoard event files under `logdir` and shows them on a tqdm bar."""

    def __init__(self, logdir: str | os.PathLike, total_steps: int, initial_step: int = 0,
                 progress: bool = True, enabled: bool = True):
        self._tb = None
        self._bar = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(logdir))
            if progress:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if self._bar is not None and prefix == "train":
            short = {k: scalars[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu") if k in scalars}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)
        elif self._bar is not None:
            self._bar.write(f"step {step} {prefix}: " + " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items()))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
