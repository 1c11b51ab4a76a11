"""Learned merges' steps per second on the CPU, before and after the speed work, side by
side in one run, on the demo zoo.

"Before" is the code at a git revision (``--before``, default the commit this work
started from), exported into a temporary folder and imported from there; "after" is
this checkout. Each (version, method) runs in its own process, one after the other
(alternating versions, ``--repeats`` times; the best rate of each is kept, since the
machine is shared), with the same torch thread count. The rate is measured between the
progress reports of the first and the last step, so setup, the first step and writing
the model are left out: in wall-clock steps per second, and in steps per CPU-second of
the process (one thread), which other processes on a shared machine disturb far less.
Both versions write the merged model; the largest difference between their weights
(and between their losses at the steps both report) says how far the new arithmetic
moved the result.

Methods, with the demo's settings (lr 1e-2, batch 16 per task, entropy): Concrete TA,
layer-wise AdaMerging and parity distillation (from task arithmetic, training
coefficients, norms and biases; one round).

    .venv/bin/python bench/learned_speed.py [--steps 41] [--repeats 2] [--before REV]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tarfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the last commit before the learned-merge speed work (shared body pass, losses left on
# the device, the fused mask chain)
BEFORE = "ffb3025"
METHODS = {
    "concrete_ta": ("Concrete TA", {"merge_method": "concrete_ta", "parameters": {"lr": 1e-2}}),
    "adamerging_layer": ("AdaMerging layer-wise", {"merge_method": "adamerging",
                                                   "parameters": {"lr": 1e-2, "coefficients": "layer"}}),
    "parity": ("parity (coefficients, norms, biases)",
               {"merge_method": "parity", "parameters": {"lr": 1e-2, "rounds": 1, "start": "task_arithmetic",
                                                          "train": "coefficients,params", "eval_split": "none"}}),
}


def export(rev: str, dest: Path) -> Path:
    """The package at ``rev`` as an importable ``zoo`` folder (the repository's folder
    mapping of pyproject.toml: merge/, protect/, cli/ inside zoo/)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    tree = dest / "tree"
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(tree, filter="data")
    pkg = dest / "pkg"
    shutil.copytree(tree / "zoo", pkg / "zoo")
    for sub in ("merge", "protect", "cli"):
        shutil.copytree(tree / sub, pkg / "zoo" / sub)
    return pkg


def worker(args) -> None:
    """One learned merge in this process; prints a JSON line with its rate."""
    import torch

    torch.set_num_threads(args.threads)
    import zoo.merge as merge

    from common import timed_demo_merge

    t = timed_demo_merge(METHODS[args.method][1], args.steps, Path(args.registry), Path(args.demo), Path(args.out))
    print(json.dumps({"package": str(Path(merge.__file__).parent), "steps_per_second": t["timed_steps"] / t["seconds"],
                      "steps_per_cpu_second": t["timed_steps"] / t["cpu_seconds"], "timed_steps": t["timed_steps"],
                      "wall_seconds": t["wall_seconds"], "losses": t["losses"], "max_rss_mib": t["max_rss_mib"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=41, help="steps per run (the rate is over all but the first)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=BEFORE, help="git revision of the code before")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--result", default="learned_speed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import demo_zoo, git_rev, save, weights_difference

    if args.worker:
        worker(args)
        return
    if args.setup:  # the demo zoo in a registry of this process's zoo (each version reads only its own schema)
        demo_zoo(Path(args.out))
        return

    work = Path(tempfile.mkdtemp(prefix="zoo-learned-speed-"))
    before = export(args.before, work / "before")
    rev = git_rev()
    versions = {"before": before, "after": None}
    n_tasks = demo_zoo(work / "after-zoo")
    setup = subprocess.run([sys.executable, __file__, "--setup", "--out", str(work / "before-zoo")],
                           env={**os.environ, "PYTHONPATH": str(before)}, capture_output=True, text=True)
    if setup.returncode != 0:
        raise SystemExit(f"the demo zoo for {args.before} failed:\n{setup.stderr[-3000:]}")
    runs: dict[str, dict[str, list[dict]]] = {m: {v: [] for v in versions} for m in args.methods.split(",")}
    for repeat in range(args.repeats):
        for method in runs:
            for version, pkg in versions.items():
                out = work / f"{method}-{version}-{repeat}"
                env = {**os.environ, "PYTHONHASHSEED": "0"}
                if pkg is not None:
                    env["PYTHONPATH"] = str(pkg)
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--registry", str(work / f"{version}-zoo" / "registry.db"),
                       "--demo", str(work / f"{version}-zoo" / "demo.json"), "--out", str(out)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{method} ({version}) failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["out"] = str(out)
                runs[method][version].append(row)
                print(f"{method} {version}: {row['steps_per_second']:.2f} steps/s ({row['package']})",
                      file=sys.stderr, flush=True)
    table = []
    for method, by in runs.items():
        best = {v: max(r["steps_per_second"] for r in by[v]) for v in versions}
        cpu = {v: max(r["steps_per_cpu_second"] for r in by[v]) for v in versions}
        a, b = by["before"][0], by["after"][0]
        common = sorted(set(a["losses"]) & set(b["losses"]), key=int)
        table.append({
            "method": METHODS[method][0], "key": method,
            "before_steps_per_second": best["before"], "after_steps_per_second": best["after"],
            "speedup": best["after"] / best["before"],
            "before_steps_per_cpu_second": cpu["before"], "after_steps_per_cpu_second": cpu["after"],
            "cpu_speedup": cpu["after"] / cpu["before"],
            "before_max_rss_mib": max(r["max_rss_mib"] for r in by["before"]),
            "after_max_rss_mib": max(r["max_rss_mib"] for r in by["after"]),
            "max_weight_difference": weights_difference(Path(a["out"]), Path(b["out"])),
            "max_loss_difference": max(abs(a["losses"][s] - b["losses"][s]) for s in common),
            "all_rates": {v: [r["steps_per_second"] for r in by[v]] for v in versions},
            "all_cpu_rates": {v: [r["steps_per_cpu_second"] for r in by[v]] for v in versions},
        })
    save(args.result, {"before": args.before, "after": rev, "steps": args.steps, "threads": args.threads,
                       "repeats": args.repeats, "tasks": n_tasks, "batch_per_task": 16,
                       "load_average_at_end": os.getloadavg(), "rows": table})
    print("\n| method | before (steps/s) | after (steps/s) | speedup | before (steps/CPU-s) | after (steps/CPU-s) "
          "| speedup | max weight difference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {r['before_steps_per_second']:.2f} | {r['after_steps_per_second']:.2f} | "
              f"{r['speedup']:.2f}x | {r['before_steps_per_cpu_second']:.2f} | {r['after_steps_per_cpu_second']:.2f} | "
              f"{r['cpu_speedup']:.2f}x | {r['max_weight_difference']:.1e} |")


if __name__ == "__main__":
    main()
