"""The demo's merge step: merge the demo experts and measure every task.

Task arithmetic (weight 0.3) and TIES (density 0.2, weight 0.3, dis-sum: the CLIP
literature's setting) merge the experts; each merge keeps every expert's head, so it
is measured per task. Merges already in the registry are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zoo.demo import DemoResult
from zoo.evaluate import accuracy, evaluate, load_model
from zoo.registry import Registry
from zoo.taskdata import load_split, task_info

from .recipe import from_dict
from .run import run

MERGES = {
    "ta": {"merge_method": "task_arithmetic", "weight": 0.3, "parameters": {}},
    "ties": {"merge_method": "ties", "weight": 0.3, "density": 0.2, "parameters": {"normalize": False}},
}


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


def merge_demo(registry: Registry, demo: DemoResult, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Merge the demo experts and return one accuracy row per method."""
    prefix = demo.config.prefix
    rows = [{"method": "individual experts", **demo.accuracy},
            {"method": "base + expert heads", **base_with_heads(registry, demo)}]
    for key, spec in MERGES.items():
        name = f"{prefix}-{key}"
        known = {m["name"] for m in registry.list(kind="merged")}
        if name not in known:
            recipe = from_dict({
                "merge_method": spec["merge_method"], "base_model": demo.base, "parameters": spec["parameters"],
                "models": [{"model": ref, "parameters": {k: v for k, v in spec.items()
                                                          if k in ("weight", "density")}}
                           for ref in demo.experts.values()],
            })
            run(recipe, name, registry=registry, device="cpu")
            log(f"merged the experts with {spec['merge_method']} into {name}")
        recorded = {m["task"]: m["value"] for m in registry.metrics(name)
                    if m["metric"] == "accuracy" and m["split"] == "test"}
        missing = [t for t in demo.experts if t not in recorded]
        if missing:
            recorded.update({r["task"]: r["value"] for r in evaluate(registry, name, missing)})
        label = "task arithmetic (weight 0.3)" if key == "ta" else "TIES (density 0.2, weight 0.3, dis-sum)"
        rows.append({"method": label, **{t: recorded[t] for t in demo.experts}})
    for row in rows:
        vals = [row[t] for t in demo.experts]
        row["avg"] = sum(vals) / len(vals)
    return rows
