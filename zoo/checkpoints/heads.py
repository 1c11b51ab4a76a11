"""Task heads: the tensors that belong to one task and are never merged. A merge keeps
each expert's head unmerged in ``task_heads.safetensors`` beside the merged body, and
``zoo eval`` runs each task through its own expert's head."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from zoo.checkpoints.reader import HEADS_FILE, Checkpoint, read_safetensors_header
from zoo.errors import CheckpointError

# Tensors that belong to one task and are never merged. Matches a path component.
DEFAULT_HEAD_PATTERNS = (r"(^|\.)classifier\.", r"(^|\.)score\.", r"(^|\.)qa_outputs\.")


def is_head(name: str, patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS) -> bool:
    return any(re.search(p, name) for p in patterns)


def read_task_heads(folder: Path) -> dict[str, dict[str, Any]]:
    """The task heads a merged model keeps, by expert: its tasks, labels and tensors.

    Returns {} for a folder without ``task_heads.safetensors``.
    """
    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        return {}
    tensors, meta = read_safetensors_header(path)
    try:
        entries = json.loads(meta.get("zoo_heads", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt zoo_heads metadata") from None
    ckpt = Checkpoint(path, "file", {HEADS_FILE: path}, tensors, None, meta)
    for key, entry in entries.items():
        entry["checkpoint"] = ckpt
        entry["prefix"] = f"{key}/"
    return entries
