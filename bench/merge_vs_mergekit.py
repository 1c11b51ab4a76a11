"""Benchmark: `zoo merge` against mergekit's `mergekit-yaml` and a floor loop, same run.

The family is a synthetic LLaMA-layout base + 3 experts (bf16, about 1B parameters
each; docs/results.md describes it). mergekit is
installed in its own virtual environment, never as a project dependency. Both tools
get the same mergekit-format recipe file, unchanged.

Cases: task arithmetic (weight 0.3 each, float32 compute, bf16 out) and TIES
(density 0.2, weight 0.3). For each: wall time and peak anonymous / file-backed
memory; for task arithmetic also the largest difference between zoo's and mergekit's
outputs in bf16 ULPs. Results go to bench/results/merge_vs_mergekit.json.

    .venv/bin/python bench/merge_vs_mergekit.py --family DIR --mergekit PATH/TO/mergekit-yaml [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from common import run_measured, save

from zoo.checkpoints.reader import open_checkpoint

HERE = Path(__file__).resolve().parent
ZOO = str(Path(sys.executable).with_name("zoo"))
CASES = {
    "task_arithmetic": {"weight": 0.3},
    "ties": {"weight": 0.3, "density": 0.2},
}


def recipe(family: Path, method: str, path: Path) -> Path:
    experts = sorted(p for p in family.iterdir() if p.name.startswith("expert"))
    path.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(family / "base"),
        "models": [{"model": str(e), "parameters": CASES[method]} for e in experts],
        "dtype": "float32", "out_dtype": "bfloat16"}, sort_keys=False))
    return path


def max_ulp(a_dir: Path, b_dir: Path) -> int:
    """Largest distance in bf16 steps between two checkpoints, tensor by tensor."""
    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    if set(a.tensors) != set(b.tensors):
        raise SystemExit("the outputs have different tensors")
    worst = 0
    for name in a.tensors:
        x = a.read_tensor(name).view(torch.int16).to(torch.int32)
        y = b.read_tensor(name).view(torch.int16).to(torch.int32)
        x = torch.where(x < 0, -(x + 32768), x)
        y = torch.where(y < 0, -(y + 32768), y)
        if x.numel():
            worst = max(worst, int((x - y).abs().max()))
    return worst


def warm(family: Path) -> None:
    for f in family.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, type=Path)
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml; omit to skip mergekit")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--cases", default="task_arithmetic,ties")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder on the same disk")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-merge-bench-", dir=args.work))
    results: dict[str, dict] = {}
    try:
        warm(args.family)
        experts = sorted(str(p) for p in args.family.iterdir() if p.name.startswith("expert"))
        for case in args.cases.split(","):
            cfg = recipe(args.family, case, work / f"{case}.yml")
            runs: dict[str, list[dict]] = {"zoo": [], "mergekit": [], "floor": []}
            for i in range(args.runs):
                out = work / f"zoo_{case}"
                shutil.rmtree(out, ignore_errors=True)
                # each run starts with no dirty pages: none pays for the previous one's writeback
                os.sync()
                runs["zoo"].append(run_measured([ZOO, "merge", str(cfg), "--out-dir", str(out), "--device", "cpu"]))
                if case == "task_arithmetic":
                    floor_out = work / "floor.safetensors"
                    os.sync()
                    runs["floor"].append(run_measured([sys.executable, str(HERE / "floor_merge.py"),
                                                       str(args.family / "base"), *experts, "--weight", "0.3",
                                                       "--out", str(floor_out)]))
                    floor_out.unlink(missing_ok=True)
                if args.mergekit:
                    mk_out = work / f"mk_{case}"
                    shutil.rmtree(mk_out, ignore_errors=True)
                    os.sync()
                    runs["mergekit"].append(run_measured([args.mergekit, str(cfg), str(mk_out)]))
            entry: dict = {}
            for tool, rs in runs.items():
                if rs:
                    entry[tool] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                    entry[tool]["runs"] = rs
            if "mergekit" in entry:
                entry["zoo_over_mergekit_wall"] = entry["zoo"]["wall_s"] / entry["mergekit"]["wall_s"]
                if case == "task_arithmetic":
                    entry["max_ulp_zoo_vs_mergekit"] = max_ulp(work / f"zoo_{case}", work / f"mk_{case}")
            if "floor" in entry:
                entry["zoo_over_floor_wall"] = entry["zoo"]["wall_s"] / entry["floor"]["wall_s"]
            results[case] = entry
            for d in (f"zoo_{case}", f"mk_{case}"):
                shutil.rmtree(work / d, ignore_errors=True)
        params = sum(t.numel for t in open_checkpoint(args.family / "base").tensors.values())
        previous = HERE / "results" / "merge_vs_mergekit.json"
        if previous.is_file():  # a run of some cases keeps the others' last results
            import json

            results = {**json.loads(previous.read_text()).get("cases", {}), **results}
        save("merge_vs_mergekit", {"family": str(args.family), "parameters_per_model": params,
                                   "targets": {"task_arithmetic_over_mergekit": 0.25, "task_arithmetic_over_floor": 2.0,
                                               "ties_over_mergekit": 0.1, "peak_anon_mib": 1024, "max_ulp": 0},
                                   "cases": results})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
