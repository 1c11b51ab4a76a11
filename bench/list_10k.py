"""Benchmark: `zoo list --json` over a registry of 10,000 models (target: under 1 s).

The registry is a real one made by zoo (so the schema is the migrated one), filled
with 10,000 models, their files, tasks and tags in one transaction. The reference in
the same run is the floor: a bare Python process that selects every row of the models
table with the standard library and prints it as JSON. Results go to
bench/results/list_10k.json.

    .venv/bin/python bench/list_10k.py [--models 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import save
from sqlalchemy import insert

from zoo import Registry
from zoo.registry.listing import relist
from zoo.registry.schema import File, Model, ModelTag, ModelTask, Task

ZOO = str(Path(sys.executable).with_name("zoo"))
FLOOR = ("import json, sqlite3, sys; con = sqlite3.connect(sys.argv[1]); cur = con.execute('select * from models'); "
         "cols = [c[0] for c in cur.description]; print(json.dumps([dict(zip(cols, r)) for r in cur], indent=2))")


def fill(reg: Registry, n: int) -> None:
    now = datetime.now(timezone.utc)
    tasks = [f"task{i}" for i in range(20)]
    with reg.db.write() as s:
        s.execute(insert(Task), [{"name": t, "created_at": now} for t in tasks])
        common = dict(form="model", model_type="llama", hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, vocab_size=32000, architecture={"model_type": "llama"}, tensor_count=291,
                      param_count=6_738_415_616, total_bytes=13_476_831_232, dtypes={"BF16": 291},
                      source_type="local", in_place=False, created_at=now)
        bases = 10
        s.execute(insert(Model), [{**common, "id": i + 1, "name": f"base-{i}", "version": 1, "kind": "base",
                                   "source_path": f"/data/base-{i}"} for i in range(bases)])
        s.execute(insert(Model), [{**common, "id": i + 1, "name": f"expert-{i:05d}", "version": 1, "kind": "expert",
                                   "base_id": 1 + i % bases, "source_path": f"/data/e{i}", "meta": {"lr": 1e-4}}
                                  for i in range(bases, n)])
        s.execute(insert(ModelTask), [{"model_id": i + 1, "task_id": 1 + i % len(tasks)} for i in range(bases, n)])
        s.execute(insert(ModelTag), [{"model_id": i + 1, "tag": t} for i in range(n) for t in ("bench", f"g{i % 7}")])
        s.execute(insert(File), [{"model_id": i + 1, "relpath": rel, "sha256": f"{i:060d}{j:04d}", "size": 1000}
                                 for i in range(n) for j, rel in enumerate(("config.json", "model.safetensors"))])
        # The rows went in past Registry.add, for speed: write their listing lines as it does.
        relist(s.connection().connection.dbapi_connection)


def timed(cmd: list[str]) -> tuple[float, bytes]:
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    try:
        reg = Registry(work / "registry.db", create=True)
        fill(reg, args.models)
        reg.close()
        zoo_t, floor_t = [], []
        for _ in range(args.runs):
            t, out = timed([ZOO, "--registry", str(work / "registry.db"), "list", "--json"])
            assert len(json.loads(out)) == args.models
            zoo_t.append(t)
            floor_t.append(timed([sys.executable, "-c", FLOOR, str(work / "registry.db")])[0])
        result = {
            "models": args.models,
            "runs": args.runs,
            "seconds_median": {"zoo_list_json": statistics.median(zoo_t), "floor_sqlite3_json": statistics.median(floor_t)},
            "seconds_all": {"zoo_list_json": zoo_t, "floor_sqlite3_json": floor_t},
            "ratio_to_floor": statistics.median(zoo_t) / statistics.median(floor_t),
            "target_seconds": 1.0,
        }
        save("list_10k", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
