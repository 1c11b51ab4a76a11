"""Benchmark: the SVD merges (tsv, iso_c) stream in bounded memory on the 1B family,
timed against task arithmetic in the same run.

The family is the synthetic LLaMA-layout base + 3 experts of bench/merge_vs_mergekit.py
(bf16, about 1B parameters each). ``--layers N`` first cuts it to its first N decoder
layers, keeping the embeddings, lm_head and final norm whole: every tensor shape of the
full model is there (the 32000 x 2048 vocabulary matrices, which the SVD merges average
and stream in pieces, and the 5632 x 2048 MLP matrices, the largest they SVD), so the
peak memory is the full model's, and the time per layer is measured. Each merge is
``zoo merge`` on the CPU with float32 compute and bf16 output; memory is the process
tree's peak anonymous RSS, sampled every 20 ms.

    .venv/bin/python bench/svd_streaming.py --family DIR [--layers 1] [--methods task_arithmetic,iso_c,tsv]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from common import run_measured, save
from safetensors import safe_open
from safetensors.torch import save_file

ZOO = str(Path(sys.executable).with_name("zoo"))
PARAMS = {"task_arithmetic": ({"weight": 0.3}, {}), "tsv": ({}, {"alpha": 1.0}), "iso_c": ({}, {"scaling_factor": 1.0}),
          "iso_cts": ({}, {"scaling_factor": 1.0, "common_space_fraction": 0.8})}


def cut(src: Path, dst: Path, layers: int) -> None:
    """``src`` (a sharded HF folder) with only its first ``layers`` decoder layers."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: f for k, f in index.items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers}
    dst.mkdir(parents=True)
    tensors = {}
    for name, f in keep.items():
        with safe_open(str(src / f), "pt") as fh:
            tensors[name] = fh.get_tensor(name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=0, help="cut to the first N decoder layers (0: the whole model)")
    ap.add_argument("--methods", default="task_arithmetic,iso_c,tsv")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every merge (1 on a shared machine: two threads contending for two "
                         "busy cores make an SVD many times slower)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    work = Path(tempfile.mkdtemp(prefix="zoo-svd-bench-", dir=args.work))
    try:
        family = args.family
        if args.layers:
            family = work / "family"
            for d in sorted(p for p in args.family.iterdir() if p.is_dir()):
                cut(d, family / d.name, args.layers)
        experts = sorted(p for p in family.iterdir() if p.name.startswith("expert"))
        results = {}
        for method in args.methods.split(","):
            per_model, options = PARAMS[method]
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(family / "base"),
                                           "models": [{"model": str(e), "parameters": per_model} for e in experts],
                                           "parameters": options, "dtype": "float32", "out_dtype": "bfloat16"}))
            out = work / f"out_{method}"
            os.sync()
            results[method] = run_measured([ZOO, "merge", str(cfg), "--out-dir", str(out), "--device", "cpu"], env=env)
            print(method, results[method], flush=True)
            shutil.rmtree(out, ignore_errors=True)
        ta = results.get("task_arithmetic", {}).get("wall_s")
        for r in results.values():
            if ta:
                r["wall_over_task_arithmetic"] = r["wall_s"] / ta
        save("svd_streaming", {"family": str(args.family), "layers": args.layers or "all", "experts": len(experts),
                               "target_peak_anon_mib": 1024, "threads": args.threads or os.cpu_count(), "cases": results})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
