"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import REQUIRED, Param, check_unit
from zoo.merge.methods.streamed import Gram, large, unit_dot

# Norms and the dot product are summed over pieces of this many elements (mergekit's
# bound on full-precision scratch), so the sums round as mergekit's do.
PIECE = 1 << 20


@register
class Slerp(MergeMethod):
    """Spherical interpolation from the base (t=0) to the one other model (t=1).

    The whole tensor is one vector, as in mergekit: t is a float32 value, the
    coefficients and the result are computed in float32 (float64 for float64 inputs)
    and rounded once to the inputs' dtype, and nearly parallel tensors (|cos| > 0.9995)
    are interpolated linearly. Up to 2^20 elements the norms and the cosine are summed
    as mergekit sums them (bit for bit); a larger tensor streams in pieces, its norms
    and cosine summed in float64 in one pass first (within float32 rounding of mergekit's).
    """

    name = "slerp"
    reference = 'Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985'
    min_models = 1
    max_models = 1
    parameters = {"t": Param(REQUIRED, check_unit, "0 gives the base, 1 the other model")}

    # Nearly parallel tensors: interpolate linearly (the angle is too small to divide by).
    DOT_THRESHOLD = 0.9995
    EPS = 1e-8

    def streams(self, name, shape, options):
        return large(shape)  # the norms and the dot product in one pass, then elementwise

    def stats_collector(self, numel, params, options):
        return Gram(lambda base, tensors: [base, tensors[0]])

    def merge(self, base, tensors, params, options, ctx):
        v0, v1 = base, tensors[0]
        dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
        t = torch.tensor([self.option(options, "t")], dtype=dtype, device=a.device).reshape(-1, 1)
        if not a.shape[1]:
            return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
        if ctx.stats is not None:  # a piece of a streamed tensor: the cosine of the whole tensors
            dot = torch.tensor([[unit_dot(ctx.stats["gram"], 0, 1, self.EPS)]], dtype=dtype, device=a.device)
        else:
            dot = self._cosine(a, b, dtype)
        linear = dot.abs() > self.DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        out = torch.empty_like(a)  # the inputs' dtype: each piece is rounded once, as mergekit writes it
        for s in range(0, a.shape[1], PIECE):
            out[:, s:s + PIECE] = coef_a * a[:, s:s + PIECE].to(dtype) + coef_b * b[:, s:s + PIECE].to(dtype)
        return out.reshape(v0.shape)

    def _cosine(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mergekit's cosine: norms of per-piece norms, then per-piece sums of the unit vectors' products."""
        starts = range(0, a.shape[1], PIECE)

        def piece(x: torch.Tensor, s: int) -> torch.Tensor:
            return x[:, s:s + PIECE].to(dtype)

        norm_a = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(piece(a, s), dim=1, keepdim=True) for s in starts]), dim=0)
        norm_b = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(piece(b, s), dim=1, keepdim=True) for s in starts]), dim=0)
        norm_a = torch.where(norm_a > self.EPS, norm_a, 1)
        norm_b = torch.where(norm_b > self.EPS, norm_b, 1)
        return torch.stack([((piece(a, s) / norm_a) * (piece(b, s) / norm_b)).sum(dim=1, keepdim=True)
                            for s in starts]).sum(dim=0).clamp(-1, 1)
