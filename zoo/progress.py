"""Progress reporting: how long operations tell a caller (the CLI's bars) how far they are.

A ``ProgressFactory`` is called once per operation with a description, the total
bytes, and optionally the total number of items (tensors, files); it returns an
``Advance`` to call with the bytes, and the items, done since the last call.
"""

from __future__ import annotations

from typing import Protocol


class Advance(Protocol):
    def __call__(self, nbytes: int, items: int = 0, /) -> None: ...


class ProgressFactory(Protocol):
    def __call__(self, description: str, total_bytes: int, total_items: int = 0, /) -> Advance: ...


def ignore(nbytes: int, items: int = 0, /) -> None:
    """An Advance that reports nowhere."""


def no_progress(description: str, total_bytes: int, total_items: int = 0, /) -> Advance:
    """The factory to use when nobody is watching."""
    return ignore
