"""Parity distillation on the demo zoo: does levelling a merge against its experts,
without labels, close the gap to them?

Rows (test accuracy per task, none of it used for training or for any choice):
task arithmetic (λ = 0.3), label-free Concrete TA and AdaMerging (entropy) on the same
unlabeled pool and the same number of steps and examples as the parity runs, then
parity distillation from task arithmetic and from Concrete TA, training the
coefficients (the default), coefficients plus norms and biases, or the Concrete mask;
and parity from the merge in which the digit expert was MergeLock-protected, with that
protected expert teaching. Each parity row also has the average disagreement with the
experts on their pools, before and after.

    .venv/bin/python bench/parity_demo.py [--schedule demo|default] [--only KEY,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402

import zoo.merge as merge  # noqa: E402
from zoo.demo.merges import LEARNED, PARITY_SCHEDULE, measure  # noqa: E402
from zoo.demo.protection import SEED, VICTIM  # noqa: E402
from zoo.protect.run import protect  # noqa: E402
from zoo import Registry  # noqa: E402
from zoo.demo.build import FULL, run_demo  # noqa: E402

DEFAULT = {"rounds": 3, "steps": 100}  # the method's defaults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", choices=["demo", "default"], default="default",
                    help="demo: the demo's 2 rounds x 50 steps; default: the method's 3 x 100")
    ap.add_argument("--only", default=None, help="comma-separated row keys")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    schedule = DEFAULT if args.schedule == "default" else {k: PARITY_SCHEDULE[k] for k in ("rounds", "steps")}
    steps = schedule["rounds"] * schedule["steps"]
    work = Path(tempfile.mkdtemp(prefix="zoo-parity-demo-"))
    reg = Registry(work / "registry.db", create=True)
    demo = run_demo(reg, FULL, log=lambda m: print(m, file=sys.stderr))
    tasks, experts = list(demo.experts), list(demo.experts.values())
    locked = f"{demo.config.prefix}-{VICTIM}-locked"
    protect(demo.experts[VICTIM], locked, registry=reg, seed=SEED)
    with_locked = [locked if e == demo.experts[VICTIM] else e for e in experts]

    # the same pool (each task's train inputs) and the same examples per task: a parity
    # step sees batch_size parity samples and batch_size agreeing ones
    budget = {"steps": steps, "batch_size": 2 * 16, "lr": 1e-2, "objective": "entropy"}
    parity = {**schedule, "lr": 1e-2}
    rows_spec = [
        ("ta", "task arithmetic (λ = 0.3)", "task_arithmetic", experts, {}),
        ("ta-protected", f"task arithmetic, {VICTIM} protected", "task_arithmetic", with_locked, {}),
        ("am-task-entropy", "AdaMerging task-wise, entropy", "adamerging", experts, {**budget, "coefficients": "task"}),
        ("am-layer-entropy", "AdaMerging layer-wise, entropy", "adamerging", experts,
         {**budget, "coefficients": "layer"}),
        ("concrete-ta-entropy", "Concrete TA, entropy (the demo's)", "concrete_ta", experts,
         LEARNED["concrete-ta-entropy"]["parameters"]),
        ("parity-ta", "parity from TA: coefficients", "parity", experts, {**parity, "start": "ta"}),
        ("parity-ta-params", "parity from TA: coefficients + norms and biases", "parity", experts,
         {**parity, "start": "ta", "train": "coefficients,params"}),
        ("parity-ta-mask", "parity from TA: Concrete mask", "parity", experts,
         {**parity, "start": "ta", "train": "mask"}),
        ("parity-cta", "parity from Concrete TA: coefficients", "parity", experts,
         {**parity, "start": "concrete-ta-entropy"}),
        ("parity-cta-params", "parity from Concrete TA: coefficients + norms and biases", "parity", experts,
         {**parity, "start": "concrete-ta-entropy", "train": "coefficients,params"}),
        ("parity-ta-agree0.1", "parity from TA: coefficients, agree_weight 0.1", "parity", experts,
         {**parity, "start": "ta", "agree_weight": 0.1}),
        ("parity-ta-protected", f"parity from TA with {VICTIM} protected, the protected expert teaching "
                                f"(coefficients + norms and biases, as the demo)", "parity",
         with_locked, {**parity, "start": "ta-protected", "train": "coefficients,params"}),
    ]
    rows, only = [], set(args.only.split(",")) if args.only else None
    needed = {"ta", "ta-protected", "concrete-ta-entropy"}
    for key, label, method, models, params in rows_spec:
        if only is not None and key not in only and key not in needed:
            continue
        recipe = merge.from_dict({"merge_method": method, "base_model": demo.base, "parameters": params,
                                  "models": [{"model": m} for m in models]})
        t0 = time.perf_counter()
        merge.run(recipe, key, registry=reg, device="cpu", log=lambda m: print(m, file=sys.stderr))
        row = {"key": key, "method": label, "params": params, "wall_s": round(time.perf_counter() - t0, 1),
               **measure(reg, key, tasks)}
        row["avg"] = sum(row[t] for t in tasks) / len(tasks)
        learned = reg.show(key)["recipe"].get("learned") or {}
        if learned.get("objective") == "parity":
            table = learned["table"]
            for tag, r in (("start", 0), ("end", next(x["round"] for x in table if x["kept"]))):
                these = [x for x in table if x["round"] == r]
                row[f"disagreement_{tag}"] = sum(x["disagreement"] for x in these) / len(these)
                row[f"parity_set_{tag}"] = sum(x["parity"] for x in these)
            row["reliable"] = sum(x["reliable"] for x in table if x["round"] == 0)
            row["kept_round"] = next(x["round"] for x in table if x["kept"])
            row["table"] = table
        rows.append(row)
        extra = "" if "disagreement_end" not in row else \
            f", disagreement {100 * row['disagreement_start']:.1f}% -> {100 * row['disagreement_end']:.1f}%"
        print(f"{key}: {100 * row['avg']:.1f}{extra} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        save(args.result or f"parity_demo{'' if args.schedule == 'default' else '_demo_schedule'}",
             {"schedule": schedule, "tasks": tasks, "experts_accuracy": demo.accuracy, "rows": rows})
    print("\n| method | " + " | ".join(tasks) + " | avg | disagreement |")
    for r in rows:
        dis = "" if "disagreement_end" not in r else \
            f"{100 * r['disagreement_start']:.1f} → {100 * r['disagreement_end']:.1f}"
        print(f"| {r['method']} | " + " | ".join(f"{100 * r[t]:.1f}" for t in [*tasks, "avg"]) + f" | {dis} |")


if __name__ == "__main__":
    main()
