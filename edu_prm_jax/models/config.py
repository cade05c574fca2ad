"""Qwen2/Qwen2.5 architecture config, read from and written to Hugging Face `config.json`.

Real Qwen2.5 configs use `rope_theta`/`torch_dtype`; transformers 5 writes `rope_parameters`/`dtype`.
Both spellings are accepted so that a checkpoint from either era loads.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen2 model; the message names the file and field."""


def dtype_from_name(name: str) -> Any:
    try:
        return _DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


REMAT_MODES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture hyper-parameters plus the dtypes this process computes in."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"  # the dtype the weights were saved in (informational, kept on export)
    param_dtype: str = "float32"  # dtype of the parameters in this process
    dtype: str = "float32"  # compute dtype of matmuls; norms, rope, softmax and logits stay float32
    remat: str = "none"  # activation rematerialisation of decoder layers without a cache: none | full | dots

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"remat={self.remat!r}: expected one of {REMAT_MODES}")

    @property
    def compute_dtype(self) -> Any:
        return dtype_from_name(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return dtype_from_name(self.param_dtype)

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **kw: Any) -> Qwen2Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Qwen2Config:
        missing = [f for f in REQUIRED_FIELDS if f not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen2.5 ships false)")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported, only 'default'")
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // heads
        saved_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").replace("torch.", "")
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rope_theta=float(theta),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                torch_dtype=saved_dtype,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> Qwen2Config:
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(raw, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The classic Qwen2.5 spelling, which both transformers 4 and 5 read."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
        }
