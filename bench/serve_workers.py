"""16 concurrent clients pushing and pulling through ``zoo serve --workers 4`` on
PostgreSQL, against one worker on SQLite (and, for reference, one worker on PostgreSQL):
throughput, p50/p99 latency, CPU per request, and afterwards 0 lost or corrupt commits.

Each configuration gets a fresh registry: a database on a private PostgreSQL server
(tests/postgres.py: initdb in a temp folder, unix socket, stopped at the end) with its
store folder, or a SQLite file. The server is its own process (``zoo serve --quiet``)
on a loopback port; files of 64 KiB and more go through LFS (``--lfs-threshold``), as
weights would. The clients are stock ``huggingface_hub`` (``HfApi.create_commit``,
``hf_hub_download``), threads spread over a few processes so that the clients' own GIL
does not time them. Two clients share each repository, so pushes also race on their
parent. Each client loops for ``--duration`` seconds over:

- push: read the branch head (``model_info``), then one commit on it with
  ``parent_commit``: a small inline file and an LFS file of ``--lfs-kib`` random bytes.
  A 412 (the other client of the repository moved the branch first) is counted as a
  conflict and retried on the new head; it is not an error.
- pull: ``hf_hub_download`` of a file of a commit some client made earlier, pinned to
  that commit, its bytes checked against the sha256 the pusher recorded.

Afterwards, with no load: every commit a client saw succeed is on its repository's
branch history, and each of its files reads back with the sha256 that was sent; then
``zoo verify`` re-hashes every stored blob. Everything is bounded: request timeouts, a
deadline per phase and per client process.

    .venv/bin/python bench/serve_workers.py [--duration 30] [--clients 16] [--workers 4]
"""

from __future__ import annotations

import argparse
import hashlib
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import process_tree as tree, save  # noqa: E402

REQUEST_TIMEOUT = 60.0
LFS_THRESHOLD = 64 * 1024
CLIENT_PROCS = 4


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the live processes ``pids`` have used."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def pg_sessions(url: str) -> int:
    """Sessions (connections) opened to the database so far, by PostgreSQL's statistics."""
    import psycopg

    time.sleep(1.5)  # backends report their statistics about once a second
    with psycopg.connect(url) as con:
        return con.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def start_server(cli: list[str], env: dict[str, str], workers: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", *cli, "serve", "--port", "0", "--quiet",
                             "--lfs-threshold", str(LFS_THRESHOLD), "--workers", str(workers)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()  # the ready line; a server that fails to start closes stdout
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"zoo serve did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ")[1].split()[0]


def client(args: tuple) -> tuple[list[tuple[str, float, str]], list[tuple[str, str, dict[str, str]]]]:
    """One client: (operation, seconds, "" or the error) per request, and the commits it made."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    constants.HF_HUB_DISABLE_XET = True
    url, token, repo, repos, seed, deadline, lfs_kib, cache, shared = args
    rng = random.Random(seed)
    api = HfApi(endpoint=url, token=token)
    out: list[tuple[str, float, str]] = []
    made: list[tuple[str, str, dict[str, str]]] = []
    n = 0
    while time.time() < deadline:
        pulls = [c for c in list(shared) if c[0] != repo] or list(shared)
        op = "pull" if pulls and rng.random() < 0.5 else "push"
        t0 = time.perf_counter()
        err = ""
        try:
            if op == "push":
                n += 1
                files = {f"clients/{seed}/note.txt": f"client {seed} commit {n} at {time.time()}\n".encode(),
                         f"clients/{seed}/w{n % 4}.bin": rng.randbytes(lfs_kib << 10)}
                while True:
                    head = api.model_info(repo, timeout=REQUEST_TIMEOUT).sha
                    try:
                        sha = api.create_commit(repo, [CommitOperationAdd(p, b) for p, b in files.items()],
                                                commit_message=f"client {seed} push {n}", parent_commit=head).oid
                        break
                    except HfHubHTTPError as e:
                        if e.response is None or e.response.status_code != 412 or time.time() > deadline + 30:
                            raise
                        out.append(("push_conflict_412", time.perf_counter() - t0, ""))
                        t0 = time.perf_counter()
                commit = (repo, sha, {p: hashlib.sha256(b).hexdigest() for p, b in files.items()})
                made.append(commit)
                shared.append(commit)
            else:
                crepo, sha, files = rng.choice(pulls)
                path = rng.choice(sorted(files))
                got = hf_hub_download(crepo, path, revision=sha, endpoint=url, token=token, cache_dir=cache,
                                      etag_timeout=REQUEST_TIMEOUT)
                digest = hashlib.sha256(Path(got).read_bytes()).hexdigest()
                Path(got).unlink(missing_ok=True)  # the cache stays small; a pull always downloads
                if digest != files[path]:
                    err = "corrupt"
        except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
            err = f"HTTP {e.response.status_code}" if getattr(e, "response", None) is not None else type(e).__name__
        out.append((op, time.perf_counter() - t0, err))
        if err and not err.startswith("HTTP"):
            time.sleep(0.1)  # a dead server: do not spin
    return out, made


def worker(jobs: list[tuple]) -> tuple[list, list]:
    """One client process: a thread per client, all at once."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(client, jobs))
    return [r for rs, _ in results for r in rs], [c for _, cs in results for c in cs]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]  # nearest rank


def summarise(records: list[tuple[str, float, str]], seconds: float) -> dict:
    by_op: dict[str, dict] = {}
    for op in sorted({r[0] for r in records}):
        rows = [r for r in records if r[0] == op]
        ok = [r[1] for r in rows if not r[2]]
        by_op[op] = {"requests": len(rows), "per_s": round(len(ok) / seconds, 2),
                     "errors": len(rows) - len(ok), "error_kinds": dict(Counter(r[2] for r in rows if r[2])),
                     "p50_ms": round(1000 * _pct(ok, 0.50), 1) if ok else None,
                     "p99_ms": round(1000 * _pct(ok, 0.99), 1) if ok else None}
    done = [r for r in records if not r[2] and r[0] in ("push", "pull")]
    by_op["all"] = {"per_s": round(len(done) / seconds, 2),
                    "p99_ms": round(1000 * _pct([r[1] for r in done], 0.99), 1) if done else None}
    return by_op


def verify(url: str, token: str, commits: list[tuple[str, str, dict[str, str]]], cli: list[str],
           env: dict[str, str]) -> dict:
    """Every commit a client saw succeed: on its branch's history, each file's bytes as sent."""
    import httpx2
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token)
    history = {repo: {c.commit_id for c in api.list_repo_commits(repo)} for repo in sorted({r for r, _, _ in commits})}
    lost = [(r, s) for r, s, _ in commits if s not in history[r]]
    with httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:

        def check(item: tuple[str, str, str, str]) -> tuple[str, str, str] | None:
            repo, sha, path, digest = item
            r = c.get(f"/{repo}/resolve/{sha}/{path}")
            return None if r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest else \
                (repo, sha, path)

        items = [(r, s, p, d) for r, s, files in commits for p, d in files.items()]
        with ThreadPoolExecutor(8) as pool:
            corrupt = [x for x in pool.map(check, items) if x is not None]
    v = subprocess.run([sys.executable, "-m", "zoo.cli.main", *cli, "verify"], env=env, capture_output=True,
                       text=True, cwd=ROOT, timeout=1800)
    return {"commits": len(commits), "files": len(items), "lost_commits": len(lost), "corrupt_files": len(corrupt),
            "zoo_verify_exit": v.returncode, "zoo_verify_says": (v.stdout + v.stderr).strip().splitlines()[-1:],
            "examples": {"lost": lost[:3], "corrupt": corrupt[:3]}}


def run_config(name: str, cli: list[str], env: dict[str, str], workers: int, args, work: Path,
               pg_cpu=None) -> dict:
    from zoo import Registry
    from zoo.hub.accounts import Accounts

    reg = Registry(cli[1], create=True, store=Path(cli[3]) if len(cli) > 2 else None)
    token = Accounts(reg).create_token("bench")["token"]
    Accounts(reg).add_org("load", ["bench"])
    reg.close()
    proc, url = start_server(cli, env, workers)
    try:
        from huggingface_hub import HfApi, constants

        constants.HF_HUB_DISABLE_XET = True
        api = HfApi(endpoint=url, token=token)
        repos = [f"load/r{i}" for i in range(-(-args.clients // args.clients_per_repo))]
        for r in repos:
            api.create_repo(r)
        cpu0 = cpu_of(tree(proc.pid))
        pg0 = pg_cpu() if pg_cpu else 0.0
        sessions0 = pg_sessions(cli[1]) if pg_cpu else 0
        start = time.time() + 5  # the client processes start first, then all begin together
        deadline = start + args.duration
        manager = multiprocessing.get_context("spawn").Manager()
        shared = manager.list()
        jobs = [(url, token, repos[i // args.clients_per_repo], repos, i, deadline, args.lfs_kib,
                 str(work / f"cache{i}"), shared) for i in range(args.clients)]
        chunks = [jobs[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
        records, commits, notes = [], [], []
        with multiprocessing.get_context("spawn").Pool(CLIENT_PROCS) as pool:
            pending = pool.map_async(worker, chunks)
            pending.wait(deadline + REQUEST_TIMEOUT + 120 - time.time())
            if pending.ready():
                for rs, cs in pending.get():
                    records += rs
                    commits += cs
            else:
                notes.append("the clients did not report by their deadline; their results are lost")
                pool.terminate()
        server_cpu = cpu_of(tree(proc.pid)) - cpu0
        pg_used = pg_cpu() - pg0 if pg_cpu else 0.0
        sessions = pg_sessions(cli[1]) - sessions0 if pg_cpu else 0
        manager.shutdown()
        if proc.poll() is not None:
            notes.append(f"the server died (exit {proc.returncode})")
        checked = verify(url, token, commits, cli, env)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"registry": name, "workers": workers, "clients": args.clients, "repos": len(repos),
            "duration_s": args.duration, "operations": summarise(records, args.duration),
            "cpu_seconds": {"zoo_serve": round(server_cpu, 1),
                            **({"postgresql": round(pg_used, 1)} if pg_cpu else {})},
            **({"postgresql_sessions_opened": sessions} if pg_cpu else {}),
            "verified": checked, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30, help="Seconds per configuration (default 30).")
    ap.add_argument("--clients", type=int, default=16, help="Concurrent clients (default 16).")
    ap.add_argument("--workers", type=int, default=4, help="zoo serve workers on PostgreSQL (default 4).")
    ap.add_argument("--clients-per-repo", type=int, default=2,
                    help="Clients pushing to each repository, racing on its parent (default 2).")
    ap.add_argument("--lfs-kib", type=int, default=128, help="Size of each pushed LFS file (default 128 KiB).")
    ap.add_argument("--out", default="serve_workers", help="Results name under bench/results/.")
    args = ap.parse_args()

    from postgres import PrivateServer, ensure_binaries

    bindir, why = ensure_binaries()
    if bindir is None:
        sys.exit(f"serve_workers: {why}")
    work = Path(tempfile.mkdtemp(prefix="zoo-serve-workers-"))
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # the client processes too
    env = {**os.environ, "HF_HOME": str(work / "hf_home")}
    env.pop("ZOO_REGISTRY", None)
    server = PrivateServer(bindir).start()
    load_before = os.getloadavg()[0]
    try:
        url = server.create_database("bench")
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])

        def pg_cpu() -> float:  # the postmaster with its exited children, and the live backends
            return server.cpu_seconds() + cpu_of(tree(postmaster)[1:])

        pg = run_config("postgresql", ["--registry", url, "--store", str(work / "pg.store")], env, args.workers,
                        args, work, pg_cpu=pg_cpu)
        print("postgresql", json.dumps(pg["operations"]), json.dumps(pg["verified"]), flush=True)
        # The same database kind with one worker: what the workers themselves add on this machine.
        url1 = server.create_database("bench1")
        pg1 = run_config("postgresql", ["--registry", url1, "--store", str(work / "pg1.store")], env, 1,
                         args, work, pg_cpu=pg_cpu)
        print("postgresql, one worker", json.dumps(pg1["operations"]), flush=True)
        lite = run_config("sqlite", ["--registry", str(work / "server.db")], env, 1, args, work)
        print("sqlite", json.dumps(lite["operations"]), json.dumps(lite["verified"]), flush=True)
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    runs = {"postgresql_workers": pg, "sqlite_one_worker": lite, "postgresql_one_worker": pg1}
    ok = all(c["verified"]["lost_commits"] == 0 and c["verified"]["corrupt_files"] == 0 and
             c["verified"]["zoo_verify_exit"] == 0 for c in runs.values())
    errors = {k: sum(o.get("errors", 0) for o in c["operations"].values()) for k, c in runs.items()}
    for c in runs.values():  # CPU per operation (a push, a 412 attempt or a pull), the measure a busy 2-core machine does not distort much
        n = sum(o["requests"] for k, o in c["operations"].items() if k != "all")
        c["cpu_ms_per_operation"] = {k: round(1000 * v / max(n, 1), 1) for k, v in c["cpu_seconds"].items()}
    save(args.out, {
        "setup": {"clients": args.clients, "client_processes": CLIENT_PROCS, "lfs_kib": args.lfs_kib,
                  "lfs_threshold": LFS_THRESHOLD, "duration_s": args.duration, "request_timeout_s": REQUEST_TIMEOUT,
                  "clients_per_repo": args.clients_per_repo, "mix": "half push (model_info + create_commit with parent_commit), "
                                                "half pull (hf_hub_download pinned to a commit, sha256 checked)"},
        "server": version.strip(),
        **runs,
        "throughput_ratio_pg_over_sqlite": round(pg["operations"]["all"]["per_s"] /
                                                 max(lite["operations"]["all"]["per_s"], 1e-9), 2),
        "errors": errors,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "zero_lost_or_corrupt": ok,
    })


if __name__ == "__main__":
    main()
