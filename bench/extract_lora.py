"""Benchmark: `zoo extract-lora`, accuracy against size on the demo zoo, and its time
against mergekit-extract-lora on the same expert, in one run.

1. Demo zoo (8 ViT experts of one base): for each expert and each rank R (4, 8, 16, 32,
   64 and full, 128 = the hidden size), extract the adapter, apply it to the base the
   way PEFT's merge_and_unload does (base + B @ A, modules_to_save replaced), and
   measure the expert's task on the test split. Also the adapter's bytes against the
   expert's, and the retained energy. Rank 16 = 128 / 8 tasks is TSV-C's per-task
   budget (Gargiulo et al., CVPR 2025, arXiv 2412.00081).
2. Time: mergekit 0.1.5's mergekit-extract-lora cannot plan a ViT (it has no
   architecture definition for it; the error is recorded), so both tools run on one
   expert of a 1B LLaMA family (bf16), restricted to its first decoder layer with
   the same include expression (the embeddings and the layer's norms are saved at
   full rank by both), each as a command in its own process; the products B @ A of the
   two adapters are compared.

Results go to bench/results/extract_lora.json; docs/results.md has the table.

    .venv/bin/python bench/extract_lora.py [--cache DIR] [--medium DIR] [--mergekit PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import run_measured, save
from safetensors.torch import load_file, save_file

from zoo import Registry
from zoo.checkpoints.lora import read_adapter
from zoo.checkpoints.reader import open_checkpoint
from zoo.checkpoints.taskdata import load_split
from zoo.demo.build import FULL, run_demo
from zoo.evaluate import accuracy
from zoo.merge.extract_lora import ExtractOptions, extract

RANKS = [4, 8, 16, 32, 64, 128]
ROOT = Path(__file__).resolve().parent.parent


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def applied(base: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """base + scale * B @ A for every LoRA pair, and the saved modules in place: what
    PEFT's merge_and_unload gives, read through zoo's LoRA parser."""
    ckpt = open_checkpoint(adapter)
    parsed = read_adapter(ckpt)
    sd = dict(base)
    for target, pair in parsed.pairs.items():
        sd[target] = (sd[target].float() + pair.delta(ckpt.read_tensor(pair.a), ckpt.read_tensor(pair.b))
                      ).to(sd[target].dtype)
    for key, name in parsed.saved.items():
        sd[key] = ckpt.read_tensor(name)
    return sd


def demo_part(reg: Registry, res, work: Path) -> dict:
    from transformers import AutoConfig, ViTForImageClassification

    base_dir = reg.model_dir(res.base)
    base = folder_tensors(base_dir)
    rows: dict[str, dict] = {}
    for task, ref in res.experts.items():
        expert_dir = reg.model_dir(ref)
        config = AutoConfig.from_pretrained(expert_dir)
        x, y = load_split(reg.task_data(task), "test")
        expert_bytes = sum(p.stat().st_size for p in expert_dir.glob("*.safetensors"))

        def acc(sd: dict[str, torch.Tensor]) -> float:
            # through a folder: transformers maps the checkpoint's names onto its modules on load
            probe = work / "probe"
            shutil.rmtree(probe, ignore_errors=True)
            probe.mkdir()
            shutil.copy(expert_dir / "config.json", probe / "config.json")
            save_file({k: v.contiguous() for k, v in sd.items()}, str(probe / "model.safetensors"),
                      metadata={"format": "pt"})
            model = ViTForImageClassification.from_pretrained(probe)
            model.eval()
            return 100 * accuracy(model, x, y)

        expert_sd = folder_tensors(expert_dir)
        head = {k: v for k, v in expert_sd.items() if k.startswith("classifier.")}
        row = {"expert": acc(expert_sd), "base_with_head": acc({**base, **head}), "expert_bytes": expert_bytes,
               "ranks": {}}
        for r in RANKS:
            out = work / f"{task}-r{r}"
            t0 = time.perf_counter()
            info = extract(ref, ExtractOptions(rank=r), out_dir=out, registry=reg, device="cpu")
            seconds = time.perf_counter() - t0
            row["ranks"][str(r)] = {"accuracy": acc(applied(base, out)), "adapter_bytes": info["adapter_bytes"],
                                    "bytes_fraction": info["adapter_bytes"] / expert_bytes,
                                    "energy_mean": info["energy_mean"], "energy_min": info["energy_min"],
                                    "seconds": seconds, "dropped_tensors": info["dropped_tensors"]}
            shutil.rmtree(out)
        rows[task] = row
        print(task, {r: round(v["accuracy"], 1) for r, v in row["ranks"].items()}, "expert", round(row["expert"], 1),
              flush=True)
    tasks = list(rows)

    def avg(f) -> float:
        return sum(f(rows[t]) for t in tasks) / len(tasks)

    summary = {"expert": avg(lambda r: r["expert"]), "base_with_head": avg(lambda r: r["base_with_head"])}
    for r in RANKS:
        summary[f"rank {r}"] = {k: avg(lambda row, k=k: row["ranks"][str(r)][k])
                                for k in ("accuracy", "bytes_fraction", "energy_mean", "seconds")}
    summary["retained_accuracy_at_rank_16"] = summary["rank 16"]["accuracy"] / summary["expert"]
    return {"tasks": rows, "average": summary}


def mergekit_on_vit(mergekit: str, reg: Registry, res, work: Path) -> str | None:
    """mergekit's answer for one demo expert: None if it ran, else the last line of its error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([mergekit, "--model", str(res.cache / "experts" / "parity"), "--base-model",
                          str(res.cache / "base"), "--out-path", str(work / "mk-vit"), "--max-rank", "16"],
                         capture_output=True, text=True, env=env)
    return None if run.returncode == 0 else run.stderr.strip().splitlines()[-1]


def timing_part(mergekit: str | None, medium: Path, work: Path, rank: int, include: str) -> dict:
    """Both tools as commands on the same expert; wall time, peak memory, and how far
    apart their products B @ A are (relative Frobenius norm, per module)."""
    base, expert = medium / "base", medium / "expert1"
    zoo = [str(Path(sys.executable).parent / "zoo"), "extract-lora", str(expert), "--base", str(base), "--rank",
           str(rank), "--include", include, "--device", "cpu", "--out-dir"]
    # one thread each: on a busy shared machine, threads fighting over cores slow SVDs many times over
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out: dict = {"threads": 1, "expert": str(expert), "rank": rank, "include": include,
                 "parameters": open_checkpoint(expert).param_count}
    out["zoo"] = run_measured(zoo + [str(work / "zoo-medium")], env=env)
    if mergekit:
        out["mergekit"] = run_measured([mergekit, "--model", str(expert), "--base-model", str(base), "--out-path",
                                        str(work / "mk-medium"), "--max-rank", str(rank), "-i", include], env=env)
        out["zoo_over_mergekit_wall"] = out["zoo"]["wall_s"] / out["mergekit"]["wall_s"]
        z, m = folder_tensors(work / "zoo-medium"), folder_tensors(work / "mk-medium")
        out["same_tensor_names"] = set(z) == set(m)
        # each product against the exact rank-r truncation of the float32 task vector
        # (mergekit subtracts in bf16; both round the factors to bf16)
        e_ckpt, b_ckpt = open_checkpoint(expert), open_checkpoint(base)
        worst = {"zoo_vs_mergekit": 0.0, "zoo_vs_exact": 0.0, "mergekit_vs_exact": 0.0}
        for name in z:
            if ".lora_A." in name:
                b = name.replace(".lora_A.", ".lora_B.")
                pz, pm = z[b].float() @ z[name].float(), m[b].float() @ m[name].float()
                weight = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                delta = e_ckpt.read_tensor(weight).float() - b_ckpt.read_tensor(weight).float()
                u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
                exact = (u[:, :rank] * sv[:rank]) @ vh[:rank]
                for key, x, y in (("zoo_vs_mergekit", pz, pm), ("zoo_vs_exact", pz, exact),
                                  ("mergekit_vs_exact", pm, exact)):
                    worst[key] = max(worst[key], float((x - y).norm() / y.norm()))
        out["max_relative_product_difference"] = worst
        out["saved_tensors_equal"] = all(torch.equal(z[n], m[n]) for n in z if "lora_" not in n and n in m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="demo cache (default: zoo's, reused when built)")
    ap.add_argument("--medium", default="/work/bench-env/data/medium", help="a LLaMA family: base/, expert1/")
    ap.add_argument("--mergekit", default="/work/bench-env/mergekit-venv/bin/mergekit-extract-lora",
                    help="mergekit-extract-lora; a missing path skips mergekit")
    ap.add_argument("--rank", type=int, default=16, help="rank of the timing comparison")
    ap.add_argument("--include", default=r"layers\.0\.", help="modules both tools decompose in the timing run")
    args = ap.parse_args()
    mergekit = args.mergekit if Path(args.mergekit).is_file() else None
    work = Path(tempfile.mkdtemp(prefix="zoo-extract-lora-"))
    try:
        reg = Registry(work / "registry.db", create=True)
        res = run_demo(reg, FULL, log=print, cache=Path(args.cache) if args.cache else None)
        result = {"ranks": RANKS, "torch_threads": torch.get_num_threads(), "demo": demo_part(reg, res, work)}
        result["mergekit_on_demo_vit"] = mergekit_on_vit(mergekit, reg, res, work) if mergekit else "not run"
        medium = Path(args.medium)
        if (medium / "expert1").is_dir():
            result["timing"] = timing_part(mergekit, medium, work, args.rank, args.include)
        else:
            result["timing"] = f"skipped: no LLaMA family at {medium}"
        save("extract_lora", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
