"""Model resolution: a label on the command line is a registry name or a path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.reader import Checkpoint, open_checkpoint
from zoo.errors import NotFound

if TYPE_CHECKING:
    from zoo.registry import Registry


def open_model(label: str, registry: "Registry | None") -> tuple[Checkpoint, dict[str, Any] | None]:
    """A registry name (preferred, when there is a registry) or a path on disk: its
    checkpoint, and for a registered model the registry's record (``show``).

    A merge of paths passes no registry, so it never imports SQLAlchemy.
    """
    if registry is not None and registry.has(label):
        info = registry.show(label)
        return registry.checkpoint(info["ref"]), info
    if Path(label).exists() or Path(label).is_symlink():  # the reader names a broken link or a loop
        return open_checkpoint(label), None
    raise NotFound(f"{label!r} is neither a registered model nor a path")
