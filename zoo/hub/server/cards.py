"""Model cards as ``zoo serve`` reads them: checked at commit and at validate-yaml,
served as ``cardData`` in model info.

A card is data, never code: its front matter goes through the registry's strict
reader (no aliases, tags or deep nesting; JSON's types only). A card that fails it is
refused with a 400 (``InvalidMetadata``) before anything is committed. A card that
reached the store some other way (an older server, a direct write) only loses its
``cardData``: model info never fails, nor grows large, because of a card.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from zoo.errors import HubError
from zoo.hub.repos import Change
from zoo.registry.card import CardError, read_front_matter
from zoo.registry.store import BlobStore

log = logging.getLogger("zoo.serve")

CARD_HEAD = 1024 * 1024  # the part of a README that is read: its front matter must end within it
CARD_DATA_LIMIT = 64 * 1024  # cardData as JSON, so that no card makes model info large
CACHE_SIZE = 512  # parsed cards kept, by the README's sha256


def parse_card(data: str | bytes) -> dict[str, Any]:
    """A README's front matter as plain JSON values ({} when it has none); a CardError
    names what is wrong with it. Reads at most ``CARD_HEAD`` bytes."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise CardError("the card is not UTF-8 text (it holds a lone surrogate)") from None
    if len(data) > CARD_HEAD:  # the front matter must close within the head; cut at a line end
        data = data[: data.rfind(b"\n", 0, CARD_HEAD) + 1]
    meta = read_front_matter(data) or {}
    tags = meta.get("tags")
    if not (tags is None or isinstance(tags, str)
            or (isinstance(tags, list) and all(isinstance(t, str) for t in tags))):
        raise CardError("'tags' must be a string or a list of strings")  # clients iterate over them
    if "eval_results" in meta:  # huggingface_hub's ModelCardData.to_dict() fails on any such key
        raise CardError("'eval_results' is huggingface_hub's in-memory name: a card holds results as 'model-index'")
    size = len(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    if size > CARD_DATA_LIMIT:
        raise CardError(f"the card metadata is {size} bytes as JSON, over the {CARD_DATA_LIMIT >> 10} KiB "
                        "zoo serve serves")
    return meta


def check_card(data: str | bytes) -> dict[str, Any]:
    """:func:`parse_card`, refused as the Hub refuses invalid metadata: a 400 with
    ``X-Error-Code: InvalidMetadata``."""
    try:
        return parse_card(data)
    except CardError as e:
        raise HubError(f"invalid model card metadata: {e}", status=400, code="InvalidMetadata") from None


def read_head(path: Path) -> bytes:
    """The first ``CARD_HEAD`` bytes of a stored README, and one more to tell a longer one."""
    with open(path, "rb") as f:
        return f.read(CARD_HEAD + 1)


def card_data(data: str | bytes, label: str = "a card") -> dict[str, Any]:
    """A card's ``cardData`` for model info: {} (and a log line) when it cannot be read.
    Never raises."""
    try:
        return parse_card(data)
    except Exception as e:  # noqa: BLE001 - whatever a card holds, model info still answers
        log.warning("%s: no cardData served: %s", label, e)
        return {}


class CardCache:
    """``cardData`` by the README's sha256: a blob never changes, so each card is parsed
    once, however often its repository is asked for."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def card_data(self, sha256: str, path: Path, label: str) -> dict[str, Any]:
        with self._lock:
            if sha256 in self._items:
                self._items.move_to_end(sha256)
                return self._items[sha256]
        try:
            meta = card_data(read_head(path), label)
        except OSError as e:
            log.warning("%s: no cardData served: the README cannot be read (%s)", label, e)
            return {}  # not kept: the disk may recover
        with self._lock:
            self._items[sha256] = meta
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return meta


CARDS = CardCache()


def check_commit(change: Change, store: BlobStore) -> None:
    """Refuse a commit whose ``README.md`` (sent inline or through LFS) holds invalid
    metadata, as :func:`check_card` does."""
    if "README.md" in change.files:
        check_card(read_head(change.files["README.md"]))
    elif "README.md" in change.lfs:
        check_card(read_head(store.path(change.lfs["README.md"][0])))
