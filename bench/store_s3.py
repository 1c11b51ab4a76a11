"""Benchmark: a merge that reads its inputs from S3-compatible object storage through the
local read-through cache, cold (empty cache) and warm (second run), against the same
merge reading a local folder store, all in one run.

A private S3-compatible server (moto's server mode, tests/s3.py: 127.0.0.1, a free
port, stopped at the end) holds the bucket. A LLaMA-shaped family (a base and two
experts, bf16, random weights: the merge's speed does not depend on the values) is
registered twice: in a SQLite registry with a local store, and in one whose store is
``s3://BUCKET/zoo``. Each merge is ``zoo merge --method ties`` in its own process, written
with ``--out-dir`` to a local folder, so the runs differ only in where the inputs come
from. "cold" empties the cache first, so every input is downloaded, checked against its
sha256 and cached; "warm" runs again over the cached files. Every run's output is
checked to be byte-identical to the local merge's. Each run records its wall time, the
CPU seconds of the zoo process (what a loaded machine distorts least) and those of the
S3 server for it; also the time to add the family to each store (upload to the
bucket), the cache's size afterwards, and the load average before and after.

    .venv/bin/python bench/store_s3.py [--hidden 512] [--layers 4] [--vocab 16000] [--runs 2]
"""

from __future__ import annotations

import argparse
import hashlib
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

from common import run_measured, save  # noqa: E402
from s3 import PrivateS3  # noqa: E402

ZOO = str(Path(sys.executable).with_name("zoo"))
MERGE = ["merge", "--method", "ties", "--base", "base", "e0", "e1", "-p", "density=0.5", "-p", "weight=0.5"]


def family(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, list[Path], int]:
    """A LLaMA base and two experts (base + noise), bf16 safetensors; returns their bytes each."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    paths = []
    for i, name in enumerate(["base", "e0", "e1"]):
        d = root / name
        d.mkdir(parents=True)
        cfg.save_pretrained(d)
        sd = base if i == 0 else {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                                  for k, v in base.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths.append(d)
    return paths[0], paths[1:], (paths[0] / "model.safetensors").stat().st_size


def server_cpu(server: PrivateS3) -> float:
    """CPU seconds the S3 server process has used (utime + stime, from /proc)."""
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-s3-"))
    server = PrivateS3().start()
    try:
        base, experts, model_bytes = family(work / "models", args.hidden, args.layers, args.vocab)
        bucket = server.create_bucket("zoo-bench")
        store = f"s3://{bucket}/zoo"
        env = {**os.environ, **server.env(), "ZOO_S3_CACHE": str(work / "cache")}
        env.pop("ZOO_REGISTRY", None)
        env.pop("ZOO_STORE", None)
        regs = {"local": ["--registry", str(work / "local.db")],
                "s3": ["--registry", str(work / "s3.db"), "--store", store]}
        add_s = {}
        for where, reg in regs.items():
            t = time.perf_counter()
            subprocess.run([ZOO, *reg, "add", str(base), "--name", "base", "--kind", "base"], env=env, check=True,
                           capture_output=True)
            for i, e in enumerate(experts):
                subprocess.run([ZOO, *reg, "add", str(e), "--name", f"e{i}", "--base", "base"], env=env,
                               check=True, capture_output=True)
            add_s[where] = time.perf_counter() - t

        def merge(where: str, n: int) -> dict:
            out = work / f"out-{where}-{n}"
            before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu(server)
            r = run_measured([ZOO, *regs[where], *MERGE, "--out-dir", str(out)], env=env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            r["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            r["server_cpu_s"] = server_cpu(server) - server_before
            r["digests"] = digests(out)
            shutil.rmtree(out)
            return r

        runs: dict[str, list[dict]] = {"local": [], "s3_cold": [], "s3_warm": []}
        for n in range(args.runs):
            runs["local"].append(merge("local", n))
            shutil.rmtree(work / "cache" / "blobs", ignore_errors=True)  # cold: only the bucket has the inputs
            runs["s3_cold"].append(merge("s3", n))
            runs["s3_warm"].append(merge("s3", n))
        want = runs["local"][0]["digests"]
        assert all(r["digests"] == want for rs in runs.values() for r in rs), "a merge's output differs"
        cached = sum(p.stat().st_size for p in (work / "cache" / "blobs").rglob("*") if p.is_file())
        summary = {k: {"wall_s": [round(r["wall_s"], 3) for r in rs],
                       "median_wall_s": round(statistics.median(r["wall_s"] for r in rs), 3),
                       "cpu_s": [round(r["cpu_s"], 3) for r in rs],
                       "median_cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
                       "server_cpu_s": [round(r["server_cpu_s"], 3) for r in rs],
                       "peak_anon_mib": round(max(r["peak_anon_mib"] for r in rs), 1)}
                   for k, rs in runs.items()}
        local = summary["local"]["median_wall_s"]
        local_cpu = summary["local"]["median_cpu_s"]
        result = {
            "what": "zoo merge --method ties (base + 2 experts, bf16) with --out-dir, inputs from a local folder "
                    "store vs from S3 (moto server on loopback) through the read-through cache: cold (empty "
                    "cache) and warm (cached)",
            "server": "moto[server] " + _version("moto") + ", boto3 " + _version("boto3"),
            "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                      "bytes_per_model": model_bytes, "inputs_bytes": 3 * model_bytes},
            "add_family_s": {k: round(v, 3) for k, v in add_s.items()},
            "merge": summary,
            "cold_over_local": round(summary["s3_cold"]["median_wall_s"] / local, 3),
            "warm_over_local": round(summary["s3_warm"]["median_wall_s"] / local, 3),
            "cold_over_local_cpu": round(summary["s3_cold"]["median_cpu_s"] / local_cpu, 3),
            "warm_over_local_cpu": round(summary["s3_warm"]["median_cpu_s"] / local_cpu, 3),
            "load_avg_before": load_before,
            "cache_bytes_after": cached,
            "outputs_identical": True,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        }
        save("store_s3", result)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
