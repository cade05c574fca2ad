"""Qwen2/Qwen2.5 architecture config, read from and written to Hugging Face `config.json`.

Real Qwen2.5 configs use `rope_theta`/`torch_dtype`; transformers 5 writes `rope_parameters`/`dtype`.
Both spellings are accepted so that a checkpoint from either era loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from edu_prm_jax.io import storage

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # parameter and compute dtypes the model runs in
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16"}  # shorthand spellings (as in torchtune/mlx-lm configs) -> canonical names


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen2 model; the message names the file and field."""


def dtype_name(value: DTypeLike, field: str = "dtype") -> str:
    """The canonical name ('float32', 'bfloat16' or 'float16') of a dtype given in any spelling a user has at
    hand: a string ('bfloat16', 'bf16', 'torch.bfloat16', case-insensitive), a numpy or JAX scalar type
    (`np.float32`, `jnp.bfloat16`), a dtype object (`jnp.dtype('bfloat16')`), or a torch dtype (by its str).
    The one normaliser for every dtype argument of the API and every dtype config field.

    Raises ConfigError naming `field` and the value for anything else (unknown names, unsupported dtypes such
    as float64 or int8)."""
    name: str | None = None
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        name = DTYPE_ALIASES.get(key, key)
    elif value is not None:
        try:
            name = jnp.dtype(value).name  # numpy/JAX scalar types and dtype objects, bfloat16 included
        except (TypeError, ValueError):
            text = str(value)  # torch.bfloat16 (no torch import here)
            if text.startswith("torch."):
                key = text.removeprefix("torch.")
                name = DTYPE_ALIASES.get(key, key)
    if name not in SUPPORTED_DTYPES:
        raise ConfigError(f"{field}={value!r}: unknown or unsupported dtype; expected one of "
                          f"{list(SUPPORTED_DTYPES)} (or {sorted(DTYPE_ALIASES)}), as a string, a numpy/JAX "
                          "scalar type or a dtype object")
    return name


def as_dtype(value: DTypeLike, field: str = "dtype") -> np.dtype:
    """The numpy dtype (bfloat16 through ml_dtypes) of `value`, in any spelling `dtype_name` accepts."""
    return jnp.dtype(dtype_name(value, field))


dtype_from_name = as_dtype  # the name older callers import


REMAT_MODES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")  # see `Qwen2Config.attention`
CACHE_LAYOUTS = ("heads_first", "positions_first")  # see `Qwen2Config.cache_layout`
ACCELERATOR_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")  # jax platform names (jax.default_backend(), device.platform)


def default_scan_layers(platform: str) -> bool:
    """The `scan_layers` a model built for `platform` gets when its config leaves it None: True on accelerators
    (TPU, GPU), False on CPU.

    Why: a scan compiles the decoder layer once instead of once per layer (the compile time of an unrolled step
    grows by a constant per layer: minutes for a 72B model), and the accelerators are where deep models run.
    On a CPU the unrolled loop is what the shipped toy pipeline's outputs were produced with, and they stay
    bit-identical (XLA:CPU orders some float reductions of the scanned program differently, ~1e-7), and the
    toy's shallow models compile a little faster unrolled (2 layers: 3.1 s vs 4.7 s; 32 layers: 19.0 s vs
    4.9 s, `benchmarks/compile_layers.py`). Run time is no reason: scanned steps were as fast or faster on
    this CPU, so set True for deep models on a CPU."""
    return platform.lower() in ACCELERATOR_PLATFORMS


def default_attention(platform: str, compute_dtype: str) -> str:
    """The attention kernel `attention="auto"` picks for `platform`: Pallas splash attention on TPU, cuDNN
    flash attention on an NVIDIA GPU when the compute dtype is bfloat16/float16 (cuDNN has no float32
    kernel), else the plain XLA einsum (CPU, ROCm, float32 on GPU)."""
    platform = platform.lower()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and dtype_name(compute_dtype) in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


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
    # The two dtypes below take any spelling `dtype_name` accepts and are stored as its canonical name.
    param_dtype: str = "float32"  # dtype of the parameters in this process
    dtype: str = "float32"  # compute dtype of matmuls; norms, rope, softmax and logits stay float32
    remat: str = "none"  # activation rematerialisation of decoder layers without a cache: none | full | dots
    # Decoder layers stored stacked ([layers, ...] parameters, logical axis "layers") and run by one
    # `jax.lax.scan` (True), or as a list run by a Python loop (False). None: `default_scan_layers` of the
    # platform the model is built on (True on TPU/GPU, False on CPU). A layout, fixed when the model is built:
    # `qwen2.set_scan_layers` converts a built model; HF import/export and `save_orbax` checkpoints convert
    # transparently. Both layouts compute the same function (tests/test_scan_layers.py).
    scan_layers: bool | None = None
    # Attention kernel for training, scoring and prefill: "xla" (einsum + softmax, materialises [B, H, T, S]
    # float32 scores; the reference), "cudnn" (`jax.nn.dot_product_attention` cuDNN flash attention, NVIDIA GPU,
    # bf16/fp16), "splash" (Pallas splash attention; TPU, or interpret mode elsewhere: slow, for tests) or
    # "auto" (`default_attention` of the platform the program is compiled for). Decode steps always use "xla".
    # A runtime choice: it changes no parameter and may be replaced on a built model's config.
    attention: str = "auto"
    # KV cache layout for decoding (`qwen2.KVCache`): "heads_first", keys [B, K, D, S] and values [B, K, S, D],
    # which a decode step's attention matmuls read in place (XLA:CPU copied every layer's [B, S, K, D] cache
    # into that layout at every step; a compile for an H100 holds 1.1 MB of temporaries for a 33.5 MB cache
    # against 25 MB with [B, S, K, D]), or "positions_first", [B, S, K, D] for both (the layout before
    # 2026-12-01, kept to compare on accelerators: the one the H200 test run passed with, where two decode tests
    # fail with heads-first). A runtime choice like `attention`: the same numbers either way (tests/test_model.py).
    cache_layout: str = "heads_first"

    def __post_init__(self) -> None:
        for field in ("param_dtype", "dtype"):  # jnp.bfloat16, np.float32, "bf16" ... -> "bfloat16", "float32"
            object.__setattr__(self, field, dtype_name(getattr(self, field), field))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"remat={self.remat!r}: expected one of {REMAT_MODES}")
        if self.scan_layers is not None and not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers={self.scan_layers!r}: expected true, false or null (platform default)")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.cache_layout not in CACHE_LAYOUTS:
            raise ConfigError(f"cache_layout={self.cache_layout!r}: expected one of {CACHE_LAYOUTS}")

    @property
    def compute_dtype(self) -> np.dtype:
        return as_dtype(self.dtype)

    @property
    def params_dtype(self) -> np.dtype:
        return as_dtype(self.param_dtype)

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **kw: Any) -> Qwen2Config:
        return dataclasses.replace(self, **kw)

    def for_platform(self, platform: str) -> Qwen2Config:
        """This config with `scan_layers` (when None) and `attention` (when "auto") set to `platform`'s defaults
        (`default_scan_layers`, `default_attention`): how to build a model for a chip other than this process's
        own, e.g. `edu-prm plan` compiling for "tpu" on a CPU host."""
        scan = default_scan_layers(platform) if self.scan_layers is None else self.scan_layers
        impl = default_attention(platform, self.dtype) if self.attention == "auto" else self.attention
        return self.replace(scan_layers=scan, attention=impl)

    def with_dtypes(self, param_dtype: DTypeLike | None = None, dtype: DTypeLike | None = None) -> Qwen2Config:
        """This config with the given parameter / compute dtypes (any `dtype_name` spelling); None keeps the
        current one. Raises ConfigError naming the field for an unknown dtype."""
        return self.replace(param_dtype=self.param_dtype if param_dtype is None else param_dtype,
                            dtype=self.dtype if dtype is None else dtype)

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
    def from_file(cls, path: str | os.PathLike) -> Qwen2Config:
        """The config.json at `path` (the file or its model directory; a local path or a gs:// URI). Raises
        ConfigError naming the file when it is missing or not JSON."""
        path = storage.as_path(path)
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
