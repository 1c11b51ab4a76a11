"""Streaming MergeLock over a checkpoint: read, transform the attention tensors, write.

Every tensor is handled on its own: an attention tensor's transform depends only on
the key and its sublayer, so the checkpoint streams in its own order. A background
thread reads the next tensor while this one transforms and the shard writer's thread
writes; memory holds a few tensors and the writer's queue, whatever the model size.
A lock stamps every shard's header with a fresh key check value (``keycheck``); an
unlock writes plain headers, so its output is not taken for a protected model.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoo.checkpoints.reader import Checkpoint
from zoo.errors import NonFiniteValues, ZooError
from zoo.memory import keep_freed_memory
from zoo.progress import ProgressFactory, no_progress
from zoo.checkpoints.readahead import read_ahead
from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES, OutTensor, ShardWriter, plan_shards, tensor_bytes

from zoo.protect.keycheck import KeyCheck
from zoo.protect.layouts import Attention, Layout, layout_for
from zoo.protect.transform import Key, apply, draw, role_factors



@dataclass
class LockStats:
    """What a lock or unlock pass did: the sublayers and tensors it changed, and the
    largest condition numbers it used."""

    model_type: str
    layers: int
    tensors: int
    cond_qk: float
    cond_vo: float
    digests: dict[str, str] = field(default_factory=dict)
    max_rel_error: float | None = None  # against a reference checkpoint, when given

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"model_type": self.model_type, "attention_layers": self.layers,
                                "tensors_transformed": self.tensors, "max_cond_qk": self.cond_qk,
                                "max_cond_vo": self.cond_vo}
        if self.max_rel_error is not None:
            d["max_rel_error"] = self.max_rel_error
        return d


TensorFn = Callable[[Attention, str, str, torch.Tensor], torch.Tensor]


def stream_attention(ckpt: Checkpoint, folder: Path, fn: TensorFn, layout: Layout, *,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, progress: ProgressFactory = no_progress,
                     desc: str = "writing", reference: Checkpoint | None = None,
                     metadata: dict[str, str] | None = None) -> tuple[dict[str, str], int, float]:
    """Copy ``ckpt`` into ``folder`` (existing, empty), replacing each attention tensor
    ``t`` by ``fn(sublayer, role, name, t)``. Names, dtypes and order are kept;
    ``metadata`` goes into every shard's header.

    Returns the files' sha256, the number of tensors changed, and (with ``reference``)
    the largest max|Δ| / max|reference| over them.
    """
    keep_freed_memory()
    names = list(ckpt.tensors)
    outs = [OutTensor(n, ckpt.tensors[n].dtype, tuple(ckpt.tensors[n].shape)) for n in names]
    advance = progress(desc, sum(o.nbytes for o in outs), len(outs))
    writer = ShardWriter(folder, plan_shards(outs, shard_bytes), metadata=metadata)
    changed, worst = 0, 0.0
    try:
        # fresh tensors each time (the writer may still hold an untouched one's bytes), two ahead
        for name, tensor in read_ahead(lambda _, n: (n, ckpt.read_tensor(n)), names, sets=3):
            role = layout.roles.get(name)
            if not _finite(tensor):
                raise NonFiniteValues(name)
            if role is not None:
                tensor = fn(role[0], role[1], name, tensor)
                if not _finite(tensor):
                    raise ZooError(f"transforming {name} gave NaN or infinite values although it is finite; "
                                   "nothing was written. Try a smaller --max-cond")
                changed += 1
                if reference is not None and name in reference.tensors:
                    worst = max(worst, _rel_error(reference.read_tensor(name), tensor))
            writer.put(tensor_bytes(tensor))
            advance(tensor.numel() * tensor.element_size(), 1)
        digests = writer.close()
    except BaseException:
        writer.abort()
        raise
    return digests, changed, worst


def lock_checkpoint(ckpt: Checkpoint, key: Key, folder: Path, *, unlock: bool = False,
                    layout: Layout | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    progress: ProgressFactory = no_progress, label: str = "model",
                    reference: Checkpoint | None = None) -> LockStats:
    """Write ``ckpt`` into ``folder`` (existing, empty), locked with ``key`` (or, with
    ``unlock``, unlocked). A locked model's shards carry the key's check value. With
    ``reference`` (the original, when unlocking), each restored tensor is compared with
    it (``max_rel_error``)."""
    layout = layout or layout_for(ckpt)
    transforms = {att.unit: draw(key, att) for att in layout.units}  # two d×d matrices per KV group
    factors = {att.unit: role_factors(transforms[att.unit], att, unlock) for att in layout.units}

    def transform(att: Attention, role: str, name: str, t: torch.Tensor) -> torch.Tensor:
        return apply(factors[att.unit], att, role, t)

    digests, changed, worst = stream_attention(
        ckpt, folder, transform, layout, shard_bytes=shard_bytes, progress=progress,
        desc=f"{'unlocking' if unlock else 'protecting'} {label}", reference=reference,
        metadata=None if unlock else KeyCheck.new(key).metadata())
    conds = list(transforms.values())
    return LockStats(layout.model_type, len(layout.units), changed,
                     max((t.qk.cond for t in conds), default=1.0), max((t.vo.cond for t in conds), default=1.0),
                     digests, worst if reference is not None else None)


def _finite(t: torch.Tensor) -> bool:
    """No NaN and no infinity: one float32 sum (any NaN or infinity makes it non-finite)."""
    return not t.is_floating_point() or math.isfinite(float(torch.sum(t, dtype=torch.float32)))


def _rel_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.to(torch.float64), got.to(torch.float64)
    scale = ref.abs().max().item()
    return (ref - got).abs().max().item() / scale if scale else float((ref != got).any())
