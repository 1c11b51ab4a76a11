"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import REQUIRED, Param, check_unit
from zoo.merge.methods.streamed import Gram, large, unit_dot


@register
class Slerp(MergeMethod):
    """Spherical interpolation from the base (t=0) to the one other model (t=1)."""

    name = "slerp"
    reference = 'Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985'
    min_models = 1
    max_models = 1
    parameters = {"t": Param(REQUIRED, check_unit, "0 gives the base, 1 the other model")}

    # Nearly parallel tensors: interpolate linearly (the angle is too small to divide by).
    DOT_THRESHOLD = 0.9995

    def streams(self, name, shape, options):
        return large(shape)  # the norms and the dot product in one pass, then elementwise

    def stats_collector(self, numel, params, options):
        return Gram(lambda base, tensors: [base, tensors[0]])

    def merge(self, base, tensors, params, options, ctx):
        t = self.option(options, "t")
        v0, v1 = base, tensors[0]
        if ctx.stats is not None:  # a piece of a streamed tensor
            dot = unit_dot(ctx.stats["gram"], 0, 1, 1e-8)
        else:
            n0, n1 = v0.norm(), v1.norm()
            u0 = v0 / n0 if n0 > 1e-8 else v0
            u1 = v1 / n1 if n1 > 1e-8 else v1
            dot = float((u0 * u1).sum())
        if abs(dot) > self.DOT_THRESHOLD:
            return (1 - t) * v0 + t * v1
        theta0 = math.acos(dot)
        s0 = math.sin(theta0 - theta0 * t) / math.sin(theta0)
        s1 = math.sin(theta0 * t) / math.sin(theta0)
        return s0 * v0 + s1 * v1
