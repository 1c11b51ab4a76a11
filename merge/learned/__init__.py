"""Learned merges: coefficients and Concrete masks fitted by running the model on
unlabeled (or, supervised, labelled) data.

``merge.run`` runs them from recipes (methods ``adamerging``, ``concrete_ta``,
``concrete_adamerging``, ``parity``); ``learn_merge`` and ``distill`` are the API for
research code that brings its own module, heads and data (e.g. a CLIP image encoder
with zero-shot heads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import ParitySettings, distill
from zoo.merge.learned.runtime import Body, make_forward
from zoo.merge.learned.train import Forward, Result, Settings, TaskData, learn

__all__ = ["Forward", "Merger", "ParitySettings", "Result", "Settings", "TaskData", "distill", "learn",
           "learn_merge"]


def learn_merge(module: nn.Module, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                heads: list[dict[str, torch.Tensor]], data: list[TaskData], method: str = "concrete_ta", *,
                forward: Forward | None = None, device: str | torch.device = "cpu", **settings: Any) -> Result:
    """Learn a merge of ``experts`` (state dicts named as ``module``'s parameters) over
    ``base``. Task t runs ``module`` with the merged parameters plus ``heads[t]`` on
    ``data[t]``, unless ``forward(t, params, batch) -> logits`` is given. ``settings``
    are ``Settings`` fields: objective, coefficients, steps, lr, mask, batch_size, seed...
    """
    device = torch.device(device)
    s = Settings(method=method, **settings)
    names = [n for n in base if base[n].is_floating_point() and all(n in e for e in experts)]
    tvs = [{n: e[n].to(device, torch.float32) - base[n].to(device, torch.float32) for n in names} for e in experts]
    merger = s.merger({n: base[n] for n in names}, tvs, device)
    del tvs
    if forward is None:
        module = module.to(device).eval().requires_grad_(False)
        forward = make_forward(Body(module, {}), [{k: v.to(device) for k, v in h.items()} for h in heads])
    return learn(merger, forward, data, s)
