"""The demo's merge step: merge the demo experts and measure every task.

Task arithmetic (weight 0.3) and TIES (density 0.2, weight 0.3, dis-sum: the CLIP
literature's setting) merge the experts; each merge keeps every expert's head, so it
is measured per task. Merges already in the registry are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zoo.demo.build import DemoResult
from zoo.evaluate import accuracy, evaluate, load_model
from zoo.registry import Registry
from zoo.checkpoints.taskdata import load_split, task_info

from zoo.merge.recipe import from_dict
from zoo.merge.run import run

MERGES = {
    "ta": {"merge_method": "task_arithmetic", "weight": 0.3, "parameters": {}},
    "ties": {"merge_method": "ties", "weight": 0.3, "density": 0.2, "parameters": {"normalize": False}},
}
LABELS = {"ta": "task arithmetic (weight 0.3)", "ties": "TIES (density 0.2, weight 0.3, dis-sum)"}

# The learned merges, on the demo's short CPU schedule: the papers' batch of 16 per task,
# lr 1e-2 (10x theirs) for a fifth of their steps or less, so the whole table takes a
# few minutes on two cores. ``ce`` rows use labelled validation data: supervised.
SCHEDULE = {"adamerging": {"steps": 100}, "concrete_ta": {"steps": 100},
            "concrete_adamerging": {"steps": 50, "stage2_steps": 50}}
LEARNED = {
    f"{key}-{objective}": {"merge_method": method, "parameters": {**SCHEDULE[method], "lr": 1e-2,
                                                                  "objective": objective, **extra}}
    for objective in ("entropy", "ce")
    for key, method, extra in (("am-task", "adamerging", {"coefficients": "task"}),
                               ("am-layer", "adamerging", {"coefficients": "layer"}),
                               ("concrete-ta", "concrete_ta", {}),
                               ("concrete-am-layer", "concrete_adamerging", {"coefficients": "layer"}))
}
# Parity distillation (label-free: the experts' own pseudo-labels on their unlabeled train
# inputs), from task arithmetic and from the label-free Concrete TA above; ``start`` names
# a registered merge with the demo's prefix filled in.
PARITY_SCHEDULE = {"rounds": 2, "steps": 50, "train": "coefficients,params"}
PARITY = {
    "parity-ta": {"merge_method": "parity", "parameters": {**PARITY_SCHEDULE, "start": "task_arithmetic"}},
    "parity-concrete-ta": {"merge_method": "parity",
                           "parameters": {**PARITY_SCHEDULE, "start": "{prefix}-concrete-ta-entropy"}},
    # The pools above are the experts' own training inputs; this one is held out from
    # every expert's training (the validation inputs, without their labels).
    "parity-ta-heldout": {"merge_method": "parity",
                          "parameters": {**PARITY_SCHEDULE, "start": "task_arithmetic", "split": "val"}},
}
LEARNED.update(PARITY)
for _key, _spec in LEARNED.items():
    if _key in PARITY:
        continue
    _kind = {"am-task": "AdaMerging task-wise", "am-layer": "AdaMerging layer-wise", "concrete-ta": "Concrete TA",
             "concrete-am-layer": "Concrete AdaMerging layer-wise"}[_key.rsplit("-", 1)[0]]
    _obj = _spec["parameters"]["objective"]
    LABELS[_key] = f"{_kind}, {_obj}" + (" (supervised)" if _obj == "ce" else "")
LABELS["parity-ta"] = "parity from task arithmetic (label-free; coefficients, norms, biases)"
LABELS["parity-concrete-ta"] = "parity from Concrete TA, entropy (label-free; coefficients, norms, biases)"
LABELS["parity-ta-heldout"] = ("parity from task arithmetic, held-out pool (label-free; the val inputs; "
                               "coefficients, norms, biases)")


def base_with_heads(registry: Registry, demo: DemoResult) -> dict[str, float]:
    """The base's body under each expert's own head: what the heads do without fine-tuning."""
    base = load_model(registry, demo.base).state_dict()
    out = {}
    for task, ref in demo.experts.items():
        model = load_model(registry, ref)
        model.load_state_dict({k: v for k, v in base.items() if not k.startswith("classifier.")}, strict=False)
        path = registry.task_data(task)
        x, y = load_split(path, "test")
        out[task] = accuracy(model, x, y, task_info(path)["input"])
    return out


def merge_experts(registry: Registry, spec: dict[str, Any], base: str, experts: list[str], name: str,
                  steps_scale: float = 1.0, report=None, prefix: str = "demo", log=None) -> dict[str, Any]:
    """Merge ``experts`` on ``base`` with one of the demo's specs (``MERGES`` or
    ``LEARNED``) into ``name``, on the CPU; learned step counts times ``steps_scale``."""
    params = {k: v.format(prefix=prefix) if isinstance(v, str) else v for k, v in spec["parameters"].items()}
    for k in ("steps", "stage2_steps"):
        if k in params:
            params[k] = max(1, round(params[k] * steps_scale))
    recipe = from_dict({
        "merge_method": spec["merge_method"], "base_model": base, "parameters": params,
        "models": [{"model": ref, "parameters": {k: v for k, v in spec.items() if k in ("weight", "density")}}
                   for ref in experts],
    })
    return run(recipe, name, registry=registry, device="cpu", report=report, log=log)


def merge_demo(registry: Registry, demo: DemoResult, log: Callable[[str], None] = print,
               learned: bool = False, steps_scale: float = 1.0, report=None) -> list[dict[str, Any]]:
    """Merge the demo experts and return one accuracy row per method (with ``learned``,
    also the learned merges, their step counts multiplied by ``steps_scale``)."""
    prefix = demo.config.prefix
    rows = [{"method": "individual experts", **demo.accuracy},
            {"method": "base + expert heads", **base_with_heads(registry, demo)}]
    specs = {**MERGES, **(LEARNED if learned else {})}
    for key, spec in specs.items():
        name = f"{prefix}-{key}"
        if not registry.has(name):
            merge_experts(registry, spec, demo.base, list(demo.experts.values()), name, steps_scale, report, prefix,
                          log)
            log(f"merged the experts with {spec['merge_method']} into {name}")
        rows.append({"method": LABELS[key], "model": name, **measure(registry, name, list(demo.experts))})
    for row in rows:
        vals = [row[t] for t in demo.experts]
        row["avg"] = sum(vals) / len(vals)
    return rows


def measure(registry: Registry, name: str, tasks: list[str], split: str = "test") -> dict[str, float]:
    """Accuracy per task, from the recorded metrics where there are some."""
    recorded = {m["task"]: m["value"] for m in registry.metrics(name)
                if m["metric"] == "accuracy" and m["split"] == split}
    missing = [t for t in tasks if t not in recorded]
    if missing:
        recorded.update({r["task"]: r["value"] for r in evaluate(registry, name, missing, split=split)})
    return {t: recorded[t] for t in tasks}


def parity_summary(registry: Registry, rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """For each parity merge in ``rows``: the average disagreement with the experts on
    their pools before and after, and its accuracy against task arithmetic and the best
    label-free (entropy) AdaMerging of the same table."""
    by_model = {r.get("model"): r for r in rows}
    entropy = [by_model[f"{prefix}-{k}"]["avg"] for k in ("am-task-entropy", "am-layer-entropy")
               if f"{prefix}-{k}" in by_model]
    out = []
    for key in PARITY:
        row = by_model.get(f"{prefix}-{key}")
        if row is None:
            continue
        learned = registry.show(row["model"])["recipe"]["learned"]
        table, start = learned["table"], learned["start"]
        first, kept = min(r["round"] for r in table), next(r["round"] for r in table if r["kept"])

        def mean(r: int) -> float:
            values = [x["disagreement"] for x in table if x["round"] == r]
            return sum(values) / len(values)
        start_row = by_model.get(start.get("model", "").split("@")[0]) if start.get("model") else \
            by_model.get(f"{prefix}-ta")
        out.append({"method": LABELS[key], "model": row["model"], "disagreement_start": mean(first),
                    "disagreement_end": mean(kept), "kept_round": kept,
                    "avg": row["avg"],
                    "start_avg": start_row["avg"] if start_row else None, "ta_avg": by_model[f"{prefix}-ta"]["avg"],
                    "entropy_adamerging_avg": max(entropy) if entropy else None})
    return out


def concrete_masks(registry: Registry, demo: DemoResult, rows: list[dict[str, Any]], draws: int = 5,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """For each Concrete merge in ``rows``: its mask's sparsity and binariness, and its
    average accuracy under ``draws`` fresh draws of the final mask (``demo.masks``)."""
    from zoo.demo.masks import mask_report

    out = []
    for row in rows:
        model = row.get("model")
        if not model or registry.show(model)["recipe"].get("merge_method") not in ("concrete_ta",
                                                                                  "concrete_adamerging"):
            continue
        report = {"method": row["method"], "avg": row["avg"], **mask_report(registry, model, demo.experts, draws)}
        log(f"{row['method']}: mask keeps {100 * report['keep']:.0f}% on average, binariness "
            f"{report['binariness']:.2f} (mean |logit| {report['mean_abs_logit']:.2f}); {draws} fresh "
            f"{report['final_mask']} draws average {100 * report['draw_mean']:.1f}% ± {100 * report['draw_std']:.1f}")
        out.append(report)
    return out
