"""DELLA: drop each task-vector entry at random with a probability that falls with its
magnitude's rank in its row (MagPrune), rescale the survivors to the task vector's L1
norm, then TIES' sign election and disjoint merge (della) or a plain sum
(della_linear). Defaults are mergekit 0.1.5's."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import register, whole_rows
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_density, check_number, check_unit
from zoo.merge.methods.sparsify import rescale_l1
from zoo.merge.methods.streamed import L1Rescale, large, streamed_sparsify
from zoo.merge.methods.task_arithmetic import TV_PARAMS, WEIGHT_DOC, TaskVectorMerge

DELLA_REFERENCE = ('Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based '
                   'Sampling", arXiv 2406.11617')
MODEL_PARAMS = {"weight": Param(REQUIRED, check_number, WEIGHT_DOC),
                "density": Param(1.0, check_density, "mean probability of keeping an entry"),
                "epsilon": Param(0.15, check_unit, "keep probabilities run from density - epsilon (smallest "
                                                   "magnitude in its row) to density + epsilon (largest)")}


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
             generator: torch.Generator) -> torch.Tensor:
    """MagPrune as mergekit computes it: within each row (dim 1; a vector is one row), the
    entry of magnitude rank r (1 = smallest) of n is kept with probability
    density - epsilon + 2 * epsilon * (r - 1) / (n - 1); ``rescale`` then scales the
    survivors to the task vector's L1 norm. Probabilities are in float32 (bfloat16 for
    bfloat16 tensors), drawn on the CPU from ``generator``."""
    if density >= 1:
        return delta
    x, masked = magprune_kept(delta, density, epsilon, generator)
    out = rescale_l1(x, masked) if rescale else masked
    return out.to(delta.dtype).reshape(delta.shape)


def magprune_kept(delta: torch.Tensor, density: float, epsilon: float,
                  generator: torch.Generator) -> "tuple[torch.Tensor, torch.Tensor]":
    """MagPrune's draw without the rescale: the task vector in the work dtype (rows
    along dim 1) and its kept entries."""
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(x.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    # drawn on the CPU: CUDA's generator gives other numbers for the same seed
    mask = torch.bernoulli(probs.cpu(), generator=generator).to(work).to(x.device)
    x = x.to(work)
    return x, x * mask


class Della(TaskVectorMerge):
    """DELLA's MagPrune as the task-vector sparsifier."""

    reference = DELLA_REFERENCE
    model_parameters = MODEL_PARAMS

    def check_tensor(self, name, params, options):
        for i, p in enumerate(params):
            d, e = self.model_option(p, "density"), self.model_option(p, "epsilon")
            if d < 1 and not (d + e < 1 and d - e > 0):
                return (f"{self.name}: model {i} on {name}: density {d} +/- epsilon {e} must stay inside (0, 1), "
                        "as mergekit requires")
        return None

    def streams(self, name, shape, options):
        # 2-D (rows along dim 1) and vectors: in blocks of whole rows, with the L1 sums
        # of a first pass that draws the same masks
        return large(shape) and len(shape) <= 2

    def piece_elems(self, shape, options, chunk):
        return whole_rows(shape, chunk)

    def tensor_collector(self, shape, params, options, ctx):
        cols = shape[-1]
        dens = [(self.model_option(p, "density"), self.model_option(p, "epsilon")) for p in params]

        def draw(delta, index, generator):
            density, epsilon = dens[index]
            if density >= 1:
                return delta
            return magprune_kept(delta.view(-1, cols), density, epsilon, generator)[1].reshape(-1)

        return L1Rescale(draw, ctx.generator, len(params), self.option(options, "rescale"))

    def sparsify(self, delta, index, params, options, ctx):
        if ctx.stats is not None:  # a block of rows of a streamed tensor
            return streamed_sparsify(ctx.stats, delta, index).to(delta.dtype)
        return magprune(delta, self.model_option(params, "density"), self.model_option(params, "epsilon"),
                        self.option(options, "rescale"), ctx.generator(index))


@register
class DellaTies(Della):
    """DELLA: MagPrune (rank-dependent random drop, L1 rescale), then TIES' sign election and disjoint merge."""

    name = "della"
    consensus = True
    parameters = {**TV_PARAMS, "normalize": Param(True, check_bool, TV_PARAMS["normalize"].doc),
                  "rescale": Param(True, check_bool, TV_PARAMS["rescale"].doc)}


@register
class DellaLinear(Della):
    """DELLA's MagPrune (rank-dependent random drop, L1 rescale), then task arithmetic."""

    name = "della_linear"
    parameters = {**TV_PARAMS, "rescale": Param(True, check_bool, TV_PARAMS["rescale"].doc)}
