"""Writing checkpoints: a streaming safetensors writer for a planned set of tensors.

Every tensor's name, dtype and shape are known before the merge starts, so each
shard's header is written first and tensor bytes are appended as they are produced;
no shard is ever held in memory. Each file is hashed as it is written, so the result
can enter the blob store without being read again.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.checkpoints.reader import DTYPE_SIZES, HEADS_FILE, Checkpoint
from zoo.errors import StorageError
from zoo.fileio import DISK_FULL

if TYPE_CHECKING:
    import torch


# Bytes per output shard unless told otherwise (the Hub's and mergekit's 5 GB).
DEFAULT_SHARD_BYTES = 5 * 1000**3
SKIP_SIDECARS = {"README.md", "model.safetensors.index.json"}


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutTensor], shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most ``shard_bytes`` (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes planned shards into ``folder`` from a background thread.

    ``put(bytes)`` hands over the next bytes in plan order; ``close()`` waits, writes
    the index and returns each file's sha256. ``metadata`` (default ``{"format": "pt"}``)
    goes into every shard's header.
    """

    QUEUE_DEPTH = 4  # pieces handed over but not yet written

    def __init__(self, folder: Path, shards: list[list[OutTensor]], depth: int = QUEUE_DEPTH,
                 metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.metadata = metadata
        self.names = shard_names(len(shards))
        self.digests: dict[str, str] = {}
        self.depth = depth
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for name, tensors in zip(self.names, self.shards):
                h = hashlib.sha256()
                with open(self.folder / name, "wb", buffering=0) as f:
                    head = header_bytes(tensors, self.metadata)
                    f.write(head)
                    h.update(head)
                    for t in tensors:
                        left = t.nbytes  # a tensor may arrive in several pieces
                        while left > 0:
                            data = self._q.get()
                            if data is None:
                                return
                            if len(data) > left:
                                raise RuntimeError(f"{t.name}: got {len(data)} bytes, {left} left to write")
                            view = memoryview(data)
                            done = 0
                            while done < len(view):
                                done += f.write(view[done:])
                            h.update(view)
                            left -= len(view)
                self.digests[name] = h.hexdigest()
        except BaseException as e:  # reported by put/close in the caller's thread
            self._error = e
            while self._q.get() is not None:  # drain until the producer aborts
                pass

    def _raise(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise StorageError(f"disk full while writing the new model; nothing was kept. Free some space and run the "
                               "command again") from None
        if isinstance(e, OSError):
            raise StorageError(f"cannot write the new model: {e.strerror or e}; nothing was kept") from None
        raise e

    def put(self, data: bytes | memoryview) -> None:
        """Hand over the next bytes, in plan order: a whole tensor or a piece of one."""
        self._raise()
        if len(data) == 0:
            return
        while True:
            try:
                self._q.put(data, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def abort(self) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    def close(self) -> dict[str, str]:
        self._q.put(None)  # ends the drain loop if the writer failed; unused otherwise
        self._thread.join()
        self._raise()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": {t.name: n for n, s in zip(self.names, self.shards) for t in s}}
            data = (json.dumps(index, indent=2) + "\n").encode()
            (self.folder / "model.safetensors.index.json").write_bytes(data)
            self.digests["model.safetensors.index.json"] = hashlib.sha256(data).hexdigest()
        return dict(self.digests)


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """A tensor's raw little-endian bytes, as the writer takes them, without a copy where possible."""
    import torch

    t = t.contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bool:
        return memoryview(t.numpy().tobytes())
    return memoryview(t.view(torch.uint8).numpy())


def write_file(path: Path, data: bytes) -> str:
    """Write a small file and return its sha256."""
    try:
        path.write_bytes(data)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise StorageError(f"disk full while writing {path}") from None
        raise
    return hashlib.sha256(data).hexdigest()


def copy_sidecars(src: Checkpoint, folder: Path, heads: bool = False) -> dict[str, str]:
    """Copy ``config.json``, the tokenizer files and the like (not the weights, their
    index or the model card) from ``src`` into ``folder``; return their sha256.

    ``heads`` also copies a merge's unmerged task heads (``task_heads.safetensors``):
    for a transform of the same model (MergeLock leaves the heads as they are), not for
    a new merge, which writes its own."""
    out = {}
    for name, path in src.files.items():
        if name in SKIP_SIDECARS or (name.endswith(".safetensors") and not (heads and name == HEADS_FILE)):
            continue
        out[name] = write_file(folder / name, path.read_bytes())
    return out


