"""Benchmark: `zoo list --json` over a registry of 100,000 models on PostgreSQL (target:
under 1 s).

A private PostgreSQL server (tests/postgres.py: initdb in a temp folder, a unix socket,
stopped at the end) holds a real registry made by zoo (the migrated schema), filled as
bench/list_10k.py fills its SQLite one: models, their files, tasks and tags, in one
transaction, with each model's listing line written as zoo's own writes write it
(zoo.registry.listing.relist). The floor in the same run is a bare Python process that
selects every row of the models table with psycopg and prints it as JSON. `zoo list
--json` reads the ready lines (zoo.registry.listing.model_lines); the CPU time of the
zoo process and of the server for it are recorded too, since on a loaded machine the
wall time is mostly waiting for a core. Results go to bench/results/list_pg.json, with
the machine's load average while it ran.

    .venv/bin/python bench/list_pg.py [--models 100000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import save  # noqa: E402
from list_10k import fill  # noqa: E402
from postgres import PrivateServer, ensure_binaries  # noqa: E402

import psycopg  # noqa: E402

from zoo import Registry  # noqa: E402

ZOO = str(Path(sys.executable).with_name("zoo"))
FLOOR = ("import json, sys, psycopg; con = psycopg.connect(sys.argv[1]); cur = con.execute('select * from models'); "
         "cols = [c.name for c in cur.description]; "
         "print(json.dumps([dict(zip(cols, r)) for r in cur], indent=2, default=str))")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, bytes, float]:
    """Wall seconds, stdout, and the CPU seconds (user + system) of the command itself."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, env=env).stdout
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    bindir, why = ensure_binaries()
    if bindir is None:
        sys.exit(f"list_pg: {why}")
    server = PrivateServer(bindir).start()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    try:
        url = server.create_database("bench")
        t = time.perf_counter()
        with Registry(url, create=True, store=work / "store") as reg:
            fill(reg, args.models)
        fill_s = time.perf_counter() - t
        # What autovacuum does to a registry soon after a bulk load: without it the runs
        # below would pay for the first reads' hint bits and race autovacuum's own work.
        with psycopg.connect(url, autocommit=True) as con:
            con.execute("VACUUM ANALYZE")
        env = {**os.environ, "ZOO_REGISTRY": url, "ZOO_STORE": str(work / "store")}
        timed([ZOO, "list", "--json"], env)  # warm: the server's caches, the OS's page cache
        zoo_t, zoo_cpu, zoo_server_cpu, floor_t = [], [], [], []
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            server_cpu = server.cpu_seconds()
            t_, out, cpu = timed([ZOO, "list", "--json"], env)
            zoo_server_cpu.append(server.cpu_seconds() - server_cpu)
            assert len(json.loads(out)) == args.models
            zoo_t.append(t_)
            zoo_cpu.append(cpu)
            floor_t.append(timed([sys.executable, "-c", FLOOR, url], env)[0])
        result = {
            "models": args.models,
            "runs": args.runs,
            "server": subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                     text=True).stdout.strip(),
            "fill_seconds": fill_s,
            "seconds_median": {"zoo_list_json": statistics.median(zoo_t),
                               "floor_psycopg_json": statistics.median(floor_t)},
            "seconds_all": {"zoo_list_json": zoo_t, "floor_psycopg_json": floor_t},
            # CPU seconds of one `zoo list --json` (the zoo process) and of the server for it (its
            # backend): on a machine with cores to spare, their sum bounds the wall time.
            "cpu_seconds_median": {"zoo_process": statistics.median(zoo_cpu),
                                   "server": statistics.median(zoo_server_cpu),
                                   "total": statistics.median(a + b for a, b in zip(zoo_cpu, zoo_server_cpu))},
            "ratio_to_floor": statistics.median(zoo_t) / statistics.median(floor_t),
            # others' work on the machine while it ran (1-minute load average, before and after)
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "target_seconds": 1.0,
        }
        save("list_pg", result)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
