"""Planning a merge: resolve the inputs, check them, and decide every output tensor.

Nothing is read beyond safetensors headers and nothing is written here, so every
bad input (unknown model, other architecture, missing tensor, bad parameter) is
refused before the merge starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.reader import Checkpoint
from zoo.registry.resolve import open_model
from zoo.checkpoints.compat import compare, is_head
from zoo.errors import IncompatibleModels, ZooError
from zoo.checkpoints.writer import OutTensor

from zoo.merge.methods import MergeMethod, get_method
from zoo.merge.recipe import Recipe, resolve

if TYPE_CHECKING:
    import torch

    from zoo.registry import Registry

SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class Lora:
    """One LoRA pair of an adapter: delta = scale * B @ A for the base weight ``target``."""

    a: str
    b: str
    scale: float
    transpose: bool = False  # fan_in_fan_out layers (GPT-2 Conv1D)
    embedding: bool = False


@dataclass
class Input:
    """A model going into the merge: where it came from and how to read it."""

    label: str  # what the user wrote
    ref: str | None  # registry ref (name@version), None for a path
    ckpt: Checkpoint
    tasks: list[str] = field(default_factory=list)
    base_ref: str | None = None  # the base it was registered with
    lora: dict[str, Lora] = field(default_factory=dict)  # base tensor name -> pair
    overrides: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor

    @property
    def is_adapter(self) -> bool:
        return self.ckpt.form == "adapter"


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

    def model_params(self, tensor: str) -> list[dict[str, Any]]:
        return [resolve(spec.parameters, tensor) for spec in self.recipe.models]

    def options(self, tensor: str) -> dict[str, Any]:
        return resolve(self.recipe.parameters, tensor)


def _open_input(label: str, registry: "Registry | None") -> Input:
    ckpt, info = open_model(label, registry)
    if info is None:
        return Input(label, None, ckpt)
    return Input(label, info["ref"], ckpt, tasks=info["tasks"], base_ref=info["base"])


def _lora_pairs(adapter: Input, base: Checkpoint) -> None:
    cfg = adapter.ckpt.config or {}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rs = bool(cfg.get("use_rslora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    pairs: dict[str, dict[str, str]] = {}
    for name in adapter.ckpt.tensors:
        key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key) or \
            re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = name
        else:
            adapter.overrides[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = name
    for module, p in pairs.items():
        target = module + ".weight"
        if target not in base.tensors:
            raise IncompatibleModels(f"{adapter.label}: adapter targets {module}, which the base does not have")
        rank = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
        a = next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
        scale = a / math.sqrt(rank) if rs else a / rank
        if "lora_A" in p and "lora_B" in p:
            adapter.lora[target] = Lora(p["lora_A"], p["lora_B"], scale, transpose=fan_in_fan_out)
        elif "lora_embedding_A" in p and "lora_embedding_B" in p:
            adapter.lora[target] = Lora(p["lora_embedding_A"], p["lora_embedding_B"], scale, embedding=True)
        else:
            raise IncompatibleModels(f"{adapter.label}: {module} has only half of its LoRA pair")


def make_plan(recipe: Recipe, registry: "Registry | None" = None) -> Plan:
    """Resolve, check and plan a merge."""
    recipe.validate()
    method = get_method(recipe.merge_method)
    base = _open_input(recipe.base_model, registry) if recipe.base_model else None
    models = [_open_input(m.model, registry) for m in recipe.models]
    if base is not None and base.is_adapter:
        raise ZooError(f"the base {base.label} is a LoRA adapter; name the full model it adapts")
    for m in models:
        if base is not None and base.ref and m.base_ref and m.base_ref != base.ref:
            raise IncompatibleModels(f"{m.label} was fine-tuned from {m.base_ref}, not from the base {base.ref}; "
                                     "task vectors from different bases do not merge")
    ref = base.ckpt if base is not None else models[0].ckpt
    if any(m.is_adapter for m in models) and base is None:
        raise ZooError("merging LoRA adapters needs the base model they adapt")
    heads: dict[int, list[str]] = {}
    patterns = tuple(recipe.heads)
    for i, m in enumerate(models):
        if m.is_adapter:
            _lora_pairs(m, ref)
            heads[i] = sorted(n for n in m.overrides if is_head(n, patterns))
            continue
        arch_m, arch_b = m.ckpt.architecture(), ref.architecture()
        if arch_m.get("model_type") and arch_b.get("model_type") and arch_m["model_type"] != arch_b["model_type"]:
            raise IncompatibleModels(f"{m.label} is a {arch_m['model_type']} model but the base is "
                                     f"{arch_b['model_type']}")
        report = compare(m.ckpt, ref, m.label, recipe.base_model or recipe.models[0].model, patterns)
        if not report.ok:
            raise IncompatibleModels(report.one_line())
        heads[i] = sorted({*report.head_tensors()} & set(m.ckpt.tensors))

    steps = []
    for name, info in ref.tensors.items():
        out_dtype = SAFETENSORS_DTYPE[recipe.out_dtype] if recipe.out_dtype else info.dtype
        mergeable = info.dtype in FLOAT_DTYPES and not is_head(name, patterns)
        steps.append(TensorStep(OutTensor(name, out_dtype if mergeable else info.dtype, info.shape), mergeable))
    return Plan(recipe, method, base, models, steps, heads)


def read_input(inp: Input, name: str, base_tensor: "torch.Tensor | None") -> "torch.Tensor":
    """One model's value of a tensor; for an adapter, base + scale * B @ A."""
    if not inp.is_adapter:
        return inp.ckpt.read_tensor(name)
    if name in inp.overrides:
        return inp.ckpt.read_tensor(inp.overrides[name])
    pair = inp.lora.get(name)
    if pair is None:
        assert base_tensor is not None
        return base_tensor
    import torch

    a = inp.ckpt.read_tensor(pair.a).to(torch.float32)
    b = inp.ckpt.read_tensor(pair.b).to(torch.float32)
    delta = (b @ a) * pair.scale
    if pair.embedding or pair.transpose:
        delta = delta.T
    assert base_tensor is not None
    # float32, not the base's dtype: rounding back to bf16 would lose most of a small delta
    return base_tensor.to(torch.float32) + delta.reshape(base_tensor.shape)
