"""Model Stock: interpolate between the base and the models' average by the angle
between their task vectors."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import Param, check_bool


@register
class ModelStock(MergeMethod):
    """Model Stock: theta = t * mean(theta_i) + (1 - t) * theta_0, t from the task vectors' mean cosine.

    t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine of the task vectors.
    """

    name = "model_stock"
    reference = 'Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024, arXiv 2403.19522'
    min_models = 2
    parameters = {"filter_wise": Param(False, check_bool, "one cosine per row instead of per tensor")}

    def merge(self, base, tensors, params, options, ctx):
        shape = base.shape
        if self.option(options, "filter_wise"):
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
