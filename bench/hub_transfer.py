"""Push and pull of a model through ``zoo serve``, against a plain local copy of the same bytes.

The server runs as its own process (``zoo serve``) on a loopback port, with a fresh
registry for every run so nothing is de-duplicated; the client pushes with
``zoo.hub.client.push_folder`` (LFS upload of the shards, one commit) and pulls into
a fresh registry with ``zoo.hub.client.pull`` (``snapshot_download``, a hash check
of every file, registration). The reference copies the same files with
``shutil.copyfile`` (the kernel's in-place copy) in the same run, and with a plain
read/write loop, the floor of anything that writes bytes it received from user space. All inputs are in the page cache first; every
run starts after a ``sync``. Throughput ratio = copy time / transfer time.

Each operation is timed twice: until it returns (the written bytes may still be in
the page cache, as after ``cp``), and until ``os.sync()`` has also put them on disk.

    python bench/hub_transfer.py --model /path/to/1B/model --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def files_of(model: Path) -> list[Path]:
    return sorted(p for p in model.iterdir() if p.is_file() and not p.name.startswith("."))


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(fn) -> tuple[float, float]:
    """(seconds until fn returns, seconds until its writes are also on disk)."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    os.sync()
    return t1 - t0, time.perf_counter() - t0


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM): the upload streams, so it stays small."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(registry: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", "--registry", str(registry), "serve", "--port", "0",
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if " at " not in line:
        raise SystemExit(f"zoo serve did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ")[1].split()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="A model folder (the 1B benchmark model).")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder on the disk to measure (default: tmp).")
    args = ap.parse_args()

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from zoo import Registry
    from zoo.hub.client import pull, push_folder
    from zoo.hub.accounts import Accounts

    src_files = files_of(args.model)
    total = sum(p.stat().st_size for p in src_files)
    work = Path(tempfile.mkdtemp(prefix="zoo-hub-bench-", dir=args.work))
    env = {**os.environ, "HF_HOME": str(work / "hf_home")}
    rows = []
    try:
        client = Registry(work / "client.db", create=True)
        client.add(args.model, "model", "base")  # copied into the client's store: outside the timings
        model_dir = client.model_dir("model")
        stored = [p.resolve() for p in files_of(model_dir)]
        digests = {f["path"]: f["sha256"] for f in client.show("model")["files"]}  # as `zoo push` passes them
        warm(stored + src_files)
        for run in range(args.runs):
            r = work / f"run{run}"
            r.mkdir()

            def copy() -> None:
                dest = r / "copy"
                dest.mkdir()
                for p in stored:
                    shutil.copyfile(p, dest / p.name)

            def copy_loop() -> None:  # how a program without sendfile copies: read and write() 8 MiB at a time
                dest = r / "loop"
                dest.mkdir()
                buf = bytearray(8 << 20)
                for p in stored:
                    with open(p, "rb", buffering=0) as f, open(dest / p.name, "wb", buffering=0) as out:
                        while n := f.readinto(buf):
                            out.write(memoryview(buf)[:n])

            copy_t = timed(copy)
            loop_t = timed(copy_loop)
            server_reg = Registry(r / "server.db", create=True)
            token = Accounts(server_reg).create_token("bench")["token"]
            server_reg.close()
            proc, url = start_server(r / "server.db", env)
            try:
                push_t = timed(lambda: push_folder(model_dir, "bench/model", endpoint=url, token=token,
                                                   digests=digests))
                fresh = Registry(r / "puller.db", create=True)
                pull_t = timed(lambda: pull(fresh, "bench/model", endpoint=url, token=token))
                got = {f["path"]: f["sha256"] for f in fresh.show("model")["files"]}
                want = {f["path"]: f["sha256"] for f in client.show("model")["files"]}
                assert {k: v for k, v in got.items() if k != "README.md"} == want, "pulled bytes differ"
                fresh.close()
                server_peak_mib = peak_rss_mib(proc.pid)
            finally:
                proc.terminate()
                proc.wait(30)
            row = {"run": run, "server_peak_rss_mib": server_peak_mib, "copy_s": copy_t[0], "copy_durable_s": copy_t[1],
                   "write_loop_s": loop_t[0], "write_loop_durable_s": loop_t[1], "push_s": push_t[0],
                   "push_durable_s": push_t[1], "pull_s": pull_t[0], "pull_durable_s": pull_t[1]}
            rows.append(row)
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            shutil.rmtree(r)
        client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k.endswith("_s")}
    gib = total / 2**30
    result = {
        "model": str(args.model), "bytes": total, "files": len(src_files), "runs": rows,
        "median": med, "server_peak_rss_mib": max(row["server_peak_rss_mib"] for row in rows),
        "throughput_gib_s": {k: gib / v for k, v in med.items()},
        "ratio_to_copy": {"push": med["copy_s"] / med["push_s"], "pull": med["copy_s"] / med["pull_s"],
                          "push_durable": med["copy_durable_s"] / med["push_durable_s"],
                          "pull_durable": med["copy_durable_s"] / med["pull_durable_s"],
                          "write_loop": med["copy_s"] / med["write_loop_s"]},
        "ratio_to_write_loop": {"push": med["write_loop_s"] / med["push_s"], "pull": med["write_loop_s"] / med["pull_s"]},
        "target": "push and pull throughput >= 0.5 x a local copy of the same bytes",
    }
    save("hub_transfer", result)


if __name__ == "__main__":
    main()
