"""google-tunix's Qwen2 sampler as a decode peer, on the same safetensors weights as the other sides.

tunix is optional (`pip install --no-deps google-tunix==0.1.7 jaxtyping wadler_lindig`: a plain install
downgrades transformers, huggingface_hub, tokenizers and safetensors). Its package `__init__` imports its training
stack (metrax); only the Qwen2 model and the sampler are needed, so the package is registered without running
that `__init__`. Its sampler takes strings: the prompts go through a tokenizer of space-separated integers, with
no padding (equal-length prompts), an EOS id the model cannot emit, and a cache of exactly prompt + new tokens.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np

INSTALL_HINT = "pip install --no-deps google-tunix==0.1.7 jaxtyping wadler_lindig"


def available() -> str | None:
    """None when tunix's Qwen2 sampler can be imported, else why not (for the skip message)."""
    if importlib.util.find_spec("tunix") is None:
        return f"google-tunix is not installed ({INSTALL_HINT})"
    try:
        _import_modules()
    except ImportError as e:
        return f"google-tunix does not import here: {e}"
    return None


def _import_modules() -> tuple[Any, Any, Any]:
    if "tunix" not in sys.modules:  # register the package without its __init__ (which needs metrax)
        spec = importlib.util.find_spec("tunix")
        pkg = types.ModuleType("tunix")
        pkg.__path__ = list(spec.submodule_search_locations or [str(pathlib.Path(spec.origin).parent)])
        sys.modules["tunix"] = pkg
    from tunix.generate import sampler
    from tunix.models.qwen2 import model, params

    return model, params, sampler


class IntTokenizer:
    """Space-separated integers: what tunix's sampler needs to take token ids (no BOS, no padding, no EOS)."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], **_: Any) -> str:
        return " ".join(str(i) for i in ids)

    def bos_id(self) -> None:
        return None

    def eos_id(self) -> int:
        return -2  # never emitted: every row runs to max_generation_steps

    def pad_id(self) -> int:
        return -1  # never a token: prompts are of equal length, so no row is padded


def _rope_theta(hf_config: dict[str, Any]) -> float:
    """transformers 5 writes `rope_parameters.rope_theta` where real Qwen2.5 configs say `rope_theta`."""
    if "rope_theta" in hf_config:
        return hf_config["rope_theta"]
    return hf_config["rope_parameters"]["rope_theta"]


def tunix_generate(weights: pathlib.Path, hf_config: dict[str, Any], prompt_len: int, new_tokens: int
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """A function prompts [B, prompt_len] int -> greedy tokens [B, new_tokens] int32 through tunix's Sampler on
    the float32 weights in `weights` (a transformers safetensors directory with config `hf_config`)."""
    import jax.numpy as jnp

    model_lib, params_lib, sampler_lib = _import_modules()
    cfg = model_lib.ModelConfig(
        num_layers=hf_config["num_hidden_layers"], vocab_size=hf_config["vocab_size"],
        embed_dim=hf_config["hidden_size"], hidden_dim=hf_config["intermediate_size"],
        num_heads=hf_config["num_attention_heads"],
        head_dim=hf_config["hidden_size"] // hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"], rope_theta=int(_rope_theta(hf_config)),
        norm_eps=hf_config["rms_norm_eps"], use_tied_embedding=hf_config["tie_word_embeddings"],
        dtype=jnp.float32, param_dtype=jnp.float32)
    model = params_lib.create_model_from_safe_tensors(str(weights), cfg, dtype=jnp.float32)
    cache = sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, IntTokenizer(), cache)

    def run(prompts: np.ndarray) -> np.ndarray:
        if prompts.shape[1] != prompt_len:
            raise ValueError(f"prompts of length {prompts.shape[1]}, this sampler's cache is for {prompt_len}")
        out = sampler([" ".join(map(str, row)) for row in prompts.tolist()], max_generation_steps=new_tokens,
                      max_prompt_length=prompt_len, eos_tokens=[-2], temperature=0.0)
        return np.stack([np.asarray(t, np.int32) for t in out.tokens])

    return run
