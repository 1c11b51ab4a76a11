"""The sparsifiers of the task-vector family: magnitude trim (TIES), outlier trim
(Model Breadcrumbs), random drop (DARE), and TIES' sign election."""

from __future__ import annotations

import torch

from zoo.merge.methods.select import kth_largest_abs


def trim_magnitude(delta: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (ties kept).

    ``threshold`` is the k-th largest magnitude when the caller computed it over the
    whole tensor (chunked merges); otherwise it is computed here.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    if threshold is None:
        k = int(density * delta.numel())
        if k <= 0:
            return torch.zeros_like(delta)
        threshold = kth_largest_abs(delta, k)
    return delta * (delta.abs() >= threshold)


def elect_sign(weighted: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' sign election over stacked weighted task vectors (models first): which
    entries agree with the sign of their summed mass, and per entry the sum of the
    agreeing models' weights (1 where none agree), dis-mean's divisor."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    mask = weighted.sign() == majority
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mask, divisor


def trim_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries, then the smallest,
    so that a ``density`` fraction remains."""
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    a = delta.abs()
    mask = torch.ones_like(a, dtype=torch.bool)
    if n_bot > 0:
        mask &= a > a.flatten().kthvalue(n_bot).values
    if n_top > 0:
        mask &= a < kth_largest_abs(delta, n_top)
    return delta * mask


def drop_random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, then rescale by 1/density."""
    if density >= 1:
        return delta
    # drawn on the CPU: CUDA's generator gives other numbers for the same seed
    keep = (torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density).to(delta.device)
    out = delta * keep
    return out / density if rescale else out
