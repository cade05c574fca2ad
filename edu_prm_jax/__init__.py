"""edu_prm_jax: entropy-driven process reward models (EDU-PRM) in JAX / Flax NNX.

Imports are lazy so that `edu-prm --help` and config loading do not pay for importing JAX.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_tokenizer"):
        from edu_prm_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'edu_prm_jax' has no attribute {name!r}")
