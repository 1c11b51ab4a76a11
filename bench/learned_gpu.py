"""Learned merges at ViT-B/32 size on one GPU: steps per second and peak memory.

A ViT-B/32-shaped image classifier (hidden 768, 12 layers, patch 32, 224x224 images,
about 88M parameters) built from a transformers config; 8 synthetic experts (the base
plus seeded noise, each with its own 10-label head); 8 synthetic tasks of random
images, batch 16 per task; 200 steps of Concrete TA (mask over every body tensor) and,
with ``--methods``, layer-wise AdaMerging, under bf16 autocast and in fp32.

The rate is taken between the progress reports of the first and the last step (the
first step's kernel selection and the final merge are left out); the peak memory is
torch's peak allocation during the loop (``peak_gpu_mib``) and over the whole run with
the merge's setup (``peak_gpu_mib_with_setup``). The task vectors are computed on the
CPU and moved to the GPU one at a time, flattened. The target (issue 20): Concrete TA
at ≥ 25 steps/s and ≤ 6 GiB.

    python bench/learned_gpu.py [--steps 200] [--methods concrete_ta,adamerging]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402

from zoo.merge.learned import TaskData  # noqa: E402
from zoo.merge.learned.runtime import Body, make_forward  # noqa: E402
from zoo.merge.methods import get_method  # noqa: E402

TARGET_STEPS_PER_SECOND = 25.0
TARGET_PEAK_GIB = 6.0
SETTINGS = {"concrete_ta": {}, "adamerging": {"coefficients": "layer"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=128, help="synthetic images per task")
    ap.add_argument("--methods", default="concrete_ta", help="comma-separated: concrete_ta, adamerging")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--result", default="learned_gpu")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke)")
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if args.smoke \
        else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    cfg = ViTConfig(image_size=224, patch_size=32, num_labels=10, **size)
    module = ViTForImageClassification(cfg)
    params = sum(p.numel() for p in module.parameters())
    base = {k: v.clone() for k, v in module.state_dict().items()}
    head_names = [k for k in base if k.startswith("classifier.")]
    body = {k: v for k, v in base.items() if k not in head_names}
    g = torch.Generator().manual_seed(1)
    tvs, heads, data = [], [], []
    for t in range(args.tasks):
        tvs.append({k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in body.items()})  # on the CPU
        heads.append({k: (0.02 * torch.randn(base[k].shape, generator=g)).to(device) for k in head_names})
        data.append(TaskData(f"task{t}", {"pixel_values": torch.randn(args.examples, 3, 224, 224, generator=g)}))
    module = module.to(device).eval().requires_grad_(False)
    forward = make_forward(Body(module, {}), heads)
    cuda = device.type == "cuda"
    results = {"parameters": params, "tasks": args.tasks, "batch_per_task": args.batch_size, "steps": args.steps,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "target": {"steps_per_second": TARGET_STEPS_PER_SECOND, "peak_gib": TARGET_PEAK_GIB}}
    for method in args.methods.split(","):
        m = get_method(method)
        for precision in args.precisions.split(",") if cuda else ["fp32"]:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            s = m.settings({**SETTINGS[method], "steps": args.steps, "batch_size": args.batch_size},
                           autocast=precision == "bf16")
            merger = s.merger(body, tvs, device)
            setup_peak = torch.cuda.max_memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            reports: list[tuple[int, float]] = []
            res = m.fit(merger, forward, data, s, lambda step, *_: reports.append((step, time.perf_counter())))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            (s0, t_first), (s1, t_last) = reports[0], reports[-1]
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            row = {
                "steps_per_second": (s1 - s0) / (t_last - t_first), "loop_seconds": res.seconds,
                "wall_seconds_with_setup": wall, "peak_gpu_mib": peak / 2**20 if cuda else None,
                "peak_gpu_mib_with_setup": max(peak, setup_peak) / 2**20 if cuda else None,
                "first_loss": res.history[0]["loss"], "last_loss": res.history[-1]["loss"],
                "mask_tensors": len(res.mask_bits or {}),
            }
            if cuda and method == "concrete_ta":
                row["target_met"] = (row["steps_per_second"] >= TARGET_STEPS_PER_SECOND
                                     and max(peak, setup_peak) <= TARGET_PEAK_GIB * 2**30)
            results[f"{method}_{precision}"] = row
            print(method, precision, row, flush=True)
            del merger, res
    if not args.smoke:
        save(args.result, results)


if __name__ == "__main__":
    main()
