"""AdaMerging: learn task-wise or layer-wise merge coefficients by minimising the
prediction entropy on unlabeled inputs (or cross-entropy on labelled ones), optionally
over TIES-trimmed task vectors (AdaMerging++)."""

from __future__ import annotations

import torch

from zoo.merge.learned.train import Loop, adam
from zoo.merge.methods.base import register
from zoo.merge.methods.learned import COEF, COMMON, LearnedMethod
from zoo.merge.methods.params import Param, check_bool, check_density, check_positive_int
from zoo.merge.methods.sparsify import trim_magnitude


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
                  "ties_density": Param(0.2, check_density, "TIES pre-step density (K = 20%)")}

    def directions(self, task_vectors, options):
        if self.option(options, "ties"):
            return ties_prestep(task_vectors, float(self.option(options, "ties_density")))
        return task_vectors

    def fit(self, merger, forward, data, s, report=None):
        loop = Loop(merger, forward, data, s, report)
        opt = adam([merger.weights], s.lr)
        for step in range(1, s.steps + 1):
            loss, value = loop.loss(merger.merged(), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.tick(step, s.steps, value)
        return loop.result()


def ties_prestep(task_vectors: list[dict[str, torch.Tensor]], density: float) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++: trim each task vector to ``density`` per tensor by magnitude, elect
    the sign by mass, and keep in each task vector only the entries that agree."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    for name in task_vectors[0]:
        trimmed = [trim_magnitude(tv[name], density) for tv in task_vectors]
        positive = torch.stack(trimmed).sum(dim=0) >= 0
        for i, t in enumerate(trimmed):
            out[i][name] = t * ((t > 0) == positive) * (t != 0)
    return out
