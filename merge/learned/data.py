"""Each task's examples for a learned merge: from the registry's task records, or from
files (a .safetensors file of input tensors, a folder of images, a JSONL file of texts);
and a generative task's prompts (JSONL ``{"prompt": ..., "answer": ...}``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zoo.checkpoints.prompts import DEFAULT_SPLIT, Prompt, is_prompt_file, prompt_splits, read_prompts
from zoo.checkpoints.reader import open_safetensors
from zoo.errors import NotFound, ZooError
from zoo.checkpoints.taskdata import FORMAT as TASK_FORMAT
from zoo.checkpoints.taskdata import load_split, task_info

from zoo.merge.learned.train import TaskData

if TYPE_CHECKING:
    from zoo.registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
LABEL_KEYS = ("labels", "label", "y")


def is_generative_file(path: Path) -> bool:
    """Whether task data is a generative task's JSONL prompts (``{"prompt": ...}`` or
    ``{"messages": ...}`` lines), rather than inputs and labels (``{"text": ...}``
    lines). The first line decides; one that is neither reads as texts, whose error
    names both."""
    p = Path(path)
    if not p.is_file() or not is_prompt_file(p):
        return False
    with open(p, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        row = json.loads(first)
    except ValueError:
        return True  # read_prompts gives the line's error
    return isinstance(row, dict) and "text" not in row and bool({"prompt", "messages", "answer", "split"} & set(row))


def prompts_from(path: str | Path, task: str, split: str) -> list[Prompt]:
    """A generative task's records of one split, from its JSONL file. A file whose lines
    name no split is one pool: every split asked of it is the whole file."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"data for task {task!r}: {p} does not exist")
    sizes = prompt_splits(p)
    if set(sizes) == {DEFAULT_SPLIT}:
        return read_prompts(p)
    return read_prompts(p, split=split)


def from_registry(registry: "Registry", task: str, split: str, labelled: bool) -> TaskData:
    """A registered task's split: its inputs, and its labels when ``labelled``."""
    path = registry.task_data(task)
    return from_task_file(path, task, split, labelled)


def from_task_file(path: Path, task: str, split: str, labelled: bool) -> TaskData:
    info = task_info(path)
    x, y = load_split(path, split)
    return TaskData(task, {info["input"]: x}, y if labelled else None)


def from_path(path: str | Path, task: str, base_dir: Path | None, split: str, labelled: bool,
              max_length: int = 128) -> TaskData:
    """Examples from a file or folder; ``base_dir`` (the base model's folder) supplies the
    tokenizer for texts and the image processor for images."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"data for task {task!r}: {p} does not exist")
    if p.is_dir():
        return _images(p, task, base_dir)
    if p.suffix == ".safetensors":
        ck = open_safetensors(p)
        if ck.metadata.get("format") == TASK_FORMAT:
            return from_task_file(p, task, split, labelled)
        tensors = {n: ck.read_tensor(n) for n in ck.tensors}
        labels = next((tensors.pop(k) for k in LABEL_KEYS if k in tensors), None)
        if not tensors:
            raise ZooError(f"{p} holds no input tensors (name them as the model's inputs, e.g. pixel_values)")
        sizes = {t.shape[0] if t.dim() else 0 for t in tensors.values()}
        if len(sizes) != 1:
            raise ZooError(f"{p}: input tensors disagree on the number of examples ({sorted(sizes)})")
        return TaskData(task, tensors, labels if labelled else None)
    if p.suffix == ".jsonl":
        return _texts(p, task, base_dir, labelled, max_length)
    raise ZooError(f"data for task {task!r}: {p} is not a .safetensors file, a .jsonl file or a folder of images")


def _texts(p: Path, task: str, base_dir: Path | None, labelled: bool, max_length: int) -> TaskData:
    texts, labels = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ZooError(f"{p}:{i}: not a JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ZooError(f"{p}:{i}: each line needs a \"text\" string (a generative task's: a \"prompt\")")
        texts.append(row["text"])
        labels.append(row.get("label"))
    if base_dir is None or not any((base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                        "vocab.txt")):
        raise ZooError(f"texts in {p} need the base model's tokenizer files, and the base has none")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    try:  # never longer than the model's positions
        positions = json.loads((base_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        positions = None
    enc = tok(texts, padding=True, truncation=True, max_length=min(max_length, positions or max_length),
              return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    y = None
    if labelled:
        if any(v is None for v in labels):
            raise ZooError(f"objective ce needs a \"label\" on every line of {p}")
        y = torch.tensor(labels, dtype=torch.long)
    return TaskData(task, inputs, y)


def _images(folder: Path, task: str, base_dir: Path | None) -> TaskData:
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ZooError(f"task {task!r} has no data: {folder} holds no images")
    if base_dir is None or not (base_dir / "preprocessor_config.json").is_file():
        raise ZooError(f"images in {folder} need the base model's preprocessor_config.json, and the base has none")
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(base_dir))
    try:
        channels = json.loads((base_dir / "config.json").read_text()).get("num_channels", 3)
    except (OSError, ValueError):
        channels = 3
    images = [Image.open(f).convert("L" if channels == 1 else "RGB") for f in files]
    return TaskData(task, {"pixel_values": proc(images=images, return_tensors="pt")["pixel_values"]})
