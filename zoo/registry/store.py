"""The content-addressed blob store: one read-only file per sha256, de-duplicated.

Files enter the store through a temporary file in ``tmp/`` and are renamed into
``blobs/sha256/ab/<digest>`` only once complete, so a killed copy never leaves a
partial blob. The copy is a copy-on-write clone where the filesystem supports one,
else one pass that reads each chunk once and hashes and writes it in parallel.
A user's file is never hard-linked: an edit to it would corrupt the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import secrets
import shutil
import stat
import threading
from pathlib import Path

from zoo.errors import StorageError
from zoo.fileio import DISK_FULL, datasync, start_writeback
from zoo.progress import Advance, ignore

CHUNK = 1 << 20  # 1 MiB: measured faster than 8 MiB for copy loops (stays in cache)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def hash_file(path: Path, advance: Advance = ignore) -> tuple[str, int]:
    """sha256 and size of a file, read in large chunks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
            advance(n)
    return h.hexdigest(), size


def _clone(src_fd: int, dst_fd: int) -> bool:
    """Copy-on-write clone (btrfs, XFS, ...). False where the filesystem has none."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError:
        return False


def _copy_and_hash(src: Path, dst_fd: int, advance: Advance) -> tuple[str, int]:
    """Copy ``src`` into ``dst_fd`` while hashing exactly the bytes written.

    The hashing runs in a second thread (hashlib releases the GIL on large buffers),
    so reading, hashing and writing overlap on two cores.
    """
    h = hashlib.sha256()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(8):
        free.put(bytearray(CHUNK))
    todo: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()

    def hasher() -> None:
        while (item := todo.get()) is not None:
            buf, n = item
            h.update(memoryview(buf)[:n])
            free.put(buf)

    t = threading.Thread(target=hasher, daemon=True)
    t.start()
    size = 0
    try:
        with open(src, "rb", buffering=0) as f:
            while True:
                buf = free.get()
                n = f.readinto(buf)
                if not n:
                    break
                view = memoryview(buf)[:n]
                done = 0
                while done < n:
                    done += os.write(dst_fd, view[done:])
                todo.put((buf, n))
                size += n
                advance(n)
    finally:
        todo.put(None)
        t.join()
    return h.hexdigest(), size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BlobStore:
    """Blobs named by their sha256 under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def clean_tmp(self) -> None:
        """Remove temporary files left by processes that died mid-copy."""
        if not self.tmp.is_dir():
            return
        for p in self.tmp.iterdir():
            pid = p.name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                try:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
                except OSError:
                    pass

    def temp_path(self, suffix: str = ".part") -> Path:
        """A fresh path in the store's temp folder, tagged with this process id."""
        self.ensure()
        return self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    def ingest(self, src: Path, advance: Advance = ignore) -> tuple[str, int]:
        """Copy ``src`` into the store. Returns its sha256 and size."""
        self.ensure()
        tmp = self.temp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with open(src, "rb") as s:
                    cloned = _clone(s.fileno(), fd)
                if cloned:
                    digest, size = hash_file(tmp, advance)
                else:
                    digest, size = _copy_and_hash(src, fd, advance)
            finally:
                os.close(fd)
            self._seal(tmp, digest)
            return digest, size
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in DISK_FULL:
                raise StorageError(
                    f"disk full while copying {src} into the store at {self.root}; "
                    "free some space, or register the files where they are with --in-place"
                ) from None
            if isinstance(e, FileNotFoundError) and e.filename and Path(e.filename) == Path(src):
                raise StorageError(f"{src}: file disappeared while copying") from None
            raise StorageError(f"cannot copy {src} into the store: {e.strerror or e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def adopt(self, path: Path, digest: str | None = None, advance: Advance = ignore) -> tuple[str, int]:
        """Move a file that is already in this store's filesystem into the store.

        ``digest`` may be given when the writer hashed the file as it wrote it; it is
        trusted, so only zoo's own writers pass it.
        """
        size = path.stat().st_size
        if digest is None:
            digest, size = hash_file(path, advance)
        else:
            advance(size)
        self._seal(path, digest)
        return digest, size

    def _seal(self, path: Path, digest: str) -> None:
        """Make a complete file read-only and rename it to its blob name (or drop it
        when that blob is already stored)."""
        os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        dest = self.path(digest)
        if dest.exists():
            path.unlink()
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)

    def remove(self, sha256: str) -> None:
        p = self.path(sha256)
        try:
            p.unlink()
        except FileNotFoundError:
            pass

    def all_digests(self) -> set[str]:
        if not self.blobs.is_dir():
            return set()
        return {p.name for d in self.blobs.iterdir() if d.is_dir() for p in d.iterdir()}
