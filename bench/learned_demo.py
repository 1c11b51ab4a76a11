"""Learned merges on the demo zoo: the accuracy table per task, and the cost per step.

Rows (test accuracy per task; λ and every other choice made on the validation split):
the experts, the base with each expert's head, weight averaging, task arithmetic at 0.3
and at the best λ on validation, TIES, then AdaMerging task-wise and layer-wise,
Concrete TA and Concrete layer-wise AdaMerging, each with the label-free ``entropy``
objective and with supervised ``ce`` on the validation labels. ``--investigate`` adds
the entropy experiments: heads temperature-calibrated on validation first, and the
papers' own lr (1e-3). ``--schedule paper`` uses the papers' step counts and lr.

    .venv/bin/python bench/learned_demo.py [--schedule demo|paper] [--device cpu|cuda] [--investigate]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_measured, save  # noqa: E402

import zoo.merge as merge  # noqa: E402
from zoo.demo.merges import LABELS, LEARNED, PARITY, SCHEDULE, measure, merge_demo  # noqa: E402
from zoo import Registry  # noqa: E402
from zoo.demo.build import FULL, run_demo  # noqa: E402

PAPER = {"adamerging": {"steps": 500, "lr": 1e-3}, "concrete_ta": {"steps": 2000, "lr": 1e-3},
         "concrete_adamerging": {"steps": 1000, "stage2_steps": 1000, "lr": 1e-3}}
LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


def merge_into(reg: Registry, name: str, method: str, experts: list[str], base: str, params: dict,
               model_params: dict | None = None, device: str = "cpu") -> dict:
    recipe = merge.from_dict({"merge_method": method, "base_model": base, "parameters": params,
                              "models": [{"model": e, "parameters": model_params or {}} for e in experts]})
    t0 = time.perf_counter()
    merge.run(recipe, name, registry=reg, device=device)
    learned = reg.show(name)["recipe"].get("learned") or {}
    return {"wall_s": time.perf_counter() - t0, **{k: learned[k] for k in ("steps", "seconds") if k in learned}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", choices=["demo", "paper"], default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--investigate", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated learned keys, e.g. am-layer-entropy")
    ap.add_argument("--result", default=None, help="results file name (default learned_demo[_paper])")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (smoke tests)")
    ap.add_argument("--skip-baselines", action="store_true", help="no averaging row and no λ sweep")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-learned-demo-"))
    reg = Registry(work / "registry.db", create=True)
    demo = run_demo(reg, FULL, log=lambda m: print(m, file=sys.stderr))
    tasks, experts = list(demo.experts), list(demo.experts.values())
    rows = merge_demo(reg, demo, log=lambda m: print(m, file=sys.stderr))
    for r in rows:
        r.pop("avg", None)
    timings: dict[str, dict] = {}

    # weight averaging and task arithmetic at the best λ on validation
    val: dict[float, float] = {}
    best = None
    if not args.skip_baselines:
        timings["averaging"] = merge_into(reg, "avg", "linear", experts, demo.base, {})
        rows.insert(2, {"method": "weight averaging", "model": "avg", **measure(reg, "avg", tasks)})
    for lam in [] if args.skip_baselines else LAMBDAS:
        name = f"ta-{lam}"
        merge_into(reg, name, "task_arithmetic", experts, demo.base, {}, {"weight": lam})
        v = measure(reg, name, tasks, "val")
        val[lam] = sum(v.values()) / len(v)
    if val:
        best = max(LAMBDAS, key=lambda lam: val[lam])
        rows.insert(4, {"method": f"task arithmetic, best λ on validation ({best})", "model": f"ta-{best}",
                        **measure(reg, f"ta-{best}", tasks)})

    specs = {k: v for k, v in LEARNED.items() if k not in PARITY}  # bench/parity_demo.py has those
    if args.investigate:
        for key in ("am-layer-entropy", "concrete-ta-entropy"):
            spec = json.loads(json.dumps(specs[key]))
            spec["parameters"]["calibrate"] = True
            specs[key + "-calibrated"] = spec
            LABELS[key + "-calibrated"] = LABELS[key] + ", heads calibrated on validation"
        spec = json.loads(json.dumps(specs["am-layer-entropy"]))
        spec["parameters"]["lr"] = 1e-3
        specs["am-layer-entropy-lr1e-3"] = spec
        LABELS["am-layer-entropy-lr1e-3"] = LABELS["am-layer-entropy"] + ", lr 1e-3"
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    for key, spec in specs.items():
        params = dict(spec["parameters"])
        if args.schedule == "paper":
            params.update(PAPER[spec["merge_method"]])
            if key.endswith("lr1e-3"):
                continue
        for k in ("steps", "stage2_steps"):
            if k in params:
                params[k] = max(1, round(params[k] * args.steps_scale))
        timings[key] = merge_into(reg, key, spec["merge_method"], experts, demo.base, params, device=args.device)
        rows.append({"method": LABELS[key], "model": key, "params": params, **measure(reg, key, tasks)})
        print(f"{key}: {sum(rows[-1][t] for t in tasks) / len(tasks) * 100:.1f} "
              f"({timings[key]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        finish(args, rows, tasks, timings, {}, val, best)  # each row saved as it comes

    # the cost of a step on this machine: one learned merge in its own process
    cost = {}
    if args.device == "cpu":
        zoo = str(Path(sys.executable).with_name("zoo"))
        for method, extra in (("adamerging", ["--param", "coefficients=layer"]), ("concrete_ta", [])):
            out = work / f"cost-{method}"
            m = run_measured([zoo, "merge", "--method", method, "--base", demo.base, *experts, "--steps", "30",
                              "--out-dir", str(out), "--device", "cpu", *extra],
                             env={**os.environ, "ZOO_REGISTRY": str(work / "registry.db")})
            cost[method] = {**m, "steps": 30}
    finish(args, rows, tasks, timings, cost, val, best)
    print("\n| method | " + " | ".join(tasks) + " | avg |")
    for r in rows:
        print(f"| {r['method']} | " + " | ".join(f"{100 * r[t]:.1f}" for t in [*tasks, "avg"]) + " |")


def finish(args, rows, tasks, timings, cost, val, best) -> None:
    for r in rows:
        r["avg"] = sum(r[t] for t in tasks) / len(tasks)
    save(args.result or ("learned_demo" if args.schedule == "demo" else "learned_demo_paper"), {
        "schedule": args.schedule, "device": args.device, "demo_schedule": SCHEDULE, "steps_scale": args.steps_scale,
        "ta_val_by_lambda": val, "best_lambda": best, "rows": rows, "timings": timings, "step_cost": cost,
        "tasks": tasks})


if __name__ == "__main__":
    main()
