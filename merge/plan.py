"""Planning a merge: resolve the inputs, check them, and decide every output tensor.

Nothing is read beyond safetensors headers and nothing is written here, so every
bad input (unknown model, other architecture, missing tensor, bad parameter) is
refused before the merge starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from zoo.merge.methods import MergeMethod, get_method
from zoo.merge.recipe import Recipe, resolve, split_globals

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


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    base: Input | None
    models: list[Input]
    steps: list[TensorStep]
    heads: dict[int, list[str]]  # model index -> its task-head tensor names
    vocab: "vocabulary.Vocabulary | None" = None  # the rebuilt vocabulary (tokenizer_source / tokenizer:)

    def model_params(self, tensor: str) -> list[dict[str, Any]]:
        """Each model's parameters for one tensor: its own, else the global ones (mergekit's precedence)."""
        _, catch_all = split_globals(self.method, self.recipe.parameters)
        shared = resolve(catch_all, tensor)
        return [{**shared, **resolve(spec.parameters, tensor)} for spec in self.recipe.models]

    def options(self, tensor: str) -> dict[str, Any]:
        return resolve(split_globals(self.method, self.recipe.parameters)[0], tensor)

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
        arch_m, arch_b = m.ckpt.architecture(), ref.architecture()
        if arch_m.get("model_type") and arch_b.get("model_type") and arch_m["model_type"] != arch_b["model_type"]:
            raise IncompatibleModels(f"{m.label} is a {arch_m['model_type']} model but the base is "
                                     f"{arch_b['model_type']}")
        report = compare(m.ckpt, ref, m.label, recipe.base_model or recipe.models[0].model, patterns)
        if vocab is not None:  # vocabulary tensors are rebuilt on the merged vocabulary
            report.findings = [f for f in report.findings if not vocab.tolerates(f.kind, f.tensor)]
        if not report.ok:
            raise IncompatibleModels(report.one_line())
        heads[i] = sorted({*report.head_tensors()} & set(m.ckpt.tensors))

    steps = []
    saved = recipe.out_dtype or recipe.dtype  # mergekit: dtype is also the saved dtype unless out_dtype says
    for name, info in ref.tensors.items():
        out_dtype = SAFETENSORS_DTYPE[saved] if saved else _promoted(name, info.dtype, models)
        mergeable = info.dtype in FLOAT_DTYPES and not is_head(name, patterns)
        shape = vocab.shape(name, info.shape) if vocab is not None and mergeable else info.shape
        steps.append(TensorStep(OutTensor(name, out_dtype if mergeable else info.dtype, shape), mergeable))
    plan = Plan(recipe, method, base, models, steps, heads, vocab)
    if not method.learned:
        for step in steps:
            if step.merge:
                _check_values(plan, step.out.name)
    return plan


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
