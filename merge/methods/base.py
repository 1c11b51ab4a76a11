"""The merge-method base class, the registry of methods, and parameter validation.

A method is one class in one file: its name, its paper (``reference``), its
parameters with their one set of defaults (``parameters``: global,
``model_parameters``: per model), its formula (``merge`` for a tensor at a time, or
``learn`` for merges learned by running the model), how a merge it made is rebuilt
as a parity start (``as_start``), and what the model card says about it
(``card_lines``). ``METHODS`` maps each name to an instance; ``get_method(name)``
looks one up with a one-line error for an unknown name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from zoo.errors import ZooError

from zoo.merge.methods.params import REQUIRED, Param

if TYPE_CHECKING:
    import torch

    from zoo.merge.learned.start import Start, StartSource
    from zoo.merge.learned.train import Result
    from zoo.registry import Registry
    from zoo.registry.records import Measurement


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges."""

    name: str
    seed: int = 0
    # Whole-tensor statistics computed by the engine in a first pass over chunks,
    # e.g. TIES' trim thresholds; None when the method sees the whole tensor.
    stats: dict[str, Any] | None = None
    # True when the input tensors are the engine's scratch buffers, which the method
    # may overwrite (saves an allocation per piece on the hot path).
    scratch: bool = False
    # True when the model tensors already have the base subtracted (task vectors); the
    # engine does this once for methods with ``accepts_deltas``.
    deltas: bool = False

    def generator(self, model_index: int) -> "torch.Generator":
        """A CPU generator seeded by (seed, model, tensor name): the same draw whatever
        the order the tensors are merged in, and (drawn on the CPU) whatever the device."""
        import torch

        digest = hashlib.sha256(f"{self.seed}:{model_index}:{self.name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class ParamDoc:
    """One row of a method's parameter help (``describe``)."""

    scope: str  # global | per-model
    name: str
    default: Any
    doc: str


class MergeMethod:
    """Base class: ``merge`` returns the merged tensor in the compute dtype."""

    name: ClassVar[str]
    # The paper the method follows, as mergekit cites them: authors, title, venue, arXiv id.
    reference: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True
    # True when a base_model is also one of the merged inputs (mergekit's linear averages
    # it): the recipe lists it among the models, appended when not listed.
    base_is_input: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    parameters: ClassVar[dict[str, Param]] = {}
    model_parameters: ClassVar[dict[str, Param]] = {}
    # True when merge() can run on any slice of a tensor independently, given the
    # statistics from stats_passes(); the engine then streams large tensors in chunks.
    elementwise: ClassVar[bool] = False
    # True for merges learned by running the model; they have learn(), not merge().
    learned: ClassVar[bool] = False
    # True when merge() and the stats collectors accept task vectors (ctx.deltas).
    accepts_deltas: ClassVar[bool] = False
    # True when a merge it made can be rebuilt as coefficients over task vectors
    # (as_start), so parity distillation can start from it.
    rebuildable: ClassVar[bool] = False
    # The per-expert statistics a data-aware merge weighs the experts with ("gram":
    # RegMean's input Gram matrices, "fisher": the diagonal Fisher); each expert is run
    # on its task's data first (zoo.merge.statistics) and merge() finds them in
    # ctx.stats["statistics"]. None: the method needs no data.
    statistics: ClassVar[str | None] = None

    @property
    def summary(self) -> str:
        """The first line of the class docstring."""
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def option(self, options: dict[str, Any], key: str) -> Any:
        """A global parameter's value: as given, else its default."""
        value = options.get(key, self.parameters[key].default)
        if value is REQUIRED:
            raise ZooError(f"{self.name}: parameter {key} is required (it has no default, as in mergekit)")
        return value

    def model_option(self, params: dict[str, Any], key: str) -> Any:
        """A per-model parameter's value: as given, else its default."""
        value = params.get(key, self.model_parameters[key].default)
        if value is REQUIRED:
            raise ZooError(f"{self.name}: per-model parameter {key} is required (it has no default, as in mergekit)")
        return value

    def missing(self, options: dict[str, Any], params: list[dict[str, Any]]) -> str | None:
        """The first required parameter left out, as "KEY" or "KEY for model I"; None when all are given."""
        for key, p in self.parameters.items():
            if p.default is REQUIRED and key not in options:
                return key
        for i, given in enumerate(params):
            for key, p in self.model_parameters.items():
                if p.default is REQUIRED and key not in given:
                    return f"{key} for model {i}"
        return None

    def check_tensor(self, name: str, params: list[dict[str, Any]], options: dict[str, Any]) -> str | None:
        """What is wrong with merging tensor ``name`` with these resolved values (None: nothing);
        the plan asks before anything is written."""
        return None

    # -- merging a tensor at a time ---------------------------------------------------------
    def streams(self, name: str, shape: tuple[int, ...], options: dict[str, Any]) -> bool:
        """True when this tensor can be merged in pieces: ``elementwise``, unless an option
        needs whole-tensor sums (TIES' ``rescale``) or the tensor is one a method takes
        whole (the SVD merges' matrices)."""
        return self.elementwise

    def merge(self, base: "torch.Tensor | None", tensors: "list[torch.Tensor]", params: list[dict[str, Any]],
              options: dict[str, Any], ctx: TensorContext) -> "torch.Tensor":
        raise NotImplementedError(f"{self.name} is learned by running the model; it has no tensor formula")

    def stats_collector(self, numel: int, params: list[dict[str, Any]], options: dict[str, Any]) \
            -> "StatsCollector | None":
        """What to gather over a whole tensor before merging it in chunks (None: nothing)."""
        return None

    def tensor_collector(self, shape: tuple[int, ...], params: list[dict[str, Any]], options: dict[str, Any],
                         ctx: TensorContext) -> "StatsCollector | None":
        """``stats_collector`` for a tensor of ``shape``: a method that works row by row, or
        draws at random (``ctx.generator``) in its statistics pass, overrides this one."""
        return self.stats_collector(math.prod(shape), params, options)

    def piece_elems(self, shape: tuple[int, ...], options: dict[str, Any], chunk: int) -> int:
        """How many elements each streamed piece of a tensor of ``shape`` holds: ``chunk``,
        or (``whole_rows``) a whole number of rows for a method that works row by row."""
        return chunk

    def model_collector(self, tensors: list[tuple[list[dict[str, Any]], dict[str, Any], int]]) \
            -> "StatsCollector | None":
        """What to gather over all merged tensors together before merging any of them
        (None: nothing). ``tensors`` holds each merged tensor's (per-model parameters,
        options, number of elements); the result reaches merge() as ``ctx.stats``."""
        return None

    # -- learned merges ---------------------------------------------------------------------
    def learn(self, inputs: Any) -> "tuple[Result, dict[str, Any]]":
        """Learn the merge from a plan's inputs (``zoo.merge.learned.inputs.LearnInputs``);
        returns the result and what to record in the lineage."""
        raise NotImplementedError(f"{self.name} merges tensor by tensor; it learns nothing")

    def pin(self, recipe: dict[str, Any], used: dict[str, Any]) -> None:
        """Pin, in the resolved ``recipe``, what the learning resolved (e.g. registry
        names at their versions)."""

    def lineage_parents(self, learned: dict[str, Any] | None, registry: "Registry",
                        parents: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Further (role, ref) parents of the merge beyond the base and the experts."""
        return []

    def metrics(self, learned: dict[str, Any] | None) -> "list[Measurement]":
        """Registry metric rows the merge measured while it learned."""
        return []

    def card_lines(self, learned: dict[str, Any] | None) -> list[str]:
        """The model card's paragraph on how the merge was made (beyond its recipe)."""
        return []

    # -- parity starts ----------------------------------------------------------------------
    def as_start(self, source: "StartSource") -> "Start":
        """The merge ``source`` describes, as coefficients over per-task directions."""
        raise ZooError(f"start {source.label}: a {self.name} merge is not coefficients over task vectors; start "
                       f"from one of {', '.join(rebuildable())}")


class StatsCollector:
    """Gathers whole-tensor statistics over chunks, in one or more passes."""

    passes: int = 1

    def update(self, pass_no: int, base: "torch.Tensor | None", tensors: "list[torch.Tensor]",
               deltas: bool = False) -> None:
        """Count one piece of every model (``deltas``: already minus the base)."""
        raise NotImplementedError

    def end_pass(self, pass_no: int) -> None:
        pass

    def result(self) -> dict[str, Any]:
        raise NotImplementedError

    def use_sample(self, base: "torch.Tensor | None", tensors: "list[torch.Tensor]") -> None:
        """A sample of the inputs (the same entries of each), before the first pass; a
        collector may plan fewer passes with it (``passes`` may change in end_pass)."""

    def gather(self, pieces: "Callable[[], Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]]",
               deltas: bool = False) -> dict[str, Any]:
        """Run every pass over ``pieces()`` (base, model tensors) and return the result."""
        p = 0
        while p < self.passes:
            for base, tensors in pieces():
                self.update(p, base, tensors, deltas)
            self.end_pass(p)
            p += 1
        return self.result()

    def gather_whole(self, base: "torch.Tensor | None", tensors: "list[torch.Tensor]", deltas: bool = False,
                     slice_elems: int = 1 << 18) -> dict[str, Any]:
        """The result over tensors held whole (flat); by default every pass walks them in
        cache-sized slices."""
        return self.gather(lambda: slices(base, tensors, slice_elems), deltas)


def whole_rows(shape: tuple[int, ...], chunk: int) -> int:
    """About ``chunk`` elements, rounded to whole rows of the last dimension (at least
    one row; a vector is one row)."""
    cols = shape[-1] if shape else 1
    return max(1, chunk // max(1, cols)) * max(1, cols)


def slices(base: "torch.Tensor | None", tensors: "list[torch.Tensor]", size: int):
    """(base, [models]) of flat tensors held whole, ``size`` elements at a time."""
    for off in range(0, tensors[0].numel(), size):
        yield (base[off:off + size] if base is not None else None), [x[off:off + size] for x in tensors]


# Every registered method by name; filled as ``zoo.merge.methods`` imports its modules.
METHODS: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add an instance of ``cls`` to METHODS under its name."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a one-line error naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ZooError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def rebuildable() -> list[str]:
    """The methods whose merges a parity distillation can start from."""
    return [name for name, m in METHODS.items() if m.rebuildable]


def describe(method: MergeMethod) -> list[ParamDoc]:
    """The method's parameters for help text: global ones first, then per-model ones."""
    return [ParamDoc("global", k, p.default, p.doc) for k, p in method.parameters.items()] + \
        [ParamDoc("per-model", k, p.default, p.doc) for k, p in method.model_parameters.items()]


def validate_params(method: MergeMethod, options: dict[str, Any], per_model: list[dict[str, Any]]) -> None:
    """Refuse unknown parameters and bad values, naming the parameter."""
    for key, value in options.items():
        _check_param(method, method.parameters, "parameter", "global parameters", key, value)
    for params in per_model:
        for key, value in params.items():
            _check_param(method, method.model_parameters, "per-model parameter", "per-model parameters", key, value)


def check_count(method: MergeMethod, n: int) -> None:
    """Refuse too few or too many models (besides the base) for the method."""
    if n < method.min_models:
        raise ZooError(f"{method.name} needs at least {method.min_models} model(s) besides the base, got {n}")
    if method.max_models is not None and n > method.max_models:
        raise ZooError(f"{method.name} takes at most {method.max_models} model(s) besides the base, got {n}")


# What only learned merges take (their training loop); named so a data-free method can say it does not train.
LOOP_PARAMETERS = ("steps", "lr", "batch_size")


def _check_param(method: MergeMethod, table: dict[str, Param], what: str, listing: str, key: str, value: Any) -> None:
    if key not in table and key in LOOP_PARAMETERS and not method.learned:
        learned = ", ".join(name for name, m in METHODS.items() if m.learned)
        raise ZooError(f"{method.name} does not train, so it takes no {key}: --steps, --lr and --batch-size are for "
                       f"learned merges ({learned})")
    if key not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ZooError(f"{method.name}: unknown {what} {key!r} ({listing}: {known})")
    p = table[key]
    if p.check and (msg := p.check(value)):
        raise ZooError(f"{method.name}: parameter {key} {msg} (got {value!r})")
