"""Task arithmetic, and the task-vector family's shared formula: base + lambda *
combine(w_i * sparsify(theta_i - base)), as mergekit computes it. TIES, DARE and Model
Breadcrumbs subclass ``TaskVectorMerge`` with their own sparsifier and combination."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from zoo.merge.learned.start import Start
from zoo.merge.methods.base import MergeMethod, TensorContext, register
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_number
from zoo.merge.methods.sparsify import elect_sign

# The global parameters every task-vector method has, with mergekit 0.1.5's defaults
# (a method overrides normalize and rescale where mergekit's differ).
TV_PARAMS = {
    "normalize": Param(False, check_bool, "divide by the sum of the weights (for TIES: dis-mean instead of dis-sum)"),
    "lambda": Param(1.0, check_number, "scale the combined task vector"),
    "rescale": Param(False, check_bool, "scale each sparsified task vector back to its L1 norm (mergekit's rescale)"),
    "int8_mask": Param(False, check_bool, "mergekit's memory option for the sign mask; the result is the same"),
}
WEIGHT_DOC = "scaling of this model's task vector"
# Compute dtypes whose in-place, one-rounding-per-step paths give mergekit's bytes; in
# bfloat16 and float16 mergekit sums the stacked task vectors (one rounding per sum),
# so those take the stacked formula.
FULL_PRECISION = (torch.float32, torch.float64)


class TaskVectorMerge(MergeMethod):
    """Base + lambda * combine(w_i * sparsify(theta_i - base)); the stacked formula."""

    # True: TIES' sign election and disjoint merge; False: a plain (weighted) sum.
    consensus: ClassVar[bool] = False

    def sparsify(self, delta: torch.Tensor, index: int, params: dict[str, Any], options: dict[str, Any],
                 ctx: TensorContext) -> torch.Tensor:
        """Model ``index``'s task vector after the method's sparsification (none here)."""
        return delta

    def merge(self, base, tensors, params, options, ctx):
        normalize = self.option(options, "normalize")
        lam = self.option(options, "lambda")
        if ctx.deltas and not self.accepts_deltas:
            raise ValueError(f"{self.name} does not take task vectors")
        deltas = []
        for i, (x, p) in enumerate(zip(tensors, params)):
            deltas.append(self.sparsify(x if ctx.deltas else x - base, i, p, options, ctx))
        stacked = torch.stack(deltas, dim=0)
        weights = torch.tensor([self.model_option(p, "weight") for p in params],
                               dtype=stacked.dtype, device=stacked.device)
        while weights.dim() < stacked.dim():
            weights = weights.unsqueeze(-1)
        weighted = stacked * weights
        if self.consensus:
            mask, divisor = elect_sign(weighted, weights)
            mixed = (weighted * mask).sum(dim=0)
        else:
            mixed = weighted.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        return (base + mixed).to(base.dtype)


def add_task_vectors(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], normalize: bool,
                     lam: float, scratch: bool = False) -> torch.Tensor:
    """base + lambda * sum_i w_i (theta_i - base) [/ sum_i w_i] without a stacked copy: the
    same float32 operations in the same order as stack-multiply-sum (so bit for bit
    equal to it), in place; ``scratch`` lets it overwrite ``tensors``."""
    if scratch:  # overwrite the engine's buffers: no allocation at all
        acc = tensors[0].sub_(base).mul_(weights[0])
        for x, w in zip(tensors[1:], weights[1:]):
            acc.add_(x.sub_(base).mul_(w))
    else:
        acc = torch.sub(tensors[0], base).mul_(weights[0])
        buf = torch.empty_like(acc) if len(tensors) > 1 else None
        for x, w in zip(tensors[1:], weights[1:]):
            acc.add_(torch.sub(x, base, out=buf).mul_(w))
    if normalize:
        divisor = torch.tensor(weights, dtype=acc.dtype).sum()
        if divisor.abs() >= 1e-8:
            acc.div_(divisor.to(acc.device))
    if lam != 1:
        acc.mul_(lam)
    return acc.add_(base)


@register
class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: theta = theta_0 + lambda * sum_i w_i tau_i, with the default weight 0.3."""

    name = "task_arithmetic"
    reference = 'Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv 2212.04089'
    elementwise = True
    rebuildable = True
    parameters = TV_PARAMS
    model_parameters = {"weight": Param(REQUIRED, check_number, WEIGHT_DOC)}

    def merge(self, base, tensors, params, options, ctx):
        if base.dtype not in FULL_PRECISION:
            return super().merge(base, tensors, params, options, ctx)
        weights = [float(self.model_option(p, "weight")) for p in params]
        return add_task_vectors(base, tensors, weights, self.option(options, "normalize"),
                                self.option(options, "lambda"), ctx.scratch)

    def as_start(self, source):
        """The task vectors themselves, each with its weight (normalized, times lambda)."""
        weights = {}
        for n in source.names:
            w = [float(self.model_option(p, "weight")) for p in source.params[n]]
            if self.option(source.options[n], "normalize") and abs(sum(w)) >= 1e-8:
                w = [x / sum(w) for x in w]
            weights[n] = [x * float(self.option(source.options[n], "lambda")) for x in w]
        return Start(source.task_vectors, weights)
