"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit
hypersphere, scaled by their mean norm (mergekit's ``karcher``)."""

from __future__ import annotations

import math

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import Param, check_positive, check_positive_int
from zoo.merge.methods.streamed import Gram, large


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of the unit directions (fixed-point iteration, at most
    ``max_iter`` steps, stopping when the tangent step is below ``tol``), times
    sum_i alpha_i |x_i|; norms in float32 (float64 for float64 inputs), as mergekit."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(dtype))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for alpha, u in zip(a, us):
        mean += alpha * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = us[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(dtype))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        unorm = torch.linalg.vector_norm(mean.to(dtype))
        if unorm.item() > tol:
            mean = (mean / unorm).to(mean.dtype)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return scale * mean


def karcher_coefficients(gram: list[list[float]], alphas: list[float], max_iter: int = 10,
                         tol: float = 1e-5) -> list[float]:
    """``karcher_mean`` from the inputs' dot products alone: the mean stays in the span of
    the unit directions (it starts as their weighted mean; each step adds a tangent made
    of them), so the iteration runs on its coefficients over them, in float64. Returns
    c with karcher_mean = sum_i c_i x_i."""
    n = len(alphas)
    if n == 1:
        return [1.0]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}
    units = [[gram[i][j] / (norms[i] * norms[j]) if i in a and j in a else 0.0 for j in range(n)] for i in range(n)]

    def dot(p: list[float], q: list[float]) -> float:
        return sum(p[i] * units[i][j] * q[j] for i in valid for j in valid)

    beta = [a.get(i, 0.0) for i in range(n)]
    mean_norm = math.sqrt(max(dot(beta, beta), 0.0))
    if mean_norm < tol:
        beta = [1.0 if i == valid[0] else 0.0 for i in range(n)]
    else:
        beta = [b / mean_norm for b in beta]
    for _ in range(max_iter):
        gamma = [0.0] * n
        for i in valid:
            d = min(1.0, max(-1.0, sum(units[i][j] * beta[j] for j in valid)))
            theta = math.acos(d)
            if theta < tol:
                continue
            c = a[i] * theta / math.sin(theta)
            gamma[i] += c
            gamma = [g - c * d * b for g, b in zip(gamma, beta)]
        tnorm = math.sqrt(max(dot(gamma, gamma), 0.0))
        if tnorm < tol:
            break
        beta = [math.cos(tnorm) * b + math.sin(tnorm) * g / tnorm for b, g in zip(beta, gamma)]
        unorm = math.sqrt(max(dot(beta, beta), 0.0))
        if unorm > tol:
            beta = [b / unorm for b in beta]
    scale = sum(alpha * nrm for alpha, nrm in zip(alphas, norms))
    return [scale * beta[i] / norms[i] if i in a else 0.0 for i in range(n)]


@register
class Karcher(MergeMethod):
    """Karcher mean: the models' mean direction on the unit sphere (equal weights), times their mean norm.

    As in mergekit, a ``base_model`` is one more input to the mean.
    """

    name = "karcher"
    reference = ('Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977; '
                 'as a model merge, arXiv 2603.04972')
    needs_base = False
    base_is_input = True
    parameters = {"max_iter": Param(10, check_positive_int, "most iterations of the fixed-point update"),
                  "tol": Param(1e-5, check_positive, "stop when the tangent step's norm is below this")}

    def streams(self, name, shape, options):
        return large(shape)  # the inputs' dot products in one pass, then a weighted sum

    def stats_collector(self, numel, params, options):
        return Gram(lambda base, tensors: tensors)

    def merge(self, base, tensors, params, options, ctx):
        # the base, when set, is already among ``tensors`` (base_is_input)
        if ctx.stats is not None:  # a piece of a streamed tensor
            coefs = karcher_coefficients(ctx.stats["gram"], [1.0 / len(tensors)] * len(tensors),
                                         self.option(options, "max_iter"), self.option(options, "tol"))
            acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
            out = torch.zeros_like(tensors[0], dtype=acc)
            for c, x in zip(coefs, tensors):
                if c != 0.0:
                    out.add_(x.to(acc), alpha=c)
            return out.to(tensors[0].dtype)
        return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), self.option(options, "max_iter"),
                            self.option(options, "tol"))
