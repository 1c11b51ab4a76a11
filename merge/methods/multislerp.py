"""Multi-SLERP: barycentric interpolation of any number of models (or their task
vectors over a base) on the hypersphere (mergekit's ``multislerp``)."""

from __future__ import annotations

import torch

from zoo.errors import ZooError

from zoo.merge.methods.base import MergeMethod, StatsCollector, register
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_number, check_positive
from zoo.merge.methods.streamed import large


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

    def streams(self, name, shape, options):
        return large(shape)  # four streamed passes of sums (MultiSlerpSums), then elementwise

    def stats_collector(self, numel, params, options):
        return MultiSlerpSums([float(self.model_option(p, "weight")) for p in params],
                              self.option(options, "normalize_weights"), self.option(options, "eps"))

    def merge(self, base, tensors, params, options, ctx):
        if len(tensors) == 1:
            return tensors[0]  # as mergekit: one model is returned as it is, base or not
        if ctx.stats is not None:  # a piece of a streamed tensor
            return ctx.stats["sums"].merge(base, tensors, ctx.name)
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
            raise _antipodal(ctx.name)
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
        tnorm = torch.norm(tangent) + eps
        out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
        out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
        return out + base if base is not None else out


def _antipodal(name: str) -> ZooError:
    return ZooError(f"multislerp: the weighted sum of the unit tensors of {name} is zero (antipodal tensors with "
                    "weights that balance out); give other weights")


class MultiSlerpSums(StatsCollector):
    """Multi-SLERP's whole-tensor sums over a streamed tensor, each a pass in float64:
    the norms of the inputs, the norm of the weighted mean of their units, each unit's
    dot product with that mean, and the norm of the tangent; then ``merge`` maps each
    piece elementwise, with the same operations as the whole-tensor formula."""

    passes = 4

    def __init__(self, weights: list[float], normalize: bool, eps: float):
        self.weights, self.normalize, self.eps = weights, normalize, eps
        self.sums = [0.0] * len(weights)
        self.w: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.mean_norm: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None
        self.tnorm: torch.Tensor | None = None
        self.antipodal = False
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def _flat(self, base, tensors) -> torch.Tensor:
        x = torch.stack(tensors, dim=0)
        if base is not None:
            x -= base
        return x.view(x.shape[0], -1)

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            w = torch.tensor(self.weights, dtype=like.dtype, device=like.device)
            self.w = w / w.sum() if self.normalize else w
        return self.w

    def _scalar(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).sqrt().to(self.dtype).to(self.device)

    def _units_mean(self, flat: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        units = flat / (self.norms + self.eps)
        return units, (units * self._weights(flat).view(-1, 1)).sum(0)

    def update(self, pass_no, base, tensors, deltas=False):
        flat = self._flat(base, tensors)
        self.dtype, self.device = flat.dtype, flat.device
        if pass_no == 0:
            for i in range(flat.shape[0]):
                self.sums[i] += float(flat[i].double().square().sum())
            return
        units, mean = self._units_mean(flat)
        if pass_no == 1:
            self.sums[0] += float(mean.double().square().sum())
            return
        mean = mean / self.mean_norm
        if pass_no == 2:
            d = (units.double() * mean.double()).sum(-1)
            for i in range(flat.shape[0]):
                self.sums[i] += float(d[i])
            return
        tangent = ((units - self.dots * mean) * self._weights(flat).view(-1, 1)).sum(0)
        self.sums[0] += float(tangent.double().square().sum())

    def end_pass(self, pass_no):
        if pass_no == 0:
            self.norms = self._scalar(self.sums).view(-1, 1)
        elif pass_no == 1:
            self.mean_norm = self._scalar(self.sums[:1]).view(())
            if self.mean_norm < self.eps:
                self.antipodal = True
                self.passes = 2
        elif pass_no == 2:
            self.dots = torch.tensor(self.sums, dtype=torch.float64).to(self.dtype).to(self.device).view(-1, 1)
        else:
            self.tnorm = self._scalar(self.sums[:1]).view(()) + self.eps
        self.sums = [0.0] * len(self.sums)

    def result(self):
        return {"sums": self}

    def merge(self, base, tensors, name: str) -> torch.Tensor:
        flat = self._flat(base, tensors)
        w = self._weights(flat)
        if self.antipodal:
            if flat.shape[0] != 2:
                raise _antipodal(name)
            out = flat[0] * w[0] + flat[1] * w[1]
        else:
            units, mean = self._units_mean(flat)
            mean = mean / self.mean_norm
            tangent = ((units - self.dots * mean) * w.view(-1, 1)).sum(0)
            out = mean * torch.cos(self.tnorm) + tangent * (torch.sin(self.tnorm) / self.tnorm)
            out = out * (self.norms.squeeze(-1) * w).sum()
        return out + base if base is not None else out
