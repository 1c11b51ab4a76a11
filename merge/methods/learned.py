"""What the learned merges share: their parameter tables, the way a recipe becomes
``Settings``, the run from a merge plan (task data, task vectors, the loop, the
lineage record), their paragraph of the model card, and their rebuild as a parity
start from the learned coefficients in their lineage.

They do not merge tensor by tensor: ``merge.run`` hands them to
``merge.learning``, which calls ``learn`` with the plan's inputs.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, ClassVar

from zoo.errors import ZooError

from zoo.merge.learned.generative import MAX_NEW_TOKENS, REFRESH_EVERY, is_generative
from zoo.merge.learned.merger import Merger
from zoo.merge.learned.objectives import OBJECTIVES, default_split, supervised
from zoo.merge.learned.start import Start, StartSource
from zoo.merge.learned.train import Forward, Report, Result, Settings, TaskData, calibrated
from zoo.merge.methods.base import MergeMethod
from zoo.merge.methods.params import (Param, check_bool, check_choice, check_number, check_positive,
                                      check_positive_int, check_regex, check_string)

if TYPE_CHECKING:
    import torch

    from zoo.merge.learned.inputs import LearnInputs

COMMON = {
    "objective": Param("entropy", check_choice(*OBJECTIVES),
                       "entropy (label-free, the papers') or ce (supervised, on labelled validation data)"),
    "lr": Param(1e-3, check_positive, "Adam learning rate"),
    "batch_size": Param(16, check_positive_int, "examples per task per step"),
    "split": Param(None, check_string, "which split of a registry task to learn from "
                                       "(default: train for entropy, a generative task's pool; val for ce)"),
    "precision": Param("auto", check_choice("auto", "fp32", "bf16"),
                       "forward precision: auto = bf16 autocast on CUDA, fp32 on CPU"),
    "calibrate": Param(False, check_bool, "temperature-scale each head on its expert and labelled validation data "
                                          "before learning (uses labels)"),
    "calibration_split": Param(None, check_string, "split to calibrate on (default val)"),
    "max_new_tokens": Param(MAX_NEW_TOKENS, check_positive_int,
                            "generative tasks, entropy: new tokens of the merge's greedy continuations at most"),
    "refresh_every": Param(REFRESH_EVERY, check_positive_int,
                           "generative tasks, entropy: steps between continuations by the current merge"),
}
MODEL = {
    "task": Param(None, check_string, "the task this expert serves (default: its registered task)"),
    "data": Param(None, check_string, "its task's data: a .safetensors file, a folder of images or a .jsonl file"),
}
COEF = {
    "coefficients": Param("layer", check_choice("task", "layer"),
                          "one coefficient per task, or per task and parameter tensor (layer-wise)"),
    "init": Param(0.3, check_number, "starting coefficient"),
    "clamp": Param(False, check_bool, "clamp coefficients to [0, 1] in the forward"),
}
MASK = {
    "mask": Param(".*", check_regex, "regex: which merged tensors get a learned mask (others merge unmasked)"),
    "temperature": Param(0.5, check_positive, "Concrete (RelaxedBernoulli) temperature"),
}
_SETTINGS = {f.name for f in fields(Settings)} - {"seed", "autocast"}


class LearnedMethod(MergeMethod):
    """A merge that learns coefficients and/or a mask by running the model."""

    learned = True
    rebuildable = True
    model_parameters = MODEL
    # Settings the method fixes rather than takes as parameters (Concrete TA: the coefficients).
    fixed_settings: ClassVar[dict[str, Any]] = {}

    def settings(self, options: dict[str, Any] | None = None, *, seed: int = 0, autocast: bool = False) -> Settings:
        """The loop's settings: ``options`` (global parameters) over the parameter table's defaults."""
        options = options or {}
        values = {k: self.option(options, k) for k in self.parameters if k in _SETTINGS}
        return Settings(**{**values, **self.fixed_settings}, seed=seed, autocast=autocast)

    def fit(self, merger: Merger, forward: Forward, data: list[TaskData], s: Settings,
            report: Report | None = None) -> Result:
        """The method's optimisation loop over ``merger``; returns the final merge."""
        raise NotImplementedError

    def directions(self, task_vectors: list[dict[str, "torch.Tensor"]],
                   options: dict[str, Any]) -> list[dict[str, "torch.Tensor"]]:
        """What the coefficients scale: the task vectors themselves, unless the method
        prepares them (AdaMerging++)."""
        return task_vectors

    def learn(self, inputs: "LearnInputs") -> tuple[Result, dict[str, Any]]:
        options = inputs.options
        s = self.settings(options, seed=inputs.seed, autocast=inputs.autocast)
        data = inputs.task_data(s.objective, self.option(options, "split"))
        parts = inputs.parts()
        tvs = self.directions(parts.task_vectors, options)
        merger = s.merger(parts.base, tvs, inputs.device)
        del tvs
        parts.task_vectors = []  # the merger holds its own copy
        forward = parts.forward
        temps = None
        generative = is_generative(data)
        if self.option(options, "calibrate"):
            if generative:
                raise ZooError("calibrate temperature-scales classifier heads; a causal LM's tasks have none")
            forward, temps = calibrated(forward, merger,
                                        inputs.task_data("ce", self.option(options, "calibration_split")))
        result = self.fit(merger, forward, data, s, inputs.report)
        split = self.option(options, "split") or default_split(s.objective, generative)
        labels = [split] if supervised(s.objective) else []
        if temps is not None:
            labels.append(self.option(options, "calibration_split") or default_split("ce"))
        # Anything that read a label makes the run supervised, whatever the objective.
        used = {"objective": s.objective, "supervised": bool(labels), "labels_read": list(dict.fromkeys(labels)),
                "split": split, "coefficient_scope": s.coefficients, "clamp": bool(s.clamp),
                "steps": result.steps_done, "seconds": round(result.seconds, 3),
                "tasks": [d.name for d in data], "coefficient_tensors": merger.names}
        if temps is not None:
            used["temperatures"] = temps  # fitted on labelled validation data
            used["calibration_split"] = self.option(options, "calibration_split") or default_split("ce")
        if generative:  # what the tokens were: reference answers (ce) or the merge's own continuations
            used["generative"] = True
            if not supervised(s.objective):
                used.update({"max_new_tokens": s.max_new_tokens, "refresh_every": s.refresh_every,
                             "refreshes": result.refreshes})
        used.update(self.recorded(options, s))
        return result, used

    def recorded(self, options: dict[str, Any], s: Settings) -> dict[str, Any]:
        """The method's own settings the lineage records (e.g. the final mask's kind)."""
        return {}

    def card_lines(self, learned):
        if not learned:
            return []
        generative = learned.get("generative")
        if learned.get("supervised"):
            read = ", ".join(f"`{x}`" for x in learned.get("labels_read") or [learned["split"]])
            what = ("token cross-entropy on reference answers" if generative and learned["objective"] == "ce"
                    else "cross-entropy on labelled data" if learned["objective"] == "ce"
                    else "prediction entropy on unlabeled inputs, with heads temperature-calibrated on labels")
            kind = f"supervised: {what}; labels read from split {read}"
        elif generative:
            kind = ("label-free: next-token entropy over the merge's own greedy continuations of unlabeled "
                    "prompts")
        else:
            kind = "label-free: prediction entropy on unlabeled inputs"
        return [f"Learned by running the model ({learned['steps']} steps) with objective "
                f"`{learned['objective']}` ({kind}, split `{learned['split']}`).", ""]

    def start_directions(self, source: StartSource) -> tuple[list[dict[str, "torch.Tensor"]], str | None]:
        """The directions the learned coefficients scale, and the regex of the masked
        tensors (None: unmasked), as the merge was learned."""
        return self.directions(source.task_vectors, source.global_parameters), None

    def as_start(self, source: StartSource) -> Start:
        """The learned coefficients from the lineage, over the directions they scaled
        (the mask and offsets artifacts are loaded by ``merge.starts``)."""
        directions, mask = self.start_directions(source)
        learned = source.learned
        coefficients, tensors = learned.get("coefficients"), learned.get("coefficient_tensors")
        if not coefficients or not tensors or sorted(tensors) != sorted(source.names):
            raise ZooError(f"start {source.label}: its lineage lacks the learned coefficients of every merged tensor")
        weights = {n: [float(row[k]) for row in coefficients] for k, n in enumerate(tensors)}
        return Start(directions, weights, mask=mask)
