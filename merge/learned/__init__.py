"""Learned merges: coefficients and Concrete masks fitted by running the model on
unlabeled (or, supervised, labelled) data.

This package is their toolbox: the trainable merge (``Merger``), the objectives, the
shared loop machinery (``train``), parity distillation's loop (``distill``), task
data, the runnable model, and the plan-level pipeline. The methods themselves
(``adamerging``, ``concrete_ta``, ``concrete_adamerging``, ``parity``) are classes in
``zoo.merge.methods``; ``merge.run`` runs them from recipes, and
``zoo.merge.state_dicts.learn_merge`` (also importable from here) is the API for
research code that brings its own module, heads and data (e.g. a CLIP image encoder
with zero-shot heads).
"""

from __future__ import annotations

from typing import Any

from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import ParitySettings, distill
from zoo.merge.learned.train import Forward, Result, Settings, TaskData

__all__ = ["Forward", "Merger", "ParitySettings", "Result", "Settings", "TaskData", "distill", "learn_merge"]


def __getattr__(name: str) -> Any:
    # learn_merge picks a method by name, so it lives above the methods (which use this
    # toolbox); imported on first use, the same function.
    if name == "learn_merge":
        from zoo.merge.state_dicts import learn_merge

        return learn_merge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
