"""Where a new model goes: a new registry name, or a new folder. The destination is
checked before any work; the model is written in a temporary folder (the store's temp
area, or a hidden folder beside the final one) and registered or renamed into place
only when complete, so an interrupted command leaves nothing half-done."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import AlreadyExists, StorageError, ZooError
from zoo.registry.names import validate_name

if TYPE_CHECKING:
    from zoo.progress import ProgressFactory
    from zoo.registry import Registry
    from zoo.registry.records import NewModel


@dataclass(frozen=True)
class Destination:
    """A checked destination: ``name`` in ``registry``, or the new folder ``path``."""

    registry: "Registry | None"
    name: str | None = None
    path: Path | None = None

    @classmethod
    def check(cls, out: str | None, out_dir: "str | os.PathLike[str] | None", registry: "Registry | None",
              shard_bytes: int | None = None, name_option: str = "--out") -> "Destination":
        """A new registry name (``out``) or a new folder (``out_dir``, made absolute), not
        both. ``name_option`` is the command's option for the name, for the error."""
        if (out is None) == (out_dir is None):
            raise ZooError("give either a registry name (--out) or a folder (--out-dir) for the result")
        if shard_bytes is not None and shard_bytes <= 0:
            raise ZooError("--shard-size must be a positive number of bytes")
        if out is not None:
            validate_name(out)
            if registry is None:
                raise ZooError("registering the result needs a registry")
            if registry.has(out):
                raise AlreadyExists(f"a model named {out!r} already exists; choose another {name_option}")
            return cls(registry, name=out)
        path = Path(out_dir).absolute()
        if path.exists():
            raise AlreadyExists(f"{path} already exists; choose a new folder")
        if not path.parent.is_dir():
            raise ZooError(f"{path.parent} does not exist")
        return cls(registry, path=path)

    @property
    def registers(self) -> bool:
        return self.name is not None

    @property
    def label(self) -> str:
        """The new model's name: the registry name or the folder's name."""
        return self.name if self.name is not None else self.path.name

    @contextmanager
    def workspace(self, suffix: str) -> Iterator[Path]:
        """A fresh temporary folder to write the model in, removed on the way out
        unless ``keep`` moved it into place."""
        if self.registers:
            folder = self.registry.store.temp_path(suffix)
            folder.mkdir(parents=True)
        else:
            folder = self.path.parent / f".{self.path.name}.{os.getpid()}.writing"
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.mkdir(parents=True)
            except OSError as e:
                raise StorageError(f"cannot write to {self.path.parent}: {e.strerror or e}; choose a writable "
                                   "--out-dir") from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def keep(self, new: "NewModel", progress: "ProgressFactory | None" = None) -> dict[str, Any]:
        """Register the finished folder under this destination's name (the registry's
        record comes back), or rename it to the new folder (``{"path": ...}``)."""
        if self.registers:
            return self.registry.register(dataclasses.replace(new, name=self.name), progress)
        new.folder.rename(self.path)
        return {"path": str(self.path)}

