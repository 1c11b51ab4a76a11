"""Blobs on S3-compatible object storage: ``--store s3://BUCKET/PREFIX``, through boto3.

The endpoint, region and credentials come from the standard AWS environment and files
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``~/.aws/config``...), read by boto3 itself. Blobs live at
``PREFIX/blobs/sha256/ab/<sha256>``, as in a folder store.

- Writes stay content-addressed and atomic. A file is hashed, then uploaded (multipart
  above one part) to a temporary key ``PREFIX/tmp/PID.HOST-...`` while it is hashed again,
  all before the registry's transaction; sealing, inside it, is one server-side copy to
  the content key and a delete. A file ``adopt``ed (an upload ``zoo serve`` received and
  checked) is written once at its content key: a multipart upload appears whole or not
  at all. A blob already stored is never uploaded again. A failed or interrupted upload
  is aborted; `zoo gc` removes what a killed process left.
- Reads go through a bounded local read-through cache (``blobcache.py``): ``path()``
  fetches a blob once, checks its sha256 and hands back the local file, so the merge
  engine and MergeLock keep ``pread`` access.
- ``presign`` makes a time-limited GET URL, which ``zoo serve`` redirects downloads to.

Bad input (a bucket that does not exist, wrong credentials, an endpoint that does not
answer) is one line, raised when the store is opened, before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from zoo.errors import StorageError, ZooError
from zoo.progress import Advance, ignore
from zoo.registry.blobcache import BlobCache, configured_bytes
from zoo.registry.store import BlobStore, hash_file, owner_gone, owner_tag

PART_BYTES = 16 << 20  # multipart part size (S3's minimum is 5 MiB); larger for huge files
MAX_PARTS = 9000  # S3 allows 10,000 parts per upload
THREADS = 4  # parts in flight (each held in memory)
READ_CHUNK = 1 << 20
PRESIGN_S = 3600
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "InvalidSecurity", "AllAccessDisabled", "403", "Forbidden"}
_MISSING = {"404", "NoSuchKey", "NotFound"}


def make_client() -> Any:
    """An S3 client configured from the standard AWS environment and files."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ZooError("blobs on S3 need boto3: pip install 'zoo[s3]'") from None
    config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=120, max_pool_connections=16,
                    retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=8,
                          use_threads=True)


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or
               (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")


def s3_error(e: BaseException, url: str, endpoint: str, doing: str) -> StorageError:
    """One line for a failure of the object store: what, where, and what to check."""
    from botocore import exceptions as x

    bucket = url[len("s3://"):].split("/", 1)[0]
    if isinstance(e, (x.NoCredentialsError, x.PartialCredentialsError)):
        return StorageError(f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or AWS_PROFILE")
    if isinstance(e, (x.EndpointConnectionError, x.ConnectTimeoutError, x.ReadTimeoutError,
                      x.ConnectionClosedError)) or (isinstance(e, x.BotoCoreError) and "connect" in str(e).lower()):
        return StorageError(f"cannot reach the object store at {endpoint} while {doing}; is it running, and are "
                            "AWS_ENDPOINT_URL and the network right?")
    code = _code(e)
    if code in ("NoSuchBucket",) or (code in _MISSING and doing == "opening the store"):
        return StorageError(f"bucket {bucket!r} does not exist at {endpoint}; create it first, or fix --store")
    if code in _DENIED:
        return StorageError(f"{endpoint} refused access to {url} ({code}) while {doing}; check the AWS "
                            "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the "
                            "bucket's policy")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StorageError(f"object store {url} failed while {doing}: {reason}")


class StagedKey:
    """An upload waiting at a temporary key, sealed by ``S3BlobStore.seal``; ``unlink``
    removes it (like a staged temp file)."""

    def __init__(self, store: "S3BlobStore", key: str | None, local: Path | None = None):
        self.store, self.key = store, key  # None: the blob was stored already, nothing was uploaded
        self.local = local  # a file zoo wrote: it enters the cache when sealed

    @property
    def name(self) -> str:
        return (self.key or "").rsplit("/", 1)[-1]

    def unlink(self, missing_ok: bool = True) -> None:
        if self.key is not None:
            self.store.delete_key(self.key)
            self.key = None

    def __str__(self) -> str:
        return f"s3://{self.store.bucket}/{self.key}"


class S3BlobStore(BlobStore):
    """Blobs named by their sha256 in ``s3://BUCKET/PREFIX``; ``local`` holds the read-through
    cache (``blobs/``), the temporary area (``tmp/``) and the model views."""

    def __init__(self, remote: str, local: Path, cache_bytes: int | None = None, client: Any = None):
        super().__init__(local)
        self.remote = remote
        rest = remote[len("s3://"):]
        self.bucket, _, self.prefix = rest.partition("/")
        self.client = client if client is not None else make_client()
        self.endpoint = str(self.client.meta.endpoint_url)
        self.cache = BlobCache(self.blobs, configured_bytes() if cache_bytes is None else cache_bytes)
        with self.calls("opening the store"):
            self.client.head_bucket(Bucket=self.bucket)

    # -- names -------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def key(self, sha256: str) -> str:
        return self._key("blobs", "sha256", sha256[:2], sha256)

    @property
    def shown(self) -> str:
        return self.remote or ""

    def where(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    @contextmanager
    def calls(self, doing: str) -> Iterator[None]:
        """botocore's errors as one line each."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise s3_error(e, self.remote or "", self.endpoint, doing) from None

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self.calls("looking up a blob"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise

    # -- reading -----------------------------------------------------------------------
    def has(self, sha256: str) -> bool:
        return self._head(self.key(sha256)) is not None

    def info(self, sha256: str) -> tuple[int, float] | None:
        head = self._head(self.key(sha256))
        return (int(head["ContentLength"]), head["LastModified"].timestamp()) if head is not None else None

    def path(self, sha256: str) -> Path:
        """The blob as a local file, fetched into the cache unless it is there (a path that
        does not exist when the bucket has no such blob)."""
        hit = self.cache.lookup(sha256)
        return hit if hit is not None else self._fetch(sha256)

    def _fetch(self, sha256: str) -> Path:
        from botocore.exceptions import ClientError

        self.ensure()
        tmp = self.temp_path(".fetch")
        try:
            with self.calls(f"reading blob {sha256[:12]}"):
                try:
                    self.client.download_file(self.bucket, self.key(sha256), str(tmp), Config=_transfer_config())
                except ClientError as e:
                    if _code(e) in _MISSING:
                        return self.cache.path(sha256)
                    raise
            digest, _ = hash_file(tmp)
            if digest != sha256:
                raise StorageError(f"blob {sha256} in {self.remote} does not match its hash (it reads as {digest}); "
                                   "run `zoo verify`")
            return self.cache.admit(tmp, sha256)
        except OSError as e:
            raise StorageError(f"cannot cache blob {sha256[:12]} in {self.root}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def rehash(self, sha256: str, advance: Advance = ignore) -> str | None:
        """Hash the object in the bucket (not the cache); a cached copy that differs from
        its name is dropped, to be fetched again."""
        from botocore.exceptions import ClientError

        h = hashlib.sha256()
        with self.calls(f"reading blob {sha256[:12]}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise
            for chunk in body.iter_chunks(READ_CHUNK):
                h.update(chunk)
                advance(len(chunk))
        cached = self.cache.path(sha256)
        if cached.is_file() and hash_file(cached)[0] != sha256:
            self.cache.drop(sha256)
        return h.hexdigest()

    def presign(self, sha256: str, filename: str, expires_s: int = PRESIGN_S) -> str | None:
        name = quote(filename.rsplit("/", 1)[-1], safe="")  # RFC 6266/5987: any file name, one header
        with self.calls("signing a download URL"):
            return str(self.client.generate_presigned_url(
                "get_object", ExpiresIn=expires_s,
                Params={"Bucket": self.bucket, "Key": self.key(sha256),
                        "ResponseContentDisposition": f"attachment; filename*=UTF-8''{name}"}))

    def all_digests(self) -> set[str]:
        return {k.rsplit("/", 1)[-1] for k, _, _ in self._list(self._key("blobs", "sha256") + "/")
                if _DIGEST.match(k.rsplit("/", 1)[-1])}

    def _list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        with self.calls("listing the store"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for o in page.get("Contents") or ():
                    yield o["Key"], int(o["Size"]), o["LastModified"].timestamp()

    # -- writing -----------------------------------------------------------------------
    def stage(self, src: Path, advance: Advance = ignore) -> tuple[StagedKey, str, int]:  # type: ignore[override]
        """Hash ``src``; unless that blob is stored already, upload it to a new temporary key,
        hashing it again as it goes (a file that changed in between is refused). ``seal``
        it once it may enter the store. An error or Ctrl-C (at the end of a part) aborts
        the upload."""
        try:
            digest, size = hash_file(src)
            if self.has(digest):
                advance(size)
                return StagedKey(self, None), digest, size
            key = self._key("tmp", f"{owner_tag()}-{secrets.token_hex(8)}.part")
            got, size = self._upload(src, key, advance)
        except OSError as e:
            raise self._copy_error(src, e) from None
        staged = StagedKey(self, key)
        if got != digest:
            staged.unlink()
            raise StorageError(f"{src} changed while it was copied into the store; try again")
        return staged, digest, size

    def prepare(self, path: Path, digest: str) -> StagedKey:
        """Upload a file zoo wrote to a temporary key now, outside the registry's transaction
        (which serialises every write), unless that blob is stored already."""
        if self.has(digest):
            return StagedKey(self, None, local=path)
        key = self._key("tmp", f"{owner_tag()}-{secrets.token_hex(8)}.part")
        try:
            got, _ = self._upload(path, key, ignore)
        except OSError as e:
            raise self._copy_error(path, e) from None
        staged = StagedKey(self, key, local=path)
        if got != digest:
            staged.unlink()
            raise StorageError(f"{path} changed while it was stored (sha256 {got[:12]}, not {digest[:12]}); "
                               "nothing was kept")
        return staged

    def seal(self, path: Any, digest: str, src: Path | None = None) -> None:
        if isinstance(path, StagedKey):
            self._seal(path, digest)
            return
        super().seal(path, digest, src)

    def _seal(self, path: Any, digest: str) -> None:
        """A staged upload: copied to its content key, then its temporary key deleted (and
        the local file zoo wrote, if any, kept in the cache). A local file (`adopt`):
        uploaded once at its content key, then kept in the cache."""
        if isinstance(path, StagedKey):
            if path.key is not None and not self.has(digest):
                with self.calls(f"storing blob {digest[:12]}"):
                    self.client.copy({"Bucket": self.bucket, "Key": path.key}, self.bucket, self.key(digest),
                                     Config=_transfer_config())
            path.unlink()
            if path.local is not None:
                self.cache.admit(path.local, digest)
            return
        if not self.has(digest):
            got, _ = self._upload(Path(path), self.key(digest), ignore)
            if got != digest:  # the writer's hash was wrong: never leave bytes under another name
                self.delete_key(self.key(digest))
                raise StorageError(f"{path} changed while it was stored (sha256 {got[:12]}, not {digest[:12]}); "
                                   "nothing was kept")
        self.cache.admit(Path(path), digest)

    def _upload(self, src: Path, key: str, advance: Advance) -> tuple[str, int]:
        """Upload ``src`` to ``key``, hashing exactly the bytes sent: one PUT for a small file,
        else a multipart upload with ``THREADS`` parts in flight, aborted on any failure."""
        h = hashlib.sha256()
        part = max(PART_BYTES, -(-os.path.getsize(src) // MAX_PARTS))
        with open(src, "rb") as f, self.calls(f"uploading {src.name}"):
            first = f.read(part)
            h.update(first)
            if len(first) < part:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=first)
                advance(len(first))
                return h.hexdigest(), len(first)
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            try:
                etags: dict[int, str] = {}
                size, n = len(first), 1
                with ThreadPoolExecutor(THREADS, thread_name_prefix="zoo-s3-upload") as pool:
                    pending: set[Future[tuple[int, str, int]]] = {pool.submit(self._part, key, upload, 1, first)}
                    while True:
                        if len(pending) >= THREADS:
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            self._collect(done, etags, advance)
                        chunk = f.read(part)
                        if not chunk:
                            break
                        h.update(chunk)
                        n, size = n + 1, size + len(chunk)
                        pending.add(pool.submit(self._part, key, upload, n, chunk))
                    done, _ = wait(pending)
                    self._collect(done, etags, advance)
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload,
                    MultipartUpload={"Parts": [{"PartNumber": i, "ETag": etags[i]} for i in sorted(etags)]})
            except BaseException:
                self._abort(key, upload)
                raise
        return h.hexdigest(), size

    def _part(self, key: str, upload: str, number: int, data: bytes) -> tuple[int, str, int]:
        r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=data)
        return number, r["ETag"], len(data)

    @staticmethod
    def _collect(done: set[Future[tuple[int, str, int]]], etags: dict[int, str], advance: Advance) -> None:
        for fut in done:
            number, etag, nbytes = fut.result()
            etags[number] = etag
            advance(nbytes)

    def _abort(self, key: str, upload: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except Exception:  # best effort: `zoo gc` aborts what is left
            pass

    def delete_key(self, key: str) -> None:
        """Remove one object (best effort: a leftover temporary key is `zoo gc`'s)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception:
            pass

    def remove(self, sha256: str) -> None:
        with self.calls(f"removing blob {sha256[:12]}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self.cache.drop(sha256)

    # -- temporary objects -------------------------------------------------------------
    def clean_tmp(self) -> None:
        """The local temporary files, and the temporary keys, that dead processes of this
        machine left."""
        super().clean_tmp()
        for key, _, _ in self._list(self._key("tmp") + "/"):
            if owner_gone(key.rsplit("/", 1)[-1]):
                self.delete_key(key)

    def collect_temporary(self, cutoff: float) -> tuple[int, int]:
        """Temporary keys and unfinished multipart uploads older than ``cutoff``, from any machine."""
        removed = freed = 0
        for key, size, stamp in list(self._list(self._key("tmp") + "/")):
            if stamp <= cutoff:
                self.delete_key(key)
                removed, freed = removed + 1, freed + size
        with self.calls("listing unfinished uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._key("") + "/" if self.prefix else "")
            for page in pages:
                for u in page.get("Uploads") or ():
                    if u["Initiated"].timestamp() <= cutoff:
                        self._abort(u["Key"], u["UploadId"])
                        removed += 1
        return removed, freed


__all__ = ["S3BlobStore", "StagedKey", "make_client", "s3_error"]
