"""DARE (drop and rescale): keep each task-vector entry with probability ``density``
and rescale the survivors to the task vector's L1 norm (mergekit's rescale, about
1/density), then task arithmetic (dare_linear) or TIES' sign election and disjoint
merge (dare_ties). Defaults are mergekit 0.1.5's: rescale true, normalize false."""

from __future__ import annotations

from zoo.merge.methods.base import register
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_density, check_number
from zoo.merge.methods.sparsify import drop_random
from zoo.merge.methods.streamed import L1Rescale, large, streamed_sparsify
from zoo.merge.methods.task_arithmetic import TV_PARAMS, WEIGHT_DOC, TaskVectorMerge

DARE_REFERENCE = ('Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a '
                  'Free Lunch", ICML 2024, arXiv 2311.03099')
RESCALE = Param(True, check_bool, "scale the surviving entries back to the task vector's L1 norm (about 1/density)")
MODEL_PARAMS = {"weight": Param(REQUIRED, check_number, WEIGHT_DOC),
                "density": Param(1.0, check_density, "probability of keeping each entry (1 - drop rate)")}


class Dare(TaskVectorMerge):
    """DARE's random drop as the task-vector sparsifier."""

    reference = DARE_REFERENCE

    def streams(self, name, shape, options):
        return large(shape)  # the L1 sums in a first pass that draws the same masks

    def tensor_collector(self, shape, params, options, ctx):
        densities = [self.model_option(p, "density") for p in params]

        def draw(delta, index, generator):
            return drop_random(delta, densities[index], False, generator)

        return L1Rescale(draw, ctx.generator, len(params), self.option(options, "rescale"))

    def sparsify(self, delta, index, params, options, ctx):
        if ctx.stats is not None:  # a piece of a streamed tensor
            return streamed_sparsify(ctx.stats, delta, index)
        return drop_random(delta, self.model_option(params, "density"), self.option(options, "rescale"),
                           ctx.generator(index))


@register
class DareLinear(Dare):
    """DARE then task arithmetic: keep each entry with probability ``density``, rescale to the L1 norm."""

    name = "dare_linear"
    parameters = {**TV_PARAMS, "rescale": RESCALE}
    model_parameters = MODEL_PARAMS


@register
class DareTies(Dare):
    """DARE then TIES' sign election and disjoint merge."""

    name = "dare_ties"
    consensus = True
    parameters = {**TV_PARAMS, "rescale": RESCALE}  # normalize false, as mergekit since 0.0.4
    model_parameters = MODEL_PARAMS
