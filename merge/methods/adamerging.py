"""AdaMerging: learn task-wise or layer-wise merge coefficients by minimising the
prediction entropy on unlabeled inputs (or cross-entropy on labelled ones), optionally
over TIES-trimmed task vectors (AdaMerging++)."""

from __future__ import annotations

import torch

from zoo.errors import ZooError
from zoo.merge.learned.train import Loop, adam
from zoo.merge.methods.base import register
from zoo.merge.methods.learned import COEF, COMMON, LearnedMethod
from zoo.merge.methods.params import Param, check_bool, check_choice, check_density, check_positive_int
from zoo.merge.methods.select import kth_largest_abs
from zoo.merge.methods.sparsify import trim_magnitude

# AdaMerging++'s TIES pre-step: over the whole model (the reference) or each tensor alone
TRIMS = ("global", "per_tensor")


@register
class AdaMerging(LearnedMethod):
    """AdaMerging: learn task-wise or layer-wise coefficients by minimising the objective.

    With ``ties: true`` the task vectors are TIES-trimmed and sign-elected first (AdaMerging++).
    """

    name = "adamerging"
    reference = ('Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024, '
                 'arXiv 2310.02575')
    parameters = {**COMMON, **COEF, "steps": Param(500, check_positive_int, "optimisation steps"),
                  "ties": Param(False, check_bool, "AdaMerging++: TIES-trim and sign-elect the task vectors first"),
                  "ties_density": Param(0.2, check_density, "TIES pre-step density (K = 20%)"),
                  "ties_trim": Param("global", check_choice(*TRIMS),
                                     "TIES pre-step trim: global (each task vector's top density over the whole "
                                     "model, as the reference) or per_tensor")}

    def directions(self, task_vectors, options):
        if self.option(options, "ties"):
            return ties_prestep(task_vectors, float(self.option(options, "ties_density")),
                                str(self.option(options, "ties_trim")))
        return task_vectors

    def recorded(self, options, s):
        if not self.option(options, "ties"):
            return {}
        return {"ties_density": float(self.option(options, "ties_density")),
                "ties_trim": str(self.option(options, "ties_trim"))}

    def start_directions(self, source):
        options = dict(source.global_parameters)
        if options.get("ties") and "ties_trim" not in options and "ties_trim" not in source.learned:
            options["ties_trim"] = "per_tensor"  # merged before the whole-model trim was the default
        return self.directions(source.task_vectors, options), None

    def fit(self, merger, forward, data, s, report=None):
        loop = Loop(merger, forward, data, s, report)
        opt = adam([merger.weights], s.lr)
        for step in range(1, s.steps + 1):
            loss = loop.objective(merger.merged())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = loop.sync.reduce(opt, loss)
            opt.step()
            loop.tick(step, s.steps, loss)
        return loop.result()



def ties_prestep(task_vectors: list[dict[str, torch.Tensor]], density: float,
                 trim: str = "global") -> list[dict[str, torch.Tensor]]:
    """AdaMerging++: trim each task vector by magnitude, elect the sign by mass, and keep
    in each task vector only the entries that agree.

    ``global`` follows the reference (EnnengYang/AdaMerging's TIES utilities, on the
    flattened model; TIES, arXiv 2306.01708): each task vector keeps its entries with
    |x| at least its (int(density·n) + 1)-th largest over all merged tensors together,
    and an entry whose summed mass is exactly 0 takes the majority of the elected signs.
    ``per_tensor`` keeps each tensor's own top int(density·n) (zoo's TIES trim), and a
    zero sum elects +."""
    if trim not in TRIMS:
        raise ZooError(f"ties_trim must be one of {', '.join(TRIMS)}, not {trim!r}")
    if trim == "per_tensor":
        out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
        for name in task_vectors[0]:
            trimmed = [trim_magnitude(tv[name], density) for tv in task_vectors]
            positive = torch.stack(trimmed).sum(dim=0) >= 0
            for i, t in enumerate(trimmed):
                out[i][name] = t * ((t > 0) == positive) * (t != 0)
        return out
    names = list(task_vectors[0])
    trimmed_all: list[dict[str, torch.Tensor]] = []
    for tv in task_vectors:
        if density >= 1:
            trimmed_all.append(dict(tv))
            continue
        flat = torch.cat([tv[n].reshape(-1).float() for n in names])
        k = min(flat.numel(), int(density * flat.numel()) + 1)
        threshold = kth_largest_abs(flat, k)
        del flat
        trimmed_all.append({n: tv[n] * (tv[n].abs() >= threshold) for n in names})
    sums = {n: torch.stack([t[n] for t in trimmed_all]).sum(dim=0) for n in names}
    # the reference's resolve_zero_signs: a zero sum takes the sign of Σ sign(sum) over the model
    majority = sum(torch.sign(x).sum() for x in sums.values()) > 0  # a tie of signs: 0, which keeps negatives
    out = [{} for _ in task_vectors]
    for n in names:
        positive = torch.where(sums[n] == 0, majority, sums[n] > 0)
        for i, t in enumerate(trimmed_all):
            x = t[n]
            out[i][n] = x * torch.where(positive, x > 0, x < 0)
    return out
