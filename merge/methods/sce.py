"""SCE (select, calculate, erase): keep the entries where the task vectors vary most,
weight each task vector by its mean square, drop the entries against the elected sign,
and take the weighted mean (mergekit's ``sce``)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import Param, check_bool, check_unit


@register
class Sce(MergeMethod):
    """SCE: keep the highest-variance entries, weight task vectors by mean square, erase sign conflicts.

    No per-model weights: each task vector's weight is its mean square over the sum of them.
    """

    name = "sce"
    reference = ('Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990')
    parameters = {"select_topk": Param(1.0, check_unit, "fraction of entries kept: those of largest variance "
                                                        "across the task vectors (of the non-zero ones)"),
                  "int8_mask": Param(False, check_bool, "mergekit's memory option for the masks; the result is "
                                                        "the same")}

    def merge(self, base, tensors, params, options, ctx):
        topk = self.option(options, "select_topk")
        tvs = torch.stack([x if ctx.deltas else x - base for x in tensors], dim=0)
        if topk < 1:
            tvs = tvs * select_mask(tvs, topk, base.dtype).unsqueeze(0)
        majority = (tvs.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        erase = tvs.sign().to(base.dtype) == majority
        weights = mean_square_weights(tvs)
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * erase
        merged = (tvs * erased).sum(dim=0)
        return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def mean_square_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Each task vector's mean square over their sum (equal weights when the sum is ~0)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def select_mask(tvs: torch.Tensor, density: float, dtype: torch.dtype) -> torch.Tensor:
    """1 on the ``int(density * nonzero)`` entries of largest variance across the task
    vectors (torch.topk's choice among ties, as mergekit), 0 elsewhere."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=dtype)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask
