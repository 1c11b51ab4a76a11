"""``merge.run``: plan, stream to disk, and register the result with its lineage."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from zoo.registry import card
from zoo.registry.records import NewModel
from zoo.progress import no_progress

from zoo.merge import engine
from zoo.merge.plan import Plan, make_plan
from zoo.merge.recipe import Recipe
from zoo.registry.destination import Destination
from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES, copy_sidecars, write_file

if TYPE_CHECKING:
    from zoo.progress import ProgressFactory

    from zoo.merge.learned.train import Report
    from zoo.registry import Registry


def resolved_recipe(plan: Plan) -> dict[str, Any]:
    """The recipe with every model pinned: registry refs at their version, paths as given."""
    d = plan.recipe.to_dict()
    if plan.base is not None:
        d["base_model"] = plan.base.ref or plan.base.label
    pinned = {inp.label: inp.ref or inp.label for inp in ([plan.base] if plan.base is not None else []) + plan.models}
    for spec, inp in zip(d["models"], plan.models):
        spec["model"] = inp.ref or inp.label
    for sl in d.get("slices") or []:
        for src in sl["sources"]:
            src["model"] = pinned.get(src["model"], src["model"])
        if sl.get("base_model"):
            sl["base_model"] = pinned.get(sl["base_model"], sl["base_model"])
    return d


def model_card(name: str, plan: Plan, recipe: dict[str, Any]) -> str:
    parents = ([plan.base] if plan.base is not None else []) + plan.models
    front = card.front_matter([p.ref or p.label for p in parents], "merge", [card.MERGE_TAG, card.TAG])
    body = yaml.safe_dump(card.public_recipe(recipe), sort_keys=True)  # per-tensor values stay in the lineage
    lines = [
        f"Merged with zoo using `{plan.recipe.merge_method}`"
        + (f" on top of `{front['base_model'][0]}`." if plan.base is not None else "."), "",
        "Models merged:", "",
        *[f"- `{m.ref or m.label}`" for m in plan.models], "",
        "## Recipe", "", "```yaml", body.rstrip(), "```", "",
    ]
    lines += plan.method.card_lines(recipe.get("learned") if plan.method.learned else recipe.get("statistics"))
    if plan.heads and any(plan.heads.values()):
        lines += ["Each expert's task head is kept unmerged in `task_heads.safetensors`.", ""]
    return card.render(front, name, lines)


def run(recipe: Recipe, out: str | None = None, *, registry: "Registry | None" = None,
        out_dir: str | Path | None = None, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: "ProgressFactory | None" = None, report: "Report | None" = None,
        log: "Callable[[str], None] | None" = None) -> dict[str, Any]:
    """Merge to disk, tensor by tensor.

    With ``out`` (a name) the result is registered in ``registry`` as a ``merged``
    model with its lineage; with ``out_dir`` it is written to that folder. Either way
    it appears only when complete. Learned methods (``adamerging``, ``concrete_*``,
    ``parity``) first run the model on each task's data; ``report(step, steps, loss,
    steps/s)`` follows them and ``log`` gets their notices (parity: a task with an empty
    parity set). A parity merge's per-round table comes back under ``parity``, and the
    method's measured values (``method.metrics``) are recorded as the model's metrics.
    Across processes (``merge.learned.distributed``) rank 0 alone writes and registers;
    the others return ``{"rank": N, "steps": ...}``.
    """
    dest = Destination.check(out, out_dir, registry, shard_bytes)
    plan = make_plan(recipe, registry)
    for m in plan.models:
        if m.is_protected:
            _warn(log, f"warning: {m.ref or m.label} is MergeLock-protected: merging its weights gives a broken "
                       "model by design (unlock it first with its key, or leave it out)")
    name = dest.label
    recipe_d = resolved_recipe(plan)
    learned, artifacts = None, {}
    if plan.method.learned:
        from zoo.merge.learned.distributed import current
        from zoo.merge.learning import learn_from_plan

        result, used = learn_from_plan(plan, registry, engine.pick_device(device), report, log)
        learned = result.merged
        recipe_d["learned"] = {**used, "coefficients": result.coefficients,
                               "final_loss": result.history[-1]["loss"] if result.history else None}
        plan.method.pin(recipe_d, used)  # e.g. parity: the start and the teachers at their versions
        sync = current()
        if not sync.writes:  # across processes (torch.distributed) rank 0 alone writes and registers
            return {"rank": sync.rank, "steps": result.steps_done}
    statistics = None
    if plan.method.statistics is not None:  # regmean, fisher: each expert's statistics on its task data
        from zoo.merge.statistics import collect_for

        statistics, recipe_d["statistics"] = collect_for(plan, registry, engine.pick_device(device), log)
    with dest.workspace(".merge") as folder:
        mask_tmp = folder.with_name(folder.name + ".mask.safetensors")
        offsets_tmp = folder.with_name(folder.name + ".offsets.safetensors")
        try:
            if learned is not None and result.mask_bits is not None:
                from zoo.merge.learned.merger import save_mask

                artifacts["mask"] = save_mask(result.mask_bits, result.mask_logits or {}, mask_tmp)
            if learned is not None and result.offsets:
                from safetensors.torch import save_file

                save_file({n: t.contiguous() for n, t in result.offsets.items()}, str(offsets_tmp))
                artifacts["offsets"] = offsets_tmp
            digests = engine.execute(plan, folder, device=device, shard_bytes=shard_bytes,
                                     progress=progress or no_progress, label=name, merged=learned,
                                     model_stats=None if statistics is None else {"statistics": statistics})
            digests.update(copy_sidecars((plan.base if plan.base is not None else plan.models[0]).ckpt, folder))
            digests.update(_carry_tokenizer(plan, folder, digests))
            digests.update(_update_config(plan, folder))
            digests["README.md"] = write_file(folder / "README.md", model_card(name, plan, recipe_d).encode())
            kept = dest.keep(_new_model(folder, name, digests, plan, recipe_d, artifacts, registry))
            if not dest.registers:
                kept["files"] = sorted(digests)
                for key, tmp in artifacts.items():  # no registry to hold the lineage: artifacts go beside it
                    beside = dest.path.with_name(f"{dest.path.name}.{key}.safetensors")
                    Path(tmp).rename(beside)
                    kept[key] = str(beside)
            if learned is not None and result.rounds:
                kept["parity"] = result.rounds
            return kept
        finally:
            mask_tmp.unlink(missing_ok=True)
            offsets_tmp.unlink(missing_ok=True)


def _new_model(folder: Path, name: str, digests: dict[str, str], plan: Plan, recipe_d: dict[str, Any],
               artifacts: dict[str, Path], registry: "Registry | None") -> NewModel:
    """The merge as the registry takes it: its parents, recipe, tasks, kept heads, and
    what a learned method measured (only read when the merge is registered)."""
    base_ref = plan.base.ref if plan.base is not None else None
    # a base that is also averaged (linear) stays the base in the lineage
    parents = ([("base", base_ref)] if base_ref else []) + \
              [("expert", m.ref) for m in plan.models if m.ref and m.ref != base_ref]
    if registry is not None:
        parents += plan.method.lineage_parents(recipe_d.get("learned"), registry, parents)
    tasks = sorted({t for m in plan.models for t in m.tasks})
    return NewModel(folder, name, "merged", digests, base=plan.base.ref if plan.base is not None else None,
                    parents=parents, recipe=recipe_d, tasks=tasks, head_patterns=tuple(plan.recipe.heads),
                    artifacts=artifacts, metadata={"heads": {str(k): v for k, v in plan.heads.items() if v}},
                    metrics=[m for m in plan.method.metrics(recipe_d.get("learned")) if m.task in tasks])


def _carry_tokenizer(plan: Plan, folder: Path, digests: dict[str, str]) -> dict[str, str]:
    """The merged tokenizer (``tokenizer_source`` / ``tokenizer:``) and ``chat_template``,
    saved as mergekit saves them (merge/vocab.py, merge/chat_template.py)."""
    from zoo.merge import chat_template, vocab

    if plan.vocab is None and plan.recipe.chat_template is None and \
            not (plan.base is None and plan.models[0].adapter is not None):
        return {}
    everyone = ([plan.base] if plan.base is not None else []) + plan.models
    template = chat_template.resolve(plan.recipe.chat_template, everyone, vocab.load_tokenizer)
    for name in vocab.TOKENIZER_FILES:
        digests.pop(name, None)
    if plan.vocab is not None:
        return vocab.save(plan.vocab, folder, template)
    # mergekit loads the donor's tokenizer and saves it again (for MODEL+ADAPTER: the model's)
    tok = vocab.load_tokenizer(everyone[0])
    if tok is None:
        return {}
    return vocab.save_tokenizer(tok, folder, template)


def _update_config(plan: Plan, folder: Path) -> dict[str, str]:
    """``config.json`` as mergekit writes it: naming the saved dtype with ``dtype`` or
    ``out_dtype`` (transformers reads ``dtype``, older versions ``torch_dtype``), and
    the number of layers a slices recipe made."""
    path = folder / "config.json"
    saved = plan.recipe.out_dtype or plan.recipe.dtype
    if (saved is None and not plan.config_updates) or not path.exists():
        return {}
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    updates = dict(plan.config_updates)
    if saved is not None:
        updates.update({k: saved for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]})
    if all(config.get(k) == v and k in config for k, v in updates.items()):
        return {}
    config.update(updates)
    return {"config.json": write_file(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())}


def _warn(log: "Callable[[str], None] | None", message: str) -> None:
    """To the caller's log (the CLI's stderr), else as a Python warning."""
    if log is not None:
        log(message)
    else:
        import warnings

        warnings.warn(message, stacklevel=3)
