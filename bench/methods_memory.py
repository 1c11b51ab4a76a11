"""Benchmark: peak memory of `zoo merge` for each merge method on the ~1B family.

The family is the synthetic LLaMA-layout base + experts of merge_vs_mergekit.py (bf16,
about 1B parameters each; its largest tensors are the 32000 x 2048 embedding and LM
head). Each method merges the experts (as many as it takes) with float32 compute and
bf16 output (``--layers 1``: on the family cut to its first decoder layer, which keeps
every tensor shape); wall time and peak anonymous / file-backed memory go to
bench/results/methods_memory.json (a run of some methods keeps the others' results).

    .venv/bin/python bench/methods_memory.py --family DIR [--layers 1] [--methods nearswap,della_linear] [--result FILE]
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
from common import run_measured
from svd_streaming import cut

HERE = Path(__file__).resolve().parent
ZOO = str(Path(sys.executable).with_name("zoo"))
# method -> (experts used, per-model parameters, global parameters)
RECIPES = {
    "task_arithmetic": (3, {"weight": 0.3}, {}),
    "linear": (3, {}, {"weight": 1.0}),
    "ties": (3, {"weight": 0.3, "density": 0.5}, {}),
    "dare_linear": (3, {"weight": 0.3, "density": 0.5}, {}),
    "dare_ties": (3, {"weight": 0.3, "density": 0.5}, {}),
    "breadcrumbs": (3, {"weight": 0.3, "density": 0.5}, {}),
    "breadcrumbs_ties": (3, {"weight": 0.3, "density": 0.5}, {}),
    "della": (3, {"weight": 0.3, "density": 0.5}, {}),
    "della_linear": (3, {"weight": 0.3, "density": 0.5}, {}),
    "sce": (3, {}, {"select_topk": 0.5}),
    "nuslerp": (2, {"weight": 0.5}, {}),
    "multislerp": (3, {"weight": 1.0}, {}),
    "karcher": (3, {}, {}),
    "arcee_fusion": (1, {}, {}),
    "nearswap": (1, {}, {"t": 0.001}),
    "ram": (3, {}, {}),
    "ramplus_tl": (3, {}, {}),
    "slerp": (1, {}, {"t": 0.3}),
    "model_stock": (3, {}, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, type=Path)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder on the same disk")
    ap.add_argument("--layers", type=int, default=0,
                    help="cut the family to its first N decoder layers first (0: the whole model); every tensor "
                         "shape stays, so the peak of a streamed merge does too")
    ap.add_argument("--result", type=Path, default=HERE / "results" / "methods_memory.json",
                    help="the JSON file the results go into (its other methods' results are kept)")
    args = ap.parse_args()
    target = args.result
    results = json.loads(target.read_text()) if target.is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="zoo-methods-mem-", dir=args.work))
    try:
        family = args.family
        if args.layers:
            family = work / "family"
            for d in sorted(args.family.iterdir()):
                if d.is_dir():
                    cut(d, family / d.name, args.layers)
        experts = sorted(p for p in family.iterdir() if p.name.startswith("expert"))
        for method in args.methods.split(","):
            n, per_model, options = RECIPES[method]
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump({
                "merge_method": method, "base_model": str(family / "base"), "parameters": options,
                "models": [{"model": str(e), **({"parameters": per_model} if per_model else {})}
                           for e in experts[:n]],
                "dtype": "float32", "out_dtype": "bfloat16"}, sort_keys=False))
            out = work / method
            os.sync()
            results[method] = {"experts": n, "layers": args.layers or "all", **run_measured([ZOO, "merge", str(cfg), "--out-dir", str(out),
                                                             "--device", "cpu"])}
            shutil.rmtree(out, ignore_errors=True)
            print(method, results[method], flush=True)
            target.parent.mkdir(exist_ok=True)
            target.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
