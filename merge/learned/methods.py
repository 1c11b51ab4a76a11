"""The learned merges as entries of the merge-method registry, so recipes, ``zoo merge
--method`` and parameter checks treat them like any other method.

They do not merge tensor by tensor: ``merge.run`` hands them to
``merge.learned.pipeline``, which runs the model on each task's data.
"""

from __future__ import annotations

import re
from typing import Any

from ..methods import MergeMethod, Param, _bool, _density, _number, register
from .objectives import OBJECTIVES


def _positive_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be a whole number >= 1"


def _non_negative_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be a whole number >= 0"


def _positive(v: Any) -> str | None:
    return _number(v) or (None if v > 0 else "must be > 0")


def _choice(*options: str):
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"
    return check


def _regex(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a regular expression"
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


COMMON = {
    "objective": Param("entropy", _choice(*OBJECTIVES),
                       "entropy (label-free, the papers') or ce (supervised, on labelled validation data)"),
    "lr": Param(1e-3, _positive, "Adam learning rate"),
    "batch_size": Param(16, _positive_int, "examples per task per step"),
    "split": Param(None, _string, "which split of a registry task to learn from "
                                  "(default: train for entropy, val for ce)"),
    "precision": Param("auto", _choice("auto", "fp32", "bf16"),
                       "forward precision: auto = bf16 autocast on CUDA, fp32 on CPU"),
    "calibrate": Param(False, _bool, "temperature-scale each head on its expert and labelled validation data "
                                     "before learning (uses labels)"),
    "calibration_split": Param(None, _string, "split to calibrate on (default val)"),
}
MODEL = {
    "task": Param(None, _string, "the task this expert serves (default: its registered task)"),
    "data": Param(None, _string, "its task's data: a .safetensors file, a folder of images or a .jsonl file"),
}
COEF = {
    "coefficients": Param("layer", _choice("task", "layer"),
                          "one coefficient per task, or per task and parameter tensor (layer-wise)"),
    "init": Param(0.3, _number, "starting coefficient"),
    "clamp": Param(False, _bool, "clamp coefficients to [0, 1] in the forward"),
}
MASK = {
    "mask": Param(".*", _regex, "regex: which merged tensors get a learned mask (others merge unmasked)"),
    "temperature": Param(0.5, _positive, "Concrete (RelaxedBernoulli) temperature"),
}


class LearnedMethod(MergeMethod):
    """A merge that learns coefficients and/or a mask by running the model."""

    learned = True


@register
class AdaMerging(LearnedMethod):
    """AdaMerging: learn task-wise or layer-wise coefficients by minimising the objective
    (optionally after a TIES pre-step: AdaMerging++)."""

    name = "adamerging"
    parameters = {**COMMON, **COEF, "steps": Param(500, _positive_int, "optimisation steps"),
                  "ties": Param(False, _bool, "AdaMerging++: TIES-trim and sign-elect the task vectors first"),
                  "ties_density": Param(0.2, _density, "TIES pre-step density (K = 20%)")}
    model_parameters = MODEL


@register
class ConcreteTA(LearnedMethod):
    """Concrete task arithmetic: one shared Concrete mask over the task vectors, learned
    with the coefficients fixed at ``init`` (λ = 0.3)."""

    name = "concrete_ta"
    parameters = {**COMMON, **MASK, "init": Param(0.3, _number, "the fixed coefficient λ"),
                  "steps": Param(2000, _positive_int, "optimisation steps")}
    model_parameters = MODEL


@register
class ConcreteAdaMerging(LearnedMethod):
    """Concrete AdaMerging: stage 1 alternates coefficient and mask steps; stage 2 freezes
    one mask draw and runs AdaMerging inside it."""

    name = "concrete_adamerging"
    parameters = {**COMMON, **COEF, **MASK,
                  "steps": Param(1000, _positive_int, "stage-1 (mask) steps"),
                  "stage2_steps": Param(1000, _non_negative_int, "stage-2 (AdaMerging in the frozen mask) steps"),
                  "inner_lr": Param(1.0, _positive, "stage-1 inner learning rate of the coefficients")}
    model_parameters = MODEL


LEARNED = {m.name for m in (AdaMerging, ConcreteTA, ConcreteAdaMerging)}
