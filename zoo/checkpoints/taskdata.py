"""Task data files: one safetensors file holding every split of a task.

Tensors are named ``x.<split>`` (model inputs) and ``y.<split>`` (integer labels);
the header metadata names the format, the model input and the label set. Being
safetensors, a task file is read without unpickling anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.reader import open_safetensors
from zoo.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMAT = "zoo-task-v1"


def save_task_data(path: Path, splits: dict[str, tuple["torch.Tensor", "torch.Tensor"]], labels: list[str],
                   input_name: str = "pixel_values") -> None:
    """Write a task file atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    tensors = {}
    for split, (x, y) in splits.items():
        tensors[f"x.{split}"] = x.contiguous()
        tensors[f"y.{split}"] = y.to(dtype=__import__("torch").int64).contiguous()
    meta = {"format": FORMAT, "input": input_name, "labels": json.dumps(labels)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def task_info(path: Path) -> dict[str, Any]:
    """Format, input name, labels and split sizes, from the header alone."""
    ckpt = open_safetensors(path)
    if ckpt.metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a zoo task file (format {ckpt.metadata.get('format')!r})")
    splits = {n[2:]: t.shape[0] for n, t in ckpt.tensors.items() if n.startswith("y.")}
    return {"input": ckpt.metadata.get("input", "pixel_values"), "labels": json.loads(ckpt.metadata["labels"]),
            "splits": splits}


def load_split(path: Path, split: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The inputs and labels of one split."""
    ckpt = open_safetensors(path)
    if f"x.{split}" not in ckpt.tensors:
        have = sorted(n[2:] for n in ckpt.tensors if n.startswith("x."))
        raise CheckpointError(f"task data has no split {split!r} (it has {', '.join(have)})")
    return ckpt.read_tensor(f"x.{split}"), ckpt.read_tensor(f"y.{split}")
