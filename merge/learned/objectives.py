"""What learned merges minimise: prediction entropy on unlabeled inputs (the papers'
label-free objective) or cross-entropy on a labelled validation split (supervised).

Over a causal LM's teacher-forced batch (``zoo.textgen.teacher_forced``: labels -100
except the answer's tokens, position t predicting t + 1) the same two objectives are
per token: ``token_entropy``, the mean entropy of the next-token distributions that
chose the scored tokens, and ``token_cross_entropy``, the mean token cross-entropy of
the scored tokens (``transformers``' causal-LM loss). Both use masks rather than
boolean indexing, so a step never waits for the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.textgen import IGNORE

EPS = 1e-8  # inside the log, as fusion_bench's entropy loss


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits): -Σ p log(p + eps)."""
    p = logits.float().softmax(dim=-1)
    return -(p * (p + EPS).log()).sum(dim=-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over every scored token of the batch of the entropy -Σ p log(p + eps) of the
    next-token distribution that predicts it (logits ``[rows, positions, vocabulary]``,
    labels ``[rows, positions]``, -100 where unscored). Only where labels are scored is
    read, never which tokens they are."""
    keep = (labels[:, 1:] != IGNORE).to(torch.float32)
    p = logits[:, :-1].float().softmax(dim=-1)
    h = -(p * (p + EPS).log()).sum(dim=-1)
    return (h * keep).sum() / keep.sum().clamp_min(1.0)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of the scored labels, each predicted by the position before."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def loss(objective: str, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The objective on one batch: per example (labels ``[rows]`` or none), or per token
    over a causal LM's teacher-forced batch (labels ``[rows, positions]``)."""
    if labels is not None and labels.dim() == 2:
        return token_cross_entropy(logits, labels) if supervised(objective) else token_entropy(logits, labels)
    return cross_entropy(logits, labels) if supervised(objective) else entropy(logits)


OBJECTIVES = {"entropy": "label-free: mean prediction entropy on unlabeled inputs",
              "ce": "supervised: cross-entropy on a labelled validation split"}


def supervised(objective: str) -> bool:
    return objective == "ce"


def default_split(objective: str, generative: bool = False) -> str:
    """Which split of a registered task to learn from: labelled validation data for the
    supervised objective, the unlabeled training inputs (a generative task's pool of
    prompts) for entropy."""
    if supervised(objective):
        return "val"
    return "pool" if generative else "train"
