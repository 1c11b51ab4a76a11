"""The registry: the catalogue of models (SQLAlchemy over SQLite), its schema and
migrations, the content-addressed blob store, names, listing and model cards.

``Registry`` is imported on first use, so that ``zoo list`` (``zoo.registry.listing``,
plain sqlite3) never loads SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.registry.catalogue import Registry

__all__ = ["Registry"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from zoo.registry.catalogue import Registry

        return Registry
    raise AttributeError(f"module 'zoo.registry' has no attribute {name!r}")
