"""mergekit's ``model+adapter`` references: a LoRA adapter merged into its model before the merge.

mergekit loads the model, applies the adapter with PEFT's ``merge_and_unload`` and
saves the result, which then merges like any other model. zoo does the same per
tensor, as it reads it: ``W + scale · B @ A`` computed in float32 (the adapter's
weights upcast, as PEFT does) and rounded once to the model's stored dtype, which is
the dtype the merged model is saved in. Nothing is written or cached.
LoRA: Hu et al., arXiv:2106.09685.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from zoo.checkpoints.compat import compare
from zoo.checkpoints.lora import read_adapter
from zoo.errors import IncompatibleModels, ZooError

if TYPE_CHECKING:
    import torch

    from zoo.merge.plan import Input
    from zoo.registry import Registry


def open_merged(label: str, registry: "Registry | None", open_one: "Callable[[str, Any], Input]") -> "Input | None":
    """``MODEL+ADAPTER`` opened as one input (None where ``label`` is itself a path)."""
    if Path(label).exists():
        return None
    parts = label.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ZooError(f"cannot read model reference {label!r}: expected MODEL or MODEL+ADAPTER")
    model, adapter = open_one(parts[0], registry), open_one(parts[1], registry)
    if model.is_adapter:
        raise ZooError(f"{label}: {parts[0]} is a LoRA adapter; MODEL+ADAPTER names the full model first")
    if not adapter.is_adapter:
        raise ZooError(f"{label}: {parts[1]} is not a LoRA adapter (no adapter_config.json and adapter weights)")
    report = compare(adapter.ckpt, model.ckpt, parts[1], parts[0])
    if not report.ok:
        raise IncompatibleModels(report.one_line())
    parsed = read_adapter(adapter.ckpt)
    return dataclasses.replace(model, label=label, ref=None, lora=parsed.pairs, overrides=parsed.saved,
                               adapter=adapter.ckpt)


def merged_tensor(inp: "Input", name: str) -> "torch.Tensor":
    """One tensor of ``inp``'s model with its adapter merged in, in the model's dtype."""
    import torch

    w = inp.ckpt.read_tensor(name)
    assert inp.adapter is not None
    if name in inp.overrides:  # a module the adapter saves whole (modules_to_save)
        return inp.adapter.read_tensor(inp.overrides[name]).to(w.dtype)
    pair = inp.lora.get(name)
    if pair is None:
        return w
    assert pair.a is not None and pair.b is not None
    delta = pair.delta(inp.adapter.read_tensor(pair.a), inp.adapter.read_tensor(pair.b))
    return (w.to(torch.float32) + delta.reshape(w.shape)).to(w.dtype)
