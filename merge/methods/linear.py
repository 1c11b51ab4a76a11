"""Linear: the weighted average of the models (model soups), with mergekit's arithmetic."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_number


@register
class Linear(MergeMethod):
    """Weighted average: sum_i w_i theta_i / sum_i w_i (normalize) over the listed models and the base.

    As in mergekit, a ``base_model`` is one more input to the average (it needs a weight
    too), and the sum runs in float32 (float64 for float64 inputs), rounded once to the
    input dtype at the end.
    """

    name = "linear"
    reference = ('Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy '
                 'without increasing inference time", ICML 2022, arXiv 2203.05482')
    needs_base = False
    base_is_input = True
    elementwise = True
    parameters = {"normalize": Param(True, check_bool, "divide by the sum of the weights")}
    model_parameters = {"weight": Param(REQUIRED, check_number,
                                        "this model's weight in the average")}

    def check_tensor(self, name, params, options):
        if self.option(options, "normalize"):
            total = torch.tensor([float(self.model_option(p, "weight")) for p in params], dtype=torch.float32).sum()
            if total == 0:
                return (f"linear: the weights of {name} sum to 0, and normalize divides by that sum; "
                        "give weights that do not cancel, or set normalize: false")
        return None

    def merge(self, base, tensors, params, options, ctx):
        first = tensors[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor([float(self.model_option(p, "weight")) for p in params], dtype=dtype,
                               device=first.device)
        out = torch.zeros_like(first, dtype=dtype)
        for x, w in zip(tensors, weights.unbind(0)):
            out.addcmul_(x, w)
        if self.option(options, "normalize"):
            out.div_(weights.sum())
        return out.to(first.dtype)
