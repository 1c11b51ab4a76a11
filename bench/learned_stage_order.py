"""Concrete AdaMerging's stage-1 order over seeds, on the demo zoo.

fusion_bench takes stage 1's inner gradient at the previous step's adapted coefficients
and only then resets them to the initial value (``stage1_order: reference``, the
default); zoo used to reset first (``reset_first``). Both orders run layer-wise Concrete
AdaMerging on the demo's schedule (50 stage-1 + 50 stage-2 steps, lr 1e-2, batch 16 per
task) for several recipe seeds, and each merge is measured on the test split; the
result is the mean and the spread (sample standard deviation, min, max) of the average
accuracy per order. Label-free (``entropy``) by default; ``--objective ce`` for the
supervised rows.

    .venv/bin/python bench/learned_stage_order.py [--seeds 5] [--objective entropy|ce]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402

import zoo.merge as merge  # noqa: E402
from zoo import Registry  # noqa: E402
from zoo.demo.build import FULL, run_demo  # noqa: E402
from zoo.demo.merges import LEARNED, measure  # noqa: E402

ORDERS = ("reference", "reset_first")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--objective", choices=["entropy", "ce"], default="entropy")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the same bytes on any machine)")
    ap.add_argument("--result", default=None, help="results file name (default learned_stage_order[_ce])")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="zoo-stage-order-"))
    reg = Registry(work / "registry.db", create=True)
    demo = run_demo(reg, FULL, log=lambda m: print(m, file=sys.stderr))
    tasks, experts = list(demo.experts), list(demo.experts.values())
    spec = LEARNED[f"concrete-am-layer-{args.objective}"]
    runs = []
    for seed in range(args.seeds):
        for order in ORDERS:
            name = f"cam-{order}-{seed}"
            params = {**spec["parameters"], "stage1_order": order}
            recipe = merge.from_dict({"merge_method": spec["merge_method"], "base_model": demo.base, "seed": seed,
                                      "parameters": params, "models": [{"model": e} for e in experts]})
            t0 = time.perf_counter()
            merge.run(recipe, name, registry=reg, device="cpu")
            acc = measure(reg, name, tasks)
            avg = sum(acc.values()) / len(acc)
            runs.append({"seed": seed, "order": order, "avg": avg, "per_task": acc,
                         "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {order}: {100 * avg:.1f} ({runs[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    summary = {}
    for order in ORDERS:
        avgs = [r["avg"] for r in runs if r["order"] == order]
        summary[order] = {"mean": statistics.mean(avgs), "std": statistics.stdev(avgs) if len(avgs) > 1 else 0.0,
                          "min": min(avgs), "max": max(avgs), "n": len(avgs)}
    diffs = [a["avg"] - b["avg"] for a, b in zip(*([r for r in runs if r["order"] == o] for o in ORDERS))]
    summary["reference_minus_reset_first"] = {
        "mean": statistics.mean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "wins": sum(d > 0 for d in diffs), "n": len(diffs)}
    save(args.result or ("learned_stage_order" + ("" if args.objective == "entropy" else "_ce")), {
        "method": "concrete_adamerging", "parameters": spec["parameters"], "objective": args.objective,
        "threads": args.threads, "seeds": list(range(args.seeds)), "tasks": tasks, "summary": summary,
        "runs": runs})


if __name__ == "__main__":
    main()
