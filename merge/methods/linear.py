"""Linear: the weighted average of the models (model soups)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import Param, check_bool, check_number


@register
class Linear(MergeMethod):
    """Weighted average: sum_i w_i theta_i / sum_i w_i (normalize) over the listed models."""

    name = "linear"
    reference = ('Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy '
                 'without increasing inference time", ICML 2022, arXiv 2203.05482')
    needs_base = False
    elementwise = True
    parameters = {"normalize": Param(True, check_bool, "divide by the sum of the weights")}
    model_parameters = {"weight": Param(1.0, check_number, "this model's weight in the average")}

    def merge(self, base, tensors, params, options, ctx):
        weights = [float(self.model_option(p, "weight")) for p in params]
        out = torch.mul(tensors[0], weights[0])
        for x, w in zip(tensors[1:], weights[1:]):
            out.add_(torch.mul(x, w))
        if self.option(options, "normalize"):
            out.div_(torch.tensor(weights, dtype=out.dtype).sum().to(out.device))
        return out
