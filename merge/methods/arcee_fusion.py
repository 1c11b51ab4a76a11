"""Arcee Fusion: take the other model's value only where it matters most, by its change
times the KL divergence of the rows' softmaxes, above a dynamic threshold (median +
1.5 IQR), the base's elsewhere (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.merge.methods.base import MergeMethod, register

# Above this many entries the quartiles come from a sample of this size (as mergekit).
QUANTILE_SAMPLE = 1_000_000


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the KL divergence of softmax(x) from softmax(base), per last-dim row."""
    eps = 1e-8
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (x - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The 25%, 50% and 75% order statistics (index floor(q * (n - 1)) of the sorted
    scores); over a sample drawn with replacement above ``QUANTILE_SAMPLE`` entries."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        # zoo's own seeded draw (mergekit's comes from torch's global generator)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    ordered, _ = torch.sort(flat)
    return ordered[(torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()]


@register
class ArceeFusion(MergeMethod):
    """Arcee Fusion: the other model's entries of outlying importance (change x KL), the base's elsewhere.

    Importance is |theta_1 - theta_0| times the KL divergence of the rows' softmaxes;
    outlying is at least median + 1.5 IQR of the tensor's importances.
    """

    name = "arcee_fusion"
    reference = 'Arcee AI, "Arcee Fusion", mergekit (2025)'
    min_models = 1
    max_models = 1

    def merge(self, base, tensors, params, options, ctx):
        x = tensors[0]
        scores = importance(x, base)
        q1, median, q3 = quartiles(scores, ctx.generator(0))
        mask = (scores >= median + 1.5 * (q3 - q1)).float()
        # float32 mask: in bfloat16 the result is float32 until written, as in mergekit
        return base + (x - base) * mask
