"""A bounded local read-through cache for blobs kept on object storage.

The merge engine and MergeLock read safetensors files with ``pread`` at arbitrary
offsets; an object store answers HTTP range requests. So a blob is fetched whole into
a local folder once, checked against its sha256, and read from there: the second
merge over the same inputs reads local files at disk speed.

The folder is bounded: after each fetch the least recently used blobs are removed
until the total is under the bound. A blob used within the last ``IN_USE_S`` seconds
is never removed (a running merge may have it open or be about to open it), so the
bound is soft while one job's inputs are larger than it. Use is stamped in each
file's mtime (the files are read-only; their atime depends on mount options).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ZooError

DEFAULT_BYTES = 20 << 30  # 20 GiB
SIZE_ENV_VAR = "ZOO_S3_CACHE_SIZE"
IN_USE_S = 300.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``20G``, ``512MiB``, ``1.5t`` or plain bytes, as bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise ZooError(f"${SIZE_ENV_VAR}={text!r} is not a size; write e.g. 20G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def configured_bytes() -> int:
    """The cache bound: ``$ZOO_S3_CACHE_SIZE``, else 20 GiB."""
    value = os.environ.get(SIZE_ENV_VAR)
    return parse_size(value) if value else DEFAULT_BYTES


@dataclass(frozen=True)
class CacheStats:
    files: int
    bytes: int
    limit: int


class BlobCache:
    """Blobs under ``folder/ab/<sha256>``, at most ``limit`` bytes of them not in use."""

    def __init__(self, folder: Path, limit: int):
        self.folder = Path(folder)
        self.limit = limit

    def path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / sha256

    def lookup(self, sha256: str) -> Path | None:
        """The cached file, stamped as just used, or None when it is not cached."""
        p = self.path(sha256)
        try:
            os.utime(p)
        except FileNotFoundError:
            return None
        except OSError:  # another user's file: still readable
            pass
        return p if p.is_file() else None

    def admit(self, tmp: Path, sha256: str) -> Path:
        """Move a complete, checked file into the cache (read-only), then keep to the bound."""
        dest = self.path(sha256)
        os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        os.utime(dest)
        self.trim()
        return dest

    def drop(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        if not self.folder.is_dir():
            return out
        for d in self.folder.iterdir():
            if not d.is_dir():
                continue
            for p in d.iterdir():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def trim(self) -> int:
        """Remove least recently used blobs until the cache is under its bound; returns bytes freed."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        freed = 0
        busy = time.time() - IN_USE_S
        for used, size, p in entries:
            if total <= self.limit:
                break
            if used >= busy:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            total -= size
            freed += size
        return freed

    def stats(self) -> CacheStats:
        entries = self._entries()
        return CacheStats(len(entries), sum(size for _, size, _ in entries), self.limit)


__all__ = ["BlobCache", "CacheStats", "DEFAULT_BYTES", "SIZE_ENV_VAR", "configured_bytes", "parse_size"]
