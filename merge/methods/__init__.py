"""Merge methods: each one a class in its own module, registered by name in ``METHODS``.

A method sees the base tensor and one tensor per model, already in the compute dtype
and on the compute device, with each model's parameters resolved for that tensor
(``merge``), or learns the merge by running the model (``learn``). Where mergekit has
the same method, parameter names and defaults are mergekit's, so a mergekit recipe
merges the same way here.

The public API, which the CLI help reads:

- ``METHODS``: name -> method instance, in a stable order; ``get_method(name)``.
- On each method: ``.name``, ``.summary`` (its class docstring's first line),
  ``.reference`` (its paper), ``.learned``, and ``.parameters`` / ``.model_parameters``
  (name -> ``Param(default, check, doc)``: global and per-model parameters, with the
  method's one set of defaults).
- ``describe(method)``: those parameters as ``ParamDoc(scope, name, default, doc)`` rows.
"""

from __future__ import annotations

from zoo.merge.methods.base import (METHODS, MergeMethod, ParamDoc, StatsCollector, TensorContext, check_count,
                                    describe, get_method, rebuildable, register, slices, validate_params)
from zoo.merge.methods.params import Param

# Importing a method's module registers it; this order is the order of METHODS.
from zoo.merge.methods.task_arithmetic import TaskArithmetic  # noqa: E402
from zoo.merge.methods.ties import Ties  # noqa: E402
from zoo.merge.methods.dare import DareLinear, DareTies  # noqa: E402
from zoo.merge.methods.breadcrumbs import Breadcrumbs  # noqa: E402
from zoo.merge.methods.linear import Linear  # noqa: E402
from zoo.merge.methods.slerp import Slerp  # noqa: E402
from zoo.merge.methods.model_stock import ModelStock  # noqa: E402
from zoo.merge.methods.tsv import TaskSingularVectors  # noqa: E402
from zoo.merge.methods.iso import IsoC, IsoCTS  # noqa: E402
from zoo.merge.methods.adamerging import AdaMerging  # noqa: E402
from zoo.merge.methods.concrete import ConcreteAdaMerging, ConcreteTA  # noqa: E402
from zoo.merge.methods.parity import Parity  # noqa: E402
from zoo.merge.methods.breadcrumbs_ties import BreadcrumbsTies  # noqa: E402
from zoo.merge.methods.della import DellaLinear, DellaTies  # noqa: E402
from zoo.merge.methods.sce import Sce  # noqa: E402
from zoo.merge.methods.nuslerp import NuSlerp  # noqa: E402
from zoo.merge.methods.multislerp import MultiSlerp  # noqa: E402
from zoo.merge.methods.karcher import Karcher  # noqa: E402
from zoo.merge.methods.arcee_fusion import ArceeFusion  # noqa: E402
from zoo.merge.methods.nearswap import NearSwap  # noqa: E402
from zoo.merge.methods.ram import Ram, RamPlusTL  # noqa: E402
from zoo.merge.methods.passthrough import Passthrough  # noqa: E402
from zoo.merge.methods.regmean import RegMean  # noqa: E402
from zoo.merge.methods.fisher import Fisher  # noqa: E402

__all__ = ["METHODS", "AdaMerging", "ArceeFusion", "Breadcrumbs", "BreadcrumbsTies", "ConcreteAdaMerging",
           "ConcreteTA", "DareLinear", "DareTies", "DellaLinear", "DellaTies", "Fisher", "IsoC", "IsoCTS", "Karcher", "Linear",
           "MergeMethod", "ModelStock", "MultiSlerp", "NearSwap", "NuSlerp", "Param", "ParamDoc", "Parity", "Passthrough", "Ram",
           "RamPlusTL", "RegMean", "Sce", "Slerp", "StatsCollector", "TaskArithmetic", "TaskSingularVectors", "TensorContext",
           "Ties", "check_count", "describe", "get_method", "rebuildable", "register", "slices", "validate_params"]
