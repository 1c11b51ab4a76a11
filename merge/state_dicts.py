"""The in-memory API: merge state dicts with the same code as the streaming engine.

``merge_state_dicts(method, base, models, ...)`` runs any tensor method; one function
per method (``task_arithmetic``, ``ties``, ...) names its usual parameters; and
``learn_merge`` runs a learned method on a module the caller brings, with its heads
and data (e.g. a CLIP image encoder with zero-shot heads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.errors import ZooError

from zoo.merge.learned.runtime import Body, make_forward
from zoo.merge.learned.train import Forward, Result, TaskData
from zoo.merge.methods import TensorContext, check_count, get_method, validate_params
from zoo.merge.methods.learned import LearnedMethod


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
    check_count(m, len(models))
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


def _each(models, **given) -> list[dict[str, Any]]:
    """The same per-model parameters for every model; a parameter left as None takes the
    method's own default (its class's table: one set of defaults)."""
    return [{k: v for k, v in given.items() if v is not None} for _ in models]


def task_arithmetic(base, models, weight: float | None = None, **kw):
    """theta_0 + lambda * sum_i weight * (theta_i - theta_0)."""
    return merge_state_dicts("task_arithmetic", base, models, _each(models, weight=weight), **kw)


def ties(base, models, density: float | None = None, weight: float | None = None, **kw):
    """TIES; ``normalize`` false gives dis-sum. The paper trims to density 0.2."""
    return merge_state_dicts("ties", base, models, _each(models, weight=weight, density=density), **kw)


def dare_linear(base, models, density: float | None = None, weight: float | None = None, **kw):
    return merge_state_dicts("dare_linear", base, models, _each(models, weight=weight, density=density), **kw)


def dare_ties(base, models, density: float | None = None, weight: float | None = None, **kw):
    return merge_state_dicts("dare_ties", base, models, _each(models, weight=weight, density=density), **kw)


def breadcrumbs(base, models, density: float | None = None, gamma: float | None = None, weight: float | None = None,
                **kw):
    return merge_state_dicts("breadcrumbs", base, models, _each(models, weight=weight, density=density, gamma=gamma),
                             **kw)


def linear(models, weights: list[float] | None = None, **kw):
    """Weighted average of the models (the method's default weight for each: equal weights)."""
    params = [{"weight": w} for w in weights] if weights is not None else _each(models)
    return merge_state_dicts("linear", None, models, params, **kw)


def slerp(base, other, t: float | None = None, **kw):
    return merge_state_dicts("slerp", base, [other], **({"t": t} if t is not None else {}), **kw)


def model_stock(base, models, **kw):
    return merge_state_dicts("model_stock", base, models, **kw)


def learn_merge(module: nn.Module, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                heads: list[dict[str, torch.Tensor]], data: list[TaskData], method: str = "concrete_ta", *,
                forward: Forward | None = None, device: str | torch.device = "cpu", seed: int = 0,
                autocast: bool = False, **settings: Any) -> Result:
    """Learn a merge of ``experts`` (state dicts named as ``module``'s parameters) over
    ``base``. Task t runs ``module`` with the merged parameters plus ``heads[t]`` on
    ``data[t]``, unless ``forward(t, params, batch) -> logits`` is given. ``settings``
    are the method's global parameters (objective, coefficients, steps, lr, mask,
    batch_size...); what they leave out takes the method's defaults.
    """
    m = get_method(method)
    if not isinstance(m, LearnedMethod) or type(m).fit is LearnedMethod.fit:  # parity: see learned.distill
        raise ZooError(f"learn_merge runs adamerging, concrete_ta or concrete_adamerging, not {method} "
                       "(parity distillation: zoo.merge.learned.distill)")
    validate_params(m, settings, [])
    device = torch.device(device)
    s = m.settings(settings, seed=seed, autocast=autocast)
    names = [n for n in base if base[n].is_floating_point() and all(n in e for e in experts)]
    tvs = [{n: e[n].to(device, torch.float32) - base[n].to(device, torch.float32) for n in names} for e in experts]
    merger = s.merger({n: base[n] for n in names}, m.directions(tvs, settings), device)
    del tvs
    if forward is None:
        module = module.to(device).eval().requires_grad_(False)
        forward = make_forward(Body(module, {}), [{k: v.to(device) for k, v in h.items()} for h in heads])
    return m.fit(merger, forward, data, s)
