"""Reading ahead: load the next item in a background thread while the caller works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def read_ahead(load: Callable[[int, Any], T], items: Iterable[Any], sets: int = 2) -> Iterator[T]:
    """Yield ``load(set, item)`` for each item, loading the next ones in a background
    thread (pread and dtype conversions release the GIL) while the caller works on this
    one. ``set`` is one of ``range(sets)``: buffer sets rotate, and a set is reused only
    after the caller has moved past the item loaded into it, so at most ``sets - 1``
    items are loaded ahead."""
    free: queue.Queue[int] = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for k in range(sets):
        free.put(k)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                k = free.get()
                if stop.is_set():
                    return
                ready.put((k, load(k, item)))
            ready.put(None)
        except BaseException as e:  # handed to the consumer
            ready.put(e)

    t = threading.Thread(target=fill, daemon=True, name="zoo-read")
    t.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            k, piece = item
            yield piece
            free.put(k)
    finally:
        stop.set()
        free.put(0)
        t.join()
