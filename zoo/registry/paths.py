"""Where a registry lives: ``--registry``, else ``$ZOO_REGISTRY``, else ``./registry.db``."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.errors import NotFound, ZooError

DEFAULT_FILENAME = "registry.db"
ENV_VAR = "ZOO_REGISTRY"


def registry_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The absolute registry path for an explicit path or the defaults."""
    p = Path(path if path is not None else (os.environ.get(ENV_VAR) or DEFAULT_FILENAME)).absolute()
    if p.is_dir():
        raise ZooError(f"{p} is a folder; the registry is a file in it, e.g. --registry {p / DEFAULT_FILENAME}")
    return p


def missing_folder(folder: Path) -> str:
    """Why a new file or folder cannot go into ``folder``: it is missing, or not a folder."""
    return f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist"


def existing_registry(path: str | os.PathLike[str] | None = None) -> Path:
    """Like ``registry_path``, but the registry must exist."""
    p = registry_path(path)
    if not p.exists():
        raise NotFound(f"no registry at {p}; create one with `zoo init`, or point --registry / ${ENV_VAR} "
                       "at an existing one")
    return p


def store_path(registry: Path) -> Path:
    """The blob store beside a registry: ``registry.db`` -> ``registry.store/``."""
    return registry.with_suffix(".store")


def keys_path(registry: Path) -> Path:
    """Key files beside a registry: ``registry.db`` -> ``registry.keys/``."""
    return registry.with_suffix(".keys")


def on_read_only_storage(path: Path) -> bool:
    """True when the registry's folder cannot be written (a read-only mount): SQLite then
    opens it as immutable, since nobody can change it, and reads work."""
    return path.exists() and not os.access(path.parent, os.W_OK)


def not_a_registry(path: Path, e: Exception) -> ZooError:
    """The error for a registry file that SQLite cannot read as a database."""
    return ZooError(f"{path} is not a zoo registry ({e}); point --registry at a registry.db, or move this file "
                    "away and run `zoo init`")
