"""Benchmark: how long `zoo --help` and `zoo list` take to start, against references in
the same run: a bare `python -c pass` (the floor) and `python -c "import sqlalchemy.orm,
torch"` (what these two commands would pay if they imported the ORM and torch; they
import neither, which tests/test_cli_help.py checks). No timed test: the budget is
measured here. Results go to bench/results/cli_startup.json.

    .venv/bin/python bench/cli_startup.py [--runs 15] [--models 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

ZOO = str(Path(sys.executable).with_name("zoo"))


def seeded_registry(folder: Path, n: int) -> Path:
    """A registry with ``n`` small models (one base, the rest experts), made through the CLI."""
    import torch
    from safetensors.torch import save_file

    reg = folder / "registry.db"
    env = {**os.environ, "ZOO_REGISTRY": str(reg)}
    for i in range(n):
        model = folder / f"m{i}"
        model.mkdir()
        torch.manual_seed(0)
        save_file({"w": torch.randn(64, 64) + (0.01 * i if i else 0)}, str(model / "model.safetensors"))
        args = ["--kind", "base"] if i == 0 else ["--base", "m0", "--task", f"task{i}"]
        subprocess.run([ZOO, "add", str(model), "--name", f"m{i}", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return reg


def timed(cmd: list[str], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Wall seconds of ``runs`` runs after one warm-up (the page cache holds the files)."""
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--models", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoo-cli-startup-") as tmp:
        reg = seeded_registry(Path(tmp), args.models)
        env = {**os.environ, "ZOO_REGISTRY": str(reg)}
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "zoo --help": [ZOO, "--help"],
            "zoo list": [ZOO, "list"],
            "zoo list --json": [ZOO, "list", "--json"],
            "python -c 'import sqlalchemy.orm, torch'": [sys.executable, "-c", "import sqlalchemy.orm, torch"],
        }
        results = {name: timed(cmd, args.runs, env) for name, cmd in commands.items()}
    floor = results["python -c pass"]["median_s"]
    heavy = results["python -c 'import sqlalchemy.orm, torch'"]["median_s"]
    for r in results.values():
        r["over_floor_s"] = round(r["median_s"] - floor, 4)
    save("cli_startup", {"models": args.models, "runs": args.runs, "results": results,
                         "zoo_help_over_floor_s": results["zoo --help"]["over_floor_s"],
                         "zoo_list_over_floor_s": results["zoo list"]["over_floor_s"],
                         "heavy_imports_over_floor_s": round(heavy - floor, 4)})


if __name__ == "__main__":
    main()
