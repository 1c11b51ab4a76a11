"""mergekit-moe's YAML, read strictly: every key known, every value of its type, and
mergekit's own refusals (``is_bad_config``) as one-line errors before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import MoeConfigError

# mergekit's gate modes: hidden states of the prompts (``hidden`` is the last token's,
# as ``hidden_last``; ``hidden_avg`` the mean over each prompt's tokens), the mean of
# their token embeddings, or random rows (normal, or torch.nn.Linear's uniform init).
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")
DTYPES = ("float32", "float16", "bfloat16", "float64")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
CONFIG_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
               "architecture")


@dataclass(frozen=True)
class ExpertSpec:
    """One dense model whose MLPs become one expert of every layer."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None  # Gaussian noise added to its MLP weights
    residual_scale: float | None = None  # factor on its down_proj (the residual branch)

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.positive_prompts, self.negative_prompts


@dataclass(frozen=True)
class MoeConfig:
    """mergekit-moe's ``MoEMergeConfig``, with its defaults."""

    base_model: str
    experts: tuple[ExpertSpec, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSpec, ...] = ()
    architecture: str | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)  # the YAML as read, for the lineage

    @property
    def needs_prompts(self) -> bool:
        return self.gate_mode not in RANDOM_MODES

    def gated(self) -> tuple[ExpertSpec, ...]:
        """The experts that get a router row: the routed ones, then the shared ones when
        they have prompts or the mode is random (mergekit's rule)."""
        if self.shared_experts and (self.gate_mode in RANDOM_MODES
                                    or any(e.positive_prompts for e in self.shared_experts)):
            return self.experts + self.shared_experts
        return self.experts

    def check(self, allow_all_same: bool = False) -> None:
        """mergekit's refusals (``is_bad_config``), before any model is opened."""
        if self.experts_per_token < 1:
            raise MoeConfigError(f"experts_per_token must be at least 1, not {self.experts_per_token}")
        if len(self.experts) < self.experts_per_token:
            raise MoeConfigError(f"experts_per_token is {self.experts_per_token} but only {len(self.experts)} "
                                 "expert(s) are listed; list at least as many experts")
        if self.shared_experts:
            with_prompts = [bool(e.positive_prompts) for e in self.shared_experts]
            if any(with_prompts) and not all(with_prompts):
                raise MoeConfigError("give positive_prompts for every shared expert or for none")
        if self.needs_prompts:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise MoeConfigError(f"expert {i} ({e.source_model}) has no positive_prompts; gate_mode "
                                         f"{self.gate_mode} builds its router row from them (or use gate_mode: "
                                         "random)")
            first = self.experts[0].prompts()
            if len(self.experts) > 1 and all(e.prompts() == first for e in self.experts[1:]):
                raise MoeConfigError("every expert has the same positive and negative prompts, so the router "
                                     "could not tell them apart; give each expert prompts of its own task")
        if not allow_all_same and len(self.experts) > 1 and \
                all(e.source_model == self.experts[0].source_model for e in self.experts[1:]):
            raise MoeConfigError("every expert is the same model: the MoE would compute exactly what that model "
                                 "does, at more cost (pass --allow-all-same if you will train it further)")


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise MoeConfigError(f"{where} must be a list of strings, not one string (write it as a YAML list)")
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoeConfigError(f"{where} must be a list of strings")
    if any(not p for p in value):
        raise MoeConfigError(f"{where} holds an empty prompt")
    return tuple(value)


def _scale(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MoeConfigError(f"{where} must be a finite number, not {value!r}")
    return float(value)


def _model(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) <= {"model", "path"} and len(value) == 1:
        value = next(iter(value.values()))  # mergekit's {model: ...} form
    if not isinstance(value, str) or not value.strip():
        raise MoeConfigError(f"{where} must name a model (a registry name or a folder)")
    if "+" in value:
        raise MoeConfigError(f"{where}: {value!r} is a model with a LoRA adapter; zoo moe takes whole models "
                             "(apply the adapter first with zoo merge)")
    return value


def _expert(value: Any, where: str) -> ExpertSpec:
    if not isinstance(value, dict):
        raise MoeConfigError(f"{where} must be a mapping with source_model and its prompts")
    unknown = sorted(set(value) - set(EXPERT_KEYS))
    if unknown:
        raise MoeConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(EXPERT_KEYS)}")
    if "source_model" not in value:
        raise MoeConfigError(f"{where} has no source_model")
    return ExpertSpec(_model(value["source_model"], f"{where}.source_model"),
                      _prompts(value.get("positive_prompts"), f"{where}.positive_prompts"),
                      _prompts(value.get("negative_prompts"), f"{where}.negative_prompts"),
                      _scale(value.get("noise_scale"), f"{where}.noise_scale"),
                      _scale(value.get("residual_scale"), f"{where}.residual_scale"))


def _experts(value: Any, key: str, required: bool) -> tuple[ExpertSpec, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        raise MoeConfigError(f"{key} must be a list of experts, each with a source_model")
    return tuple(_expert(v, f"{key}[{i}]") for i, v in enumerate(value))


def from_dict(data: Any) -> MoeConfig:
    """A ``MoeConfig`` from mergekit-moe's YAML, already parsed."""
    if not isinstance(data, dict):
        raise MoeConfigError("a mergekit-moe config is a mapping with base_model and experts")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise MoeConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(CONFIG_KEYS)}")
    if "base_model" not in data:
        raise MoeConfigError("the config has no base_model")
    if "experts" not in data:
        raise MoeConfigError("the config has no experts")
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise MoeConfigError(f"gate_mode must be one of {', '.join(GATE_MODES)}, not {mode!r}")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise MoeConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {data['dtype']!r}")
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int):
        raise MoeConfigError(f"experts_per_token must be a whole number, not {k!r}")
    arch = data.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise MoeConfigError(f"architecture must be a name (mixtral or qwen), not {arch!r}")
    return MoeConfig(_model(data["base_model"], "base_model"), _experts(data["experts"], "experts", True),
                     mode, dtype, k, _experts(data.get("shared_experts"), "shared_experts", False), arch,
                     source=data)


def load(path: str | Path) -> MoeConfig:
    """Read a mergekit-moe YAML file (YAML 1.2 numbers and no duplicate keys, as recipes)."""
    from zoo.merge.recipe import read_yaml

    return from_dict(read_yaml(path, error=MoeConfigError))
