"""The sparsifiers of the task-vector family: magnitude trim (TIES), outlier trim
(Model Breadcrumbs), random drop (DARE), TIES' sign election, and mergekit's L1
rescale of what survives.

Each keeps exactly as many entries as mergekit's sparsifier does. Where several
entries tie at the cut-off (common in bfloat16), the ones kept are the ones torch's
sort puts first, the same call on the same values as mergekit makes, so the selection
is mergekit's, bit for bit, on the CPU.
"""

from __future__ import annotations

import torch

from zoo.merge.methods.select import kth_largest_abs_counts


def top_k(delta: torch.Tensor, density: float) -> int:
    """How many entries the magnitude trim keeps: ``max(1, floor(density * n))`` (mergekit:
    a positive density keeps at least one entry)."""
    return max(1, int(density * delta.numel()))


def trim_magnitude(delta: torch.Tensor, density: float, threshold: float | None = None, rescale: bool = False,
                   ties: list[int | None] | None = None, index: int = 0) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude: exactly
    ``top_k`` of them; ``rescale`` then scales the survivors to the task vector's L1 norm.

    ``threshold`` is the k-th largest magnitude when the caller computed it over the
    whole tensor (chunked merges), with ``ties[index]`` the number of entries equal to
    it still to keep, in order (None: keep them all); otherwise it is computed here.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    if threshold is None:
        masked = delta * magnitude_mask(delta, top_k(delta, density))
    else:
        if ties is not None and ties[index] is not None:
            delta = delta.clone()
            drop_extra_ties(delta, threshold, ties, index)
        masked = delta * (delta.abs() >= threshold)
    return rescale_l1(delta, masked) if rescale else masked


SORTED_TIES_MAX = 1 << 20  # elements; larger tensors break ties at the cut-off by position


def magnitude_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of largest magnitude, as a bool mask: the entries above the k-th
    largest, and of those equal to it the ones mergekit's ``argsort`` (on the float32
    magnitudes, on the CPU) puts first. Past ``SORTED_TIES_MAX`` elements a full sort
    costs more than the rest of the merge (bf16 deltas tie at the cut-off in nearly every
    large tensor), so the first ties by position are kept, as a streamed tensor keeps
    them: still exactly k, deterministic."""
    thr, above, equal = kth_largest_abs_counts(delta, k)
    if above + equal == k:  # no tie at the cut-off: the set is unique
        return delta.abs() >= thr
    if delta.numel() > SORTED_TIES_MAX:
        mag = delta.detach().abs()
        mask = mag > thr
        flat, ties = mask.reshape(-1), (mag == thr).reshape(-1).nonzero().reshape(-1)
        flat[ties[: k - above]] = True
        return mask
    order = torch.argsort(delta.detach().abs().reshape(-1).float().cpu(), descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.to(delta.device).reshape(delta.shape)


def keep_top_k_in_place(delta: torch.Tensor, k: int) -> float:
    """The k-th largest magnitude of ``delta`` (flat, contiguous), after zeroing the
    entries equal to it that mergekit's sort would not keep, so that ``|delta| >=
    threshold`` keeps exactly k (a no-op without ties at the cut-off)."""
    thr, above, equal = kth_largest_abs_counts(delta, k)
    if above + equal > k and thr > 0:
        delta.mul_(magnitude_mask(delta, k))
    return thr


def drop_extra_ties(x: torch.Tensor, threshold: float, ties: list[int | None], index: int) -> None:
    """A piece of a tensor streamed in order: zero its entries equal to ``threshold``
    beyond the ``ties[index]`` still to keep (the first ones in order are kept), and
    count down. Only for tensors too large to hold, where mergekit's sort order is out
    of reach: exactly k are kept, the first ties by position."""
    budget = ties[index]
    if budget is None or threshold == 0:
        return
    flat = x.reshape(-1)
    eq = flat.abs() == threshold
    n = int(eq.sum())
    if n <= budget:
        ties[index] = budget - n
        return
    flat[eq.nonzero().reshape(-1)[budget:]] = 0
    ties[index] = 0


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescale: the survivors times sum|delta| / sum|masked|, in the tensor's
    dtype (unscaled when either norm is below ``eps``)."""
    # summed on the CPU, as mergekit sums: a GPU's reduction order would round otherwise
    before = delta.abs().cpu().sum()
    after = masked.abs().cpu().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after).to(masked.device)


def elect_sign(weighted: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' sign election over stacked weighted task vectors (models first): which
    entries agree with the sign of their summed mass, and per entry the sum of the
    agreeing models' weights (1 where none agree), dis-mean's divisor."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    mask = weighted.sign() == majority
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mask, divisor


def trim_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries, then the smallest,
    so that exactly ``floor(density * n)`` remain (fewer top entries are dropped when
    both do not fit). The order is mergekit's: torch's ascending sort of the float32
    magnitudes, on the CPU."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    order = torch.sort(delta.detach().abs().reshape(-1).float().cpu(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot:n_bot + keep]] = True
    masked = delta * mask.to(delta.device).reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def drop_random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; ``rescale`` then scales the
    survivors to the task vector's L1 norm, as mergekit does (about 1/density)."""
    if density >= 1:
        return delta
    # drawn on the CPU: CUDA's generator gives other numbers for the same seed
    keep = (torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density).to(delta.device)
    out = delta * keep
    return rescale_l1(delta, out) if rescale else out
