"""Shared by the benchmarks: where results go and what machine made them."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def weights_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two model folders' tensors (same names)."""
    from safetensors.torch import load_file

    worst = 0.0
    for f in sorted(a.glob("*.safetensors")):
        x, y = load_file(str(f)), load_file(str(b / f.name))
        for n, t in x.items():
            worst = max(worst, float((t.float() - y[n].float()).abs().max()) if t.numel() else 0.0)
    return worst


def grown_pool(task: str, splits: dict, size: int, *, labelled: bool = False) -> list:
    """An LLM demo task's pool, then fresh prompts of the task (seeded, distinct, never a
    prompt of any split) up to ``size``: more data, nothing else. Without answers
    (unlabeled) unless ``labelled``."""
    import random

    from zoo.checkpoints.prompts import Prompt
    from zoo.demo.llm_tasks import sample

    seen = {p.prompt for rows in splits.values() for p in rows}
    rng = random.Random(f"{task}/grown-pool")
    pool = list(splits["pool"])
    tries = 0
    while len(pool) < size:
        tries += 1
        if tries > 100 * size:
            raise SystemExit(f"task {task} has too few distinct prompts for a pool of {size}")
        p = sample(task, rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            pool.append(p if labelled else Prompt(p.prompt))
    return pool


def git_rev() -> str:
    """The repository's current commit, short."""
    import subprocess

    return subprocess.run(["git", "-C", str(RESULTS.parents[1]), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def demo_zoo(work: Path) -> int:
    """The classifier demo zoo registered in ``work`` (its ``registry.db``, and
    ``demo.json`` naming the base and experts) by the ``zoo`` this process imports;
    returns how many experts."""
    import sys

    from zoo import Registry
    from zoo.demo.build import FULL, run_demo

    work.mkdir(parents=True, exist_ok=True)
    demo = run_demo(Registry(work / "registry.db", create=True), FULL, log=lambda m: print(m, file=sys.stderr))
    (work / "demo.json").write_text(json.dumps({"base": demo.base, "experts": list(demo.experts.values())}))
    return len(demo.experts)


def timed_demo_merge(spec: dict[str, Any], steps: int, registry: Path, demo: Path, out_dir: Path) -> dict[str, Any]:
    """A learned merge (``spec``: merge_method and parameters) of ``demo_zoo``'s experts
    in this process, timed between the progress reports of its first and last step
    (setup, the first step and writing left out): the steps timed, their wall and CPU
    seconds, the whole run's wall seconds, the losses by step and the peak memory."""
    import resource

    import zoo.merge as merge
    from zoo import Registry

    info = json.loads(demo.read_text())
    recipe = merge.from_dict({"merge_method": spec["merge_method"], "base_model": info["base"], "seed": 0,
                              "parameters": {**spec["parameters"], "steps": steps},
                              "models": [{"model": e} for e in info["experts"]]})
    reports: list[tuple[int, float, float, float]] = []

    def report(step: int, total: int, loss: float, rate: float) -> None:
        reports.append((step, loss, time.perf_counter(), time.process_time()))

    t0 = time.perf_counter()
    merge.run(recipe, None, registry=Registry(registry), out_dir=out_dir, device="cpu", report=report)
    wall = time.perf_counter() - t0
    (s0, _, t_first, c_first), (s1, _, t_last, c_last) = reports[0], reports[-1]
    return {"timed_steps": s1 - s0, "seconds": t_last - t_first, "cpu_seconds": c_last - c_first,
            "wall_seconds": wall, "losses": {s: loss for s, loss, _, _ in reports},
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def save(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine and date, and print it."""
    result = {**result, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                    "platform": platform.platform()}, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (children started by any of each process's threads)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; wall time and the peaks of anonymous and file-backed memory of its
    process tree, sampled every 20 ms (file-backed pages are mapped inputs, which the
    page cache holds anyway; anonymous memory is what the program itself allocated)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        samples = [_rss(p) for p in process_tree(proc.pid)]
        peak_anon = max(peak_anon, sum(s[0] for s in samples))
        peak_file = max(peak_file, sum(s[1] for s in samples))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": wall, "peak_anon_mib": peak_anon / 1024, "peak_file_mib": peak_file / 1024}
