"""SCE (select, calculate, erase): keep the entries where the task vectors vary most,
weight each task vector by its mean square, drop the entries against the elected sign,
and take the weighted mean (mergekit's ``sce``)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, StatsCollector, register
from zoo.merge.methods.params import IGNORED_WEIGHT, Param, check_bool, check_unit
from zoo.merge.methods.select import TopKThreshold
from zoo.merge.methods.streamed import large


@register
class Sce(MergeMethod):
    """SCE: keep the highest-variance entries, weight task vectors by mean square, erase sign conflicts.

    Each task vector's weight is its mean square over the sum of them; a ``weight`` in the
    recipe is accepted and ignored, as mergekit does.
    """

    name = "sce"
    reference = ('Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990')
    parameters = {"select_topk": Param(1.0, check_unit, "fraction of entries kept: those of largest variance "
                                                        "across the task vectors (of the non-zero ones)"),
                  "int8_mask": Param(False, check_bool, "mergekit's memory option for the masks; the result is "
                                                        "the same")}
    model_parameters = IGNORED_WEIGHT

    def streams(self, name, shape, options):
        return large(shape)  # the selection's cut-off and the mean squares in streamed passes

    def stats_collector(self, numel, params, options):
        return SceSums(numel, len(params), self.option(options, "select_topk"))

    def merge(self, base, tensors, params, options, ctx):
        topk = self.option(options, "select_topk")
        tvs = torch.stack([x if ctx.deltas else x - base for x in tensors], dim=0)
        if ctx.stats is not None:  # a piece of a streamed tensor
            sums: SceSums = ctx.stats["sums"]
            tvs = sums.select(tvs, ctx.stats["ties"])
            weights = sums.weights(tvs.dtype, tvs.device)
        else:
            if topk < 1:
                tvs = tvs * select_mask(tvs, topk, base.dtype).unsqueeze(0)
            weights = mean_square_weights(tvs)
        majority = (tvs.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        erase = tvs.sign().to(base.dtype) == majority
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * erase
        merged = (tvs * erased).sum(dim=0)
        return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def mean_square_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Each task vector's mean square over their sum (equal weights when the sum is ~0)."""
    return normalized(tvs.square().reshape(tvs.shape[0], -1).mean(dim=1))


def normalized(w: torch.Tensor) -> torch.Tensor:
    """Mean squares over their sum (equal weights when the sum is ~0)."""
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


class SceSums(StatsCollector):
    """SCE's whole-tensor statistics over a streamed tensor. With ``select_topk`` < 1, two
    radix passes find the k-th largest variance across the task vectors (k of the
    non-zero ones); of the entries equal to it, the first ones in order are kept, so
    exactly k are (torch.topk's choice among ties needs the whole tensor). Then one
    pass sums each selected task vector's squares, in float64, for the weights."""

    def __init__(self, numel: int, n_models: int, topk: float):
        self.numel, self.topk = numel, topk
        self.sel = TopKThreshold(0) if 0 < topk < 1 else None
        self.nonzero = 0
        self.threshold: float | None = None
        self.ties: int | None = None  # how many entries equal to the threshold are kept
        self.squares = [0.0] * n_models
        self.passes = 3 if self.sel is not None else 1
        self.budget = [None]
        self.none = topk <= 0  # nothing selected

    def _weights_pass(self) -> int:
        return self.passes - 1

    def select(self, tvs: torch.Tensor, budget: list) -> torch.Tensor:
        """The piece's task vectors with the unselected entries zeroed (``budget``: the ties
        still to keep, counted down in order)."""
        if self.none:
            return tvs * 0
        if self.sel is None:
            return tvs
        var = torch.var(tvs, dim=0, unbiased=False).abs().float()
        mask = var > self.threshold
        if budget[0] is not None:
            eq = (var == self.threshold).reshape(-1)
            idx = eq.nonzero().reshape(-1)
            take = idx[:budget[0]]
            budget[0] -= take.numel()
            mask.reshape(-1)[take] = True
        else:
            mask |= var == self.threshold
        return tvs * mask.to(tvs.dtype).unsqueeze(0)

    def update(self, pass_no, base, tensors, deltas=False):
        tvs = torch.stack([x if deltas else x - base for x in tensors], dim=0)
        if pass_no < self._weights_pass():
            var = torch.var(tvs, dim=0, unbiased=False)
            if pass_no == 0:
                self.nonzero += int(torch.count_nonzero(var))
            self.sel.update(pass_no, var)
            return
        tvs = self.select(tvs, self.budget)
        for i in range(tvs.shape[0]):
            self.squares[i] += float(tvs[i].double().square().sum())

    def end_pass(self, pass_no):
        if pass_no >= self._weights_pass():
            return
        if pass_no == 0:
            self.sel.k = int(self.nonzero * self.topk)
            if self.sel.k == 0:  # as select_mask: k == 0 selects nothing
                self.none, self.sel, self.passes = True, None, 2
                return
        self.sel.end_pass(pass_no)
        if pass_no == 1:
            self.threshold = self.sel.value()
            above, equal = self.sel.n_above, self.sel.n_equal
            self.ties = self.sel.k - above if above + equal > self.sel.k else None
            self.budget = [self.ties]

    def weights(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Each task vector's weight: its mean square over the sum of them."""
        w = torch.tensor([q / self.numel for q in self.squares], dtype=torch.float64)
        return normalized(w.to(dtype).to(device))

    def result(self):
        return {"sums": self, "ties": [self.ties]}
