"""Merge methods: each one a small class in a registry, working on one tensor at a time.

A method sees the base tensor and one tensor per model, already in the compute dtype
and on the compute device, with each model's parameters resolved for that tensor.
Each method cites its paper; where mergekit has
the same method, parameter names and defaults are mergekit's, so a mergekit recipe
merges the same way here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from zoo.errors import ZooError


@dataclass(frozen=True)
class Param:
    """One parameter: its default and the check its value must pass."""

    default: Any
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


def _number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "must be a number"
    if math.isnan(v) or math.isinf(v):
        return "must be a finite number"
    return None


def _density(v: Any) -> str | None:
    return _number(v) or (None if 0 < v <= 1 else "must be in (0, 1]")


def _unit(v: Any) -> str | None:
    return _number(v) or (None if 0 <= v <= 1 else "must be in [0, 1]")


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _trim_scope(v: Any) -> str | None:
    return None if v in ("per_tensor", "global") else "must be per_tensor or global"


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges."""

    name: str
    seed: int = 0
    # Whole-tensor statistics computed by the engine in a first pass over chunks,
    # e.g. TIES' trim thresholds; None when the method sees the whole tensor.
    stats: dict[str, Any] | None = None
    # True when the input tensors are the engine's scratch buffers, which the method
    # may overwrite (saves an allocation per piece on the hot path).
    scratch: bool = False
    # True when the model tensors already have the base subtracted (task vectors); the
    # engine does this once for methods with ``accepts_deltas``.
    deltas: bool = False

    def generator(self, model_index: int) -> torch.Generator:
        """A CPU generator seeded by (seed, model, tensor name): the same draw whatever
        the order the tensors are merged in, and (drawn on the CPU) whatever the device."""
        digest = hashlib.sha256(f"{self.seed}:{model_index}:{self.name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class MergeMethod:
    """Base class: ``merge`` returns the merged tensor in the compute dtype."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = True
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    parameters: ClassVar[dict[str, Param]] = {}
    model_parameters: ClassVar[dict[str, Param]] = {}
    # True when merge() can run on any slice of a tensor independently, given the
    # statistics from stats_passes(); the engine then streams large tensors in chunks.
    elementwise: ClassVar[bool] = False
    # True for merges learned by running the model (merge.learned); they have no merge().
    learned: ClassVar[bool] = False
    # True when merge() and the stats collectors accept task vectors (ctx.deltas).
    accepts_deltas: ClassVar[bool] = False

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], params: list[dict[str, Any]],
              options: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError

    def stats_collector(self, numel: int, params: list[dict[str, Any]], options: dict[str, Any]) \
            -> "StatsCollector | None":
        """What to gather over a whole tensor before merging it in chunks (None: nothing)."""
        return None

    def model_collector(self, tensors: list[tuple[list[dict[str, Any]], dict[str, Any], int]]) \
            -> "StatsCollector | None":
        """What to gather over all merged tensors together before merging any of them
        (None: nothing). ``tensors`` holds each merged tensor's (per-model parameters,
        options, number of elements); the result reaches merge() as ``ctx.stats``."""
        return None


class StatsCollector:
    """Gathers whole-tensor statistics over chunks, in one or more passes."""

    passes: int = 1

    def update(self, pass_no: int, base: torch.Tensor | None, tensors: list[torch.Tensor],
               deltas: bool = False) -> None:
        """Count one piece of every model (``deltas``: already minus the base)."""
        raise NotImplementedError

    def end_pass(self, pass_no: int) -> None:
        pass

    def result(self) -> dict[str, Any]:
        raise NotImplementedError

    def use_sample(self, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> None:
        """A sample of the inputs (the same entries of each), before the first pass; a
        collector may plan fewer passes with it (``passes`` may change in end_pass)."""

    def gather(self, pieces: Callable[[], Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]],
               deltas: bool = False) -> dict[str, Any]:
        """Run every pass over ``pieces()`` (base, model tensors) and return the result."""
        p = 0
        while p < self.passes:
            for base, tensors in pieces():
                self.update(p, base, tensors, deltas)
            self.end_pass(p)
            p += 1
        return self.result()

    def gather_whole(self, base: torch.Tensor | None, tensors: list[torch.Tensor], deltas: bool = False,
                     slice_elems: int = 1 << 18) -> dict[str, Any]:
        """The result over tensors held whole (flat); by default every pass walks them in
        cache-sized slices."""
        return self.gather(lambda: slices(base, tensors, slice_elems), deltas)


def slices(base: torch.Tensor | None, tensors: list[torch.Tensor], size: int):
    """(base, [models]) of flat tensors held whole, ``size`` elements at a time."""
    for off in range(0, tensors[0].numel(), size):
        yield (base[off:off + size] if base is not None else None), [x[off:off + size] for x in tensors]


METHODS: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ZooError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def validate_params(method: MergeMethod, options: dict[str, Any], per_model: list[dict[str, Any]]) -> None:
    """Refuse unknown parameters and bad values, naming the parameter."""
    for key, value in options.items():
        _check_param(method, method.parameters, "parameter", "global parameters", key, value)
    for params in per_model:
        for key, value in params.items():
            _check_param(method, method.model_parameters, "per-model parameter", "per-model parameters", key, value)


def _check_param(method: MergeMethod, table: dict[str, Param], what: str, listing: str, key: str, value: Any) -> None:
    if key not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ZooError(f"{method.name}: unknown {what} {key!r} ({listing}: {known})")
    p = table[key]
    if p.check and (msg := p.check(value)):
        raise ZooError(f"{method.name}: parameter {key} {msg} (got {value!r})")


# -- sparsification --------------------------------------------------------------------
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
        return _float_of_bits((self.bin << 16) | ((1 << 16) - 1 - i))


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value`` (value > 0)."""
    import numpy as np

    if dtype == torch.bfloat16:  # numpy has no bfloat16: step its bit pattern down by one
        bits = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16) - 1
        return float(bits.view(torch.bfloat16))
    np_dtype = {torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32)
    return float(np.nextafter(np_dtype(value), np_dtype(0)))


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
        return _float_of_bits(self.hi - i)


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The exact k-th largest |x| (1 <= k <= numel) of a tensor held whole: usually one
    counting pass (Bracket, from a strided sample), else two (TopKThreshold). Same
    result as a sort."""
    x = x.detach().reshape(-1)
    n = x.numel()
    bracket = Bracket(x[::max(1, n // SELECT_SAMPLE)], k, n)
    if bracket.usable:
        bracket.update(x)
        if (v := bracket.value()) is not None:
            return v
    sel = TopKThreshold(k)
    for p in (0, 1):
        for off in range(0, n, SELECT_SLICE):
            sel.update(p, x[off:off + SELECT_SLICE])
        sel.end_pass(p)
    return sel.value()


def _float_of_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


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


# -- the task-vector family ----------------------------------------------------------------
class _TaskVectorMerge(MergeMethod):
    """base + lambda * combine(w_i * sparsify(theta_i - base)), as mergekit computes it."""

    consensus: ClassVar[bool] = False
    sparsify: ClassVar[str | None] = None  # magnitude | random | outliers
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def merge(self, base, tensors, params, options, ctx):
        normalize = options.get("normalize", self.default_normalize)
        rescale = options.get("rescale", self.default_rescale)
        lam = options.get("lambda", 1.0)
        if not self.consensus and self.sparsify is None:
            return self._plain(base, tensors, params, normalize, lam, ctx.scratch)
        if ctx.scratch and self.consensus and self.sparsify == "magnitude" and ctx.stats is not None:
            return self._ties_in_place(base, tensors, params, normalize, lam, ctx.stats["thresholds"], ctx.deltas)
        if ctx.deltas and not self.accepts_deltas:
            raise ValueError(f"{self.name} does not take task vectors")
        deltas = []
        thresholds = (ctx.stats or {}).get("thresholds")
        for i, (x, p) in enumerate(zip(tensors, params)):
            d = x if ctx.deltas else x - base
            density = p.get("density", self.model_parameters["density"].default) if "density" in self.model_parameters else 1.0
            if self.sparsify == "magnitude":
                if thresholds is not None and thresholds[i] is None:  # k == 0: nothing survives
                    d = torch.zeros_like(d)
                else:
                    d = trim_magnitude(d, density, thresholds[i] if thresholds is not None else None)
            elif self.sparsify == "outliers":
                d = trim_outliers(d, density, p.get("gamma", 0.01))
            elif self.sparsify == "random":
                d = drop_random(d, density, rescale, ctx.generator(i))
            deltas.append(d)
        stacked = torch.stack(deltas, dim=0)
        weights = torch.tensor([p.get("weight", self.model_parameters["weight"].default) for p in params],
                               dtype=stacked.dtype, device=stacked.device)
        while weights.dim() < stacked.dim():
            weights = weights.unsqueeze(-1)
        weighted = stacked * weights
        if self.consensus:
            mask, divisor = elect_sign(weighted, weights)
            mixed = (weighted * mask).sum(dim=0)
        else:
            mixed = weighted.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        return base + mixed


    def _plain(self, base, tensors, params, normalize, lam, scratch=False):
        """Task arithmetic without a stacked copy: the same float32 operations in the same
        order as stack-multiply-sum (so bit for bit equal to it), in place."""
        weights = [float(p.get("weight", self.model_parameters["weight"].default)) for p in params]
        if scratch:  # overwrite the engine's buffers: no allocation at all
            acc = tensors[0].sub_(base).mul_(weights[0])
            for x, w in zip(tensors[1:], weights[1:]):
                acc.add_(x.sub_(base).mul_(w))
        else:
            acc = torch.sub(tensors[0], base).mul_(weights[0])
            buf = torch.empty_like(acc) if len(tensors) > 1 else None
            for x, w in zip(tensors[1:], weights[1:]):
                acc.add_(torch.sub(x, base, out=buf).mul_(w))
        if normalize:
            divisor = torch.tensor(weights, dtype=acc.dtype).sum()
            if divisor.abs() >= 1e-8:
                acc.div_(divisor.to(acc.device))
        if lam != 1:
            acc.mul_(lam)
        return acc.add_(base)


    def _ties_in_place(self, base, tensors, params, normalize, lam, thresholds, deltas=False):
        """TIES on the engine's scratch buffers with thresholds known: the same result as
        the stacked version above, bit for bit, in fewer passes over memory.

        With s = ±1 the elected sign, an entry of x agrees when x·s > 0, so the agreeing
        sum is s · Σ relu(x·s); negation is exact, so this equals summing the agreeing
        entries themselves in the same order.
        """
        weights = [float(p.get("weight", self.model_parameters["weight"].default)) for p in params]
        for x, w, thr in zip(tensors, weights, thresholds):
            if not deltas:
                x.sub_(base)
            if thr is None:
                x.zero_()
            elif thr > 0:
                # zero |x| < thr in one fused pass: hardshrink zeroes |x| <= lambda, and
                # lambda is the float just below thr
                torch.hardshrink(x, _below(thr, x.dtype), out=x)
            x.mul_(w)
        sign = torch.add(tensors[0], tensors[1]) if len(tensors) > 1 else tensors[0].clone()
        for x in tensors[2:]:
            sign.add_(x)
        sign.ge_(0).mul_(2).sub_(1)  # the elected sign: + where the mass is >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for x, w in zip(tensors, weights):
            x.mul_(sign).clamp_(min=0)  # |x| where x agrees with the elected sign, else 0
            mixed.add_(x)
            if divisor is not None:
                divisor.add_(x.sign_(), alpha=w)
        mixed.mul_(sign)
        if divisor is not None:
            # 0 -> 1, as divisor[divisor == 0] = 1 does: adding the float 0/1 mask is
            # exact and ten times faster than masked_fill_ on CPU
            mixed.div_(divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor))))
        if lam != 1:
            mixed.mul_(lam)
        return mixed.add_(base)


_TV_PARAMS = {
    "normalize": Param(False, _bool, "divide by the sum of the weights (for TIES: dis-mean instead of dis-sum)"),
    "lambda": Param(1.0, _number, "scale the combined task vector"),
}


class _TrimThresholds(StatsCollector):
    """Each model's trim threshold over the whole tensor (TIES): the two radix passes,
    or, given a sample, one bracketed pass and the radix passes only for the models
    whose bracket missed."""

    passes = 2

    def __init__(self, numel: int, densities: list[float]):
        self.n = numel
        self.sel = [TopKThreshold(int(d * numel)) if d < 1 and int(d * numel) > 0 else None for d in densities]
        self.none = [d < 1 and int(d * numel) <= 0 for d in densities]
        self.found: list[float | None] = [None] * len(densities)
        self.brackets: list[Bracket | None] | None = None

    def gather_whole(self, base, tensors, deltas=False, slice_elems=1 << 18):
        if not deltas:
            return super().gather_whole(base, tensors, deltas, slice_elems)
        return {"thresholds": [None if none else (kth_largest_abs(x, s.k) if s is not None else 0.0)
                               for s, none, x in zip(self.sel, self.none, tensors)]}

    def use_sample(self, base, tensors):
        self.brackets = []
        for s, x in zip(self.sel, tensors):
            b = Bracket(x - base if base is not None else x, s.k, self.n) if s is not None else None
            self.brackets.append(b if b is not None and b.usable else None)
        self.passes = 1

    def _radix_pass(self, pass_no: int) -> int | None:
        """The radix pass that ``pass_no`` is (None: the bracketed pass)."""
        if self.brackets is None:
            return pass_no
        return None if pass_no == 0 else pass_no - 1

    def update(self, pass_no, base, tensors, deltas=False):
        q = self._radix_pass(pass_no)
        buf = None
        for i, (s, x) in enumerate(zip(self.sel, tensors)):
            counter = (self.brackets[i] if q is None else s) if self.found[i] is None else None
            if s is None or counter is None:
                continue
            if not deltas:
                x = buf = torch.sub(x, base, out=buf)
            if q is None:
                counter.update(x)
            else:
                counter.update(q, x)

    def end_pass(self, pass_no):
        q = self._radix_pass(pass_no)
        if q is None:
            self.found = [b.value() if b is not None else None for b in self.brackets]
            if any(s is not None and v is None for s, v in zip(self.sel, self.found)):
                self.passes = 3  # the radix select for those
            return
        for s, v in zip(self.sel, self.found):
            if s is not None and v is None:
                s.end_pass(q)

    def result(self):
        return {"thresholds": [None if none else (v if v is not None else (s.value() if s is not None else 0.0))
                               for s, none, v in zip(self.sel, self.none, self.found)]}


@register
class TaskArithmetic(_TaskVectorMerge):
    """theta = theta_0 + lambda * sum_i w_i tau_i; with the default weight 0.3."""

    name = "task_arithmetic"
    elementwise = True
    parameters = _TV_PARAMS
    model_parameters = {"weight": Param(0.3, _number, "scaling of this model's task vector")}


@register
class Ties(_TaskVectorMerge):
    """TIES: trim each task vector to ``density`` by magnitude, elect the sign by mass,
    merge the agreeing entries (normalize=true: dis-mean, false: dis-sum)."""

    name = "ties"
    consensus = True
    sparsify = "magnitude"
    default_normalize = True
    elementwise = True
    accepts_deltas = True

    parameters = {**_TV_PARAMS, "normalize": Param(True, _bool, _TV_PARAMS["normalize"].doc),
                  "rescale": Param(False, _bool),
                  "trim": Param("per_tensor", _trim_scope,
                                "per_tensor: each tensor keeps its top density (mergekit); global: one "
                                "threshold per model over the whole flattened model (the TIES paper)")}

    def stats_collector(self, numel, params, options):
        if options.get("trim", "per_tensor") == "global":
            return None  # thresholds come from model_collector
        densities = [p.get("density", 1.0) for p in params]
        return _TrimThresholds(numel, densities) if any(d < 1 for d in densities) else None

    def model_collector(self, tensors):
        scopes = {o.get("trim", "per_tensor") for _, o, _ in tensors}
        if "global" not in scopes:
            return None
        if len(scopes) > 1:
            raise ZooError("trim: global must apply to every merged tensor; set it once in the global parameters")
        densities = None
        for params, _, _ in tensors:
            d = [p.get("density", 1.0) for p in params]
            if densities is not None and d != densities:
                raise ZooError("trim: global needs one density per model for the whole model; "
                               "drop the per-tensor density filters or use trim: per_tensor")
            densities = d
        if densities is None or all(d >= 1 for d in densities):
            return None
        return _TrimThresholds(sum(n for _, _, n in tensors), densities)
    model_parameters = {"weight": Param(0.3, _number), "density": Param(1.0, _density)}


@register
class DareLinear(_TaskVectorMerge):
    """DARE then task arithmetic: keep each entry with probability ``density``
    (drop probability p = 1 - density), rescale survivors by 1/density."""

    name = "dare_linear"
    sparsify = "random"
    default_rescale = True
    parameters = {**_TV_PARAMS, "rescale": Param(True, _bool)}
    model_parameters = {"weight": Param(0.3, _number), "density": Param(1.0, _density)}


@register
class DareTies(_TaskVectorMerge):
    """DARE then TIES' sign election and disjoint merge."""

    name = "dare_ties"
    sparsify = "random"
    consensus = True
    default_rescale = True
    default_normalize = True
    parameters = {**_TV_PARAMS, "normalize": Param(True, _bool), "rescale": Param(True, _bool)}
    model_parameters = {"weight": Param(0.3, _number), "density": Param(1.0, _density)}


@register
class Breadcrumbs(_TaskVectorMerge):
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest entries of each
    task vector, keeping ``density``, then task arithmetic."""

    name = "breadcrumbs"
    sparsify = "outliers"
    parameters = _TV_PARAMS
    model_parameters = {"weight": Param(0.3, _number), "density": Param(1.0, _density),
                        "gamma": Param(0.01, _unit)}


@register
class Linear(MergeMethod):
    """Weighted average: sum_i w_i theta_i / sum_i w_i (normalize) over the listed models."""

    name = "linear"
    needs_base = False
    elementwise = True
    parameters = {"normalize": Param(True, _bool)}
    model_parameters = {"weight": Param(1.0, _number)}

    def merge(self, base, tensors, params, options, ctx):
        weights = [float(p.get("weight", 1.0)) for p in params]
        out = torch.mul(tensors[0], weights[0])
        for x, w in zip(tensors[1:], weights[1:]):
            out.add_(torch.mul(x, w))
        if options.get("normalize", True):
            out.div_(torch.tensor(weights, dtype=out.dtype).sum().to(out.device))
        return out


@register
class Slerp(MergeMethod):
    """Spherical interpolation from the base (t=0) to the one other model (t=1)."""

    name = "slerp"
    min_models = 1
    max_models = 1
    parameters = {"t": Param(0.5, _unit, "0 gives the base, 1 the other model")}

    DOT_THRESHOLD = 0.9995

    def merge(self, base, tensors, params, options, ctx):
        t = options.get("t", 0.5)
        v0, v1 = base, tensors[0]
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


@register
class ModelStock(MergeMethod):
    """Model Stock: t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the task
    vectors; theta = t * mean(theta_i) + (1 - t) * theta_0."""

    name = "model_stock"
    min_models = 2
    parameters = {"filter_wise": Param(False, _bool, "one cosine per row instead of per tensor")}

    def merge(self, base, tensors, params, options, ctx):
        shape = base.shape
        if options.get("filter_wise", False):
            w0 = base.unsqueeze(0) if base.dim() == 1 else base
            ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
        else:
            w0 = base.reshape(-1)
            ws = [w.reshape(-1) for w in tensors]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i in range(len(offsets)):
            for j in range(i + 1, len(offsets)):
                norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
                cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        t = (n * cos) / (1 + (n - 1) * cos)
        avg = sum(ws) / n
        return (t * avg + (1 - t) * w0).reshape(shape)


# -- the in-memory API: one function per method over state dicts --------------------------
def merge_state_dicts(method: str, base: dict[str, torch.Tensor] | None, models: list[dict[str, torch.Tensor]],
                      model_params: list[dict[str, Any]] | None = None, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, **options: Any) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory, tensor by tensor, with the same code as the streaming
    engine. Tensors only some models have, or of other shapes than the base, are skipped
    (those are task heads). Results are in ``dtype``."""
    m = get_method(method)
    model_params = model_params or [{} for _ in models]
    if len(model_params) != len(models):
        raise ZooError("give one parameter dict per model")
    validate_params(m, options, model_params)
    _check_count(m, len(models))
    if m.needs_base and base is None:
        raise ZooError(f"{method} needs a base model")
    ref = base if base is not None else models[0]
    names = [name for name, b in ref.items()
             if b.is_floating_point() and all(name in sd and sd[name].shape == b.shape for sd in models)]

    def inputs(name: str):
        return (base[name].to(dtype) if base is not None else None), [sd[name].to(dtype) for sd in models]

    collector = m.model_collector([(model_params, options, ref[n].numel()) for n in names])
    stats = collector.gather(lambda: map(inputs, names)) if collector is not None else None
    return {name: m.merge(*inputs(name), model_params, options, TensorContext(name, seed, stats)) for name in names}


def _check_count(m: MergeMethod, n: int) -> None:
    if n < m.min_models:
        raise ZooError(f"{m.name} needs at least {m.min_models} model(s) besides the base, got {n}")
    if m.max_models is not None and n > m.max_models:
        raise ZooError(f"{m.name} takes at most {m.max_models} model(s) besides the base, got {n}")


def task_arithmetic(base, models, weight: float = 0.3, **kw):
    """theta_0 + sum_i weight * (theta_i - theta_0)."""
    return merge_state_dicts("task_arithmetic", base, models, [{"weight": weight} for _ in models], **kw)


def ties(base, models, density: float = 0.2, weight: float = 1.0, **kw):
    """TIES with the paper's trim (density 0.2); ``normalize`` false gives dis-sum."""
    return merge_state_dicts("ties", base, models, [{"weight": weight, "density": density} for _ in models], **kw)


def dare_linear(base, models, density: float = 0.5, weight: float = 0.3, **kw):
    return merge_state_dicts("dare_linear", base, models, [{"weight": weight, "density": density} for _ in models], **kw)


def dare_ties(base, models, density: float = 0.5, weight: float = 1.0, **kw):
    return merge_state_dicts("dare_ties", base, models, [{"weight": weight, "density": density} for _ in models], **kw)


def breadcrumbs(base, models, density: float = 0.9, gamma: float = 0.01, weight: float = 0.3, **kw):
    return merge_state_dicts("breadcrumbs", base, models,
                             [{"weight": weight, "density": density, "gamma": gamma} for _ in models], **kw)


def linear(models, weights: list[float] | None = None, **kw):
    """Weighted average of the models (equal weights by default)."""
    weights = weights or [1.0] * len(models)
    return merge_state_dicts("linear", None, models, [{"weight": w} for w in weights], **kw)


def slerp(base, other, t: float = 0.5, **kw):
    return merge_state_dicts("slerp", base, [other], t=t, **kw)


def model_stock(base, models, **kw):
    return merge_state_dicts("model_stock", base, models, **kw)


# The learned merges register themselves in METHODS (they run through merge.learned).
from zoo.merge.learned import methods as _learned_methods  # noqa: E402,F401
