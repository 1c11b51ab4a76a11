"""Where a new model goes: a new registry name, or a new folder written beside its
final place and renamed into it only when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from zoo.errors import AlreadyExists, ZooError
from zoo.registry.names import validate_name

if TYPE_CHECKING:
    from zoo.registry import Registry


def temp_folder(parent: Path, name: str) -> Path:
    """A fresh hidden folder beside the final one, renamed into place when complete."""
    path = parent / f".{name}.{os.getpid()}.writing"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def check_destination(out: Optional[str], out_dir: "str | os.PathLike[str] | None", registry: "Registry | None",
                      shard_bytes: int) -> Path | None:
    """Check where a new model will go before any work: a new registry name (``out``)
    or a new folder (``out_dir``, returned absolute), not both."""
    if (out is None) == (out_dir is None):
        raise ZooError("give either a registry name (--out) or a folder (--out-dir) for the result")
    if shard_bytes <= 0:
        raise ZooError("--shard-size must be a positive number of bytes")
    if out is not None:
        validate_name(out)
        if registry is None:
            raise ZooError("registering the result needs a registry")
        if registry.has(out):
            raise AlreadyExists(f"a model named {out!r} already exists; choose another --out")
        return None
    path = Path(out_dir).absolute()
    if path.exists():
        raise AlreadyExists(f"{path} already exists; choose a new folder")
    if not path.parent.is_dir():
        raise ZooError(f"{path.parent} does not exist")
    return path
