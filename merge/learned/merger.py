"""The trainable part of a learned merge: merge coefficients and a Concrete mask over
frozen task vectors, producing merged parameters for ``torch.func.functional_call``.

θ = θ₀ + Σᵢ wᵢ · (m ⊙ τᵢ) / mean(m), per tensor. The mask m is shared by every task
(spec §1.1), so the sum is computed as m ⊙ Σᵢ wᵢτᵢ. With no mask and fixed weights the
arithmetic is task arithmetic's, in the same order, so it gives the same bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zoo.errors import ZooError

COEFFICIENTS = ("fixed", "task", "layer")


@dataclass(frozen=True)
class MaskSample:
    """One draw of the mask, already divided by its per-tensor mean."""

    values: dict[str, torch.Tensor]


class Merger(nn.Module):
    """Task vectors (frozen) plus the learned coefficients and mask logits.

    ``coefficients``: ``fixed`` (all ``init``), ``task`` (one per task) or ``layer``
    (one per task and parameter tensor, as "layer-wise" means in the papers).
    ``mask``: None, or a regex choosing which tensors get mask logits (one per element,
    initialised at 0, i.e. keep probability 0.5).
    """

    def __init__(self, base: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]], *,
                 coefficients: str = "task", init: float = 0.3, clamp: bool = False, mask: str | None = None,
                 temperature: float = 0.5, device: torch.device | str = "cpu"):
        super().__init__()
        if coefficients not in COEFFICIENTS:
            raise ZooError(f"coefficients must be one of {', '.join(COEFFICIENTS)}, not {coefficients!r}")
        if not task_vectors:
            raise ZooError("a learned merge needs at least one expert")
        self.names = list(base)
        self.base = {n: t.to(device, torch.float32) for n, t in base.items()}
        self.tv = {n: [tv[n].to(device, torch.float32) for tv in task_vectors] for n in self.names}
        self.n_tasks = len(task_vectors)
        self.mode, self.init, self.clamp, self.temperature = coefficients, init, clamp, temperature
        shape = {"fixed": (self.n_tasks, 1), "task": (self.n_tasks, 1), "layer": (self.n_tasks, len(self.names))}
        w = torch.full(shape[coefficients], float(init), device=device)
        if coefficients == "fixed":
            self.register_buffer("weights", w)
        else:
            self.weights = nn.Parameter(w)
        self.mask_names: list[str] = []
        if mask is not None:
            try:
                pattern = re.compile(mask)
            except re.error as e:
                raise ZooError(f"mask pattern {mask!r} is not a valid regular expression: {e}") from None
            self.mask_names = [n for n in self.names if pattern.search(n)]
            if not self.mask_names:
                raise ZooError(f"mask pattern {mask!r} matches none of the {len(self.names)} merged tensors "
                               f"(e.g. {', '.join(self.names[:3])})")
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros_like(self.base[n])) for n in self.mask_names])

    # -- coefficients -------------------------------------------------------------------
    def coefficient_matrix(self) -> torch.Tensor:
        """[tasks, tensors] coefficients, clamped to [0, 1] when asked."""
        w = self.weights.clamp(0, 1) if self.clamp else self.weights
        return w.expand(self.n_tasks, len(self.names))

    def reset_coefficients(self) -> None:
        with torch.no_grad():
            self.weights.fill_(self.init)

    # -- the mask -------------------------------------------------------------------------
    def sample(self, generator: torch.Generator) -> MaskSample:
        """A RelaxedBernoulli(temperature, logits) draw, reparameterised so gradients reach
        the logits, each tensor divided by its mean. ``generator`` lives on the logits'
        device (drawing a model's worth of noise on the CPU would dominate a GPU step)."""
        out = {}
        for name, x in zip(self.mask_names, self.logits):
            u = torch.rand(x.shape, generator=generator, device=x.device)
            u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
            m = torch.sigmoid((x + u.log() - (-u).log1p()) / self.temperature)
            out[name] = m / m.mean().clamp_min(torch.finfo(m.dtype).tiny)
        return MaskSample(out)

    def draw_bits(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One Bernoulli(σ(logit)) draw per element: the binary mask the final model uses
        (fusion_bench's ``discrete`` evaluation mask), so it can be stored as bits."""
        out = {}
        for name, x in zip(self.mask_names, self.logits):
            u = torch.rand(x.shape, generator=generator, device=x.device)
            out[name] = (u < torch.sigmoid(x.detach())).to(torch.float32)
        return out

    def logits_dict(self) -> dict[str, torch.Tensor]:
        return {n: x.detach() for n, x in zip(self.mask_names, self.logits)}

    # -- the merged parameters ------------------------------------------------------------
    def merged(self, mask: MaskSample | None = None) -> dict[str, torch.Tensor]:
        """θ₀ + m ⊙ Σᵢ wᵢτᵢ for every merged tensor (differentiable in w and the logits)."""
        w = self.coefficient_matrix()
        out = {}
        for j, name in enumerate(self.names):
            tvs = self.tv[name]
            acc = tvs[0] * w[0, j]
            for i in range(1, self.n_tasks):
                acc = acc + tvs[i] * w[i, j]
            if mask is not None and name in mask.values:
                acc = acc * mask.values[name]
            out[name] = self.base[name] + acc
        return out

    def coefficients_list(self) -> list[list[float]]:
        return self.coefficient_matrix().detach().cpu().tolist()


# -- packing the final mask for the lineage ---------------------------------------------------
def pack_mask(bits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A binary mask as bytes, 8 elements a byte (numpy.packbits order)."""
    return {n: torch.from_numpy(np.packbits(m.detach().cpu().reshape(-1).numpy() > 0)) for n, m in bits.items()}


def unpack_mask(packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out = {}
    for n, b in packed.items():
        count = int(np.prod(shapes[n])) if shapes[n] else 1
        out[n] = torch.from_numpy(np.unpackbits(b.numpy())[:count].astype(np.float32)).reshape(shapes[n])
    return out


def rescale(bits: dict[str, torch.Tensor]) -> MaskSample:
    """A binary mask divided by its per-tensor mean, as applied to the merge."""
    return MaskSample({n: m / m.mean().clamp_min(torch.finfo(torch.float32).tiny) for n, m in bits.items()})


MASK_FORMAT = "zoo-mask-v1"
LOGIT_SCALE = 16  # int8 logits: round(clamp(x, -8, 8) * 16), a 1/16 step


def save_mask(bits: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], path):
    """The final mask as a safetensors file: ``bits.<tensor>`` (the binary draw the model
    was made with, packed 8 a byte) and ``logits.<tensor>`` (the learned logits, int8),
    with each tensor's shape in the metadata. Written to a temp file, then renamed."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for n, b in pack_mask(bits).items():
        tensors[f"bits.{n}"] = b
    for n, x in logits.items():
        tensors[f"logits.{n}"] = (x.detach().float().cpu().clamp(-8, 8) * LOGIT_SCALE).round().to(torch.int8)
    meta = {"format": MASK_FORMAT, "logit_scale": str(LOGIT_SCALE),
            "shapes": json.dumps({n: list(b.shape) for n, b in bits.items()})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_mask(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(binary mask, logits) from a file written by ``save_mask``."""
    import json

    from zoo.checkpoint import open_safetensors
    from zoo.errors import CheckpointError

    ck = open_safetensors(path)
    if ck.metadata.get("format") != MASK_FORMAT:
        raise CheckpointError(f"{path} is not a zoo mask file")
    shapes = {n: tuple(v) for n, v in json.loads(ck.metadata["shapes"]).items()}
    packed = {n: ck.read_tensor(f"bits.{n}") for n in shapes}
    scale = float(ck.metadata.get("logit_scale", LOGIT_SCALE))
    logits = {n: ck.read_tensor(f"logits.{n}").float() / scale for n in shapes if f"logits.{n}" in ck.tensors}
    return unpack_mask(packed, shapes), logits
