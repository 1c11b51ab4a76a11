"""What the SVD-era merges (TSV-M, Iso-C, Iso-CTS) share: which tensors are matrices
to them, the fallback for every other tensor, and the orthogonal Procrustes step.

The papers' code (and FusionBench's port of it) SVDs every 2-D tensor not excluded by
name and gives every other tensor (biases, norms, 1-D, excluded keys) the *mean* of
the task vectors, scaled by the same final factor: task arithmetic with lambda =
alpha / T. zoo excludes the vocabulary and position embeddings and ``lm_head`` by
default (``exclude_keys``): they are lookup tables, not linear maps, and their SVD is
the most expensive of a model (vocab x hidden); FusionBench SVDs them unless told.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from zoo.merge.methods.base import MergeMethod
from zoo.merge.methods.params import Param, check_regex

# Embeddings (token, position: LLaMA/BERT/CLIP/GPT-2 names) and the LM head.
EXCLUDE_DEFAULT = r"embed|lm_head|\bwte\b|\bwpe\b"
EXCLUDE_PARAM = Param(EXCLUDE_DEFAULT, check_regex,
                      "regular expression: 2-D tensors whose name it matches are not SVD'd but averaged like "
                      "biases (default: embeddings and lm_head; \"$^\" excludes nothing, as FusionBench)")


class SpectralMerge(MergeMethod):
    """A merge that SVDs each weight matrix's task updates; the mean of the task vectors elsewhere."""

    min_models = 1
    # the name of the final scale factor (FusionBench: alpha for TSV, scaling_factor for Iso)
    scale_name = "alpha"

    def is_matrix(self, name: str, shape: tuple[int, ...], options: dict[str, Any]) -> bool:
        """True when the tensor is merged through its SVD."""
        return len(shape) == 2 and min(shape) > 0 and not re.search(self.option(options, "exclude_keys"), name)

    def streams(self, name: str, shape: tuple[int, ...], options: dict[str, Any]) -> bool:
        # every tensor that is not SVD'd is merged elementwise, so the engine streams it
        return not self.is_matrix(name, shape, options)

    def merge(self, base, tensors, params, options, ctx):
        scale = float(self.option(options, self.scale_name))
        if not self.is_matrix(ctx.name, tuple(base.shape), options):
            return mean_task_vector(base, tensors, scale, ctx.scratch, ctx.deltas)
        work = torch.float64 if base.dtype == torch.float64 else torch.float32  # no SVD in half precision
        merged = self.merge_matrix(TaskMatrices(base, tensors, work, ctx.deltas), options)
        if scale != 1:
            merged.mul_(scale)
        return merged.add_(base.to(work)).to(base.dtype)

    def merge_matrix(self, tasks: "TaskMatrices", options: dict[str, Any]) -> torch.Tensor:
        """The merged task matrix (before the final scale) from the experts' task matrices."""
        raise NotImplementedError

    def card_lines(self, learned):
        return [f"{self.name} merges each 2-D weight through the SVD of its task updates; every other tensor "
                "(biases, norms, 1-D tensors, and 2-D tensors matching exclude_keys: by default the embeddings and "
                f"lm_head) gets the mean of the task vectors times {self.scale_name}, as the paper's code and "
                "FusionBench do (task arithmetic with lambda = "
                f"{self.scale_name} / number of experts)."]


class TaskMatrices:
    """The experts' task matrices theta_i - theta_0, formed one at a time into one reused
    buffer, so a merge holds one task matrix beside its inputs, not T of them.
    ``tasks[i]`` is only valid until the next ``tasks[j]``."""

    def __init__(self, base: torch.Tensor, tensors: list[torch.Tensor], work: torch.dtype, deltas: bool = False):
        self.base, self.tensors, self.work, self.deltas = base.to(work), tensors, work, deltas
        self.shape = tuple(base.shape)
        self.buf: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.tensors[i]
        if self.deltas:
            return x.to(self.work)
        if self.buf is None:
            self.buf = torch.empty(self.shape, dtype=self.work, device=self.base.device)
        if x.dtype == self.work:
            return torch.sub(x, self.base, out=self.buf)
        return self.buf.copy_(x).sub_(self.base)

    def total(self) -> torch.Tensor:
        """The sum of the task matrices, in task order."""
        acc = self.base.new_zeros(self.shape)
        for i in range(len(self)):
            acc.add_(self[i])
        return acc


def mean_task_vector(base: torch.Tensor, tensors: list[torch.Tensor], scale: float, scratch: bool = False,
                     deltas: bool = False) -> torch.Tensor:
    """base + scale * mean_i(theta_i - base), elementwise (any piece of a tensor). Each
    task vector is formed before summing, so no precision is lost to cancellation."""
    acc = None
    for x in tensors:
        if not deltas:
            x = x.sub_(base) if scratch else x - base
        if acc is None:
            acc = x if scratch or not deltas else x.clone()
        else:
            acc.add_(x)
    acc.mul_(scale / len(tensors))
    return acc.add_(base)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest ``x`` (orthogonal Procrustes): P Qh from x = P S Qh."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh
