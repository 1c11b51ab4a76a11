"""The built-in demo zoo: build it offline, merge it, protect and publish it.

``zoo.demo.run(registry)`` does all of it and returns a ``Tour`` (``zoo.demo.tour``);
``build``, ``merges`` and ``protection`` are its steps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Tour", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one step (zoo.demo.build) does not import the others.
    if name in __all__:
        from zoo.demo import tour

        return getattr(tour, name)
    raise AttributeError(f"module 'zoo.demo' has no attribute {name!r}")
