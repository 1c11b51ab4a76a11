"""Learned merges across two processes (torch.distributed, gloo on the CPU) against one
process, on the demo zoo.

Each (layout, method) runs as its own command, one after the other, ``--repeats`` times
(alternating layouts; the best rate of each is kept, since the machine is shared):

- ``1x1``: one process, one torch thread;
- ``1x2``: one process, two threads (the whole of a 2-core machine);
- ``2x1``: two processes under torchrun, one thread each (each step's batches split
  between them, the gradients all-reduced).

As in ``learned_speed.py`` the rate is measured between the progress reports of the
first and the last step (setup, the first step and writing the model left out), in
wall-clock steps per second and in steps per CPU-second summed over the processes.
Rank 0's merged weights are compared with the one-process run's.

    .venv/bin/python bench/learned_distributed.py [--steps 41] [--repeats 2] [--layouts 1x1,1x2,2x1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "adamerging_layer": ("AdaMerging layer-wise", {"merge_method": "adamerging",
                                                   "parameters": {"lr": 1e-2, "coefficients": "layer"}}),
    "concrete_ta": ("Concrete TA", {"merge_method": "concrete_ta", "parameters": {"lr": 1e-2}}),
    "parity": ("parity (coefficients, norms, biases)",
               {"merge_method": "parity", "parameters": {"lr": 1e-2, "rounds": 1, "start": "task_arithmetic",
                                                          "train": "coefficients,params", "eval_split": "none"}}),
}
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes x threads each


def worker(args) -> None:
    """One learned merge in this process (one rank of it under torchrun); writes its
    rates as JSON to ``--out``/rank<N>.json."""
    import torch

    torch.set_num_threads(args.threads)
    from zoo.merge.learned.distributed import session

    sys.path.insert(0, str(ROOT / "bench"))
    from common import timed_demo_merge

    out = Path(args.out)
    with session("cpu") as sync:
        t = timed_demo_merge(METHODS[args.method][1], args.steps, Path(args.registry), Path(args.demo), out / "model")
    (out / f"rank{sync.rank}.json").write_text(json.dumps({"rank": sync.rank, "world": sync.world, **t}))


def run_one(args, work: Path, method: str, layout: str, repeat: int) -> dict:
    procs, threads = LAYOUTS[layout]
    out = work / f"{method}-{layout}-{repeat}"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS=str(threads))
    tail = [__file__, "--worker", "--method", method, "--steps", str(args.steps), "--threads", str(threads),
            "--registry", str(work / "registry.db"), "--demo", str(work / "demo.json"), "--out", str(out)]
    cmd = [sys.executable, *tail] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), *tail]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} ({layout}) failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    steps, seconds = ranks[0]["timed_steps"], max(r["seconds"] for r in ranks)
    return {"steps_per_second": steps / seconds, "steps_per_cpu_second": steps / sum(r["cpu_seconds"] for r in ranks),
            "losses": ranks[0]["losses"], "max_rss_mib_per_process": max(r["max_rss_mib"] for r in ranks),
            "out": str(out / "model")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=41, help="steps per run (the rate is over all but the first)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="of 1x1, 1x2, 2x1 (2x1 and 1x1 needed)")
    ap.add_argument("--result", default="learned_distributed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from common import demo_zoo, git_rev, save, weights_difference

    work = Path(tempfile.mkdtemp(prefix="zoo-learned-distributed-"))
    n_tasks = demo_zoo(work)
    rev = git_rev()
    layouts = args.layouts.split(",")
    runs: dict[str, dict[str, list[dict]]] = {m: {x: [] for x in layouts} for m in args.methods.split(",")}
    load: list[float] = []
    for repeat in range(args.repeats):
        for method in runs:
            for layout in layouts:
                row = run_one(args, work, method, layout, repeat)
                runs[method][layout].append(row)
                load.append(os.getloadavg()[0])
                print(f"{method} {layout}: {row['steps_per_second']:.2f} steps/s, "
                      f"{row['steps_per_cpu_second']:.2f} steps/CPU-s (load {load[-1]:.1f})", file=sys.stderr,
                      flush=True)
    table = []
    for method, by in runs.items():
        best = {x: max(r["steps_per_second"] for r in by[x]) for x in layouts}
        cpu = {x: max(r["steps_per_cpu_second"] for r in by[x]) for x in layouts}
        one, two = by["1x1"][0], by["2x1"][0]
        common = sorted(set(one["losses"]) & set(two["losses"]), key=int)
        table.append({
            "method": METHODS[method][0], "key": method,
            **{f"steps_per_second_{x}": best[x] for x in layouts},
            **{f"steps_per_cpu_second_{x}": cpu[x] for x in layouts},
            "speedup_2x1_vs_1x1": best["2x1"] / best["1x1"],
            "cpu_per_step_2x1_vs_1x1": cpu["1x1"] / cpu["2x1"],
            "max_rss_mib_per_process": {x: max(r["max_rss_mib_per_process"] for r in by[x]) for x in layouts},
            "max_weight_difference_2x1_vs_1x1": weights_difference(Path(one["out"]), Path(two["out"])),
            "max_loss_difference_2x1_vs_1x1": max(abs(one["losses"][s] - two["losses"][s]) for s in common),
            "all_rates": {x: [r["steps_per_second"] for r in by[x]] for x in layouts},
            "all_cpu_rates": {x: [r["steps_per_cpu_second"] for r in by[x]] for x in layouts},
        })
    save(args.result, {"commit": rev, "steps": args.steps, "repeats": args.repeats, "tasks": n_tasks,
                       "batch_per_task": 16, "layouts": {x: {"processes": LAYOUTS[x][0], "threads_each": LAYOUTS[x][1]}
                                                         for x in layouts},
                       "load_average_1min_after_each_run": load, "rows": table})
    print("\n| method | 1x1 (steps/s) | 2x1 (steps/s) | 2x1 / 1x1 | 1x1 (steps/CPU-s) | 2x1 (steps/CPU-s) | "
          "max weight difference |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {r['steps_per_second_1x1']:.2f} | {r['steps_per_second_2x1']:.2f} | "
              f"{r['speedup_2x1_vs_1x1']:.2f}x | {r['steps_per_cpu_second_1x1']:.2f} | "
              f"{r['steps_per_cpu_second_2x1']:.2f} | {r['max_weight_difference_2x1_vs_1x1']:.1e} |")

if __name__ == "__main__":
    main()
