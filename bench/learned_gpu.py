"""Concrete task arithmetic at ViT-B/32 size on one GPU: steps per second and peak memory.

A ViT-B/32-shaped image classifier (hidden 768, 12 layers, patch 32, 224x224 images,
about 88M parameters) built from a transformers config; 8 synthetic experts (the base
plus seeded noise, each with its own 10-label head); 8 synthetic tasks of random
images, batch 16 per task; 200 steps of Concrete TA (mask over every body tensor),
bf16 autocast forward. Also times the same steps in fp32 for comparison.

    python bench/learned_gpu.py --steps 200
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
from zoo.merge.state_dicts import learn_merge  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=128, help="synthetic images per task")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the script")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
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
    experts, heads, data = [], [], []
    for t in range(args.tasks):
        experts.append({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in body.items()})
        heads.append({k: 0.02 * torch.randn(base[k].shape, generator=g) for k in head_names})
        data.append(TaskData(f"task{t}", {"pixel_values": torch.randn(args.examples, 3, 224, 224, generator=g)}))
    cuda = device == "cuda"
    results = {"parameters": params, "tasks": args.tasks, "batch_per_task": args.batch_size, "steps": args.steps,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    for precision in ("bf16", "fp32") if cuda else ("fp32",):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = learn_merge(module, body, experts, heads, data, "concrete_ta", device=device, steps=args.steps,
                          batch_size=args.batch_size, autocast=precision == "bf16")
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        results[precision] = {
            "steps_per_second": res.steps_per_second, "loop_seconds": res.seconds, "wall_seconds_with_setup": wall,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "first_loss": res.history[0]["loss"], "last_loss": res.history[-1]["loss"],
            "mask_tensors": len(res.mask_bits or {}),
        }
        print(precision, results[precision], flush=True)
    if not args.smoke:
        save("learned_gpu", results)


if __name__ == "__main__":
    main()
