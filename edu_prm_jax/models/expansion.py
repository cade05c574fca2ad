"""Block expansion (LLaMA Pro, Wu et al. 2024): deepen a pretrained decoder by blocks that start as the identity.

Why a PRM wants it: a step checker compares the token written at a position with what the model predicts there,
and then carries that verdict to the step's end. A small backbone spends all of its depth on making the
prediction, so nothing is left for the comparison. New blocks appended after the last one see the finished
prediction at every position. Each new block copies the last block's weights with its two output projections
(attention `o_proj`, MLP `down_proj`) set to zero: both residual branches add nothing, so the expanded model
computes exactly what the original did until training moves those projections.

Layer layouts (`Qwen2Config.scan_layers`): names here are per-layer ('layers.5.attn.q_proj.kernel'), which is
how `checkpoints.layer_view` shows a scanned (stacked) policy too, so a PRM can be grown from either layout. The
grown PRM itself is always unrolled (`prm._backbone_cfg`): LLaMA Pro trains the new blocks alone, and the
optimizer freezes parameters by a regex on their names (`expanded_layers_pattern`), which can select a whole
stacked [layers, ...] parameter but not some of its rows.
"""

from __future__ import annotations

import re

ZEROED = ("attn.o_proj.kernel", "mlp.down_proj.kernel")  # residual-branch outputs of a decoder block
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def expansion_source(name: str, num_layers: int) -> tuple[str, bool]:
    """(name of the unexpanded parameter that initialises `name`, whether it starts at zero), for a per-layer
    backbone path such as 'layers.5.attn.q_proj.kernel' in a model grown from `num_layers` blocks (any other
    name, e.g. a stacked 'layers.attn.q_proj.kernel', is its own source)."""
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) < num_layers:
        return name, False
    rest = m.group(2)
    return f"layers.{num_layers - 1}.{rest}", rest in ZEROED


def expanded_layers_pattern(num_layers: int, extra: int) -> str:
    """Regex (optimizer path form) matching the reward head and the `extra` blocks appended after
    `num_layers`: the parameters LLaMA Pro's recipe trains while the original blocks stay frozen."""
    indices = "|".join(str(i) for i in range(num_layers, num_layers + extra))
    return rf"^head\.|^backbone\.layers\.({indices})\."
