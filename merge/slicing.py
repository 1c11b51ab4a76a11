"""The layout of a ``slices`` recipe: which input tensors make each output tensor.

As mergekit plans it (Goddard et al., arXiv 2403.13257): output layers are numbered
0, 1, 2, ... through the slices in the order written; output layer ``k`` of a slice
reads layer ``start + k`` of each of its sources, and its gradients are evaluated at
``t = k / (L - 1)`` for a slice of ``L`` layers (1 for a single layer). Tensors
outside the layers take t = 0: those before the layers (embeddings) come from the
first slice's sources, those after (final norm, LM head) from the last slice's. Only
planning lives here; nothing is read beyond headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zoo.errors import ZooError

from zoo.merge.layers import is_before_layers, layer_count, layer_name, stacks
from zoo.merge.recipe import SliceSpec

if TYPE_CHECKING:
    import torch

    from zoo.checkpoints.reader import Checkpoint, TensorInfo


@dataclass(frozen=True)
class Placement:
    """One output tensor: the slice whose sources and parameters make it, its layer
    position, and its name in each of those sources (in the slice's order)."""

    out: str
    slice: int
    t: float
    names: tuple[str, ...]
    layer: int | None  # the output layer it belongs to; None outside the layers


def layout(slices: list[SliceSpec], reference: "Checkpoint", inputs: dict[str, "Checkpoint"]) -> list[Placement]:
    """Every output tensor of a slices recipe, in order: before the layers, the layers,
    after them. ``reference`` (the base, else the first model) names the tensors outside
    the layers; ``inputs`` maps each source's model to its checkpoint."""
    ref_stacks = stacks(reference.tensors)
    if len(ref_stacks) != 1:
        raise ZooError("slices need a model with one stack of numbered layers; this one has "
                       + (", ".join(sorted(ref_stacks)) or "none")
                       + " (an encoder-decoder needs mergekit's modules syntax, which zoo does not support)")
    for i, sl in enumerate(slices):
        seen = [s.model for s in sl.sources]
        if len(set(seen)) != len(seen):
            raise ZooError(f"slice {i} lists the same model twice; give each model once per slice")
        for src in sl.sources:
            ck = inputs[src.model]
            have = layer_count(ck.config if ck.form == "model" else None, ck.tensors)
            if src.layer_range[1] > have:
                raise ZooError(f"slice {i}: layer_range {list(src.layer_range)} of {src.model} goes past its "
                               f"{have} layers")
    outside = [n for n in reference.tensors if layer_name(n) is None]
    first, last = slices[0], slices[-1]
    # mergekit pairs the last slice's models with as many inputs as the first slice has
    post_sources = min(len(first.sources), len(last.sources))
    placed = [Placement(n, 0, 0.0, (n,) * len(first.sources), None) for n in outside if is_before_layers(n)]
    k = 0
    for i, sl in enumerate(slices):
        for idx in range(sl.length):
            t = idx / (sl.length - 1) if sl.length > 1 else 1.0
            placed += _layer(i, sl, idx, k, t, inputs)
            k += 1
    placed += [Placement(n, len(slices) - 1, 0.0, (n,) * post_sources, None)
               for n in outside if not is_before_layers(n)]
    for p in placed:
        for src, name in zip(slices[p.slice].sources, p.names):
            if name not in inputs[src.model].tensors:
                raise ZooError(f"slice {p.slice}: {src.model} has no tensor {name}")
    return placed


def _layer(i: int, sl: SliceSpec, idx: int, k: int, t: float, inputs: dict[str, "Checkpoint"]) -> list[Placement]:
    """Output layer ``k``: the tensors of layer ``start + idx`` of the slice's first
    source, renamed to layer k, each read from the same-offset layer of every source."""
    first = sl.sources[0]
    at = first.layer_range[0] + idx
    names = [n for n in inputs[first.model].tensors if (ln := layer_name(n)) is not None and ln.index == at]
    out = []
    for n in names:
        ln = layer_name(n)
        assert ln is not None
        out.append(Placement(ln.at(k), i, t, tuple(ln.at(s.layer_range[0] + idx) for s in sl.sources), k))
    return out


def output_layers(slices: list[SliceSpec]) -> int:
    """The merged model's number of layers (mergekit counts each slice's first source)."""
    return sum(sl.length for sl in slices)


class RenamedCheckpoint:
    """A checkpoint seen through output names: ``tensors`` and the readers take the
    output name of a tensor and read the input tensor it comes from. Everything else
    (config, files, form) is the checkpoint's own."""

    def __init__(self, inner: "Checkpoint", names: dict[str, str]):
        self.inner = inner
        self.names = names  # output name -> its name in ``inner``
        self.tensors: dict[str, "TensorInfo"] = {out: inner.tensors[src] for out, src in names.items()}

    def source_name(self, name: str) -> str:
        return self.names[name]

    def read_tensor(self, name: str) -> "torch.Tensor":
        return self.inner.read_tensor(self.names[name])

    def read_range(self, name: str, start: int, count: int, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        return self.inner.read_range(self.names[name], start, count, out=out)

    def read_bytes(self, name: str) -> bytes:
        return self.inner.read_bytes(self.names[name])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)
