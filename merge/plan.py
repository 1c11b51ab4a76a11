"""Planning a merge: resolve the inputs, check them, and decide every output tensor.

Nothing is read beyond safetensors headers and nothing is written here, so every
bad input (unknown model, other architecture, missing tensor, bad parameter) is
refused before the merge starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.compat import compare
from zoo.checkpoints.heads import is_head
from zoo.checkpoints.lora import LoraPair, read_adapter
from zoo.checkpoints.reader import FLOAT_DTYPES, MERGELOCK_METADATA, Checkpoint
from zoo.checkpoints.writer import OutTensor
from zoo.errors import IncompatibleModels, ZooError
from zoo.registry.resolve import open_model

from zoo.merge import lora_ref
from zoo.merge import vocab as vocabulary
from zoo.merge.layers import LAYER_COUNT_KEYS, layer_count, position
from zoo.merge.methods import MergeMethod, get_method
from zoo.merge.recipe import ModelSpec, Recipe, resolve, slice_models, split_globals
from zoo.merge.slicing import Placement, RenamedCheckpoint, layout, output_layers

if TYPE_CHECKING:
    import torch

    from zoo.registry import Registry

SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPE.items()}


@dataclass
class Input:
    """A model going into the merge: where it came from and how to read it."""

    label: str  # what the user wrote
    ref: str | None  # registry ref (name@version), None for a path
    ckpt: Checkpoint
    tasks: list[str] = field(default_factory=list)
    base_ref: str | None = None  # the base it was registered with
    kind: str | None = None  # its registry kind (None for a path)
    lora: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> pair
    overrides: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor
    adapter: Checkpoint | None = None  # ``model+adapter``: the adapter merged into ckpt (merge/lora_ref.py)

    @property
    def is_adapter(self) -> bool:
        return self.ckpt.form == "adapter"

    @property
    def is_protected(self) -> bool:
        """MergeLock-protected: registered so, or stamped so in its files."""
        return self.kind == "protected" or MERGELOCK_METADATA in self.ckpt.metadata


@dataclass
class TensorStep:
    out: OutTensor
    merge: bool  # False: copied from the base as it is
    # slices recipes: the plan of the slice layer the tensor comes from (its sources,
    # their names for it, its parameters and position); None: the whole plan's
    part: "Plan | None" = None


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    base: Input | None
    models: list[Input]
    steps: list[TensorStep]
    heads: dict[int, list[str]]  # model index -> its task-head tensor names
    vocab: "vocabulary.Vocabulary | None" = None  # the rebuilt vocabulary (tokenizer_source / tokenizer:)
    layers: int = 0  # the models' number of layers, where gradients take a tensor's position
    t: float | None = None  # a slice layer's position for gradients (None: from the tensor's layer)
    slice_parameters: dict[str, Any] = field(default_factory=dict)  # a slice's, above the global ones
    config_updates: dict[str, Any] = field(default_factory=dict)  # what the merged config.json changes

    def position(self, tensor: str) -> float:
        """Where gradients are evaluated for a tensor (mergekit's t, 0 to 1)."""
        return self.t if self.t is not None else position(tensor, self.layers)

    def _shared_scopes(self) -> list[dict[str, Any]]:
        return [self.slice_parameters, self.recipe.parameters]

    def model_params(self, tensor: str) -> list[dict[str, Any]]:
        """Each model's parameters for one tensor, as mergekit looks them up: its own
        (a slice source's), then its slice's, then the global ones; the first scope
        whose value applies to the tensor wins. Filters see the model's own name for it."""
        t = self.position(tensor)
        shared = [split_globals(self.method, scope)[1] for scope in self._shared_scopes()]
        out = []
        for spec, inp in zip(self.recipe.models, self.models):
            name = inp.ckpt.source_name(tensor) if isinstance(inp.ckpt, RenamedCheckpoint) else tensor
            got: dict[str, Any] = {}
            for scope in (spec.parameters, *shared):
                for key, value in resolve(scope, name, t).items():
                    got.setdefault(key, value)
            out.append(got)
        return out

    def options(self, tensor: str) -> dict[str, Any]:
        t = self.position(tensor)
        got: dict[str, Any] = {}
        for scope in self._shared_scopes():
            for key, value in resolve(split_globals(self.method, scope)[0], tensor, t).items():
                got.setdefault(key, value)
        return got

    def compute_dtype(self, tensor: str) -> "torch.dtype":
        """The dtype a tensor is merged in: the recipe's ``dtype``; else, as mergekit, the
        stored dtypes promoted together (float32 where a LoRA adapter's B·A is added)."""
        import torch

        if self.recipe.dtype is not None:
            return getattr(torch, self.recipe.dtype)
        ref = self.base.ckpt if self.base is not None else self.models[0].ckpt
        if any(m.is_adapter for m in self.models):
            return torch.float32
        out = getattr(torch, DTYPE_NAMES[ref.tensors[tensor].dtype])
        for m in self.models:
            info = m.ckpt.tensors.get(tensor)
            if info is not None and info.dtype in DTYPE_NAMES:
                out = torch.promote_types(out, getattr(torch, DTYPE_NAMES[info.dtype]))
        return out


def _promoted(name: str, dtype: str, models: list[Input]) -> str:
    """The saved dtype of a merged tensor without ``dtype``/``out_dtype``: as mergekit,
    the result's, which is the inputs' dtypes promoted together (bfloat16 with float16
    gives float32). An adapter's tensors are not among them: its B·A is added to the
    base in float32 and saved in the base's dtype, as PEFT's merge_and_unload does."""
    import torch

    if dtype not in DTYPE_NAMES:
        return dtype
    out = getattr(torch, DTYPE_NAMES[dtype])
    for m in models:
        info = None if m.is_adapter else m.ckpt.tensors.get(name)
        if info is not None and info.dtype in DTYPE_NAMES:
            out = torch.promote_types(out, getattr(torch, DTYPE_NAMES[info.dtype]))
    return SAFETENSORS_DTYPE[str(out).removeprefix("torch.")]


def _open_input(label: str, registry: "Registry | None") -> Input:
    if "+" in label and (plus := lora_ref.open_merged(label, registry, _open_input)) is not None:
        return plus
    ckpt, info = open_model(label, registry)
    if info is None:
        return Input(label, None, ckpt)
    return Input(label, info["ref"], ckpt, tasks=info["tasks"], base_ref=info["base"], kind=info["kind"])


def _check_adapter(adapter: Input, base: Checkpoint, base_label: str, patterns: tuple[str, ...]) -> None:
    """Check an adapter against the base it adapts (the compatibility check's adapter
    rules) and read its LoRA pairs and saved tensors into ``adapter``."""
    report = compare(adapter.ckpt, base, adapter.label, base_label, patterns)
    if not report.ok:
        raise IncompatibleModels(report.one_line())
    parsed = read_adapter(adapter.ckpt)
    adapter.lora, adapter.overrides = parsed.pairs, parsed.saved


def make_plan(recipe: Recipe, registry: "Registry | None" = None) -> Plan:
    """Resolve, check and plan a merge."""
    recipe.validate()
    method = get_method(recipe.merge_method)
    base = _open_input(recipe.base_model, registry) if recipe.base_model else None
    models = [_open_input(m.model, registry) for m in recipe.models]
    if base is not None and base.is_adapter:
        raise ZooError(f"the base {base.label} is a LoRA adapter; name the full model it adapts")
    if base is not None and base.adapter is not None:
        raise ZooError(f"base_model {base.label}: zoo takes MODEL+ADAPTER as a merged model, not as the base; "
                       "write it out first (linear, that one model, weight 1) and use that as the base")
    for m in models:
        if base is not None and base.ref and m.base_ref and m.base_ref != base.ref:
            raise IncompatibleModels(f"{m.label} was fine-tuned from {m.base_ref}, not from the base {base.ref}; "
                                     "task vectors from different bases do not merge")
    ref = base.ckpt if base is not None else models[0].ckpt
    if recipe.slices is not None:
        return _plan_slices(recipe, method, base, models)
    if any(m.is_adapter for m in models) and base is None:
        raise ZooError("merging LoRA adapters needs the base model they adapt")
    vocab = None
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        vocab = vocabulary.build(recipe.tokenizer_source, recipe.tokenizer, base, models)
        if method.learned and vocab.moves_rows():
            raise ZooError(f"{method.name} learns on the models' own vocabularies; tokenizer_source over "
                           "vocabularies that differ works with mergekit's methods only")
    heads: dict[int, list[str]] = {}
    patterns = tuple(recipe.heads)
    for i, m in enumerate(models):
        if m.is_adapter:
            _check_adapter(m, ref, recipe.base_model or recipe.models[0].model, patterns)
            heads[i] = sorted(n for n in m.overrides if is_head(n, patterns))
            continue
        _check_model_type(m, ref, "the base")
        report = compare(m.ckpt, ref, m.label, recipe.base_model or recipe.models[0].model, patterns)
        if vocab is not None:  # vocabulary tensors are rebuilt on the merged vocabulary
            report.findings = [f for f in report.findings if not vocab.tolerates(f.kind, f.tensor)]
        if not report.ok:
            raise IncompatibleModels(report.one_line())
        heads[i] = sorted({*report.head_tensors()} & set(m.ckpt.tensors))

    steps = []
    saved = recipe.out_dtype or recipe.dtype  # mergekit: dtype is also the saved dtype unless out_dtype says
    for name, info in ref.tensors.items():
        step = _step(name, info.dtype, info.shape, saved, models, patterns)
        if vocab is not None and step.merge:
            step.out = OutTensor(name, step.out.dtype, vocab.shape(name, info.shape))
        steps.append(step)
    plan = Plan(recipe, method, base, models, steps, heads, vocab,
                layers=layer_count(ref.config if ref.form == "model" else None, ref.tensors))
    if not method.learned:
        _check_all_values(plan)
    return plan


def _check_model_type(m: Input, ref: Checkpoint, ref_name: str) -> None:
    """Refuse a model of another architecture than the reference (``ref_name`` in the error)."""
    arch_m, arch_r = m.ckpt.architecture(), ref.architecture()
    if arch_m.get("model_type") and arch_r.get("model_type") and arch_m["model_type"] != arch_r["model_type"]:
        raise IncompatibleModels(f"{m.label} is a {arch_m['model_type']} model but {ref_name} is "
                                 f"{arch_r['model_type']}")


def _step(name: str, dtype: str, shape: tuple[int, ...], saved: str | None, models: list[Input],
          patterns: tuple[str, ...], part: "Plan | None" = None) -> TensorStep:
    """One output tensor: merged (a float tensor that is not a task head) in the saved
    dtype, or copied as it is."""
    mergeable = dtype in FLOAT_DTYPES and not is_head(name, patterns)
    out_dtype = (SAFETENSORS_DTYPE[saved] if saved else _promoted(name, dtype, models)) if mergeable else dtype
    return TensorStep(OutTensor(name, out_dtype, shape), mergeable, part)


def _plan_slices(recipe: Recipe, method: MergeMethod, base: Input | None, models: list[Input]) -> Plan:
    """A slices recipe: one part plan per output layer (and one each for the tensors
    before and after the layers), over renamed views of its sources' checkpoints."""
    assert recipe.slices is not None
    inputs = {m.label: m for m in models}
    if base is not None:
        inputs.setdefault(base.label, base)
    everyone = list(inputs.values())
    if any(m.is_adapter or m.adapter is not None for m in everyone):
        raise ZooError("slices take full models; merge a LoRA adapter into its base first (zoo merge linear "
                       "with the adapter alone), then slice that")
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        raise ZooError("tokenizer_source and tokenizer: with slices are not supported yet; merge with slices, "
                       "then give the result the tokenizer in a models recipe")
    ref = base if base is not None else models[0]
    for m in everyone:
        _check_model_type(m, ref.ckpt, ref.label)
    placed = layout(recipe.slices, ref.ckpt, {label: m.ckpt for label, m in inputs.items()})
    groups: dict[tuple[int, int | None, int], list[Placement]] = {}
    for p in placed:
        groups.setdefault((p.slice, p.layer, len(p.names)), []).append(p)
    parts = {key: _slice_part(recipe, method, inputs, key[0], group) for key, group in groups.items()}
    saved = recipe.out_dtype or recipe.dtype
    patterns = tuple(recipe.heads)
    steps = []
    for p in placed:
        part = parts[(p.slice, p.layer, len(p.names))]
        infos = [inputs[s.model].ckpt.tensors[n] for s, n in zip(recipe.slices[p.slice].sources, p.names)]
        if any(i.shape != infos[0].shape for i in infos):
            raise IncompatibleModels(f"{p.out}: the slice's sources differ in shape ("
                                     + ", ".join(f"{s.model} {n} {list(i.shape)}" for s, n, i in
                                                 zip(recipe.slices[p.slice].sources, p.names, infos)) + ")")
        steps.append(_step(p.out, infos[0].dtype, infos[0].shape, saved, part.models, patterns, part))
    plan = Plan(recipe, method, base, models, steps, {})
    config = ref.ckpt.config if ref.ckpt.form == "model" else None
    key = next((k for k in LAYER_COUNT_KEYS if k in (config or {})), None)
    if key is not None:
        plan.config_updates[key] = output_layers(recipe.slices)
    _check_all_values(plan)
    return plan


def _slice_part(recipe: Recipe, method: MergeMethod, inputs: dict[str, Input], index: int,
                group: list[Placement]) -> Plan:
    """The plan that merges one group of a slice's output tensors: its sources seen
    through the output names, its base, its parameters and its position."""
    assert recipe.slices is not None
    sl = recipe.slices[index]
    sources = sl.sources[:len(group[0].names)]
    views = {s.model: replace(inputs[s.model], ckpt=RenamedCheckpoint(inputs[s.model].ckpt,
                                                                      {p.out: p.names[j] for p in group}))
             for j, s in enumerate(sources)}
    slice_base = sl.base_model or recipe.base_model
    names = slice_models(method, [s.model for s in sources], slice_base)
    specs = [ModelSpec(n, {k: v for s in sources if s.model == n for k, v in s.parameters.items()}) for n in names]
    part_recipe = replace(recipe, models=specs, base_model=slice_base, slices=None)
    base = views.get(slice_base) if slice_base else None
    if method.needs_base and base is None:
        raise ZooError(f"slice {index}: {method.name} needs its base {slice_base} among the sources of every "
                       "slice (mergekit reads the base's layers from there)")
    return Plan(part_recipe, method, base, [views[n] for n in names], [], {}, t=group[0].t,
                slice_parameters=sl.parameters)


def _check_all_values(plan: Plan) -> None:
    """``_check_values`` for every merged tensor, with its slice's plan where it has one."""
    for step in plan.steps:
        if step.merge:
            _check_values(step.part or plan, step.out.name)


def _check_values(plan: Plan, name: str) -> None:
    """Refuse, before anything is written, a tensor whose parameters are incomplete (a
    required one missing, or a conditional list with no entry for it) or unusable."""
    params, options = plan.model_params(name), plan.options(name)
    missing = plan.method.missing(options, params)
    if missing is not None:
        key, _, which = missing.partition(" for model ")
        who = f" for {plan.recipe.models[int(which)].model}" if which else ""
        raise ZooError(f"{plan.method.name}: no {key}{who} on tensor {name}; mergekit requires one (give it in "
                       f"the model's or the global parameters; a conditional list needs an entry for every tensor, "
                       f"e.g. a last one without filter)")
    if (problem := plan.method.check_tensor(name, params, options)) is not None:
        raise ZooError(problem)


def read_input(inp: Input, name: str, base_tensor: "torch.Tensor | None") -> "torch.Tensor":
    """One model's value of a tensor; for an adapter, base + scale * B @ A (``LoraPair.delta``)."""
    if inp.adapter is not None:
        return lora_ref.merged_tensor(inp, name)
    if not inp.is_adapter:
        return inp.ckpt.read_tensor(name)
    if name in inp.overrides:
        return inp.ckpt.read_tensor(inp.overrides[name])
    pair = inp.lora.get(name)
    if pair is None:
        assert base_tensor is not None
        return base_tensor
    import torch

    assert pair.a is not None and pair.b is not None and base_tensor is not None
    delta = pair.delta(inp.ckpt.read_tensor(pair.a), inp.ckpt.read_tensor(pair.b))
    # float32, not the base's dtype: rounding back to bf16 would lose most of a small delta
    return base_tensor.to(torch.float32) + delta.reshape(base_tensor.shape)
