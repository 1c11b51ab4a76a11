"""A CPU-to-GPU copy of a 4M-element bf16 piece into float32: converting inside copy_
against a plain transfer then a conversion on the GPU (why merge/engine.py does the latter).

    python bench/cuda_copy.py
"""

import time

import torch


def per_copy_ms(f, reps: int = 50) -> float:
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


src = torch.empty(1 << 22, dtype=torch.bfloat16, pin_memory=True).normal_()
dst = torch.empty(1 << 22, dtype=torch.float32, device="cuda")
print(f"convert in copy_: {per_copy_ms(lambda: dst.copy_(src)):.2f} ms per 4M-element bf16 piece")
print(f"dma then convert: {per_copy_ms(lambda: dst.copy_(src.to('cuda'))):.2f} ms per 4M-element bf16 piece")
