"""The learned merges as entries of the merge-method registry, so recipes, ``zoo merge
--method`` and parameter checks treat them like any other method.

They do not merge tensor by tensor: ``merge.run`` hands them to
``merge.learned.pipeline``, which runs the model on each task's data.
"""

from __future__ import annotations

import re
from typing import Any

from zoo.merge.methods import MergeMethod, Param, _bool, _density, _number, register
from zoo.merge.learned.objectives import OBJECTIVES


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


def _tau(v: Any) -> str | None:
    return _number(v) or (None if 0 < v <= 1 else "must be in (0, 1]: the confidence an expert needs for its label "
                                                    "to count")


def _trainable(v: Any) -> str | None:
    from zoo.merge.learned.parity import TRAINABLE

    parts = [x.strip() for x in str(v).split(",")] if isinstance(v, str) else []
    return None if parts and all(x in TRAINABLE for x in parts) else \
        f"must be one or more of {', '.join(TRAINABLE)}, comma-separated"


@register
class Parity(LearnedMethod):
    """Parity distillation (after MPA): the experts label their own tasks' unlabeled
    pools; the merge trains only where an expert is reliable and the merge disagrees,
    re-selecting those samples each round (MPA, arXiv 2509.16633, adapted to merging)."""

    name = "parity"
    parameters = {
        "start": Param("task_arithmetic", _string, "the merge to start from: task_arithmetic, ties (with this "
                                                   "recipe's weights and densities) or a registered merge"),
        "train": Param("coefficients", _trainable, "what trains: coefficients, mask, params (comma-separated)"),
        "coefficients": Param("layer", _choice("task", "layer"), "coefficient scope when they train"),
        "mask": Param(".*", _regex, "train mask: regex of the masked tensors (a Concrete start keeps its own)"),
        "temperature": Param(0.5, _positive, "Concrete (RelaxedBernoulli) temperature"),
        "params": Param(r"norm|\.bias$", _regex, "train params: regex of the tensors that get a trained offset"),
        "tau": Param(0.9, _tau, "reliability: the expert's confidence at least tau"),
        "view": Param("auto", _choice("auto", "shift", "noise", "drop", "none"),
                      "second weak view for the reliability check (auto: noise on float inputs, drop "
                      "tokens; shift: move images by a pixel)"),
        "view_strength": Param(0.1, _positive, "noise std as a fraction of the input's, or the dropped token fraction"),
        "rounds": Param(3, _positive_int, "identify-and-level rounds"),
        "steps": Param(100, _positive_int, "optimisation steps per round"),
        "keep": Param("best", _choice("best", "last"), "which round's merge to keep: best (the least average "
                                                        "disagreement with the experts on the pools; label-free) "
                                                        "or last"),
        "lr": Param(1e-2, _positive, "Adam learning rate"),
        "batch_size": Param(16, _positive_int, "parity samples per task per step (and as many agreeing ones)"),
        "kl_weight": Param(0.0, _number, "weight of T²·KL(expert ‖ merged) on parity samples"),
        "kl_temperature": Param(2.0, _positive, "the temperature T of that KL"),
        "agree_weight": Param(1.0, _number, "weight of KL(expert ‖ merged) on reliable samples that agree"),
        "split": Param(None, _string, "which split of a registry task is the unlabeled pool (default train)"),
        "eval_split": Param("test", _string, "labelled split measured each round, never trained on (none: skip)"),
        "precision": COMMON["precision"],
        "normalize": Param(True, _bool, "start ties: dis-mean (true) or dis-sum (false)"),
    }
    model_parameters = {**MODEL,
                        "teacher": Param(None, _string, "the model that labels this task's pool (default: the "
                                                        "expert itself), e.g. its MergeLock-protected copy"),
                        "weight": Param(0.3, _number, "start task_arithmetic / ties: the expert's weight"),
                        "density": Param(1.0, _density, "start ties: the expert's density")}


LEARNED = {m.name for m in (AdaMerging, ConcreteTA, ConcreteAdaMerging, Parity)}
