"""``merge.run``: plan, stream to disk, and register the result with its lineage."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from zoo.progress import no_progress

from . import engine
from .plan import Plan, make_plan
from .recipe import Recipe
from zoo.writer import check_destination, copy_sidecars, temp_folder, write_file

if TYPE_CHECKING:
    from zoo.progress import ProgressFactory

    from .learned.train import Report
    from zoo.registry import Registry


def resolved_recipe(plan: Plan) -> dict[str, Any]:
    """The recipe with every model pinned: registry refs at their version, paths as given."""
    d = plan.recipe.to_dict()
    if plan.base is not None:
        d["base_model"] = plan.base.ref or plan.base.label
    for spec, inp in zip(d["models"], plan.models):
        spec["model"] = inp.ref or inp.label
    return d


def model_card(name: str, plan: Plan, recipe: dict[str, Any]) -> str:
    parents = ([plan.base] if plan.base is not None else []) + plan.models
    front = {
        "base_model": [p.ref or p.label for p in parents],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "zoo"],
    }
    shown = dict(recipe)
    if "learned" in shown:  # the per-tensor coefficients stay in the registry's lineage
        shown["learned"] = {k: v for k, v in shown["learned"].items() if k not in ("coefficients", "coefficient_tensors")}
    body = yaml.safe_dump(shown, sort_keys=True)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {name}", "",
        f"Merged with zoo using `{plan.recipe.merge_method}`"
        + (f" on top of `{front['base_model'][0]}`." if plan.base is not None else "."), "",
        "Models merged:", "",
        *[f"- `{m.ref or m.label}`" for m in plan.models], "",
        "## Recipe", "", "```yaml", body.rstrip(), "```", "",
    ]
    learned = recipe.get("learned")
    if learned:
        kind = ("supervised: cross-entropy on labelled data" if learned.get("supervised")
                else "label-free: prediction entropy on unlabeled inputs")
        lines += [f"Learned by running the model ({learned['steps']} steps) with objective "
                  f"`{learned['objective']}` ({kind}, split `{learned['split']}`).", ""]
    if plan.heads and any(plan.heads.values()):
        lines += ["Each expert's task head is kept unmerged in `task_heads.safetensors`.", ""]
    return "\n".join(lines)


def run(recipe: Recipe, out: str | None = None, *, registry: "Registry | None" = None,
        out_dir: str | Path | None = None, device: str = "auto", shard_bytes: int = engine.DEFAULT_SHARD_BYTES,
        progress: "ProgressFactory | None" = None, report: "Report | None" = None) -> dict[str, Any]:
    """Merge to disk, tensor by tensor.

    With ``out`` (a name) the result is registered in ``registry`` as a ``merged``
    model with its lineage; with ``out_dir`` it is written to that folder. Either way
    it appears only when complete. Learned methods (``adamerging``, ``concrete_*``)
    first run the model on each task's data; ``report(step, steps, loss, steps/s)``
    follows them.
    """
    out_dir = check_destination(out, out_dir, registry, shard_bytes)
    plan = make_plan(recipe, registry)
    name = out or out_dir.name
    recipe_d = resolved_recipe(plan)
    learned, artifacts = None, {}
    if plan.method.learned:
        from .learned.pipeline import learn_from_plan

        result, used = learn_from_plan(plan, registry, engine.pick_device(device), report)
        learned = result.merged
        recipe_d["learned"] = {**used, "coefficients": result.coefficients,
                               "final_loss": result.history[-1]["loss"] if result.history else None}
    if out is not None:
        folder = registry.store.temp_path(".merge")
        folder.mkdir(parents=True)
    else:
        folder = temp_folder(out_dir.parent, out_dir.name)
    mask_tmp = folder.with_name(folder.name + ".mask.safetensors")
    try:
        if learned is not None and result.mask_bits is not None:
            from .learned.merger import save_mask

            artifacts["mask"] = save_mask(result.mask_bits, result.mask_logits or {}, mask_tmp)
        digests = engine.execute(plan, folder, device=device, shard_bytes=shard_bytes,
                                 progress=progress or no_progress, label=name, merged=learned)
        digests.update(copy_sidecars((plan.base if plan.base is not None else plan.models[0]).ckpt, folder))
        digests["README.md"] = write_file(folder / "README.md", model_card(name, plan, recipe_d).encode())
        if out is not None:
            parents = ([("base", plan.base.ref)] if plan.base is not None and plan.base.ref else []) + \
                      [("expert", m.ref) for m in plan.models if m.ref]
            tasks = sorted({t for m in plan.models for t in m.tasks})
            info = registry.add(folder, out, "merged", base=plan.base.ref if plan.base is not None else None,
                                parents=parents, recipe=recipe_d, tasks=tasks, adopt=digests, check_base=False,
                                head_patterns=tuple(plan.recipe.heads), artifacts=artifacts or None,
                                metadata={"heads": {str(k): v for k, v in plan.heads.items() if v}})
            return info
        folder.rename(out_dir)
        written = {"path": str(out_dir), "files": sorted(digests)}
        if artifacts:  # no registry to hold the lineage: the mask goes beside the folder
            mask_path = out_dir.with_name(out_dir.name + ".mask.safetensors")
            mask_tmp.rename(mask_path)
            written["mask"] = str(mask_path)
        return written
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        mask_tmp.unlink(missing_ok=True)
