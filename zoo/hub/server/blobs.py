"""Serving the store's blobs so that nothing goes out as whole unless it is.

A blob's name is its sha256, and clients trust the ETag the server sends for it; a
file that rotted or was edited on disk must never be sent as if it were that blob.

- A whole-file GET is hashed as it is sent, and its last chunk is held back until the
  hash matched: on a mismatch the connection is closed short of ``Content-Length``,
  so the client sees a failed download, never wrong bytes it would accept.
- A ranged GET (a resumed download) cannot be checked by the bytes it sends, so the
  whole blob is hashed first, unless it was hashed since its file last changed
  (size, mtime, inode).
- A blob whose size on disk is wrong, or that failed a check and has not changed
  since, is refused before any byte is sent.

Every refusal is logged with the repository, the path and what to run.

A registry whose blobs live on object storage answers a GET of a large file with a 302
to a presigned URL, as the Hub does with its CDN: the bytes then come from the store,
not through this server (the stock ``huggingface_hub`` client follows the redirect).
Those bytes are not hashed by the server on the way; the object store keeps them, and
`zoo verify` checks them there. Small files are served here, checked as above.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from zoo.registry.store import BlobStore

log = logging.getLogger("zoo.serve")

Stamp = tuple[int, int, int]
REDIRECT_MIN_BYTES = 10 << 20  # the Hub's LFS threshold: smaller files are served directly


def presigned(store: BlobStore, sha256: str, size: int, path: str, headers: dict[str, str],
              min_bytes: int = REDIRECT_MIN_BYTES) -> Response | None:
    """A 302 to a presigned URL for a large blob where the store can make one, else None."""
    if size < min_bytes:
        return None
    url = store.presign(sha256, path)
    if url is None:
        return None
    return RedirectResponse(url, status_code=302, headers={**headers, "X-Linked-Size": str(size),
                                                           "X-Linked-ETag": f'"{sha256}"'})


def stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class BlobChecks:
    """What this server learnt of its blobs: hashed good, or found bad, at a file stamp."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[Stamp, bool]] = {}

    def known(self, sha256: str, at: Stamp | None) -> bool | None:
        """True (good) or False (bad) if this file was judged at this stamp, else None."""
        with self._lock:
            got = self._seen.get(sha256)
        return got[1] if got is not None and got[0] == at else None

    def record(self, sha256: str, at: Stamp | None, good: bool) -> None:
        if at is not None:
            with self._lock:
                self._seen[sha256] = (at, good)

    def check(self, sha256: str, path: Path) -> bool:
        """Hash the whole blob unless already judged at its current stamp."""
        at = stamp(path)
        verdict = self.known(sha256, at)
        if verdict is None:
            h = hashlib.sha256()
            try:
                with open(path, "rb", buffering=0) as f:
                    while chunk := f.read(4 << 20):
                        h.update(chunk)
            except OSError:
                return False
            verdict = h.hexdigest() == sha256
            self.record(sha256, at, verdict)
        return verdict


class RangeFile(FileResponse):
    """Part of a blob already checked whole: ``FileResponse`` answers ``Range``."""

    chunk_size = 1024 * 1024  # 64 KiB by default: too many event-loop turns for GB files


class VerifiedBlob(Response):
    """A whole blob, hashed as it is sent; its last chunk goes out only once the hash matched."""

    chunk_size = 1024 * 1024

    def __init__(self, path: Path, sha256: str, size: int, checks: BlobChecks, what: str,
                 headers: dict[str, str], media_type: str):
        super().__init__(headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"},
                         media_type=media_type)
        self.path, self.sha256, self.checks, self.what = path, sha256, checks, what
        self.stamp = stamp(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = hashlib.sha256()

        def read(f) -> bytes:
            chunk = f.read(self.chunk_size)
            h.update(chunk)
            return chunk

        with open(self.path, "rb", buffering=0) as f:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            held = await run_in_threadpool(read, f)
            while chunk := await run_in_threadpool(read, f):
                await send({"type": "http.response.body", "body": held, "more_body": True})
                held = chunk
        good = h.hexdigest() == self.sha256
        self.checks.record(self.sha256, self.stamp, good)
        if not good:
            log.error("%s: the stored blob no longer matches its sha256 %s; the download was cut short. Run "
                      "`zoo verify` on the server", self.what, self.sha256)
            return  # short of Content-Length: the client's download fails
        await send({"type": "http.response.body", "body": held, "more_body": False})
