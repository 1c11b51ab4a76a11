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
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from zoo.errors import StorageError
from zoo.fileio import DISK_FULL, pid_alive
from zoo.progress import Advance, ignore

CHUNK = 1 << 20  # 1 MiB: measured faster than 8 MiB for copy loops (stays in cache)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
WAIT_S = 0.5  # how often a waiting copy thread looks up (Ctrl-C, a partner gone)
JOIN_S = 30.0  # the hasher has at most 8 chunks left when told to stop: milliseconds


# A store may be shared by several machines (a registry on PostgreSQL, its store on a
# shared filesystem): temporary names carry the host, so that one machine never takes
# another's live temp file for a dead process's.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``PID.HOST``: this process, as the start of a temporary name in a store."""
    return f"{os.getpid()}.{HOST_TAG}"


def owner_gone(name: str) -> bool:
    """True when the process that ``name`` starts with (``PID.HOST-...``, or an older
    zoo's ``PID-...``) ran on this machine and has exited."""
    pid, _, host = name.split("-", 1)[0].partition(".")
    return pid.isdigit() and host in ("", HOST_TAG) and not pid_alive(int(pid))


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


class HeldInterrupts:
    """Ctrl-C held back to the safe points of a section of the main thread.

    Python raises KeyboardInterrupt between any two bytecodes of the main thread, also
    inside ``threading`` and ``queue``: ``Condition.__exit__`` is Python code, and an
    interrupt on its first line leaves the lock held for ever. While a section holds
    interrupts, SIGINT only records itself; ``check()`` delivers it where the code can
    clean up, and leaving the section delivers one that came after the last check.
    Nested sections share the outermost one's record, so any ``check()`` delivers.
    Off the main thread (where Python raises no KeyboardInterrupt) it does nothing.
    """

    def __init__(self) -> None:
        self.pending = False
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        self._root = self

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        current = signal.getsignal(signal.SIGINT)
        outer = getattr(current, "__self__", None)
        if isinstance(outer, HeldInterrupts):
            self._root = outer._root
        elif callable(current):  # SIG_IGN and SIG_DFL stay as they are
            self._previous = current
            signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def check(self) -> None:
        """Deliver a held Ctrl-C now (to the handler that was in place: Python's raises
        KeyboardInterrupt)."""
        root = self._root
        if root.pending and root._previous is not None:
            root.pending = False
            root._previous(signal.SIGINT, None)

    def checked(self, advance: Advance) -> Advance:
        """``advance`` that first delivers a held Ctrl-C: long loops report each chunk, so
        each chunk becomes a safe point."""

        def advance_checked(nbytes: int, items: int = 0, /) -> None:
            self.check()
            advance(nbytes, items)

        return advance_checked

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self.pending and exc[0] is None:
            self.pending = False
            self._previous(signal.SIGINT, None)


def _copy_and_hash(src: Path, dst_fd: int, advance: Advance) -> tuple[str, int]:
    """Copy ``src`` into ``dst_fd`` while hashing exactly the bytes written.

    The hashing runs in a second thread (hashlib releases the GIL on large buffers),
    so reading, hashing and writing overlap on two cores. The hand-off uses C queues
    (no Python-level lock an interrupt could leave held), Ctrl-C is held to the top of
    each chunk, the hasher is always told to stop and joined, and every wait is bounded.
    """
    h = hashlib.sha256()
    free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
    for _ in range(8):
        free.put(bytearray(CHUNK))
    todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    stopped = threading.Event()
    failed: list[BaseException] = []

    def hasher() -> None:
        try:
            while True:
                try:
                    item = todo.get(timeout=WAIT_S)
                except queue.Empty:
                    if stopped.is_set():  # the reader left without a word
                        return
                    continue
                if item is None:
                    return
                buf, n = item
                h.update(memoryview(buf)[:n])
                free.put(buf)
        except BaseException as e:  # e.g. MemoryError: tell the reader instead of leaving it waiting
            failed.append(e)
            free.put(None)

    t = threading.Thread(target=hasher, name="zoo-store-hasher", daemon=True)
    size = 0
    with HeldInterrupts() as held:
        try:
            t.start()
            with open(src, "rb", buffering=0) as f:
                while True:
                    held.check()
                    buf = _free_buffer(free, t, held)
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
            stopped.set()
            todo.put(None)
            if t.ident is not None:
                t.join(JOIN_S)
    if t.is_alive() or failed:
        raise OSError(errno.EIO, "the hashing thread failed" if failed else "the hashing thread did not finish")
    return h.hexdigest(), size


def _free_buffer(free: queue.SimpleQueue[bytearray | None], hasher: threading.Thread,
                 held: HeldInterrupts) -> bytearray:
    """The next buffer the hasher is done with; Ctrl-C still counts while waiting."""
    while True:
        try:
            buf = free.get(timeout=WAIT_S)
        except queue.Empty:
            held.check()
            if not hasher.is_alive():
                raise OSError(errno.EIO, "the hashing thread stopped") from None
            continue
        if buf is None:
            raise OSError(errno.EIO, "the hashing thread failed")
        return buf


class BlobStore:
    """Blobs named by their sha256 under ``root``."""

    remote: str | None = None  # the object store's URL where the blobs live elsewhere (objectstore.py)

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"

    @property
    def shown(self) -> str:
        """The store as messages name it."""
        return str(self.root)

    def where(self, sha256: str) -> str:
        """Where blob ``sha256`` lives, for messages and ``zoo show`` (never fetches it)."""
        return str(self.path(sha256))

    def size(self, sha256: str) -> int | None:
        """The stored size of a blob, or None when it is not stored."""
        info = self.info(sha256)
        return info[0] if info is not None else None

    def info(self, sha256: str) -> tuple[int, float] | None:
        """Size and time of storing of a blob, or None when it is not stored."""
        try:
            st = self.path(sha256).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime

    def rehash(self, sha256: str, advance: Advance = ignore) -> str | None:
        """The sha256 of the stored bytes of blob ``sha256`` (None when missing): `zoo verify`."""
        p = self.path(sha256)
        return hash_file(p, advance)[0] if p.is_file() else None

    def prepare(self, path: Path, digest: str) -> Any:
        """Make a complete file that zoo wrote (and hashed) ready for ``seal`` before the
        registry's transaction starts; here nothing is needed: sealing is a rename."""
        return path

    def presign(self, sha256: str, filename: str, expires_s: int = 3600) -> str | None:
        """A URL that serves the blob without this process, where the store can make one."""
        return None

    def collect_temporary(self, cutoff: float) -> tuple[int, int]:
        """For `zoo gc`: temporary objects older than ``cutoff`` kept outside ``tmp/``
        (none here: ``clean_tmp`` has them). Returns how many and their bytes."""
        return 0, 0

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
            if owner_gone(p.name):
                try:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
                except OSError:
                    pass

    def temp_path(self, suffix: str = ".part") -> Path:
        """A fresh path in the store's temp folder, tagged with this process and host."""
        self.ensure()
        return self.tmp / f"{owner_tag()}-{secrets.token_hex(8)}{suffix}"

    def ingest(self, src: Path, advance: Advance = ignore) -> tuple[str, int]:
        """Copy ``src`` into the store. Returns its sha256 and size."""
        with HeldInterrupts() as held:  # one section, so no Ctrl-C lands between copy and seal
            tmp, digest, size = self.stage(src, advance)
            try:
                held.check()
                self.seal(tmp, digest, src)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return digest, size

    def stage(self, src: Path, advance: Advance = ignore) -> tuple[Path, str, int]:
        """Copy ``src`` into a new temporary file in the store, hashing it. Returns the
        temporary file, its sha256 and size; ``seal`` it once it may enter the store.

        An error or Ctrl-C (held to the end of a chunk) removes the temporary file.
        """
        self.ensure()
        tmp = self.temp_path()
        try:
            with HeldInterrupts() as held:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    with open(src, "rb") as s:
                        cloned = _clone(s.fileno(), fd)
                    if cloned:
                        digest, size = hash_file(tmp, held.checked(advance))
                    else:
                        digest, size = _copy_and_hash(src, fd, advance)
                finally:
                    os.close(fd)
            return tmp, digest, size
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._copy_error(src, e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def staging(self) -> Iterator[list[Path]]:
        """A list for the temporary files of one change; those not sealed by the end
        (sealing moves them) are removed."""
        files: list[Path] = []
        try:
            yield files
        finally:
            for p in files:
                p.unlink(missing_ok=True)

    def seal(self, path: Path, digest: str, src: Path | None = None) -> None:
        """Move a complete, hashed file (copied from ``src``) into the store as blob ``digest``."""
        try:
            self._seal(path, digest)
        except OSError as e:
            raise self._copy_error(src or path, e) from None

    def _copy_error(self, src: Path, e: OSError) -> StorageError:
        if e.errno in DISK_FULL:
            return StorageError(
                f"disk full while copying {src} into the store at {self.root}; "
                "free some space, or register the files where they are with --in-place"
            )
        if isinstance(e, FileNotFoundError) and e.filename and Path(e.filename) == Path(src):
            return StorageError(f"{src}: file disappeared while copying")
        return StorageError(f"cannot copy {src} into the store: {e.strerror or e}")

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
