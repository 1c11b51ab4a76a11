"""Arcee Fusion: take the other model's value only where it matters most, by its change
times the KL divergence of the rows' softmaxes, above a dynamic threshold (median +
1.5 IQR), the base's elsewhere (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.merge.methods.base import MergeMethod, StatsCollector, register, whole_rows
from zoo.merge.methods.streamed import large

# Above this many entries the quartiles come from a sample of this size (as mergekit).
QUANTILE_SAMPLE = 1_000_000


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the KL divergence of softmax(x) from softmax(base), per last-dim row."""
    eps = 1e-8
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (x - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def sample_indices(numel: int, generator: torch.Generator) -> torch.Tensor | None:
    """The entries the quartiles are taken over: None (all of them) up to
    ``QUANTILE_SAMPLE``, else that many drawn with replacement."""
    if numel <= QUANTILE_SAMPLE:
        return None
    # zoo's own seeded draw (mergekit's comes from torch's global generator)
    return torch.randint(numel, (QUANTILE_SAMPLE,), generator=generator)


def quartiles(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The 25%, 50% and 75% order statistics (index floor(q * (n - 1)) of the sorted
    scores); over a sample drawn with replacement above ``QUANTILE_SAMPLE`` entries."""
    flat = scores.reshape(-1)
    idx = sample_indices(flat.numel(), generator)
    if idx is not None:
        flat = flat[idx.to(flat.device)]
    return order_statistics(flat)


def order_statistics(flat: torch.Tensor) -> torch.Tensor:
    """The quartiles of a flat tensor of scores (whatever their order)."""
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

    def streams(self, name, shape, options):
        return large(shape)  # in blocks of whole rows: the quartiles' sample in one pass

    def piece_elems(self, shape, options, chunk):
        return whole_rows(shape, chunk)

    def tensor_collector(self, shape, params, options, ctx):
        return QuartileSample(math.prod(shape), shape[-1], ctx.generator(0))

    def merge(self, base, tensors, params, options, ctx):
        x = tensors[0]
        if ctx.stats is not None:  # a block of whole rows of a streamed tensor
            cols = ctx.stats["rows"]
            scores = importance(x.view(-1, cols), base.view(-1, cols)).reshape(-1)
            q1, median, q3 = ctx.stats["quartiles"]
        else:
            scores = importance(x, base)
            q1, median, q3 = quartiles(scores, ctx.generator(0))
        mask = (scores >= median + 1.5 * (q3 - q1)).float()
        # float32 mask: in bfloat16 the result is float32 until written, as in mergekit
        return base + (x - base) * mask


class QuartileSample(StatsCollector):
    """The quartiles of a streamed tensor's importances: one pass over blocks of whole
    rows computes each block's importances and keeps those at the sampled entries (the
    same entries, so the same quartiles, as over the whole tensor)."""

    passes = 1

    def __init__(self, numel: int, cols: int, generator: torch.Generator):
        self.cols = cols
        idx = sample_indices(numel, generator)
        self.idx = torch.sort(idx).values if idx is not None else None
        self.offset = 0
        self.values: list[torch.Tensor] = []

    def update(self, pass_no, base, tensors, deltas=False):
        x = tensors[0]
        n = x.numel()
        scores = importance(x.view(-1, self.cols), base.view(-1, self.cols)).reshape(-1)
        if self.idx is None:
            self.values.append(scores.clone())
        else:
            lo, hi = (int(v) for v in torch.searchsorted(self.idx, torch.tensor([self.offset, self.offset + n])))
            self.values.append(scores[(self.idx[lo:hi] - self.offset).to(scores.device)])
        self.offset += n

    def result(self):
        return {"rows": self.cols, "quartiles": order_statistics(torch.cat(self.values))}
