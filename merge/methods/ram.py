"""RAM (Reinforced Agent Merging): entries only one task vector changes keep that
change whole; entries several change are averaged over those (mergekit's ``ram``);
RAM+ (tensor-local) also scales each model's unique entries up by how much it shares
(``ramplus_tl``)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, StatsCollector, register
from zoo.merge.methods.params import IGNORED_WEIGHT, Param, check_number, check_positive
from zoo.merge.methods.streamed import large

RAM_REFERENCE = 'Reinforced Agent Merging, arXiv 2601.13572'
EPSILON = Param(1e-5, check_positive, "a task-vector entry counts as changed when its magnitude is above this")


def ram_vectors(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """Flat task vectors, which entries each changes, how many models change each entry,
    and where that is more than one (overlap) or exactly one (unique)."""
    tv = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return tv, changed, counts, counts > 1, counts == 1


@register
class Ram(MergeMethod):
    """RAM: each entry's change from the one model that changes it, or the mean change of those that do."""

    name = "ram"
    reference = RAM_REFERENCE
    elementwise = True  # each entry's result depends on that entry of each model only
    parameters = {"epsilon": EPSILON}
    model_parameters = IGNORED_WEIGHT

    def merge(self, base, tensors, params, options, ctx):
        tv, changed, counts, overlap, unique = ram_vectors(base, tensors, self.option(options, "epsilon"))
        z = tv * changed
        merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


@register
class RamPlusTL(MergeMethod):
    """RAM+ (tensor-local): RAM, with each model's unique entries scaled by 1 + r * clamp(shared / unique, 0, alpha)."""

    name = "ramplus_tl"
    reference = RAM_REFERENCE
    parameters = {"r": Param(0.1, check_number, "how strongly sharing scales a model's unique entries up"),
                  "alpha": Param(0.2, check_number, "the most the shared/unique ratio counts for"),
                  "epsilon": EPSILON}
    model_parameters = IGNORED_WEIGHT

    def streams(self, name, shape, options):
        return large(shape)  # the counts in one pass (exact integers), then elementwise

    def stats_collector(self, numel, params, options):
        return SharedCounts(self.option(options, "epsilon"))

    def merge(self, base, tensors, params, options, ctx):
        eps = self.option(options, "epsilon")
        tv, changed, counts, overlap, unique = ram_vectors(base, tensors, eps)
        if ctx.stats is not None:  # a piece of a streamed tensor: the whole tensor's counts
            shared, alone = (c.to(base.device) for c in ctx.stats["counts"])
        else:
            shared = (changed & overlap).sum(dim=1)
            alone = (changed & unique).sum(dim=1)
        rho = shared / alone.clamp(min=eps)
        lam = 1 + self.option(options, "r") * rho.clamp(min=0, max=self.option(options, "alpha"))
        z = tv * changed
        merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


class SharedCounts(StatsCollector):
    """RAM+'s per-model counts over a streamed tensor: how many entries each model
    changes that others change too, and how many it alone changes (integers, so the
    same as over the whole tensor)."""

    passes = 1

    def __init__(self, epsilon: float):
        self.epsilon = epsilon
        self.shared: torch.Tensor | None = None
        self.alone: torch.Tensor | None = None

    def update(self, pass_no, base, tensors, deltas=False):
        _, changed, _, overlap, unique = ram_vectors(base, tensors, self.epsilon)
        shared, alone = (changed & overlap).sum(dim=1), (changed & unique).sum(dim=1)
        self.shared = shared if self.shared is None else self.shared + shared
        self.alone = alone if self.alone is None else self.alone + alone

    def result(self):
        return {"counts": (self.shared, self.alone)}
