"""Receiving Git LFS uploads: signed upload URLs, and the PUT body streamed into the store.

The LFS batch API hands a client a signed, short-lived URL for each object it must
upload. The PUT body is hashed and written as it arrives, synced to disk, checked
against its oid and only then adopted into the content-addressed store. Objects
received but not yet committed are remembered per repository: a commit may name an
LFS object only if it is among them or already in that repository's history, so a
write token cannot reach (or probe for) blobs of other repositories or models. They are
remembered in the registry's database (``hub_uploads``), so with ``--workers N`` an
object uploaded through one worker may be committed through another; the URL's signing
key is made once, before the workers start, and shared by all of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import queue
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Mapping
from urllib.parse import quote

from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from zoo.errors import HubError, RepoNotFound
from zoo.fileio import DISK_FULL, datasync, start_writeback
from zoo.registry import Registry
from zoo.registry.schema import HubRepo, HubUpload

BLOCK = 4 * 1024 * 1024  # upload bytes are handed to the writer thread in blocks this big
UPLOAD_TTL = 3600  # seconds a signed upload URL stays valid
UPLOAD_ROUTE = "api/lfs-upload"  # where the server routes the PUT of an upload URL


class Uploads:
    """The LFS uploads of one server run."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.secret = secrets.token_bytes(32)  # signs upload URLs; new for each server run

    # -- upload URLs ---------------------------------------------------------------------
    def action(self, base_url: str, repo_id: str, oid: str, size: int, now: float) -> dict[str, Any]:
        """The batch API's upload action for one object: a URL signed for ``UPLOAD_TTL`` seconds."""
        expires = int(now) + UPLOAD_TTL
        sig = self._sign(repo_id, oid, size, expires)
        href = (f"{base_url}/{UPLOAD_ROUTE}/{oid}?repo={quote(repo_id, safe='')}&size={size}"
                f"&expires={expires}&sig={sig}")
        return {"href": href, "expires_in": UPLOAD_TTL}

    def authorise(self, oid: str, query: Mapping[str, str]) -> tuple[str, int]:
        """The repository and size an upload URL was signed for; refused when forged or expired."""
        try:
            repo_id, size, expires = query["repo"], int(query["size"]), int(query["expires"])
        except (KeyError, ValueError):
            raise HubError("upload URL is missing its repository, size or expiry; ask the LFS batch API for a "
                           "new one", status=403, code="Forbidden") from None
        if not hmac.compare_digest(self._sign(repo_id, oid, size, expires), query.get("sig", "")) \
                or expires < time.time():
            raise HubError("upload URL is invalid or expired; ask the LFS batch API for a new one",
                           status=403, code="Forbidden")
        return repo_id, size

    def _sign(self, repo_id: str, oid: str, size: int, expires: int) -> str:
        return hmac.new(self.secret, f"{repo_id}\0{oid}\0{size}\0{expires}".encode(), hashlib.sha256).hexdigest()

    # -- received objects ----------------------------------------------------------------
    async def receive(self, chunks: AsyncIterator[bytes], repo_id: str, oid: str, size: int) -> None:
        """Stream an upload into the store; refused unless it is ``size`` bytes with sha256 ``oid``."""
        store = self.registry.store
        tmp = store.temp_path()
        try:
            digest, got = await receive_to_file(chunks, tmp, limit=size)
            if got != size or digest != oid:
                raise HubError(f"uploaded content does not match its oid (got {got} bytes, sha256 {digest[:12]})",
                               status=400, code="BadRequest")
            await run_in_threadpool(self._adopt, tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        await run_in_threadpool(self._remember, repo_id, oid)

    def _adopt(self, tmp: Path, digest: str) -> None:
        with self.registry.db.store_lock(exclusive=False):  # not while `zoo rm` removes blobs
            self.registry.store.adopt(tmp, digest)

    def _remember(self, repo_id: str, oid: str) -> None:
        """Record ``oid`` as received for ``repo_id``, and forget uploads never committed
        once their URLs are long expired."""
        now = datetime.now(timezone.utc)
        with self.registry.db.write() as s:
            s.execute(delete(HubUpload).where(HubUpload.received_at < now - timedelta(seconds=2 * UPLOAD_TTL)))
            pk = s.scalar(select(HubRepo.id).where(HubRepo.repo_type == "model", HubRepo.repo_id == repo_id))
            if pk is None:  # deleted since its upload URL was signed
                raise RepoNotFound(f"repository {repo_id} not found")
            s.merge(HubUpload(repo_pk=pk, oid=oid, received_at=now))

    def holds(self, repo_id: str, oid: str) -> bool:
        """Whether ``oid`` was uploaded to ``repo_id`` (through any worker of this server)
        and not yet committed."""
        with self.registry.db.read() as s:
            return s.scalar(select(HubUpload.oid).join(HubRepo, HubRepo.id == HubUpload.repo_pk)
                            .where(HubRepo.repo_type == "model", HubRepo.repo_id == repo_id,
                                   HubUpload.oid == oid)) is not None

    def stored_size(self, oid: str) -> int | None:
        return self.registry.store.size(oid)

    def committed(self, repo_id: str, oids: list[str]) -> None:
        """Forget the uploads a commit has taken into the repository's history."""
        if not oids:
            return
        with self.registry.db.write() as s:
            pk = s.scalar(select(HubRepo.id).where(HubRepo.repo_type == "model", HubRepo.repo_id == repo_id))
            s.execute(delete(HubUpload).where(HubUpload.repo_pk == pk, HubUpload.oid.in_(oids)))


async def receive_to_file(chunks: AsyncIterator[bytes], path: Path, limit: int) -> tuple[str, int]:
    """Stream a request body into ``path``, durably; returns its sha256 and size.

    The event loop only gathers the received chunks (no copies); a writer thread
    hashes and writes them, so receiving, hashing and writing overlap (hashlib and
    os.writev release the GIL). The file is on disk (fdatasync) before this returns:
    a blob the store accepts survives a crash.
    """
    h = hashlib.sha256()
    todo: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def writer() -> None:
        written, ended = 0, False
        try:
            while (batch := todo.get()) is not None:
                for chunk in batch:
                    h.update(chunk)
                left = sum(len(c) for c in batch)
                start = written
                while left:
                    n = os.writev(fd, batch)
                    left -= n
                    written += n
                    while batch and n >= len(batch[0]):  # a short write: resume where it stopped
                        n -= len(batch.pop(0))
                    if n:
                        batch[0] = batch[0][n:]
                # start writing this block to disk now, so the sync before the blob is
                # accepted finds little left
                start_writeback(fd, start, written - start)
            ended = True
            datasync(fd)
        except BaseException as e:  # reported to the receiving side
            failure.append(e)
            while not ended and todo.get() is not None:  # let the receiving side finish handing over
                pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    size = 0
    batch: list[bytes] = []
    held = 0

    async def hand(items: list[bytes]) -> None:
        try:
            todo.put_nowait(items)
        except queue.Full:
            await asyncio.to_thread(todo.put, items)

    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise HubError(f"upload is larger than the {limit} bytes announced", status=400)
            batch.append(chunk)
            held += len(chunk)
            if held >= BLOCK or len(batch) >= 512:  # 512: writev's IOV_MAX is 1024
                await hand(batch)
                batch, held = [], 0
            if failure:
                break
        if batch:
            await hand(batch)
    finally:
        await asyncio.to_thread(todo.put, None)
        await asyncio.to_thread(t.join)
        os.close(fd)
    if failure:
        e = failure[0]
        full = isinstance(e, OSError) and e.errno in DISK_FULL
        raise HubError(f"cannot write the upload into the store: {e}", status=507 if full else 500,
                       code="InsufficientStorage" if full else "InternalError")
    return h.hexdigest(), size
