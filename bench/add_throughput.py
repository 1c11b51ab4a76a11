"""Benchmark: `zoo add` of a ~2 GB checkpoint against `sha256sum` of the same file.

Both read the same file from the page cache in the same run; `zoo add` also copies it
into the store. The figure is zoo's throughput as a fraction of sha256sum's
(target: at least 0.7). A plain `cp` of the same file is timed too, since zoo both
hashes and copies. Each timing includes process start-up. Results go to
bench/results/add_throughput.json.

    .venv/bin/python bench/add_throughput.py [--gb 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

HERE = Path(__file__).resolve().parent
ZOO = str(Path(sys.executable).with_name("zoo"))


def make_checkpoint(path: Path, nbytes: int) -> None:
    """A safetensors file of one BF16 tensor of random bytes, written in chunks."""
    n = nbytes // 2
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = 2 * n
        while left:
            k = min(left, len(chunk))
            f.write(chunk[:k])
            left -= k


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder on the same disk as bench/)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=args.dir or HERE))
    try:
        ckpt = work / "model.safetensors"
        make_checkpoint(ckpt, int(args.gb * 1e9))
        size = ckpt.stat().st_size
        timed(["cat", str(ckpt)])  # warm the page cache
        sha, cp, add, inplace = [], [], [], []
        for i in range(args.runs):
            sha.append(timed(["sha256sum", str(ckpt)]))
            cp.append(timed(["cp", str(ckpt), str(work / "copy")]))
            (work / "copy").unlink()
            reg = work / f"r{i}" / "registry.db"
            reg.parent.mkdir()
            add.append(timed([ZOO, "--registry", str(reg), "add", str(ckpt), "--name", "m", "--kind", "base"]))
            inplace.append(timed([ZOO, "--registry", str(reg), "add", str(ckpt), "--name", "m2", "--kind", "base",
                                  "--in-place"]))
            shutil.rmtree(reg.parent)
        med = {k: statistics.median(v) for k, v in (("sha256sum", sha), ("cp", cp), ("zoo_add", add),
                                                    ("zoo_add_in_place", inplace))}
        result = {
            "bytes": size,
            "runs": args.runs,
            "seconds_median": med,
            "seconds_all": {"sha256sum": sha, "cp": cp, "zoo_add": add, "zoo_add_in_place": inplace},
            "throughput_MBps": {k: size / v / 1e6 for k, v in med.items()},
            "fraction_of_sha256sum": {"zoo_add": med["sha256sum"] / med["zoo_add"],
                                      "zoo_add_in_place": med["sha256sum"] / med["zoo_add_in_place"]},
            "fraction_of_cp": {"zoo_add": med["cp"] / med["zoo_add"]},
            "target": 0.7,
        }
        save("add_throughput", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
