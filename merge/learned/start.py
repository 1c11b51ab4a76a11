"""Where a parity distillation starts: an existing merge in the form the student
trains, coefficients over per-task directions (and a mask, and parameter offsets), so
that training the coefficients, the mask or the offsets moves that very merge.

Each rebuildable method turns a merge it made into a ``Start`` (``as_start``); the
start named in a recipe is found in ``merge.starts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Start:
    """θ = θ₀ + m ⊙ Σₜ wₜ·dₜ + offsets: the start merge in the form the student trains."""

    directions: list[dict[str, torch.Tensor]]  # dₜ per tensor
    weights: dict[str, list[float]]  # tensor -> wₜ per task
    mask: str | None = None  # regex of the masked tensors
    mask_bits: dict[str, torch.Tensor] | None = None
    mask_logits: dict[str, torch.Tensor] | None = None
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # for the lineage

    def coefficient_matrix(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.weights[n] for n in names], dtype=torch.float32).T.contiguous()


@dataclass
class StartSource:
    """A merge to rebuild as a start: its recipe, resolved per merged tensor, over the
    task vectors of the distillation's own experts."""

    recipe: dict[str, Any]
    ref: str | None  # the registered merge (name@version); None for a method computed here
    task_vectors: list[dict[str, torch.Tensor]]
    params: dict[str, list[dict[str, Any]]]  # tensor -> each model's parameters
    options: dict[str, dict[str, Any]]  # tensor -> the global parameters
    # resolve(spec, recipe): the start ``spec`` names (for a merge that itself started
    # from one), with ``recipe`` as the recipe its method parameters come from
    resolve: Callable[[str, dict[str, Any]], Start]

    @property
    def label(self) -> str:
        return self.ref or str(self.recipe.get("merge_method"))

    @property
    def names(self) -> list[str]:
        return list(self.task_vectors[0])

    @property
    def learned(self) -> dict[str, Any]:
        """The merge's learned lineage (coefficients, mask, start); empty if none."""
        return self.recipe.get("learned") or {}

    @property
    def global_parameters(self) -> dict[str, Any]:
        return self.recipe.get("parameters") or {}
