"""Benchmark: `zoo merge --device cuda` against `--device cpu` on the same machine, same run.

The family is a synthetic LLaMA-layout base + 3 experts (about 1B parameters each,
bf16; docs/results.md describes it). Cases as
in merge_vs_mergekit.py: task arithmetic (weight 0.3) and TIES (density 0.2), float32
compute, bf16 out. For each device: wall time (whole process, start-up included) and
peak anonymous / file-backed memory; then whether the two outputs are the same bytes
(elementwise float32 arithmetic and exact thresholds: they must be). Results go to
bench/results/merge_cuda.json.

    python bench/merge_cuda.py --family DIR [--runs 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import run_measured, save
from merge_vs_mergekit import recipe, warm

ROOT = Path(__file__).resolve().parents[1]


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, type=Path)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--cases", default="task_arithmetic,ties")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder on the same disk")
    ap.add_argument("--smoke", action="store_true", help="the CPU twice, to check the script without a GPU")
    args = ap.parse_args()
    devices = ("cpu", "cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    work = Path(tempfile.mkdtemp(prefix="zoo-cuda-bench-", dir=args.work))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results: dict[str, dict] = {}
    try:
        warm(args.family)
        for case in args.cases.split(","):
            cfg = recipe(args.family, case, work / f"{case}.yml")
            entry: dict = {}
            for key, dev in zip(("cpu", "cuda"), devices):
                runs = []
                for _ in range(args.runs):
                    out = work / key / "merged"  # the same folder name: the card names it
                    shutil.rmtree(out, ignore_errors=True)
                    out.parent.mkdir(exist_ok=True)
                    os.sync()
                    runs.append(run_measured([sys.executable, "-m", "zoo.cli.main", "merge", str(cfg), "--out-dir",
                                              str(out), "--device", dev], env=env))
                entry[key] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                entry[key]["runs"] = runs
            entry["cuda_over_cpu_wall"] = entry["cuda"]["wall_s"] / entry["cpu"]["wall_s"]
            entry["same_bytes"] = digests(work / "cpu" / "merged") == digests(work / "cuda" / "merged")
            results[case] = entry
            for key in ("cpu", "cuda"):
                shutil.rmtree(work / key, ignore_errors=True)
        if args.smoke:
            print(results)
            return
        save("merge_cuda", {"family": str(args.family), "gpu": torch.cuda.get_device_name(0),
                            "torch": torch.__version__, "cases": results})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
