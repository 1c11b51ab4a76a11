"""The checkpoint reader: the one place that opens model files.

It understands three forms:

* a Hugging Face model folder (``config.json`` plus ``model.safetensors``, or shards
  listed in ``model.safetensors.index.json``);
* a PEFT adapter folder (``adapter_config.json`` plus ``adapter_model.safetensors``);
* a bare ``.safetensors`` file.

Opening a checkpoint parses and validates the safetensors headers only. Tensor data is
read on demand, one tensor at a time, with ``pread`` (no memory map, no pickle).
Pickle checkpoints (``.bin``, ``.pt``, ...) are refused.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.architecture import architecture_from_config
from zoo.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported lazily: inspection never needs it
    import torch


# Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
# The floating-point dtypes: what merges and MergeLock transform (the rest is copied).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The safetensors format caps the JSON header at 100 MB; anything larger is corrupt.
MAX_HEADER_BYTES = 100 * 1000 * 1000

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Small files that travel with a model folder (configuration, tokenizer, card).
SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md")

MODEL_INDEX = "model.safetensors.index.json"
MODEL_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"

FORMS = ("model", "adapter", "file")
# The header metadata entry MergeLock stamps on every shard of a protected model.
MERGELOCK_METADATA = "zoo_mergelock"
# Written by merges: each expert's task head, kept unmerged (zoo.checkpoints.heads).
HEADS_FILE = "task_heads.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in ``file``
    end: int  # absolute offset one past the last byte

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _pickle_hint(path: Path) -> str:
    return (
        f"{path} is a pickle checkpoint; zoo never unpickles files. Convert it to safetensors first, "
        "e.g. python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{path.name}', weights_only=True), 'model.safetensors')\""
    )


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header, reading no tensor data.

    Returns the tensors by name and the header's ``__metadata__``. Raises
    ``CheckpointError`` for a truncated file, a corrupt header or one that claims an
    absurd length.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: it claims {n} header bytes but the file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
        if end - begin != prod(shape) * DTYPE_SIZES[dtype]:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{prod(shape) * DTYPE_SIZES[dtype]}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    # As safetensors itself: the tensors tile the data exactly, with no byte in two tensors.
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {n0!r} and {n1!r} share bytes "
                                  f"{s1}..{min(e0, spans[-1][1])}")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


@dataclass
class Checkpoint:
    """A checkpoint on disk, opened by header: its form, files, config and tensors.

    ``files`` maps the path each file has inside a standard Hugging Face folder
    (``model.safetensors``, ``config.json``, ...) to where it is on disk.
    """

    path: Path
    form: str
    files: dict[str, Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    # -- summary -------------------------------------------------------------------
    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Number of tensors per dtype."""
        return dict(Counter(t.dtype for t in self.tensors.values()))

    def summary(self) -> dict[str, Any]:
        return {
            "tensors": self.tensor_count,
            "parameters": self.param_count,
            "bytes": self.total_bytes,
            "dtypes": self.dtypes,
        }

    def architecture(self) -> dict[str, Any]:
        """Architecture facts read from ``config.json`` (empty for adapters and bare files)."""
        return architecture_from_config(self.config if self.form == "model" else None)

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        return self.config if self.form == "adapter" else None

    # -- data ----------------------------------------------------------------------
    def read_tensor(self, name: str) -> "torch.Tensor":
        """Read one tensor from disk with ``pread``; nothing else is loaded."""
        info = self.tensors[name]
        return self.read_range(name, 0, info.numel).reshape(info.shape)

    def read_range(self, name: str, start: int, count: int, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Elements ``[start, start + count)`` of a tensor, flattened, read with ``pread``.

        The merge engine streams large tensors in such pieces; ``out`` (a uint8 tensor of
        at least the piece's bytes) is a reused buffer to read into.
        """
        import torch

        info = self.tensors[name]
        size = DTYPE_SIZES[info.dtype]
        if start < 0 or count < 0 or start + count > info.numel:
            raise IndexError(f"{name}: elements {start}..{start + count} outside {info.numel}")
        nbytes = count * size
        dtype = _torch_dtype(info.dtype)
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]  # never zero-filled
        view = memoryview(buf.numpy())
        offset = info.start + start * size
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
            done += n
        return buf.view(dtype)

    def _fd(self, path: Path) -> int:
        """One read-only descriptor per file, opened on first use (see ``close``)."""
        fds = self.__dict__.setdefault("_fds", {})
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    def close(self) -> None:
        for fd in self.__dict__.pop("_fds", {}).values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def read_bytes(self, name: str) -> bytes:
        """A tensor's raw bytes, for copying it unchanged."""
        info = self.tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
        if len(data) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return data


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None), "C64": torch.complex64,
    }
    dt = table.get(name)
    if dt is None:
        raise CheckpointError(f"dtype {name} is not supported by this torch build")
    return dt


def _sidecars(folder: Path, exclude: set[str]) -> dict[str, Path]:
    """The small top-level files that travel with a checkpoint folder."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name in exclude or p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix in SIDECAR_SUFFIXES:
            out[p.name] = p
    return out


def _open_sharded(folder: Path, index_path: Path) -> tuple[dict[str, TensorInfo], dict[str, Path], dict]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    tensors: dict[str, TensorInfo] = {}
    files: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{index_path}: bad shard name {shard!r}")
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        shard_tensors, meta = read_safetensors_header(shard_path)
        metadata.update(meta)
        for name, info in shard_tensors.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{shard_path}: tensor {name!r} is not where the index says it is")
            tensors[name] = info
        files[shard] = shard_path
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} tensors listed but absent, e.g. {missing[0]!r}")
    files[index_path.name] = index_path
    return tensors, files, metadata


def open_safetensors(path: str | os.PathLike[str]) -> Checkpoint:
    """Open one safetensors file by its header, whatever its name (store blobs have none)."""
    tensors, meta = read_safetensors_header(Path(path))
    return Checkpoint(Path(path), "file", {MODEL_FILE: Path(path)}, tensors, None, meta)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint folder or file by its headers. Raises ``CheckpointError``."""
    ckpt = _open_checkpoint(Path(path))
    if not ckpt.tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return ckpt


def _open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link that cannot be followed (a loop, or its target is gone)")
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_hint(path))
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a checkpoint; expected a .safetensors file or a model folder")
        tensors, meta = read_safetensors_header(path)
        return Checkpoint(path, "file", {MODEL_FILE: path}, tensors, None, meta)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a file or folder")

    if (path / ADAPTER_CONFIG).is_file():
        weights = path / ADAPTER_FILE
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise CheckpointError(_pickle_hint(path / "adapter_model.bin"))
            raise CheckpointError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
        config = _read_json(path / ADAPTER_CONFIG)
        tensors, meta = read_safetensors_header(weights)
        files = _sidecars(path, {ADAPTER_FILE})
        files[ADAPTER_FILE] = weights
        return Checkpoint(path, "adapter", files, tensors, config, meta)

    if (path / MODEL_INDEX).is_file():
        tensors, files, meta = _open_sharded(path, path / MODEL_INDEX)
    elif (path / MODEL_FILE).is_file():
        tensors, meta = read_safetensors_header(path / MODEL_FILE)
        files = {MODEL_FILE: path / MODEL_FILE}
    else:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(_pickle_hint(pickles[0]))
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(
                f"{path}: no checkpoint found; expected config.json with model.safetensors "
                f"(or {MODEL_INDEX}), an adapter folder, or a .safetensors file"
            )
        tensors, meta = read_safetensors_header(candidates[0])
        files = {candidates[0].name: candidates[0]}
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if (path / HEADS_FILE).is_file() and HEADS_FILE not in files:
        read_safetensors_header(path / HEADS_FILE)  # validated like any weights file
        files[HEADS_FILE] = path / HEADS_FILE
    for name, p in _sidecars(path, set(files)).items():
        files.setdefault(name, p)
    return Checkpoint(path, "model" if config is not None else "file", files, tensors, config, meta)
