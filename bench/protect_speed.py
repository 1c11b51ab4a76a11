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

`--family qwen3|mixtral` benchmarks a QK-norm or an MoE model of the same size instead,
with random bf16 weights written here (no download): Qwen3 with the base's shape (20
layers, hidden 2048, 32 heads / 4 KV heads of 64, MLP 5632; 1.0B parameters), whose lock
folds scales into the norms and permutes heads; Mixtral with that attention and 8 experts
of 704 per layer (1.0B parameters, copied untouched). Results go to
bench/results/protect_speed_FAMILY.json. `--family llama` builds the base's own shape the
same way, to compare the families on one machine under one load. Each run also records
its CPU seconds (user + system), which a loaded machine inflates less than wall time.

    .venv/bin/python bench/protect_speed.py --family qwen3 [--work DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import resource
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


# the base's attention and size (docs/results.md); random weights, so nothing is downloaded
SHAPE = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=20, num_attention_heads=32, num_key_value_heads=4)
FAMILIES = {
    "llama": lambda T: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=5632, **SHAPE)),  # the reference, same machine
    "qwen3": lambda T: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=64, intermediate_size=5632, **SHAPE)),
    "mixtral": lambda T: T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=704, num_local_experts=8,
                                                              num_experts_per_tok=2, **SHAPE)),
}

FAMILIES_NOTE = {"llama": "20 layers, hidden 2048, 32/4 heads of 64, MLP 5632",
                 "qwen3": "20 layers, hidden 2048, 32/4 heads of 64, MLP 5632",
                 "mixtral": "20 layers, hidden 2048, 32/4 heads of 64, 8 experts of 704, top 2"}


def make(family: str, folder: Path, shard_bytes: int = 1 << 30) -> Path:
    """A bf16 model folder of ``family`` with random weights (N(0, 0.02); norms 1), in
    shards of about ``shard_bytes`` with their index, as save_pretrained writes them."""
    import json

    import torch
    import transformers
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = FAMILIES[family](transformers)
    model.config.dtype = torch.bfloat16
    model.config.save_pretrained(folder)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for n, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else
                       torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(2 * t.numel() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    return folder


def measured(cmd: list[str]) -> dict:
    """``run_measured`` plus the command's CPU seconds (user + system, its whole process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_measured(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**result, "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model")
    which.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--work", default=tempfile.gettempdir(), help="where --family's model and the outputs go")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--floor-only", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_only:
        floor(*args.floor_only)
        return
    made = None
    if args.family:
        made = Path(tempfile.mkdtemp(dir=args.work, prefix=f".protect-bench-{args.family}-"))
        model = make(args.family, made / "base")
    else:
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
                runs[name].append(measured(cmd(out)))
                shutil.rmtree(out)
                Path(f"{out}.key").unlink(missing_ok=True)
                print(name, i, runs[name][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    save(f"protect_speed_{args.family}" if args.family else "protect_speed", {
        "model": f"{args.family} (random bf16, {FAMILIES_NOTE[args.family]})" if args.family else str(model),
        "bytes": size, "runs": runs, "median_s": med,
        "protect_over_floor": med["protect"] / med["floor"], "protect_over_cp": med["protect"] / med["cp"],
        "cpu_protect_over_floor": statistics.median(r["cpu_s"] for r in runs["protect"]) /
        statistics.median(r["cpu_s"] for r in runs["floor"]),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "target": "protect <= 1.5 x floor",
        "peak_anon_mib_protect": max(r["peak_anon_mib"] for r in runs["protect"]),
    })


if __name__ == "__main__":
    main()
