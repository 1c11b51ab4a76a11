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
