"""Where a tensor sits in a transformer: in a numbered layer, or before or after them.

Gradients are interpolated over a tensor's layer position, and ``slices`` recipes
move layers around, so both need each tensor's layer index. Hugging Face checkpoints
name a layer's tensors ``<stack>.<index>.<rest>`` (``model.layers.3.mlp.up_proj.weight``,
``transformer.h.3.attn.c_attn.weight``, ``encoder.layer.3.output.dense.weight``);
the first such number is the layer, so a mixture-of-experts' expert number inside a
layer is not taken for one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LAYER_NAME = re.compile(r"^(?P<stack>(?:[\w-]+\.)*?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")
# config.json keys for the number of layers, by how common they are
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerName:
    """A layer tensor's name in parts: ``{stack}.{index}.{rest}``."""

    stack: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        """The same tensor in layer ``index``."""
        return f"{self.stack}.{index}.{self.rest}"


def layer_name(name: str) -> LayerName | None:
    """The layer a tensor belongs to; None for embeddings, final norms, heads."""
    m = LAYER_NAME.match(name)
    return None if m is None else LayerName(m["stack"], int(m["index"]), m["rest"])


def stacks(names: Iterable[str]) -> dict[str, int]:
    """Each layer stack's name and its number of layers (highest index + 1)."""
    out: dict[str, int] = {}
    for n in names:
        ln = layer_name(n)
        if ln is not None:
            out[ln.stack] = max(out.get(ln.stack, 0), ln.index + 1)
    return out


def layer_count(config: dict[str, Any] | None, names: Iterable[str]) -> int:
    """The number of layers: config.json's, else counted from the tensor names."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return max(stacks(names).values(), default=0)


def is_before_layers(name: str) -> bool:
    """A tensor that is not in a layer comes before them (token and position
    embeddings, as mergekit's architectures list them) or after them (final norm, LM head)."""
    parts = name.lower().split(".")
    return any("embed" in p or p in ("wte", "wpe") for p in parts)


def position(name: str, layers: int) -> float:
    """A tensor's place for gradients, as mergekit computes it over one slice of every
    layer: layer i of L at i / (L - 1) (1 when L is 1); tensors outside the layers at 0."""
    ln = layer_name(name)
    if ln is None:
        return 0.0
    return ln.index / (layers - 1) if layers > 1 else 1.0
