"""From a merge plan (registry names or paths) to a learned merge's parameters: read the
base and task vectors, build the model and each task's head, load each task's data,
and run the loop in ``train``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from zoo.compat import is_head
from zoo.errors import ZooError

from ..methods import trim_magnitude
from ..plan import Plan, read_input
from .data import from_path, from_registry
from .objectives import default_split, supervised
from .runtime import build_body, make_forward
from .train import Report, Result, TaskData, calibrated, learn, settings_from

if TYPE_CHECKING:
    from zoo.registry import Registry


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


def task_data(plan: Plan, registry: "Registry | None", objective: str, split: str | None) -> list[TaskData]:
    labelled = supervised(objective)
    split = split or default_split(objective)
    base_dir = next(iter(plan.base.ckpt.files.values())).parent if plan.base is not None else None
    data = []
    for spec, inp in zip(plan.recipe.models, plan.models):
        params = spec.parameters
        task = params.get("task") or (inp.tasks[0] if inp.tasks else None)
        if params.get("data"):
            data.append(from_path(params["data"], task or inp.label, base_dir, split, labelled))
        elif task is not None and registry is not None:
            data.append(from_registry(registry, task, split, labelled))
        else:
            raise ZooError(f"{inp.label} has no task data: register its task with data, or set "
                           "models[].parameters.data to a file")
    return data


def learn_from_plan(plan: Plan, registry: "Registry | None", device: torch.device,
                    report: Report | None = None) -> tuple[Result, dict[str, Any]]:
    """Run the plan's learned merge; returns the result and the settings used."""
    options = plan.options("")
    s = settings_from(options, plan.recipe.merge_method, plan.recipe.seed)
    s.autocast = options.get("precision", "auto") == "bf16" or (
        options.get("precision", "auto") == "auto" and device.type == "cuda")
    if s.autocast and device.type != "cuda":
        raise ZooError("precision bf16 is for CUDA; on the CPU use precision fp32")
    data = task_data(plan, registry, s.objective, options.get("split"))
    assert plan.base is not None
    names = [st.out.name for st in plan.steps if st.merge]
    base_sd = {n: plan.base.ckpt.read_tensor(n) for n in names}
    tvs = [{n: read_input(m, n, base_sd[n]).float() - base_sd[n].float() for n in names} for m in plan.models]
    if options.get("ties"):
        tvs = ties_prestep(tvs, float(options.get("ties_density", 0.2)))
    merger = s.merger(base_sd, tvs, device)
    del tvs
    body = build_body(plan.base.ckpt, device)
    base_heads = [n for n in plan.base.ckpt.tensors if is_head(n, tuple(plan.recipe.heads))]
    heads = []
    for i, m in enumerate(plan.models):
        names_i = plan.heads.get(i) or []
        if not names_i and base_heads:
            raise ZooError(f"{m.label} has no task head ({', '.join(base_heads[:2])}...); each task runs through "
                           "its own expert's head")
        heads.append({n: read_input(m, n, None).to(device) for n in names_i})
    forward = make_forward(body, heads)
    temps = None
    if options.get("calibrate"):
        forward, temps = calibrated(forward, merger, task_data(plan, registry, "ce", options.get("calibration_split")))
    result = learn(merger, forward, data, s, report)
    used = {"objective": s.objective, "supervised": supervised(s.objective),
            "split": options.get("split") or default_split(s.objective),
            "coefficient_scope": s.coefficients, "steps": result.steps_done, "seconds": round(result.seconds, 3),
            "tasks": [d.name for d in data], "coefficient_tensors": merger.names}
    if temps is not None:
        used["temperatures"] = temps  # fitted on labelled validation data
        used["calibration_split"] = options.get("calibration_split") or default_split("ce")
    return result, used
