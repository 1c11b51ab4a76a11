"""Benchmark: MergeLock's effect on the demo zoo, with each expert in turn as the victim.

For every task: protect its expert (float32, default bound 1000), merge it with the
other seven by task arithmetic and by TIES (the demo's settings), and measure the
victim's task; then the same with the expert the realignment attack recovers. `zoo
demo` prints the full table for one victim (digit); this runs all eight.
Results go to bench/results/protect_demo.json.

    .venv/bin/python bench/protect_demo.py [--registry DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import save

from zoo.demo.merges import merge_demo
from zoo.demo.protection import protect_demo
from zoo.demo import build as demo_mod
from zoo.registry import Registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default=None, help="a folder for the registry (default: a temp folder)")
    args = ap.parse_args()
    root = Path(args.registry or tempfile.mkdtemp(prefix="zoo-protect-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    reg = Registry(root / "registry.db", create=True)
    res = demo_mod.run_demo(reg, demo_mod.FULL, log=lambda m: None)
    rows = merge_demo(reg, res, learned=False, log=lambda m: None)
    out = {}
    for victim in res.experts:
        s = protect_demo(reg, res, rows, log=lambda m: None, victim=victim)["summary"]
        out[victim] = {k: s[k] for k in ("chance", "ta", "ties")} | {
            "alone": res.accuracy[victim], "max_rel_logit_error": s["verify"]["max_rel_error"]}
        print(victim, out[victim], flush=True)
    lost = {k: [v[k]["advantage_lost"] for v in out.values() if v[k]["advantage_lost"] is not None]
            for k in ("ta", "ties")}
    rec = {k: [v[k]["recovered"] for v in out.values() if v[k]["recovered"] is not None] for k in ("ta", "ties")}
    save("protect_demo", {
        "victims": out,
        "advantage_lost": {k: {"mean": sum(x) / len(x), "min": min(x), "victims_at_80pct": sum(y >= 0.8 for y in x),
                               "n": len(x)} for k, x in lost.items()},
        "attack_recovered": {k: {"mean": sum(x) / len(x), "min": min(x), "max": max(x)} for k, x in rec.items()},
    })


if __name__ == "__main__":
    main()
