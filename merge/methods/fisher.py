"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022, arXiv 2111.09832), with FusionBench's parameter names and defaults."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.learned import MODEL
from zoo.merge.methods.params import Param, check_bool, check_positive_int, check_number
from zoo.merge.methods.regmean import STATISTICS_SPLIT, mean, statistics_card, statistics_of


def check_floor(v) -> str | None:
    return check_number(v) or (None if v >= 0 else "must be >= 0")


@register
class Fisher(MergeMethod):
    """Fisher merging: each entry is the experts' mean weighted by their diagonal Fisher on their own tasks.

    theta* = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps), per entry, with F_i
    expert i's label-free diagonal Fisher on its task's pool, eps =
    ``minimal_fisher_weight`` added (FusionBench; the paper floors with a max), c_i = 1/T,
    or with ``normalize_fisher_weight`` c_i proportional to 1 / (||F_i|| + eps), ||F_i||
    the L2 norm of all of expert i's merged Fisher entries. A tensor the model holds as
    a buffer has no Fisher: the mean of the experts' weights.
    """

    name = "fisher"
    reference = ('Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, '
                 'arXiv 2111.09832')
    statistics = "fisher"
    parameters = {
        "num_fisher_examples": Param(256, check_positive_int, "examples of each expert's task pool its Fisher is "
                                                              "estimated on"),
        "minimal_fisher_weight": Param(1e-6, check_floor, "added to every Fisher entry (so an entry no expert "
                                                          "moves gets the plain mean)"),
        "normalize_fisher_weight": Param(True, check_bool, "weigh each expert by 1 / the L2 norm of its Fisher"),
        **STATISTICS_SPLIT,
    }
    model_parameters = MODEL

    def merge(self, base, tensors, params, options, ctx):
        stats = statistics_of(ctx, self.name)
        fishers = stats.tensors(ctx.name)
        if fishers is None:
            return mean(tensors, ctx.scratch).to(base.dtype)
        floor = float(self.option(options, "minimal_fisher_weight"))
        norms = stats.norms if self.option(options, "normalize_fisher_weight") else None
        return fisher_average(tensors, [f.to(base.device) for f in fishers], coefficients(len(tensors), norms, floor),
                              floor).to(base.dtype)

    def card_lines(self, learned):
        return statistics_card(learned, "the Fisher-weighted mean", "the plain mean of the experts' weights "
                                                                    "(no Fisher: buffers)")


def coefficients(t: int, norms: list[float] | None, floor: float) -> list[float]:
    """c_i: 1/T, times (with ``norms``) 1/(||F_i|| + eps) normalised to sum to 1, as FusionBench."""
    if not norms:
        return [1.0 / t] * t
    inv = [1.0 / (n + floor) for n in norms]
    return [(1.0 / t) * x / sum(inv) for x in inv]


def fisher_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor], coefs: list[float],
                   floor: float) -> torch.Tensor:
    """sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps), in the tensors' dtype."""
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, c in zip(tensors, fishers, coefs):
        w = (f.to(x.dtype) + floor).mul_(c)
        num.addcmul_(w, x)
        den.add_(w)
    return num.div_(den)
