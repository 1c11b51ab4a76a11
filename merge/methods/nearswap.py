"""NearSwap: move the base toward the other model only where they are already close
(mergekit's ``nearswap``)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import REQUIRED, Param, check_number


@register
class NearSwap(MergeMethod):
    """NearSwap: w = clamp(t / |base - other|, 0, 1) per entry; w * other + (1 - w) * base.

    Entries closer than ``t`` take the other model's value; farther ones move by about t.
    """

    name = "nearswap"
    reference = 'alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card, Hugging Face, 2024), as in mergekit'
    min_models = 1
    max_models = 1
    elementwise = True
    parameters = {"t": Param(REQUIRED, check_number, "similarity threshold: entries within t are swapped")}

    def merge(self, base, tensors, params, options, ctx):
        t = self.option(options, "t")
        b = tensors[0]
        w = (t / torch.abs(base - b).clamp(min=1e-6)).clamp(min=0, max=1)
        return w * b + (1 - w) * base
