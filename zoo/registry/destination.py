"""Where a new model goes: a new registry name, or a new folder. The destination is
checked before any work; the model is written in a temporary folder (the store's temp
area, or a hidden folder beside the final one) and registered or renamed into place
only when complete, so an interrupted command leaves nothing half-done."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import AlreadyExists, StorageError, ZooError
from zoo.fileio import pid_alive
from zoo.registry.names import validate_name
from zoo.registry.paths import missing_folder
from zoo.registry.store import owner_gone, owner_tag

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
            raise ZooError(f"{missing_folder(path.parent)}; choose a new folder in an existing one")
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
            remove_stale_workspaces(self.path.parent)
            folder = self.path.parent / f".{self.path.name}.{os.getpid()}{WRITING}"
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.mkdir(parents=True)
            except OSError as e:
                raise StorageError(f"cannot write to {self.path.parent}: {e.strerror or e}; choose a writable "
                                   "--out-dir") from None
        record = self._record(folder)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if record is not None:
                record.unlink(missing_ok=True)

    def _record(self, folder: Path) -> Path | None:
        """A folder outside the store is noted in the registry's store while it is
        written, so that `zoo gc` finds it if this process is killed (kill -9)."""
        if self.registers or self.registry is None:
            return None  # the store's own temp area is cleaned by the store
        records = self.registry.store.root / WORKSPACES
        try:
            records.mkdir(parents=True, exist_ok=True)
            record = records / f"{owner_tag()}-{secrets.token_hex(8)}"
            record.write_text(str(folder))
        except OSError:
            return None  # a read-only registry: the next write beside the folder removes it
        return record

    def keep(self, new: "NewModel", progress: "ProgressFactory | None" = None) -> dict[str, Any]:
        """Register the finished folder under this destination's name (the registry's
        record comes back), or rename it to the new folder (``{"path": ...}``)."""
        if self.registers:
            return self.registry.register(dataclasses.replace(new, name=self.name), progress)
        new.folder.rename(self.path)
        return {"path": str(self.path)}



WRITING = ".writing"  # the suffix of a folder being written beside its final place
WORKSPACES = "workspaces"  # in the store: notes of folders being written elsewhere, for `zoo gc`


def _writer_pid(folder: Path) -> int | None:
    """The pid in ``.NAME.PID.writing`` (None for any other name)."""
    parts = folder.name.rsplit(".", 2)
    if folder.name.startswith(".") and folder.name.endswith(WRITING) and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale_workspaces(parent: Path) -> tuple[int, int]:
    """Remove the half-written folders that killed processes left in ``parent``; returns
    how many and their bytes."""
    removed = freed = 0
    try:
        candidates = [p for p in parent.iterdir() if p.is_dir() and p.name.endswith(WRITING)]
    except OSError:
        return 0, 0
    for folder in candidates:
        pid = _writer_pid(folder)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed, freed = removed + 1, freed + size
    return removed, freed


def collect_workspaces(store_root: Path) -> tuple[int, int]:
    """For `zoo gc`: the folders noted in the store whose writers died, removed; returns
    how many and their bytes."""
    records = store_root / WORKSPACES
    if not records.is_dir():
        return 0, 0
    removed = freed = 0
    for record in records.iterdir():
        if not owner_gone(record.name):
            continue  # alive, or another machine's
        pid = record.name.split("-", 1)[0].split(".", 1)[0]
        try:
            folder = Path(record.read_text().strip())
        except (OSError, UnicodeDecodeError):
            folder = None
        if folder is not None and _writer_pid(folder) == int(pid) and folder.is_dir():
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed, freed = removed + 1, freed + size
        record.unlink(missing_ok=True)
    return removed, freed
