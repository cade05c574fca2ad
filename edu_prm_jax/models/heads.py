"""The PRM head registry: everything that differs between reward heads, in one `HeadSpec` per head.

A head turns the backbone's last hidden state into one logit per token, with sigmoid(logit) = the step score.
Its spec says how to build it, how its tensors are named in a Hugging Face checkpoint, what config.json says
about it, and where a step's score is read (`StepLayout`). The rest of the package asks the spec
(`PRM.head_spec`, `get_head(name)`) and never compares head names, so a new head is one `register_head` call.

Registered here:
- "qwen_math": Qwen2.5-Math-PRM's `score = Sequential(Linear(h, h), ReLU(), Linear(h, 2))`, read at a
  separator token (`<extra_0>`) inserted after each step; logit = l1 - l0, since softmax([l0, l1])[1] =
  sigmoid(l1 - l0). HF: `score.0.*`, `score.2.*`, architectures ["Qwen2ForProcessRewardModel"], num_labels 2
  (the public Qwen2.5-Math-PRM-7B/72B layout).
- "scalar": one `Linear(h, 1)` read at the last token of each step (nothing inserted). HF: `score.weight`
  [1, h], `score.bias` [1], architectures ["Qwen2ForScalarProcessRewardModel"].
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Dense


class StepLayout(enum.Enum):
    """Where a step's score is read."""

    LAST_TOKEN = "last_token"  # the step's own last token; the policy's text is scored as generated
    SEPARATOR_AFTER = "separator_after"  # a separator token inserted after each step (e.g. Qwen's <extra_0>)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One reward head: its module, its HF layout and its step layout.

    make: (PRM config, rngs) -> an nnx.Module mapping hidden [..., hidden_size] (any float dtype) to step
        logits [...] float32, one per token. Parameters should carry logical axes (see `Dense`) so meshes place
        them; `head_compute_cfg` gives float32 compute.
    tensors: HF tensor name -> (NNX path inside the head module, transpose). NNX kernels are [in, out], HF Linear
        weights [out, in], so kernels transpose. Names must not collide with the backbone's (`model.*`).
    architecture: config.json's `architectures` entry; `load_prm` recognises a checkpoint by it when config.json
        has no `edu_prm_head` field (how public Qwen2.5-Math-PRM checkpoints are recognised).
    step_layout: where a step's score is read (`StepLayout`).
    hf_config: extra config.json fields the export writes (e.g. transformers' `num_labels`).
    """

    name: str
    make: Callable[[Qwen2Config, nnx.Rngs], nnx.Module]
    tensors: Mapping[str, tuple[str, bool]]
    architecture: str
    step_layout: StepLayout
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def inserts_separator(self) -> bool:
        """True when a separator token is inserted after each step (and the step's score read there)."""
        return self.step_layout is StepLayout.SEPARATOR_AFTER

    def nnx_path(self, hf_name: str) -> tuple[str, bool] | None:
        """(path inside the head module, transpose) for one of this head's HF tensor names, else None."""
        return self.tensors.get(hf_name)

    def hf_name(self, nnx_path: str) -> tuple[str, bool] | None:
        """Inverse of `nnx_path`: (HF tensor name, transpose) for a path inside the head module, else None."""
        for name, (path, transpose) in self.tensors.items():
            if path == nnx_path:
                return name, transpose
        return None


_REGISTRY: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add `spec` to the registry (registering the same spec again is a no-op); returns it.

    Raises ValueError when another spec already holds its name or its HF architecture string (the architecture
    identifies the head when loading a checkpoint without our config field)."""
    held = _REGISTRY.get(spec.name)
    if held is not None:
        if held == spec:
            return held
        raise ValueError(f"a different PRM head is already registered as {spec.name!r}")
    for other in _REGISTRY.values():
        if other.architecture == spec.architecture:
            raise ValueError(f"head {spec.name!r}: architecture {spec.architecture!r} already names head "
                             f"{other.name!r}")
    if not isinstance(spec.step_layout, StepLayout):
        raise ValueError(f"head {spec.name!r}: step_layout must be a StepLayout, got {spec.step_layout!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get_head(name: str) -> HeadSpec:
    """The registered spec called `name`; ValueError listing the registered heads otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown PRM head {name!r}; registered heads: {head_names()} "
                         f"(add one with edu_prm_jax.models.heads.register_head)") from None


def head_names() -> tuple[str, ...]:
    """Registered head names, in registration order."""
    return tuple(_REGISTRY)


def registered_heads() -> tuple[HeadSpec, ...]:
    """Registered specs, in registration order."""
    return tuple(_REGISTRY.values())


# ------------------------------------------------------------------------------------------ the two heads


def head_compute_cfg(cfg: Qwen2Config) -> Qwen2Config:
    """Heads compute in float32 whatever the backbone's compute dtype: they are tiny next to the backbone,
    and a score that is a difference of two logits would round coarsely in bfloat16."""
    return cfg.replace(dtype="float32")


class QwenMathHead(nnx.Module):
    """Linear(h, h) - ReLU - Linear(h, 2); returns l1 - l0 [...] float32. The hidden layer is split like an MLP."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.hidden = Dense(h, h, ("embed", "mlp"), bias=True, cfg=head_compute_cfg(cfg), rngs=rngs)
        self.out = Dense(h, 2, ("mlp", "head_out"), bias=True, cfg=head_compute_cfg(cfg), rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        two = self.out(jax.nn.relu(self.hidden(hidden.astype(jnp.float32))))
        return two[..., 1] - two[..., 0]


class ScalarHead(nnx.Module):
    """Linear(h, 1); returns its single logit [...] float32."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.out = Dense(cfg.hidden_size, 1, ("embed", "head_out"), bias=True, cfg=head_compute_cfg(cfg),
                         rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.out(hidden.astype(jnp.float32))[..., 0]


QWEN_MATH = register_head(HeadSpec(
    name="qwen_math",
    make=QwenMathHead,
    tensors={
        "score.0.weight": ("hidden.kernel", True),
        "score.0.bias": ("hidden.bias", False),
        "score.2.weight": ("out.kernel", True),
        "score.2.bias": ("out.bias", False),
    },
    architecture="Qwen2ForProcessRewardModel",
    step_layout=StepLayout.SEPARATOR_AFTER,
    hf_config={"num_labels": 2},
))

SCALAR = register_head(HeadSpec(
    name="scalar",
    make=ScalarHead,
    tensors={
        "score.weight": ("out.kernel", True),
        "score.bias": ("out.bias", False),
    },
    architecture="Qwen2ForScalarProcessRewardModel",
    step_layout=StepLayout.LAST_TOKEN,
))
