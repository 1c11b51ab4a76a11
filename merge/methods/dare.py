"""DARE (drop and rescale): keep each task-vector entry with probability ``density``
and rescale the survivors by 1/density, then task arithmetic (dare_linear) or TIES'
sign election and disjoint merge (dare_ties)."""

from __future__ import annotations

from zoo.merge.methods.base import register
from zoo.merge.methods.params import Param, check_bool, check_density, check_number
from zoo.merge.methods.sparsify import drop_random
from zoo.merge.methods.task_arithmetic import TV_PARAMS, WEIGHT_DOC, TaskVectorMerge

DARE_REFERENCE = ('Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a '
                  'Free Lunch", ICML 2024, arXiv 2311.03099')
RESCALE = Param(True, check_bool, "divide the surviving entries by density")
MODEL_PARAMS = {"weight": Param(0.3, check_number, WEIGHT_DOC),
                "density": Param(1.0, check_density, "probability of keeping each entry (1 - drop rate)")}


class Dare(TaskVectorMerge):
    """DARE's random drop as the task-vector sparsifier."""

    reference = DARE_REFERENCE

    def sparsify(self, delta, index, params, options, ctx):
        return drop_random(delta, self.model_option(params, "density"), self.option(options, "rescale"),
                           ctx.generator(index))


@register
class DareLinear(Dare):
    """DARE then task arithmetic: keep each entry with probability ``density``, rescale by 1/density."""

    name = "dare_linear"
    parameters = {**TV_PARAMS, "rescale": RESCALE}
    model_parameters = MODEL_PARAMS


@register
class DareTies(Dare):
    """DARE then TIES' sign election and disjoint merge."""

    name = "dare_ties"
    consensus = True
    parameters = {**TV_PARAMS, "normalize": Param(True, check_bool, TV_PARAMS["normalize"].doc), "rescale": RESCALE}
    model_parameters = MODEL_PARAMS
