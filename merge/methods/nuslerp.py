"""NuSLERP: spherical interpolation between two models (or their task vectors over a
base), with the interpolation factor from two weights, over the whole tensor or row by
row (mergekit's ``nuslerp``)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register, whole_rows
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_number
from zoo.merge.methods.streamed import Gram, Rows, large


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) along ``dim`` (each vector
    along it separately), or of the flattened tensors; linear where they are colinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    out = interpolate(t, v0, v1, cos, eps)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, cos: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The spherical interpolation of v0 and v1 given the cosine of their angle (``cos``
    broadcast over them: one per vector); linear where they are colinear."""
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def streamed_cos(gram: list[list], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``nuslerp``'s clamped cosine from streamed dot products (floats, or per-column
    vectors): the norms clamped to 1e-7 as there."""
    g = [[torch.as_tensor(x, dtype=torch.float64) for x in row] for row in gram]
    cos = g[0][1] / (g[0][0].sqrt().clamp(min=1e-7) * g[1][1].sqrt().clamp(min=1e-7))
    return cos.to(dtype).to(device).clamp(-1, 1).reshape(1, -1)


@register
class NuSlerp(MergeMethod):
    """NuSLERP: spherical interpolation of two models, t = w₂ / (w₁ + w₂); of task vectors given a base.

    ``nuslerp_flatten`` (the default) interpolates the flattened tensors; otherwise each
    row (``nuslerp_row_wise``: each column) is interpolated on its own.
    """

    name = "nuslerp"
    reference = 'Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985 (as mergekit\'s nuslerp)'
    needs_base = False
    min_models = 2
    max_models = 2
    parameters = {"nuslerp_row_wise": Param(False, check_bool, "interpolate column vectors (dim 0) instead of rows"),
                  "nuslerp_flatten": Param(True, check_bool, "interpolate the flattened tensors as one vector")}
    model_parameters = {"weight": Param(REQUIRED, check_number, "this model's weight; t = w2 / (w1 + w2)")}

    def streams(self, name, shape, options):
        # flattened: two norms and a dot product, then elementwise; rows: in blocks of
        # whole rows; columns: each column's norms and dot product, then elementwise
        flatten = self.option(options, "nuslerp_flatten")
        return large(shape) and (flatten or len(shape) == 2)

    def piece_elems(self, shape, options, chunk):
        return chunk if self.option(options, "nuslerp_flatten") else whole_rows(shape, chunk)

    def tensor_collector(self, shape, params, options, ctx):
        def vectors(base, tensors):
            return tensors if base is None else [tensors[0] - base, tensors[1] - base]

        if self.option(options, "nuslerp_flatten"):
            return Gram(vectors)
        if self.option(options, "nuslerp_row_wise"):
            return Gram(vectors, cols=shape[-1])
        return Rows(shape[-1])

    def merge(self, base, tensors, params, options, ctx):
        w = [self.model_option(p, "weight") for p in params]
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        dim = 0 if self.option(options, "nuslerp_row_wise") else -1
        flatten = self.option(options, "nuslerp_flatten")
        if ctx.stats is not None:  # a piece of a streamed tensor
            return self.merge_piece(t, base, tensors, ctx.stats)
        if base is None:
            return nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=flatten)
        return base + nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=flatten)

    @staticmethod
    def merge_piece(t: float, base: "torch.Tensor | None", tensors: list[torch.Tensor],
                    stats: dict) -> torch.Tensor:
        """One piece of a streamed tensor: flattened or by columns with the streamed
        cosines, or a block of whole rows as it is."""
        v0, v1 = tensors if base is None else (tensors[0] - base, tensors[1] - base)
        if "rows" in stats:
            cols = stats["rows"]
            out = nuslerp(t, v0.view(-1, cols), v1.view(-1, cols)).reshape(-1)
        elif isinstance(stats["gram"][0][0], float):
            out = interpolate(t, v0, v1, streamed_cos(stats["gram"], v0.dtype, v0.device).reshape(1))
        else:
            cols = stats["gram"][0][0].numel()
            cos = streamed_cos(stats["gram"], v0.dtype, v0.device)
            out = interpolate(t, v0.view(-1, cols), v1.view(-1, cols), cos).reshape(-1)
        return out if base is None else base + out

