"""Throughput accounting (FLOPs, MFU) and the metrics writer: log lines, a progress bar, TensorBoard events."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from absl import logging
from tqdm import tqdm

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
    """The one sink for a run's scalars, whatever is enabled: a log line per write, a tqdm progress bar (steps/s
    and the latest loss, learning rate, tokens/s, MFU) and, when `tensorboard`, event files under `logdir`.

    Log lines go through the bar (`tqdm.external_write_mode`), so a line never lands in the middle of it.
    """

    POSTFIX = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")  # train scalars shown on the bar

    def __init__(self, logdir: str | os.PathLike, total_steps: int, initial_step: int = 0,
                 progress: bool = True, tensorboard: bool = True, log_lines: bool = True):
        self._log_lines = log_lines
        self._logdir = logdir
        self._tb = None
        self._bar = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(logdir))
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train", unit="step")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        """Record `scalars` at `step` under `prefix` ('train', 'eval') in every enabled sink."""
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if self._bar is not None and prefix == "train":
            shown = {k: f"{float(scalars[k]):.3g}" for k in self.POSTFIX if k in scalars}
            self._bar.set_postfix(shown, refresh=False)
        if self._log_lines:
            line = f"step {step} {prefix}: " + " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
            if self._bar is not None:
                with tqdm.external_write_mode(file=self._bar.fp):
                    logging.info(line)
            else:
                logging.info(line)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self, raise_errors: bool = True) -> None:
        """Flush and close every sink. An event file that cannot be written (e.g. a full disk) raises OSError
        naming the event directory, or, with `raise_errors=False` (the caller is already failing with an error
        of its own, which must not be replaced), is logged as a warning."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is None:
            return
        tb, self._tb = self._tb, None
        try:
            tb.close()  # flushes first
        except OSError as e:
            if raise_errors:
                raise OSError(e.errno, f"{e.strerror or e} writing TensorBoard events", str(self._logdir)) from e
            logging.warning("TensorBoard events under %s were not all written: %s", self._logdir, e)
