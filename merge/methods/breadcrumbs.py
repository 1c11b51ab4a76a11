"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries,
then task arithmetic."""

from __future__ import annotations

from zoo.merge.methods.base import register
from zoo.merge.methods.params import REQUIRED, Param, check_density, check_number, check_unit
from zoo.merge.methods.sparsify import trim_outliers
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

    def sparsify(self, delta, index, params, options, ctx):
        return trim_outliers(delta, self.model_option(params, "density"), self.model_option(params, "gamma"),
                             self.option(options, "rescale"))
