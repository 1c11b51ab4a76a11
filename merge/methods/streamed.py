"""What the methods with whole-tensor sums share to merge a large tensor in pieces.

Tensors up to ``WHOLE_MAX_ELEMS`` are merged whole, with mergekit's own operations in
mergekit's order, so they come out bit for bit as mergekit writes them. Larger ones
(a 1B model's MLP matrices, embeddings and LM head) stream: the norms and dot products
a method needs are sums over pieces in float64 (``Gram``, or a method's own collector),
then an elementwise pass writes each piece. Those sums are rounded differently from
one sum over the whole tensor, by about one float32 unit in the last place of each
norm, so a streamed tensor may differ from a whole one by an ulp or two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zoo.merge.methods.base import StatsCollector

# Tensors up to this many elements are merged whole (a few float32 copies of 4 MiB);
# larger ones stream in pieces.
WHOLE_MAX_ELEMS = 1 << 20


def large(shape: tuple[int, ...]) -> bool:
    """True for a tensor merged in streamed pieces rather than whole."""
    return math.prod(shape) > WHOLE_MAX_ELEMS


class Gram(StatsCollector):
    """Every dot product of a few whole-tensor vectors, in float64, in one streamed pass:
    ``vectors(base, tensors)`` gives the pieces of the vectors (the same piece of each);
    the result's ``gram`` is the symmetric matrix of their dot products. ``cols`` (rows
    of that many elements, one per piece row) gives a matrix of per-column products
    instead, each entry a float64 vector of ``cols``."""

    passes = 1

    def __init__(self, vectors: Callable[["torch.Tensor | None", list[torch.Tensor]], list[torch.Tensor]],
                 cols: int | None = None):
        self.vectors = vectors
        self.cols = cols
        self.gram: list[list] | None = None

    def update(self, pass_no, base, tensors, deltas=False):
        vs = [v.reshape(-1).double() for v in self.vectors(base, tensors)]
        if self.cols is not None:
            vs = [v.view(-1, self.cols) for v in vs]
        k = len(vs)
        if self.gram is None:
            self.gram = [[0.0] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                d = torch.dot(vs[i], vs[j]) if self.cols is None else (vs[i] * vs[j]).sum(dim=0)
                self.gram[i][j] = self.gram[i][j] + (float(d) if self.cols is None else d)
                self.gram[j][i] = self.gram[i][j]

    def result(self):
        return {"gram": self.gram}


def unit_dot(gram: list[list[float]], i: int, j: int, floor: float) -> float:
    """The dot product of vectors i and j each divided by its norm, where a norm at or
    below ``floor`` counts as 1 (left undivided)."""
    ni, nj = math.sqrt(gram[i][i]), math.sqrt(gram[j][j])
    return gram[i][j] / ((ni if ni > floor else 1.0) * (nj if nj > floor else 1.0))


class Generators:
    """One generator per model for a tensor streamed in pieces: each model's draws go on
    where the last piece left off, so the pieces together draw what one call over the
    whole tensor draws (torch's CPU ``rand`` and ``bernoulli`` consume the generator in
    order, element by element)."""

    def __init__(self, make: Callable[[int], torch.Generator]):
        self.make = make
        self.made: dict[int, torch.Generator] = {}

    def __call__(self, index: int) -> torch.Generator:
        if index not in self.made:
            self.made[index] = self.make(index)
        return self.made[index]


def streamed_sparsify(stats: dict, delta: torch.Tensor, index: int) -> torch.Tensor:
    """Model ``index``'s kept entries of a piece of a streamed tensor (``L1Rescale``'s
    draw, going on with the generator where the last piece left off), rescaled by the
    whole tensor's L1 sums when the method rescales."""
    kept = stats["draw"](delta, index, stats["generators"](index))
    l1 = stats["l1"]
    return rescaled(kept, *l1[index]) if l1 is not None else kept


class L1Rescale(StatsCollector):
    """mergekit's rescale for a random sparsifier over a streamed tensor: one pass draws
    each model's mask piece by piece (``draw(delta, index, generator)`` gives the kept
    entries) and sums |delta| and |kept| in float64; the merge pass then draws the same
    masks again from freshly seeded generators and scales the kept entries by the ratio."""

    passes = 1

    def __init__(self, draw: Callable[[torch.Tensor, int, torch.Generator], torch.Tensor],
                 generator: Callable[[int], torch.Generator], n_models: int, rescale: bool):
        self.draw = draw
        self.gens = Generators(generator)
        self.before = [0.0] * n_models
        self.after = [0.0] * n_models
        self.passes = 1 if rescale else 0
        self.make = generator

    def update(self, pass_no, base, tensors, deltas=False):
        for i, x in enumerate(tensors):
            delta = x if deltas else x - base
            kept = self.draw(delta, i, self.gens(i))
            self.before[i] += float(delta.abs().sum(dtype=torch.float64))
            self.after[i] += float(kept.abs().sum(dtype=torch.float64))

    def result(self):
        return {"generators": Generators(self.make), "draw": self.draw,
                "l1": list(zip(self.before, self.after)) if self.passes else None}


def rescaled(kept: torch.Tensor, before: float, after: float, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` times before / after, as ``sparsify.rescale_l1`` scales a whole tensor
    (the ratio in the tensor's dtype; unscaled when either sum is below ``eps``)."""
    if before < eps or after < eps:
        return kept
    b = torch.tensor(before, dtype=kept.dtype)
    a = torch.tensor(after, dtype=kept.dtype)
    return kept * (b / a).to(kept.device)


class Rows(StatsCollector):
    """No statistics: the length of the rows a piece holds whole (a method that works row by row)."""

    passes = 0

    def __init__(self, cols: int):
        self.cols = cols

    def result(self):
        return {"rows": self.cols}
