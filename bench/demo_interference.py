"""Benchmark: does the demo zoo show real merge interference?

Builds (or reuses) the full demo zoo in a fresh registry, timing the first build, then
measures on the test split, per task:

* the individual experts;
* the base with each expert's head;
* weight averaging (the mean of the expert bodies);
* task arithmetic, theta0 + lambda * sum(tau_i), at lambda 0.1 ... 1.0, with the lambda
  chosen on the validation split.

The merges here are a plain-torch reference of the papers' formulas (task arithmetic,
arXiv 2212.04089), only to check the zoo; the merge engine is `merge/`. A feasibility
study of this zoo (config F) measured: experts 94.3, TA 73.4, averaging 57.1, base + heads 35.3. Results go to
bench/results/demo_interference.json.

    .venv/bin/python bench/demo_interference.py [--cache DIR] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import save

from zoo import Registry
from zoo.demo.build import FULL, QUICK, run_demo
from zoo.evaluate import accuracy, load_model
from zoo.checkpoints.taskdata import load_split

LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="demo cache (default: a fresh temp folder, so the build is timed)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="zoo-demo-bench-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    reg = Registry(work / "registry.db", create=True)
    t0 = time.perf_counter()
    res = run_demo(reg, cfg, log=print, cache=cache)
    demo_seconds = time.perf_counter() - t0

    tasks = list(cfg.tasks)
    base = load_model(reg, res.base).state_dict()
    experts = {t: load_model(reg, res.experts[t]) for t in tasks}
    states = {t: m.state_dict() for t, m in experts.items()}
    body = [k for k in base if not k.startswith("classifier.")]
    data = {t: {s: load_split(reg.task_data(t), s) for s in ("val", "test")} for t in tasks}

    def evaluate(merged_body: dict[str, torch.Tensor] | None, split: str) -> dict[str, float]:
        out = {}
        for t in tasks:
            model = experts[t]
            sd = dict(states[t])
            if merged_body is not None:
                sd.update(merged_body)
            probe = type(model)(model.config)
            probe.load_state_dict(sd)
            probe.eval()
            out[t] = 100 * accuracy(probe, *data[t][split])
        return out

    def ta(lam: float) -> dict[str, torch.Tensor]:
        return {k: base[k] + lam * sum(states[t][k] - base[k] for t in tasks) for k in body}

    rows = {
        "individual experts": evaluate(None, "test"),
        "base + expert heads": evaluate({k: base[k] for k in body}, "test"),
        "weight averaging": evaluate(ta(1 / len(tasks)), "test"),
    }
    sweep = {}
    for lam in LAMBDAS:
        val = evaluate(ta(lam), "val")
        test = evaluate(ta(lam), "test")
        sweep[lam] = {"val_avg": sum(val.values()) / len(val), "test_avg": sum(test.values()) / len(test), "test": test}
    best = max(LAMBDAS, key=lambda lam: sweep[lam]["val_avg"])
    rows["task arithmetic λ=0.3"] = sweep[0.3]["test"]
    rows[f"task arithmetic λ={best} (best on val)"] = sweep[best]["test"]

    table = {name: {**accs, "avg": sum(accs.values()) / len(accs)} for name, accs in rows.items()}
    result = {
        "config": "quick" if args.quick else "full",
        "demo_seconds": demo_seconds,
        "demo_built": res.built,
        "test_accuracy_percent": table,
        "ta_sweep_avg_percent": {str(k): {"val": v["val_avg"], "test": v["test_avg"]} for k, v in sweep.items()},
        "best_lambda_on_val": best,
        "feasibility_reference_percent": {"individual": 94.3, "task arithmetic best": 73.4,
                                          "weight averaging": 57.1, "base + expert heads": 35.3},
        "torch_threads": torch.get_num_threads(),
    }
    save(f"demo_interference{'_quick' if args.quick else ''}", result)
    header = "| method | " + " | ".join(tasks) + " | **avg** |"
    print(header)
    print("|" + "---|" * (len(tasks) + 2))
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{accs[t]:.1f}" for t in tasks) + f" | **{accs['avg']:.1f}** |")
    print(f"\nfirst demo run: {demo_seconds:.0f} s ({'built' if res.built else 'cached'})")


if __name__ == "__main__":
    main()
