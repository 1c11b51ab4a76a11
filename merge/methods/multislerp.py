"""Multi-SLERP: barycentric interpolation of any number of models (or their task
vectors over a base) on the hypersphere (mergekit's ``multislerp``)."""

from __future__ import annotations

import torch

from zoo.errors import ZooError

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_number, check_positive


@register
class MultiSlerp(MergeMethod):
    """Multi-SLERP: the weighted mean of unit tensors in the tangent space at their mean, mapped back.

    The result's norm is the weighted mean of the norms; with a base, over task vectors.
    """

    name = "multislerp"
    reference = ('Goddard, "Multi-SLERP" (mergekit), after Buss & Fillmore, "Spherical Averages and Applications '
                 'to Spherical Splines and Interpolation", ACM TOG 2001')
    needs_base = False
    min_models = 1
    parameters = {"normalize_weights": Param(True, check_bool, "divide the weights by their sum"),
                  "eps": Param(1e-8, check_positive, "small constant for numerical stability")}
    model_parameters = {"weight": Param(REQUIRED, check_number, "this model's weight")}

    def merge(self, base, tensors, params, options, ctx):
        if len(tensors) == 1:
            return tensors[0]  # as mergekit: one model is returned as it is, base or not
        eps = self.option(options, "eps")
        x = torch.stack(tensors, dim=0)
        if base is not None:
            x -= base
        flat = x.view(x.shape[0], -1)
        w = torch.tensor([self.model_option(p, "weight") for p in params], dtype=x.dtype, device=x.device)
        if self.option(options, "normalize_weights"):
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if x.shape[0] == 2:  # antipodal pair: linear interpolation
                out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
                return out + base if base is not None else out
            raise ZooError(f"multislerp: the weighted sum of the unit tensors of {ctx.name} is zero (antipodal "
                           "tensors with weights that balance out); give other weights")
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
        tnorm = torch.norm(tangent) + eps
        out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
        out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
        return out + base if base is not None else out
