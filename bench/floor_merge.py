"""The floor for a task-arithmetic merge: read every input tensor, do the arithmetic,
write the output, and nothing else.

Reused buffers, pieces of CHUNK elements, pread in and sequential writes out, one
output file. zoo's merge does the same work plus planning, checks, sharding, the
model card and registration, so this is the time it can approach, not beat.

    python bench/floor_merge.py BASE EXPERT [EXPERT ...] --weight 0.3 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.checkpoints.reader import DTYPE_SIZES, open_checkpoint  # noqa: E402

CHUNK = 1 << 18  # elements: float32 pieces that stay in the CPU cache
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("experts", nargs="+")
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)  # faster for cache-sized pieces on this 2-core machine
    t0 = time.perf_counter()
    base = open_checkpoint(args.base)
    experts = [open_checkpoint(e) for e in args.experts]
    names = list(base.tensors)
    header, offset = {}, 0
    for n in names:
        info = base.tensors[n]
        header[n] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    raw_in = [torch.empty(CHUNK * 4, dtype=torch.uint8) for _ in range(1 + len(experts))]
    f32 = [torch.empty(CHUNK, dtype=torch.float32) for _ in range(1 + len(experts))]
    acc, tmp = torch.empty(CHUNK), torch.empty(CHUNK)
    out_buf = torch.empty(CHUNK * 4, dtype=torch.uint8)  # reused: no allocation per piece
    fds: dict[Path, int] = {}

    def pread(info, start: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        size = DTYPE_SIZES[info.dtype]
        fd = fds.get(info.file) or fds.setdefault(info.file, os.open(info.file, os.O_RDONLY))
        view = memoryview(buf.numpy())[: count * size]
        done = 0
        while done < len(view):
            done += os.preadv(fd, [view[done:]], info.start + start * size + done)
        return buf[: count * size].view(TORCH[info.dtype])

    with open(args.out, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for n in names:
            info = base.tensors[n]
            for s in range(0, info.numel, CHUNK):
                c = min(CHUNK, info.numel - s)
                b = f32[0][:c]
                b.copy_(pread(info, s, c, raw_in[0]))
                a = acc[:c]
                for i, e in enumerate(experts):
                    x = f32[i + 1][:c]
                    x.copy_(pread(e.tensors[n], s, c, raw_in[i + 1]))
                    torch.sub(x, b, out=tmp[:c]).mul_(args.weight)
                    if i == 0:
                        a.copy_(tmp[:c])
                    else:
                        a.add_(tmp[:c])
                a.add_(b)
                item = DTYPE_SIZES[info.dtype]
                out_buf[: c * item].view(TORCH[info.dtype]).copy_(a)
                out.write(memoryview(out_buf[: c * item].numpy()))
    print(f"floor: {time.perf_counter() - t0:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
