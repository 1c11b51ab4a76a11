"""The exact k-th largest |x| of a tensor, as TIES' magnitude trim needs it: a radix
select over float bit patterns (``TopKThreshold``, two counting passes, streamable), a
sampled bracket that usually needs one pass (``Bracket``), and ``kth_largest_abs`` for
a tensor held whole. Every answer equals a sort's.
"""

from __future__ import annotations

import math

import torch


class TopKThreshold:
    """The exact k-th largest |x| of a tensor seen in chunks, in two passes.

    Non-negative float32 values order like their bit patterns, so a radix select on
    the bits finds the value: pass 1 histograms the high 16 bits, pass 2 the low 16
    bits inside the one high bin that holds the k-th value. Same answer as a sort,
    in linear time and a few hundred kB, whatever the chunking.
    """

    def __init__(self, k: int):
        self.k = k
        self.hi: torch.Tensor | None = None  # counts live on the pieces' device until the pass ends
        self.lo: torch.Tensor | None = None
        self.bin = -1
        self.above = 0

    def update(self, pass_no: int, x: torch.Tensor) -> None:
        """Count one piece (``x`` is left as it is)."""
        x = x.detach().reshape(-1)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if pass_no == 0:
            # the high 16 bits of |x|: the odd int16 words of little-endian float32,
            # sign bit cleared; half the memory traffic of shifting int32s
            hi = x.view(torch.int16)[1::2] & 0x7FFF
            counts = torch.bincount(hi, minlength=1 << 15)[: 1 << 15]
            self.hi = counts if self.hi is None else self.hi.add_(counts.to(self.hi.device))
        else:
            # low 16 bits of the values inside the chosen high bin, as bin + 1 (1..65536);
            # everything below goes to 0 and above to 65537, so no compaction is needed
            rel = (x.view(torch.int32) & 0x7FFFFFFF).sub_((self.bin << 16) - 1).clamp_(0, (1 << 16) + 1)
            counts = torch.bincount(rel, minlength=(1 << 16) + 2)[1:(1 << 16) + 1]
            self.lo = counts if self.lo is None else self.lo.add_(counts.to(self.lo.device))

    def end_pass(self, pass_no: int) -> None:
        if pass_no == 0:
            if self.hi is None:
                self.hi = torch.zeros(1 << 15, dtype=torch.int64)
            from_top = self.hi.cpu().flip(0).cumsum(0)
            i = int(torch.searchsorted(from_top, torch.tensor(self.k)))
            self.bin = (1 << 15) - 1 - i
            self.above = int(from_top[i - 1]) if i > 0 else 0

    def value(self) -> float:
        lo = self.lo.cpu() if self.lo is not None else torch.zeros(1 << 16, dtype=torch.int64)
        from_top = lo.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(self.k - self.above)))
        before = int(from_top[i - 1]) if i > 0 else 0
        self.n_above, self.n_equal = self.above + before, int(from_top[i]) - before
        return _float_of_bits((self.bin << 16) | ((1 << 16) - 1 - i))


# Pieces for counting passes over a tensor held whole: large enough that each bincount's
# histogram costs little beside its counting (4M elements: 117 ms against 192 ms for
# the 1B family's 11.5M-element tensors, three models).
SELECT_SLICE = 1 << 22
SELECT_SAMPLE = 1 << 16  # sampled values that bracket the k-th largest (Bracket)
SELECT_MAX_BINS = 1 << 22  # a wider bracket is not worth one pass: the two exact passes


class Bracket:
    """One counting pass that usually finds the exact k-th largest |x| of ``n`` values.

    Non-negative float32s order like their bit patterns. A sample of the values gives the
    k-th value's rank ± ``z`` standard errors, which brackets its bit pattern; the pass
    counts the entries above the bracket and histograms those inside it, and the k-th
    value is read off the histogram. ``value()`` is None where the bracket missed (for a
    representative sample, about once in a million tensors at z = 5) and ``usable`` is
    False where it is too wide to be worth a pass: the two-pass radix select
    (TopKThreshold) answers then. A sample that does not represent the values costs
    time, never exactness.
    """

    def __init__(self, sample: torch.Tensor, k: int, n: int, z: float = 5.0):
        bits = sample.detach().reshape(-1).to(torch.float32).cpu().view(torch.int32) & 0x7FFFFFFF
        m = bits.numel()
        spread = z * math.sqrt(k / n * (1 - k / n) * m) + 1
        # the sample's values of rank k/n·m ∓ spread from the top (kthvalue counts from the bottom)
        self.hi = int(torch.kthvalue(bits, m - max(0, math.floor(k / n * m - spread))).values)
        self.lo = int(torch.kthvalue(bits, m - min(m - 1, math.ceil(k / n * m + spread))).values)
        self.width = self.hi - self.lo + 1  # bins lo..hi as 1..width; 0 below, width + 1 above
        self.usable = self.width + 2 <= SELECT_MAX_BINS
        self.k = k
        self.counts: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Count a piece (``x`` is left as it is)."""
        bits = x.detach().reshape(-1).to(torch.float32).view(torch.int32)
        for off in range(0, bits.numel(), SELECT_SLICE):
            rel = (bits[off:off + SELECT_SLICE] & 0x7FFFFFFF).sub_(self.lo - 1).clamp_(0, self.width + 1)
            counts = torch.bincount(rel, minlength=self.width + 2)
            self.counts = counts if self.counts is None else self.counts.add_(counts)

    def value(self) -> float | None:
        if self.counts is None:
            return None
        counts = self.counts.cpu()
        above = int(counts[self.width + 1])
        from_top = counts[1:self.width + 1].flip(0).cumsum(0)
        if not above < self.k <= above + int(from_top[-1]):
            return None
        i = int(torch.searchsorted(from_top, torch.tensor(self.k - above)))
        before = int(from_top[i - 1]) if i > 0 else 0
        self.n_above, self.n_equal = above + before, int(from_top[i]) - before
        return _float_of_bits(self.hi - i)


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The exact k-th largest |x| (1 <= k <= numel) of a tensor held whole: usually one
    counting pass (Bracket, from a strided sample), else two (TopKThreshold). Same
    result as a sort."""
    return kth_largest_abs_counts(x, k)[0]


def kth_largest_abs_counts(x: torch.Tensor, k: int) -> tuple[float, int, int]:
    """``kth_largest_abs`` and how many |x| are above it and equal to it (ties at the cut-off)."""
    x = x.detach().reshape(-1)
    n = x.numel()
    bracket = Bracket(x[::max(1, n // SELECT_SAMPLE)], k, n)
    if bracket.usable:
        bracket.update(x)
        if (v := bracket.value()) is not None:
            return v, bracket.n_above, bracket.n_equal
    sel = TopKThreshold(k)
    for p in (0, 1):
        for off in range(0, n, SELECT_SLICE):
            sel.update(p, x[off:off + SELECT_SLICE])
        sel.end_pass(p)
    return sel.value(), sel.n_above, sel.n_equal


def _float_of_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))
