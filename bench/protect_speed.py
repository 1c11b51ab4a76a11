"""Benchmark: `zoo protect` against the time to read the model and write it back.

The model is the benchmark family's base (docs/results.md: LLaMA layout, 1.0B
parameters, bf16, GQA 32/4 heads, 3 shards). Three
commands, alternated `--runs` times, each a fresh process writing a new folder on the
same disk:

- `zoo protect BASE --out-dir OUT --seed 1` (the whole command: config, key, card);
- floor: the same reader thread and shard writer with no transform (read it, write it back);
- `cp -r`: the kernel's copy, for scale.

Target: protect ≤ 1.5× the floor. Results go to bench/results/protect_speed.json.

    .venv/bin/python bench/protect_speed.py --model DIR [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_measured, save

ZOO = str(Path(sys.executable).with_name("zoo"))


def floor(src: str, out: str) -> None:
    """Read every tensor and write it back through protect's own streaming path."""
    from zoo.protect.layouts import layout_for
    from zoo.protect.lock import stream_attention
    from zoo.checkpoints.reader import open_checkpoint

    ckpt = open_checkpoint(src)
    Path(out).mkdir()
    stream_attention(ckpt, Path(out), lambda att, role, name, t: t, layout_for(ckpt))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--floor-only", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_only:
        floor(*args.floor_only)
        return
    model = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(dir=model.parent, prefix=".protect-bench-"))
    size = sum(p.stat().st_size for p in model.iterdir())
    subprocess.run(["cat", *map(str, model.iterdir())], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    cmds = {
        "protect": lambda out: [ZOO, "protect", str(model), "--out-dir", str(out), "--seed", "1"],
        "floor": lambda out: [sys.executable, __file__, "--model", str(model), "--floor-only", str(model), str(out)],
        "cp": lambda out: ["cp", "-r", str(model), str(out)],
    }
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    try:
        for i in range(args.runs):
            for name, cmd in cmds.items():
                out = work / f"{name}-{i}"
                runs[name].append(run_measured(cmd(out)))
                shutil.rmtree(out)
                Path(f"{out}.key").unlink(missing_ok=True)
                print(name, i, runs[name][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    save("protect_speed", {
        "model": str(model), "bytes": size, "runs": runs, "median_s": med,
        "protect_over_floor": med["protect"] / med["floor"], "protect_over_cp": med["protect"] / med["cp"],
        "target": "protect <= 1.5 x floor",
        "peak_anon_mib_protect": max(r["peak_anon_mib"] for r in runs["protect"]),
    })


if __name__ == "__main__":
    main()
