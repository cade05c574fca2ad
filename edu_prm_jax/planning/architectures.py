"""Model architectures by name, so a plan needs no weights and no model directory on this machine.

Each entry is the architecture part of the model's Hugging Face `config.json` (huggingface.co/Qwen/<name>/blob/
main/config.json), which `Qwen2Config.from_hf_dict` reads as it reads a checkpoint's. The planner uses an entry
when a config names a model directory that is not here (the shipped 7B/72B configs point at /models/...).
"""

from __future__ import annotations

import json

from edu_prm_jax.io import storage
from edu_prm_jax.models.config import Qwen2Config

_QWEN = {"rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "use_sliding_window": False}
ARCHITECTURES: dict[str, dict] = {
    "Qwen2.5-0.5B-Instruct": {**_QWEN, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                              "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "Qwen2.5-Math-1.5B-Instruct": {**_QWEN, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                   "rope_theta": 10000.0, "max_position_embeddings": 4096,
                                   "tie_word_embeddings": True},
    "Qwen2.5-Math-7B-Instruct": {**_QWEN, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "rope_theta": 10000.0, "max_position_embeddings": 4096,
                                 "tie_word_embeddings": False},
    "Qwen2.5-72B-Instruct": {**_QWEN, "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                             "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                             "tie_word_embeddings": False},
}
ARCHITECTURES["Qwen2.5-Math-7B"] = ARCHITECTURES["Qwen2.5-Math-7B-Instruct"]  # the base model: same shapes
ARCHITECTURES["Qwen2.5-Math-72B-Instruct"] = {**ARCHITECTURES["Qwen2.5-72B-Instruct"], "rope_theta": 10000.0,
                                              "max_position_embeddings": 4096}


def architecture(spec: str, field: str = "arch") -> Qwen2Config:
    """The architecture `spec` names: an entry of `ARCHITECTURES` (by name, case-insensitive), a config.json,
    or a model directory holding one. ValueError naming `field` and the known names otherwise."""
    by_lower = {k.lower(): k for k in ARCHITECTURES}
    if spec.lower() in by_lower:
        name = by_lower[spec.lower()]
        return Qwen2Config.from_hf_dict(dict(ARCHITECTURES[name]), f"{field}={name}")
    path = storage.as_path(spec)  # a local path or a gs:// URI
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return Qwen2Config.from_hf_dict(json.loads(path.read_text()), str(path))
    raise ValueError(f"{field}={spec!r}: neither a known architecture ({', '.join(ARCHITECTURES)}) nor a "
                     "config.json / model directory")
