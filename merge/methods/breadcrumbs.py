"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries,
then task arithmetic."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import StatsCollector, register
from zoo.merge.methods.params import REQUIRED, Param, check_density, check_number, check_unit
from zoo.merge.methods.select import TopKThreshold
from zoo.merge.methods.sparsify import trim_outliers
from zoo.merge.methods.streamed import large, rescaled
from zoo.merge.methods.task_arithmetic import TV_PARAMS, WEIGHT_DOC, TaskVectorMerge


@register
class Breadcrumbs(TaskVectorMerge):
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest entries of each task vector, then add.

    Each task vector keeps a ``density`` fraction of its entries.
    """

    name = "breadcrumbs"
    reference = ('Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", '
                 'ECCV 2024, arXiv 2312.06795')
    parameters = TV_PARAMS
    model_parameters = {"weight": Param(REQUIRED, check_number, WEIGHT_DOC),
                        "density": Param(1.0, check_density, "fraction of the task vector kept"),
                        "gamma": Param(0.01, check_unit, "fraction of the largest entries dropped as outliers")}

    def streams(self, name, shape, options):
        return large(shape)  # the two cut-offs in two radix passes (and the L1 sums in one)

    def stats_collector(self, numel, params, options):
        return OutlierCuts(numel, [(self.model_option(p, "density"), self.model_option(p, "gamma")) for p in params],
                           self.option(options, "rescale"))

    def sparsify(self, delta, index, params, options, ctx):
        if ctx.stats is not None:  # a piece of a streamed tensor
            cut = ctx.stats["cuts"][index]
            if cut is None:
                return delta
            masked = delta * cut.mask(delta, ctx.stats["runs"][index]).to(delta.device)
            l1 = ctx.stats["l1"]
            return rescaled(masked, *l1[index]) if l1 is not None else masked
        return trim_outliers(delta, self.model_option(params, "density"), self.model_option(params, "gamma"),
                             self.option(options, "rescale"))


class TieRun:
    """The entries equal to a cut-off value, met in order over a streamed tensor: the
    first ``skip`` are dropped, the next ``take`` kept, the rest dropped."""

    def __init__(self, value: float, skip: int, take: int):
        self.value, self.skip, self.take = value, skip, take
        self.seen = 0

    def keep(self, mag: torch.Tensor, mask: torch.Tensor) -> None:
        """Set ``mask`` (flat, bool) where this piece's entries equal to the value are kept."""
        where = (mag == self.value).nonzero().reshape(-1)
        order = torch.arange(self.seen, self.seen + where.numel(), device=where.device)
        self.seen += where.numel()
        mask[where[(order >= self.skip) & (order < self.skip + self.take)]] = True


class Cut:
    """One task vector's kept range of magnitudes, from its two order statistics: the
    ``keep`` entries of ascending rank n_bot .. n_bot + keep - 1, as Breadcrumbs keeps
    them. Entries strictly inside the range are kept; of those equal to a cut-off value,
    the ones in range by rank are the ones kept, the first in order (a whole-tensor sort's
    order among ties is out of reach while streaming): still exactly ``keep``."""

    def __init__(self, n: int, density: float, gamma: float):
        self.keep = int(density * n)
        n_top = int(gamma * n)
        n_bot = max(0, n - self.keep - n_top)
        # descending ranks (1 = largest) k_hi .. k_lo are kept
        self.k_hi, self.k_lo = n - n_bot - self.keep + 1, n - n_bot
        self.hi = TopKThreshold(self.k_hi) if self.keep > 0 else None
        self.lo = TopKThreshold(self.k_lo) if self.keep > 0 else None
        self.v_hi = self.v_lo = 0.0
        self.plan: list[tuple[float, int, int]] = []

    def update(self, pass_no: int, delta: torch.Tensor) -> None:
        if self.hi is not None:
            self.hi.update(pass_no, delta)
            self.lo.update(pass_no, delta)

    def end_pass(self, pass_no: int) -> None:
        if self.hi is None:
            return
        self.hi.end_pass(pass_no)
        self.lo.end_pass(pass_no)
        if pass_no == 1:
            self.v_hi, self.v_lo = self.hi.value(), self.lo.value()
            skip = self.k_hi - 1 - self.hi.n_above  # ties at the top cut-off that rank above the range
            if self.v_hi == self.v_lo:
                self.plan = [(self.v_hi, skip, self.keep)]
            else:
                self.plan = [(self.v_hi, skip, self.hi.n_equal), (self.v_lo, 0, self.k_lo - self.lo.n_above)]

    def runs(self) -> list[TieRun]:
        """Fresh tie counters for one walk over the tensor."""
        return [TieRun(*p) for p in self.plan]

    def mask(self, delta: torch.Tensor, runs: list[TieRun]) -> torch.Tensor:
        """The kept entries of a piece (``runs``: this walk's tie counters)."""
        if self.hi is None:
            return torch.zeros_like(delta, dtype=torch.bool)
        mag = delta.detach().abs().reshape(-1).float()
        mask = (mag > self.v_lo) & (mag < self.v_hi)
        for run in runs:
            run.keep(mag, mask)
        return mask.reshape(delta.shape)


class OutlierCuts(StatsCollector):
    """Breadcrumbs' cut-offs over a streamed tensor: each task vector's two order
    statistics in two radix passes, then (``rescale``) a pass for the L1 sums."""

    def __init__(self, numel: int, settings: list[tuple[float, float]], rescale: bool):
        self.cuts = [Cut(numel, d, g) if d < 1 else None for d, g in settings]
        self.rescale = rescale
        self.passes = 3 if rescale else 2
        self.l1 = [[0.0, 0.0] for _ in settings]
        self.walk: list[list[TieRun]] = []

    def update(self, pass_no, base, tensors, deltas=False):
        for i, (cut, x) in enumerate(zip(self.cuts, tensors)):
            delta = x if deltas else x - base
            if pass_no < 2:
                if cut is not None:
                    cut.update(pass_no, delta)
                continue
            masked = delta if cut is None else delta * cut.mask(delta, self.walk[i])
            self.l1[i][0] += float(delta.abs().sum(dtype=torch.float64))
            self.l1[i][1] += float(masked.abs().sum(dtype=torch.float64))

    def end_pass(self, pass_no):
        if pass_no < 2:
            for cut in self.cuts:
                if cut is not None:
                    cut.end_pass(pass_no)
        if pass_no == 1:
            self.walk = [c.runs() if c is not None else [] for c in self.cuts]

    def result(self):
        return {"cuts": self.cuts, "runs": [c.runs() if c is not None else [] for c in self.cuts],
                "l1": [tuple(x) for x in self.l1] if self.rescale else None}
