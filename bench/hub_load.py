"""Load on one ``zoo serve``: 50 concurrent clients mixing model info, downloads and small
commits, first on normal repositories only, then with more clients hammering
repositories whose cards are hostile.

The server is its own process (``zoo serve --quiet``, uvicorn) on a loopback port, with
a fresh registry. The clients are threads with keep-alive httpx connections, spread
over a few processes so that the clients' own GIL does not time them. Each normal
client loops for ``--duration`` seconds over:

- model info (``GET /api/models/{repo}``) of a normal repository,
- a download of its weights file (``--file-mib``, default 4 MiB, read whole),
- a small commit (one inline file, each client its own path) to a normal repository.

Phase (b) adds ``--hostile-clients`` clients that ask, as fast as they can, for model
info and the README of repositories whose cards are hostile: nested aliases,
billion laughs, deep nesting, a huge scalar, many keys, tags, non-UTF-8 bytes. Those
cards are written into the repositories directly, past the server's checks, as a
server without them would have accepted them. The target: hostile cards move the
p99 latency of the normal operations by at most 2x. A control phase runs the same
extra clients against the normal repositories, so that the cost of the extra load
and the cost of the cards' content can be told apart.

Everything is bounded: each request has a timeout, each phase a deadline, the client
processes a deadline to report by, and a server that dies ends the run with the
errors counted.

    python bench/hub_load.py [--duration 60] [--clients 50] [--hostile-clients 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 30.0  # seconds, for every request
NORMAL_REPOS = 5
MIX = (("model_info", 0.5), ("download", 0.3), ("commit", 0.2))
NORMAL_CARD = ("---\nlicense: apache-2.0\nlibrary_name: transformers\ntags: [zoo, merge]\nbase_model: [team/a, "
               "team/b]\nbase_model_relation: merge\ndate: 2024-05-01\n---\n# A merge\n\nAn ordinary card.\n")


def _card(front: str) -> bytes:
    return f"---\n{front}\n---\n# card\n".encode()


def hostile_cards() -> dict[str, bytes]:
    """Cards the server refuses today, as an older server would have stored them."""
    aliases = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    aliases += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    laughs = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return {
        "nested-aliases": _card("\n".join(aliases)),  # the 304-byte card: 206 MB of model info before
        "billion-laughs": _card("\n".join(laughs)),
        "deep-nesting": _card("x: " + "[" * 5000 + "]" * 5000),
        "huge-scalar": _card("x: " + "a" * 250_000),
        "many-keys": _card("\n".join(f"key{i}: {i}" for i in range(15_000))),
        "python-tag": _card("x: !!python/object/apply:os.system ['echo pwned']"),
        "set-and-binary": _card("a: !!set {x, y}\nb: !!binary aGVsbG8="),
        "non-utf8": b"---\nlicense: \xff\xfe\n---\n# card\n",
    }


def start_server(registry: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", "--registry", str(registry), "serve", "--port", "0",
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()  # the ready line; a server that fails to start closes stdout
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"zoo serve did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ")[1].split()[0]


def _ndjson(summary: str, files: dict[str, bytes]) -> bytes:
    lines = [{"key": "header", "value": {"summary": summary}}]
    lines += [{"key": "file", "value": {"path": p, "content": base64.b64encode(d).decode(), "encoding": "base64"}}
              for p, d in files.items()]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def setup(url: str, token: str, registry: Path, file_mib: int) -> tuple[list[str], list[str]]:
    """The normal repositories (card, config, weights) and the hostile ones."""
    import httpx2

    from zoo import Registry
    from zoo.hub.repos import Change, HubRepos

    auth = {"Authorization": f"Bearer {token}"}
    weights = random.Random(0).randbytes(file_mib << 20)
    normal, hostile = [], []
    with httpx2.Client(base_url=url, headers=auth, timeout=120) as c:
        for i in range(NORMAL_REPOS):
            repo = f"load/normal-{i}"
            c.post("/api/repos/create", json={"name": f"normal-{i}", "organization": "load"}).raise_for_status()
            c.post(f"/api/models/{repo}/commit/main", content=_ndjson("model", {
                "README.md": NORMAL_CARD.encode(), "config.json": b'{"model_type": "llama"}',
                "weights.bin": weights}), headers={"Content-Type": "application/x-ndjson"}).raise_for_status()
            normal.append(repo)
        cards = hostile_cards()
        for name in cards:
            c.post("/api/repos/create", json={"name": name, "organization": "hostile"}).raise_for_status()
    reg = Registry(registry)  # the server's own registry: the cards go in past its checks
    try:
        repos = HubRepos(reg)
        for name, data in cards.items():
            change = Change(summary="an old card", files={"README.md": repos.stage(data)})
            repos.commit(f"hostile/{name}", "main", change, "bench")
            hostile.append(f"hostile/{name}")
    finally:
        reg.close()
    return normal, hostile


def client(args: tuple) -> list[tuple[str, float, str]]:
    """One client: (operation, seconds, "" or the error) for every request until the deadline."""
    import httpx2

    url, token, kind, repos, seed, deadline = args
    rng = random.Random(seed)
    out: list[tuple[str, float, str]] = []
    ops, weights = zip(*MIX)
    with httpx2.Client(base_url=url, timeout=REQUEST_TIMEOUT, headers={"Authorization": f"Bearer {token}"}) as c:
        n = 0
        while time.time() < deadline:
            repo = rng.choice(repos)
            if kind != "normal":  # the extra clients: hostile, or the same requests on normal cards
                op = f"{kind}_model_info" if rng.random() < 0.7 else f"{kind}_readme"
            else:
                op = rng.choices(ops, weights)[0]
            t0 = time.perf_counter()
            err = ""
            try:
                if op.endswith("model_info"):
                    r = c.get(f"/api/models/{repo}")
                    if r.status_code == 200:
                        r.json()["sha"]
                elif op.endswith("_readme"):
                    r = c.get(f"/{repo}/resolve/main/README.md")
                elif op == "download":
                    with c.stream("GET", f"/{repo}/resolve/main/weights.bin") as r:
                        for _ in r.iter_bytes(1 << 20):
                            pass
                else:
                    n += 1
                    r = c.post(f"/api/models/{repo}/commit/main", headers={"Content-Type": "application/x-ndjson"},
                               content=_ndjson(f"client {seed} commit {n}",
                                               {f"clients/{seed}.txt": f"commit {n} at {time.time()}\n".encode()}))
                if r.status_code >= 400:
                    err = f"HTTP {r.status_code}"
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                err = type(e).__name__
            out.append((op, time.perf_counter() - t0, err))
            if err and not err.startswith("HTTP"):
                time.sleep(0.1)  # a dead server: do not spin
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]  # nearest rank


def worker(jobs: list[tuple]) -> list[tuple[str, float, str]]:
    """One client process: a thread per client, all at once."""
    import threading

    results: list[list] = [[] for _ in jobs]

    def run(i: int) -> None:
        results[i] = client(jobs[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    end = max(j[-1] for j in jobs) + REQUEST_TIMEOUT + 10
    for t in threads:
        t.join(max(0.0, end - time.time()))
    return [r for rs in results for r in rs]


def server_memory_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak) of the server process, in MiB."""
    rss = hwm = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


def run_phase(url: str, token: str, normal: list[str], extra: tuple[str, list[str]] | None, args,
              proc: subprocess.Popen) -> dict:
    """Run the clients until the deadline; their latencies, errors and the server's memory."""
    start = time.time() + 3  # the client processes start first, then all begin together
    deadline = start + args.duration
    jobs = [(url, token, "normal", normal, i, deadline) for i in range(args.clients)]
    if extra is not None:
        kind, repos = extra
        jobs += [(url, token, kind, repos, 1000 + i, deadline) for i in range(args.hostile_clients)]
    procs = max(1, min(args.procs, len(jobs)))
    chunks = [jobs[i::procs] for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    records: list[tuple[str, float, str]] = []
    notes: list[str] = []
    peak_rss = 0.0
    with ctx.Pool(procs) as pool:
        pending = pool.map_async(worker, chunks)
        limit = deadline + REQUEST_TIMEOUT + 60
        while not pending.ready() and time.time() < limit:
            pending.wait(1)
            peak_rss = max(peak_rss, server_memory_mib(proc.pid)[0])
            if proc.poll() is not None and "the server died" not in notes:
                notes.append(f"the server died (exit {proc.returncode}) at {time.time() - start:.0f} s")
        if pending.ready():
            records = [r for rs in pending.get() for r in rs]
        else:
            notes.append("the clients did not report by their deadline; their results are lost")
            pool.terminate()
    return {"clients": len(jobs), "duration_s": args.duration, "server_peak_rss_mib": round(peak_rss, 1),
            "operations": summarise(records, args.duration), "notes": notes}


def summarise(records: list[tuple[str, float, str]], seconds: float) -> dict:
    by_op: dict[str, dict] = {}
    for op in sorted({r[0] for r in records}):
        rows = [r for r in records if r[0] == op]
        ok = [r[1] for r in rows if not r[2]]
        by_op[op] = {"requests": len(rows), "per_s": round(len(rows) / seconds, 1),
                     "errors": len(rows) - len(ok), "error_kinds": dict(Counter(r[2] for r in rows if r[2])),
                     "p50_ms": round(1000 * _pct(ok, 0.50), 1) if ok else None,
                     "p99_ms": round(1000 * _pct(ok, 0.99), 1) if ok else None,
                     "max_ms": round(1000 * max(ok), 1) if ok else None}
    return by_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="Seconds per phase (default 60).")
    ap.add_argument("--clients", type=int, default=50, help="Normal clients (default 50).")
    ap.add_argument("--hostile-clients", type=int, default=10, help="Clients added in phase (b) (default 10).")
    ap.add_argument("--procs", type=int, default=5, help="Client processes the clients are spread over.")
    ap.add_argument("--file-mib", type=int, default=4, help="Size of the file each download fetches.")
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: tmp).")
    ap.add_argument("--out", default="hub_load", help="Results name under bench/results/.")
    args = ap.parse_args()

    from zoo import Registry
    from zoo.hub.accounts import Accounts

    work = Path(tempfile.mkdtemp(prefix="zoo-hub-load-", dir=args.work))
    env = {**os.environ, "HF_HOME": str(work / "hf_home")}
    env.pop("ZOO_REGISTRY", None)
    proc = None
    try:
        registry = work / "server.db"
        reg = Registry(registry, create=True)
        accounts = Accounts(reg)
        token = accounts.create_token("bench")["token"]
        for org in ("load", "hostile"):
            accounts.add_org(org, ["bench"])
        reg.close()
        proc, url = start_server(registry, env)
        normal, hostile = setup(url, token, registry, args.file_mib)
        print(f"server at {url}: {len(normal)} normal and {len(hostile)} hostile repositories", flush=True)
        phases = {}
        for name, extra in (("a_normal", None), ("b_with_hostile_cards", ("hostile", hostile)),
                            ("control_with_benign_extra_clients", ("benign", normal))):
            phases[name] = run_phase(url, token, normal, extra, args, proc)
            print(name, json.dumps(phases[name]["operations"]), flush=True)
        rss, hwm = server_memory_mib(proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    a, b, c = (phases[k]["operations"] for k in phases)

    def ratio_of(x: dict, y: dict) -> dict:
        return {op: round(x[op]["p99_ms"] / y[op]["p99_ms"], 2) if x.get(op, {}).get("p99_ms") and
                y.get(op, {}).get("p99_ms") else None for op, _ in MIX}

    ratio = ratio_of(b, a)
    worst = max((r for r in ratio.values() if r is not None), default=None)
    errors = {name: sum(o["errors"] for o in p["operations"].values()) for name, p in phases.items()}
    save(args.out, {
        "setup": {"clients": args.clients, "hostile_clients": args.hostile_clients, "client_processes": args.procs,
                  "duration_s_per_phase": args.duration, "download_mib": args.file_mib,
                  "normal_repos": len(normal), "hostile_repos": [r.split("/")[1] for r in hostile],
                  "mix": dict(MIX), "request_timeout_s": REQUEST_TIMEOUT},
        "phases": phases, "p99_ratio_b_over_a": ratio, "worst_p99_ratio": worst, "errors": errors,
        "p99_ratio_b_over_control": ratio_of(b, c),  # the hostile cards' own effect, at the same load
        "server_rss_mib_at_end": round(rss, 1), "server_peak_rss_mib": round(hwm, 1),
        "target": "p99(b) / p99(a) <= 2 for every normal operation; no errors",
        "met": worst is not None and worst <= 2 and not any(errors.values()),
    })


if __name__ == "__main__":
    main()
