"""Where a parity distillation starts: an existing merge, rebuilt as coefficients over
per-task directions (and a mask, and parameter offsets), so that training the
coefficients, the mask or the offsets moves that very merge.

A start is a method name (``task_arithmetic``, ``ties``: computed from the parity
recipe's own model parameters) or a registered merge, rebuilt from its lineage:
task arithmetic, TIES, AdaMerging (and AdaMerging++), Concrete TA, Concrete AdaMerging,
or an earlier parity distillation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from zoo.errors import ZooError

from zoo.merge.methods import elect_sign, get_method, trim_magnitude
from zoo.merge.recipe import resolve

if TYPE_CHECKING:
    from zoo.registry import Registry

REBUILDABLE = ("task_arithmetic", "ties", "adamerging", "concrete_ta", "concrete_adamerging", "parity")


@dataclass
class Start:
    """θ = θ₀ + m ⊙ Σₜ wₜ·dₜ + offsets: the start merge in the form the student trains."""

    directions: list[dict[str, torch.Tensor]]  # dₜ per tensor
    weights: dict[str, list[float]]  # tensor -> wₜ per task
    mask: str | None = None  # regex of the masked tensors
    mask_bits: dict[str, torch.Tensor] | None = None
    mask_logits: dict[str, torch.Tensor] | None = None
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # for the lineage

    def coefficient_matrix(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.weights[n] for n in names], dtype=torch.float32).T.contiguous()


def ties_directions(task_vectors: list[dict[str, torch.Tensor]], params: dict[str, list[dict[str, Any]]],
                    options: dict[str, dict[str, Any]]) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[float]]]:
    """TIES as coefficients over directions: dₜ = trimmed τₜ where its weighted sign
    agrees with the elected one, divided by the agreeing weights' sum under dis-mean
    (``normalize``), and coefficient λ·wₜ; Σₜ λ·wₜ·dₜ is then the TIES merge
    (``merge.methods.Ties``, whose election ``elect_sign`` also runs here)."""
    default = get_method("ties")
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    weights = {}
    for name in task_vectors[0]:
        p, o = params[name], options[name]
        w = [float(x.get("weight", default.model_parameters["weight"].default)) for x in p]
        trimmed = torch.stack([trim_magnitude(tv[name], float(x.get("density", 1.0)))
                               for tv, x in zip(task_vectors, p)])
        wt = torch.tensor(w).view(-1, *[1] * (trimmed.dim() - 1))
        agree, divisor = elect_sign(trimmed * wt, wt)
        d = trimmed * agree
        if o.get("normalize", default.parameters["normalize"].default):
            d = d / divisor
        for t in range(len(task_vectors)):
            out[t][name] = d[t]
        weights[name] = [x * float(o.get("lambda", 1.0)) for x in w]
    return out, weights


def ties_prestep(task_vectors: list[dict[str, torch.Tensor]], density: float) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++: trim each task vector to ``density`` per tensor by magnitude, elect
    the sign by mass, and keep in each task vector only the entries that agree."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    for name in task_vectors[0]:
        trimmed = [trim_magnitude(tv[name], density) for tv in task_vectors]
        positive = torch.stack(trimmed).sum(dim=0) >= 0
        for i, t in enumerate(trimmed):
            out[i][name] = t * ((t > 0) == positive) * (t != 0)
    return out


def resolve_start(spec: str, recipe: dict[str, Any], model_refs: list[str | None], base_ref: str | None,
                  registry: "Registry | None", task_vectors: list[dict[str, torch.Tensor]]) -> Start:
    """The start ``spec`` names: a method computed with ``recipe``'s model parameters, or
    a registered merge of the same base and experts (``model_refs``), from its lineage."""
    if spec in ("task_arithmetic", "ties"):
        start = _rebuild({**recipe, "merge_method": spec, "parameters": recipe.get("parameters") or {}}, None,
                         registry, task_vectors, model_refs, base_ref)
        start.record = {"method": spec}
        return start
    if registry is None or not registry.has(spec):
        raise ZooError(f"start {spec!r} is neither task_arithmetic, ties nor a registered merge; name a merge "
                       "from `zoo list --kind merged`")
    info = registry.show(spec)
    if info["kind"] != "merged" or not info.get("recipe"):
        raise ZooError(f"start {info['ref']} is a {info['kind']} model, not a merge with a recipe")
    start = _rebuild(info["recipe"], info["ref"], registry, task_vectors, model_refs, base_ref)
    start.record = {"model": info["ref"], "method": info["recipe"].get("merge_method")}
    return start


def _rebuild(recipe: dict[str, Any], ref: str | None, registry: "Registry | None",
             task_vectors: list[dict[str, torch.Tensor]], model_refs: list[str | None],
             base_ref: str | None) -> Start:
    method = recipe.get("merge_method")
    label = ref or method
    if method not in REBUILDABLE:
        raise ZooError(f"start {label}: a {method} merge is not coefficients over task vectors; start from "
                       f"one of {', '.join(REBUILDABLE)}")
    if ref is not None:
        theirs = [m.get("model") for m in recipe.get("models", [])]
        if theirs != model_refs or recipe.get("base_model") != base_ref:
            raise ZooError(f"start {ref} merged {', '.join(map(str, theirs))} on {recipe.get('base_model')}; list "
                           "the same base and experts, in the same order")
    names = list(task_vectors[0])
    params = {n: [resolve(m.get("parameters") or {}, n) for m in recipe["models"]] for n in names}
    options = {n: resolve(recipe.get("parameters") or {}, n) for n in names}
    if method == "task_arithmetic":
        default = get_method(method).model_parameters["weight"].default
        weights = {}
        for n in names:
            w = [float(p.get("weight", default)) for p in params[n]]
            if options[n].get("normalize") and abs(sum(w)) >= 1e-8:
                w = [x / sum(w) for x in w]
            weights[n] = [x * float(options[n].get("lambda", 1.0)) for x in w]
        return Start(task_vectors, weights)
    if method == "ties":
        directions, weights = ties_directions(task_vectors, params, options)
        return Start(directions, weights)

    learned = recipe.get("learned") or {}
    if method == "parity":
        inner = learned.get("start") or {}
        start = resolve_start(inner.get("model") or inner.get("method", ""), {**recipe, "learned": None},
                              model_refs, base_ref, registry, task_vectors) if inner else None
        if start is None:
            raise ZooError(f"start {label}: its lineage does not say where it started")
        directions, mask = start.directions, learned.get("mask")
    else:
        opts = recipe.get("parameters") or {}
        directions = ties_prestep(task_vectors, float(opts.get("ties_density", 0.2))) if opts.get("ties") \
            else task_vectors
        mask = opts.get("mask", ".*") if method.startswith("concrete") else None
    coefficients, tensors = learned.get("coefficients"), learned.get("coefficient_tensors")
    if not coefficients or not tensors or sorted(tensors) != sorted(names):
        raise ZooError(f"start {label}: its lineage lacks the learned coefficients of every merged tensor")
    weights = {n: [float(row[k]) for row in coefficients] for k, n in enumerate(tensors)}
    start = Start(directions, weights)
    if registry is not None and ref is not None:
        arts = recipe.get("artifacts") or {}
        if "mask" in arts:
            from zoo.merge.learned.merger import load_mask

            start.mask_bits, start.mask_logits = load_mask(registry.artifact(ref, "mask"))
            start.mask = "^(?:" + "|".join(re.escape(n) for n in start.mask_bits) + ")$"
        elif mask:
            raise ZooError(f"start {label}: its mask artifact is missing from the lineage")
        if "offsets" in arts:
            from zoo.checkpoints.reader import open_safetensors

            ck = open_safetensors(registry.artifact(ref, "offsets"))
            start.offsets = {n: ck.read_tensor(n).float() for n in ck.tensors}
    return start
