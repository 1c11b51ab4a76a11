"""What learned merges minimise: prediction entropy on unlabeled inputs (the papers'
label-free objective) or cross-entropy on a labelled validation split (supervised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # inside the log, as fusion_bench's entropy loss


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits): -Σ p log(p + eps)."""
    p = logits.float().softmax(dim=-1)
    return -(p * (p + EPS).log()).sum(dim=-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


OBJECTIVES = {"entropy": "label-free: mean prediction entropy on unlabeled inputs",
              "ce": "supervised: cross-entropy on a labelled validation split"}


def supervised(objective: str) -> bool:
    return objective == "ce"


def default_split(objective: str) -> str:
    """Which split of a registered task to learn from: labelled validation data for the
    supervised objective, the unlabeled training inputs for entropy."""
    return "val" if supervised(objective) else "train"
