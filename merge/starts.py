"""Finding the merge a parity distillation starts from: a method computed with the
parity recipe's own model parameters (task arithmetic, TIES), or a registered merge
rebuilt from its lineage by its method's ``as_start`` (task arithmetic, TIES,
AdaMerging and AdaMerging++, Concrete TA, Concrete AdaMerging, an earlier parity
distillation), with its mask and parameter offsets from the lineage's artifacts.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from zoo.errors import ZooError

from zoo.merge.learned.start import Start, StartSource
from zoo.merge.methods import METHODS, rebuildable
from zoo.merge.recipe import resolve

if TYPE_CHECKING:
    from zoo.registry import Registry


def computable() -> list[str]:
    """The starts computed here from a recipe's own parameters (not learned)."""
    return [name for name in rebuildable() if not METHODS[name].learned]


def resolve_start(spec: str, recipe: dict[str, Any], model_refs: list[str | None], base_ref: str | None,
                  registry: "Registry | None", task_vectors: list[dict[str, torch.Tensor]]) -> Start:
    """The start ``spec`` names: a method computed with ``recipe``'s model parameters, or
    a registered merge of the same base and experts (``model_refs``), from its lineage."""
    if spec in computable():
        # the learned method's own table gives the weights and densities the recipe leaves out
        own = METHODS.get(str(recipe.get("merge_method")))
        table = own.model_parameters if own else {}
        defaults = {k: p.default for k, p in table.items() if k in ("weight", "density")}
        models = [{**m, "parameters": {**defaults, **(m.get("parameters") or {})}} for m in recipe.get("models", [])]
        start = _rebuild({**recipe, "merge_method": spec, "models": models,
                          "parameters": recipe.get("parameters") or {}}, None,
                         registry, task_vectors, model_refs, base_ref)
        start.record = {"method": spec}
        return start
    if registry is None or not registry.has(spec):
        raise ZooError(f"start {spec!r} is neither {', '.join(computable())} nor a registered merge; name a merge "
                       "from `zoo list --kind merged`")
    info = registry.show(spec)
    if info["kind"] != "merged" or not info.get("recipe"):
        raise ZooError(f"start {info['ref']} is a {info['kind']} model, not a merge with a recipe")
    start = _rebuild(info["recipe"], info["ref"], registry, task_vectors, model_refs, base_ref)
    start.record = {"model": info["ref"], "method": info["recipe"].get("merge_method")}
    if (info["recipe"].get("learned") or {}).get("supervised"):
        start.record["supervised"] = True  # the start read labels, so whatever builds on it has too
    return start


def _rebuild(recipe: dict[str, Any], ref: str | None, registry: "Registry | None",
             task_vectors: list[dict[str, torch.Tensor]], model_refs: list[str | None],
             base_ref: str | None) -> Start:
    method = METHODS.get(str(recipe.get("merge_method")))
    if method is None or not method.rebuildable:
        raise ZooError(f"start {ref or recipe.get('merge_method')}: a {recipe.get('merge_method')} merge is not "
                       f"coefficients over task vectors; start from one of {', '.join(rebuildable())}")
    if ref is not None:
        theirs = [m.get("model") for m in recipe.get("models", [])]
        if theirs != model_refs or recipe.get("base_model") != base_ref:
            raise ZooError(f"start {ref} merged {', '.join(map(str, theirs))} on {recipe.get('base_model')}; list "
                           "the same base and experts, in the same order")
    names = list(task_vectors[0])
    if ref is not None:
        # a merge registered before mergekit's required weight was enforced used zoo's old default, 0.3
        recipe = {**recipe, "models": [{**m, "parameters": {"weight": 0.3, **(m.get("parameters") or {})}}
                                       for m in recipe.get("models", [])]}
    source = StartSource(
        recipe, ref, task_vectors,
        params={n: [resolve(m.get("parameters") or {}, n) for m in recipe["models"]] for n in names},
        options={n: resolve(recipe.get("parameters") or {}, n) for n in names},
        resolve=lambda spec, inner: resolve_start(spec, inner, model_refs, base_ref, registry, task_vectors))
    start = method.as_start(source)
    if registry is not None and ref is not None:
        _load_artifacts(start, recipe, ref, registry)
    return start


def _load_artifacts(start: Start, recipe: dict[str, Any], ref: str, registry: "Registry") -> None:
    """The registered merge's mask (bits and logits) and parameter offsets, from its lineage."""
    arts = recipe.get("artifacts") or {}
    if "mask" in arts:
        from zoo.merge.learned.merger import load_mask

        start.mask_bits, start.mask_logits = load_mask(registry.artifact(ref, "mask"))
        start.mask = "^(?:" + "|".join(re.escape(n) for n in start.mask_bits) + ")$"
    elif start.mask:
        raise ZooError(f"start {ref}: its mask artifact is missing from the lineage")
    if "offsets" in arts:
        from zoo.checkpoints.reader import open_safetensors

        ck = open_safetensors(registry.artifact(ref, "offsets"))
        start.offsets = {n: ck.read_tensor(n).float() for n in ck.tensors}
