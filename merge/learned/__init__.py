"""Learned merges: coefficients and Concrete masks fitted by running the model on
unlabeled (or, supervised, labelled) data.

This package is their toolbox: the trainable merge (``Merger``), the objectives, the
shared loop machinery (``train``), parity distillation's loop (``distill``), task
data, the runnable model and the start records. It imports no merge method: the
methods (``adamerging``, ``concrete_ta``, ``concrete_adamerging``, ``parity``) are
classes in ``zoo.merge.methods`` built on it. ``zoo.merge.learning`` runs them from a
merge plan, and ``zoo.merge.state_dicts.learn_merge`` is the API for research code
that brings its own module, heads and data (e.g. a CLIP image encoder with zero-shot
heads).
"""

from __future__ import annotations

from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import ParitySettings, distill
from zoo.merge.learned.train import Forward, Result, Settings, TaskData

__all__ = ["Forward", "Merger", "ParitySettings", "Result", "Settings", "TaskData", "distill"]
