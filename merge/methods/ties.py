"""TIES-Merging: trim each task vector by magnitude, elect the sign by mass, merge the
agreeing entries; with the exact per-tensor (or whole-model) trim thresholds computed
in streaming passes, and the merge as coefficients over directions for parity starts."""

from __future__ import annotations

from typing import Any

import torch

from zoo.errors import ZooError

from zoo.merge.learned.start import Start
from zoo.merge.methods.base import StatsCollector, register, slices
from zoo.merge.methods.params import REQUIRED, Param, check_bool, check_density, check_number
from zoo.merge.methods.select import Bracket, TopKThreshold
from zoo.merge.methods.sparsify import drop_extra_ties, elect_sign, keep_top_k_in_place, trim_magnitude
from zoo.merge.methods.streamed import large, rescaled
from zoo.merge.methods.task_arithmetic import FULL_PRECISION, TV_PARAMS, WEIGHT_DOC, TaskVectorMerge


def check_trim_scope(v: Any) -> str | None:
    """per_tensor or global."""
    return None if v in ("per_tensor", "global") else "must be per_tensor or global"


@register
class Ties(TaskVectorMerge):
    """TIES: trim task vectors to ``density`` by magnitude, elect signs by mass, merge the agreeing entries.

    normalize=true gives dis-mean, false dis-sum.
    """

    name = "ties"
    reference = ('Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, '
                 'arXiv 2306.01708')
    consensus = True
    elementwise = True
    accepts_deltas = True
    rebuildable = True

    parameters = {**TV_PARAMS, "normalize": Param(True, check_bool, TV_PARAMS["normalize"].doc),
                  "trim": Param("per_tensor", check_trim_scope,
                                "per_tensor: each tensor keeps its top density (mergekit); global: one "
                                "threshold per model over the whole flattened model (the TIES paper)")}
    model_parameters = {"weight": Param(REQUIRED, check_number, WEIGHT_DOC),
                        "density": Param(1.0, check_density, "fraction of the task vector kept, by magnitude")}

    def merge(self, base, tensors, params, options, ctx):
        if ctx.scratch and ctx.stats is not None and base.dtype in FULL_PRECISION \
                and not self.option(options, "rescale"):
            weights = [float(self.model_option(p, "weight")) for p in params]
            return ties_in_place(base, tensors, weights, self.option(options, "normalize"),
                                 self.option(options, "lambda"), ctx.stats["thresholds"], ctx.deltas,
                                 ctx.stats.get("ties"))
        return super().merge(base, tensors, params, options, ctx)

    def streams(self, name, shape, options):
        # rescale needs each task vector's whole L1 norm before and after the trim: a
        # tensor up to 1M entries is merged whole, as mergekit does; a larger one gets
        # a pass for those sums after its thresholds
        return not self.option(options, "rescale") or large(shape)

    def sparsify(self, delta, index, params, options, ctx):
        stats = ctx.stats or {}
        thresholds = stats.get("thresholds")
        l1 = stats.get("l1")
        kept = trim_magnitude(delta, self.model_option(params, "density"),
                              thresholds[index] if thresholds is not None else None,
                              self.option(options, "rescale") and l1 is None, stats.get("ties"), index)
        return rescaled(kept, *l1[index]) if l1 is not None else kept

    def stats_collector(self, numel, params, options):
        if self.option(options, "trim") == "global":
            return None  # thresholds come from model_collector
        densities = [self.model_option(p, "density") for p in params]
        if not any(d < 1 for d in densities):
            return None
        if self.option(options, "rescale"):
            return TrimmedL1(TrimThresholds(numel, densities), densities)
        return TrimThresholds(numel, densities)

    def model_collector(self, tensors):
        scopes = {self.option(o, "trim") for _, o, _ in tensors}
        if "global" not in scopes:
            return None
        if len(scopes) > 1:
            raise ZooError("trim: global must apply to every merged tensor; set it once in the global parameters")
        if any(self.option(o, "rescale") for _, o, _ in tensors):
            raise ZooError("ties: rescale: true works per tensor; it cannot be combined with trim: global")
        densities = None
        for params, _, _ in tensors:
            d = [self.model_option(p, "density") for p in params]
            if densities is not None and d != densities:
                raise ZooError("trim: global needs one density per model for the whole model; "
                               "drop the per-tensor density filters or use trim: per_tensor")
            densities = d
        if densities is None or all(d >= 1 for d in densities):
            return None
        return TrimThresholds(sum(n for _, _, n in tensors), densities)

    def as_start(self, source):
        """Directions d_t (trimmed, sign-agreeing, dis-mean divided) with coefficients lambda * w_t."""
        directions, weights = ties_directions(source.task_vectors, source.params, source.options)
        return Start(directions, weights)


def ties_directions(task_vectors: list[dict[str, torch.Tensor]], params: dict[str, list[dict[str, Any]]],
                    options: dict[str, dict[str, Any]]) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[float]]]:
    """TIES as coefficients over directions: d_t = trimmed tau_t where its weighted sign
    agrees with the elected one, divided by the agreeing weights' sum under dis-mean
    (``normalize``), and coefficient lambda * w_t; sum_t lambda * w_t * d_t is then the
    TIES merge (the same ``elect_sign`` as ``Ties.merge``)."""
    ties = Ties()
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    weights = {}
    for name in task_vectors[0]:
        p, o = params[name], options[name]
        w = [float(ties.model_option(x, "weight")) for x in p]
        trimmed = torch.stack([trim_magnitude(tv[name], float(ties.model_option(x, "density")))
                               for tv, x in zip(task_vectors, p)])
        wt = torch.tensor(w).view(-1, *[1] * (trimmed.dim() - 1))
        agree, divisor = elect_sign(trimmed * wt, wt)
        d = trimmed * agree
        if ties.option(o, "normalize"):
            d = d / divisor
        for t in range(len(task_vectors)):
            out[t][name] = d[t]
        weights[name] = [x * float(ties.option(o, "lambda")) for x in w]
    return out, weights


def ties_in_place(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], normalize: bool,
                  lam: float, thresholds: list[float | None], deltas: bool = False,
                  ties: list[int | None] | None = None) -> torch.Tensor:
    """TIES on the engine's scratch buffers with thresholds known: the same result as
    the stacked formula, bit for bit, in fewer passes over memory.

    With s = ±1 the elected sign, an entry of x agrees when x·s > 0, so the agreeing
    sum is s · Σ relu(x·s); negation is exact, so this equals summing the agreeing
    entries themselves in the same order. ``ties``: as in ``trim_magnitude``, how many
    entries equal to each threshold are still to keep.
    """
    for i, (x, w, thr) in enumerate(zip(tensors, weights, thresholds)):
        if not deltas:
            x.sub_(base)
        if thr is None:
            x.zero_()
        elif thr > 0:
            if ties is not None and ties[i] is not None:
                drop_extra_ties(x, thr, ties, i)
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


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value`` (value > 0)."""
    import numpy as np

    if dtype == torch.bfloat16:  # numpy has no bfloat16: step its bit pattern down by one
        bits = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16) - 1
        return float(bits.view(torch.bfloat16))
    np_dtype = {torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32)
    return float(np.nextafter(np_dtype(value), np_dtype(0)))


class TrimThresholds(StatsCollector):
    """Each model's trim threshold over the whole tensor (TIES): the two radix passes,
    or, given a sample, one bracketed pass and the radix passes only for the models
    whose bracket missed."""

    passes = 2

    def __init__(self, numel: int, densities: list[float]):
        self.n = numel
        # mergekit keeps max(1, floor(density * n)) entries
        self.sel = [TopKThreshold(max(1, int(d * numel))) if d < 1 and numel > 0 else None for d in densities]
        self.found: list[float | None] = [None] * len(densities)
        self.counts: list[tuple[int, int] | None] = [None] * len(densities)  # (above, equal) at the threshold
        self.brackets: list[Bracket | None] | None = None

    def gather_whole(self, base, tensors, deltas=False, slice_elems=1 << 18):
        """Over task vectors held whole (the engine's scratch buffers), the thresholds;
        ties at a threshold beyond k are zeroed in place here, as mergekit's sort drops
        them, so that ``|x| >= threshold`` then keeps exactly k."""
        if not deltas:
            return super().gather_whole(base, tensors, deltas, slice_elems)
        thresholds = []
        for s, x in zip(self.sel, tensors):
            if s is None:
                thresholds.append(0.0)
                continue
            thresholds.append(keep_top_k_in_place(x, s.k))
        return {"thresholds": thresholds}

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
            self.counts = [(b.n_above, b.n_equal) if v is not None else None
                           for b, v in zip(self.brackets, self.found)]
            if any(s is not None and v is None for s, v in zip(self.sel, self.found)):
                self.passes = 3  # the radix select for those
            return
        for s, v in zip(self.sel, self.found):
            if s is not None and v is None:
                s.end_pass(q)

    def result(self):
        thresholds, ties = [], []
        for i, (s, v) in enumerate(zip(self.sel, self.found)):
            if s is not None and v is None:
                v = s.value()
                self.counts[i] = (s.n_above, s.n_equal)
            thresholds.append(v if s is not None else 0.0)
            above, equal = self.counts[i] or (0, 0)
            # how many entries equal to the threshold are kept, in order (None: all of them)
            ties.append(s.k - above if s is not None and above + equal > s.k else None)
        return {"thresholds": thresholds, "ties": ties}


class TrimmedL1(StatsCollector):
    """TIES' thresholds (``TrimThresholds``' passes), then one more pass for ``rescale``:
    each task vector's L1 norm before and after the trim, in float64, so a streamed
    tensor's survivors are scaled by the whole tensor's ratio."""

    def __init__(self, thresholds: TrimThresholds, densities: list[float]):
        self.inner = thresholds
        self.densities = densities
        self.found: dict | None = None  # the inner result, once its passes are done
        self.l1 = [[0.0, 0.0] for _ in densities]

    @property
    def passes(self) -> int:  # the inner passes may grow as they go (a bracket that missed)
        return self.inner.passes + 1

    def use_sample(self, base, tensors):
        self.inner.use_sample(base, tensors)

    def _ties(self) -> list | None:
        """A fresh count of the ties at each threshold still to keep (each walk counts down its own)."""
        ties = self.found.get("ties")
        return list(ties) if ties is not None else None

    def _sums(self, pieces, deltas: bool, before: bool = True, after: bool = True) -> None:
        ties = self._ties() if after else None
        for base, tensors in pieces:
            for i, (x, d) in enumerate(zip(tensors, self.densities)):
                delta = x if deltas else x - base
                if before:
                    self.l1[i][0] += float(delta.abs().sum(dtype=torch.float64))
                if after:
                    kept = trim_magnitude(delta, d, self.found["thresholds"][i], False, ties, i)
                    self.l1[i][1] += float(kept.abs().sum(dtype=torch.float64))

    def gather(self, pieces, deltas=False):
        p = 0
        while p < self.inner.passes:
            for base, tensors in pieces():
                self.inner.update(p, base, tensors, deltas)
            self.inner.end_pass(p)
            p += 1
        self.found = self.inner.result()
        self._sums(pieces(), deltas)
        return self.result()

    def gather_whole(self, base, tensors, deltas=False, slice_elems=1 << 18):
        # the norms before the trim first: held task vectors lose their extra ties in place
        self._sums(slices(base, tensors, slice_elems), deltas, after=False)
        self.found = self.inner.gather_whole(base, tensors, deltas, slice_elems)
        self._sums(slices(base, tensors, slice_elems), deltas, before=False)
        return self.result()

    def result(self):
        return {**self.found, "ties": self._ties(), "l1": [tuple(x) for x in self.l1]}
