"""``zoo serve``: a Hugging Face Hub-compatible HTTP server over a registry.

It speaks the subset of the Hub's API that ``huggingface_hub`` (and so
``transformers``) uses to create a repository, upload a folder in one commit, list
and download files: repo create, model info, tree, preupload, the NDJSON commit,
the Git LFS batch API with a basic PUT upload, ``resolve`` with ETag and Range, and
validate-yaml. Small files travel inline in the commit; large ones are PUT to a
signed, short-lived URL and stream straight into the blob store, hashed as they
arrive. Xet is not spoken: clients must set ``HF_HUB_DISABLE_XET=1`` (zoo's own
pull and push do).

Writes need a bearer token with the ``write`` scope (``zoo token create``); reads
are open unless the server runs with ``reads="token"`` or the repository is private.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import quote, unquote

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from zoo.errors import HubError, RepoNotFound, ZooError
from zoo.hub.git import DEFAULT_BRANCH, check_path, check_repo_id
from zoo.hub.repos import Change, Entry, HubRepos, folders
from zoo.registry import Registry, card
from zoo.fileio import DISK_FULL, datasync, start_writeback
from zoo.hub.tokens import Holder, TokenSet

log = logging.getLogger("zoo.serve")

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's own cut: larger files go through LFS
MAX_INLINE_LINE = 64 * 1024 * 1024  # one NDJSON line (an inline file, base64)
BLOCK = 4 * 1024 * 1024  # upload bytes are handed to the writer thread in blocks this big
UPLOAD_TTL = 3600  # seconds a signed upload URL stays valid
CARD_LIMIT = 1024 * 1024  # model cards parsed for validate-yaml and model info
KEYWORDS = {"revision", "tree", "preupload", "commit", "xet-write-token", "xet-read-token"}
UNSUPPORTED = {"paths-info", "commits", "refs", "branch", "tag", "discussions", "settings", "resolve-cache",
               "compare", "super-squash", "treesize", "notebook", "scan"}
JSON_LFS = "application/vnd.git-lfs+json"


class BlobFile(FileResponse):
    chunk_size = 1024 * 1024  # 64 KiB by default: too many event-loop turns for GB files


@dataclass
class ServeSettings:
    """How a server treats its clients."""

    tokens: TokenSet
    open_reads: bool = True
    lfs_threshold: int = LFS_THRESHOLD


class HubApp:
    """The request handlers, over one registry."""

    def __init__(self, registry: Registry, settings: ServeSettings):
        self.registry = registry
        self.repos = HubRepos(registry)
        self.settings = settings
        self.secret = secrets.token_bytes(32)  # signs upload URLs; new for each server run
        # (repo, oid) uploaded through this server and not yet committed: a commit may name
        # an LFS object only if it is here or already in that repository's history, so a
        # write token cannot reach (or probe for) blobs of other repositories or models
        self.uploads: dict[tuple[str, str], float] = {}

    # -- auth ------------------------------------------------------------------------
    def holder(self, request: Request) -> Holder | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return self.settings.tokens.check(token)

    def need_write(self, request: Request) -> Holder:
        holder = self.holder(request)
        if holder is None:
            raise HubError("writing needs a token of this server (`zoo token create`)", status=401,
                           code="Unauthorized")
        if not holder.can_write:
            raise HubError(f"token {holder.name!r} is read-only", status=403, code="Forbidden")
        return holder

    async def need_read(self, request: Request, repo_id: str | None = None) -> None:
        private = not self.settings.open_reads
        if not private and repo_id is not None:
            private = await run_in_threadpool(self.repos.is_private, repo_id)
        if private and self.holder(request) is None:
            # As the Hub does: a private repository is not found without a token.
            raise RepoNotFound(f"repository {repo_id or ''} not found, or it needs a token of this server",
                               status=401)

    # -- routing ---------------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        parts = [unquote(p) for p in raw.decode("latin-1").split("?", 1)[0].split("/")[1:]]
        method = request.method
        try:
            return await self._route(request, method, parts)
        except HubError as e:
            return error(e.status, e.code, str(e))
        except ZooError as e:
            return error(400, "BadRequest", str(e))
        except ClientDisconnect:
            log.info("%s %s: the client went away mid-request; nothing was kept", method, request.url.path)
            return Response(status_code=400)

    async def _route(self, request: Request, method: str, parts: list[str]) -> Response:
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self.whoami(request)
            if rest == ["repos", "create"] and method == "POST":
                return await self.create_repo(request)
            if rest == ["validate-yaml"] and method == "POST":
                return await self.validate_yaml(request)
            if rest == ["models"] and method == "GET":
                return await self.list_repos(request)
            if len(rest) == 2 and rest[0] == "lfs-upload" and method == "PUT":
                return await self.lfs_put(request, rest[1])
            if rest[:1] == ["models"] and len(rest) >= 2:
                return await self._repo_api(request, method, rest[1:])
            if rest[:1] in (["datasets"], ["spaces"]):
                raise HubError("zoo serve holds model repositories only", status=404, code="RepoNotFound")
        if len(parts) >= 5 and parts[-4:] == ["info", "lfs", "objects", "batch"] and parts[-5].endswith(".git") \
                and method == "POST":
            repo_id = "/".join(parts[:-4])[: -len(".git")]
            return await self.lfs_batch(request, repo_id)
        for k in (2, 1):
            if len(parts) >= k + 3 and parts[k] == "resolve" and method in ("GET", "HEAD"):
                return await self.resolve(request, "/".join(parts[:k]), parts[k + 1], "/".join(parts[k + 2:]))
        raise HubError(f"no route for {method} /{'/'.join(parts)}", status=404, code="NotFound")

    async def _repo_api(self, request: Request, method: str, rest: list[str]) -> Response:
        verbs = KEYWORDS | UNSUPPORTED
        if len(rest) >= 3 and rest[2] in verbs:
            repo_id, verb, args = "/".join(rest[:2]), rest[2], rest[3:]
        elif len(rest) >= 2 and rest[1] in verbs:
            repo_id, verb, args = rest[0], rest[1], rest[2:]
        else:
            repo_id, verb, args = "/".join(rest), "", []
        if verb in UNSUPPORTED:
            raise HubError(f"zoo serve does not serve /{verb} (no pull requests, branches, tags, commit "
                           "listings or copies)", status=501, code="NotImplemented")
        check_repo_id(repo_id)
        rev = args[0] if args else DEFAULT_BRANCH
        if verb in ("", "revision") and method == "GET":
            return await self.model_info(request, repo_id, "/".join(args) if args else DEFAULT_BRANCH)
        if verb == "tree" and method == "GET":
            return await self.tree(request, repo_id, rev, "/".join(args[1:]))
        if verb == "preupload" and method == "POST":
            return await self.preupload(request, repo_id, rev)
        if verb == "commit" and method == "POST":
            return await self.commit(request, repo_id, rev)
        if verb in ("xet-write-token", "xet-read-token"):
            raise HubError("zoo serve does not speak Xet; set HF_HUB_DISABLE_XET=1 in the client's environment",
                           status=501, code="XetNotSupported")
        raise HubError(f"no route for {method} /api/models/{'/'.join(rest)}", status=404, code="NotFound")

    # -- repositories ----------------------------------------------------------------
    def whoami(self, request: Request) -> Response:
        holder = self.holder(request)
        if holder is None:
            raise HubError("Invalid credentials in Authorization header", status=401, code="Unauthorized")
        return JSONResponse({"type": "user", "name": holder.name, "fullname": holder.name,
                             "auth": {"type": "access_token", "accessToken": {"role": holder.scope}}})

    async def create_repo(self, request: Request) -> Response:
        holder = self.need_write(request)
        body = await json_body(request)
        if body.get("type", "model") not in ("model", None):
            raise HubError("zoo serve holds model repositories only")
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str):
            raise HubError("repo create needs a 'name'")
        repo_id = check_repo_id(f"{org}/{name}" if org else name)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        created = await run_in_threadpool(self.repos.create, repo_id, private, holder.name)
        url = f"{base_url(request)}/{repo_id}"
        if not created:
            return error(409, "RepoExists", f"You already created this model repo: {repo_id}", {"url": url})
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    async def list_repos(self, request: Request) -> Response:
        await self.need_read(request)
        repos = await run_in_threadpool(self.repos.list_repos)
        visible = self.holder(request) is not None
        return JSONResponse([{"id": r["repo_id"], "modelId": r["repo_id"], "sha": r["sha"], "private": r["private"]}
                             for r in repos if visible or not r["private"]])

    async def model_info(self, request: Request, repo_id: str, rev: str) -> Response:
        await self.need_read(request, repo_id)
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        entries = await run_in_threadpool(self.repos.entries, repo_id, revision.sha)
        card = await run_in_threadpool(self._card_data, entries)
        when = revision.created_at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return JSONResponse({
            "_id": revision.sha, "id": repo_id, "modelId": repo_id, "sha": revision.sha,
            "private": revision.private, "gated": False, "disabled": False, "lastModified": when,
            "downloads": 0, "likes": 0, "tags": card.get("tags") or [],
            "library_name": card.get("library_name"), "cardData": card or None,
            "siblings": [sibling(e) for e in entries],
        })

    def _card_data(self, entries: list[Entry]) -> dict[str, Any]:
        readme = next((e for e in entries if e.path == "README.md" and e.size < CARD_LIMIT), None)
        if readme is None:
            return {}
        try:
            meta = card.read_front_matter(self.repos.blob(readme).read_text("utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    async def tree(self, request: Request, repo_id: str, rev: str, path: str) -> Response:
        await self.need_read(request, repo_id)
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        entries = await run_in_threadpool(self.repos.entries, repo_id, revision.sha)
        prefix = path.strip("/")
        dirs = folders(entries)
        if prefix and prefix not in dirs:
            raise HubError(f"{prefix} is not a folder of {repo_id} at {revision.sha}", status=404,
                           code="EntryNotFound")
        below = [e for e in entries if not prefix or e.path.startswith(prefix + "/")]
        depth = prefix.count("/") + 1 if prefix else 0

        def shown(p: str) -> bool:
            return recursive or p.count("/") == depth

        out: list[dict[str, Any]] = []
        for d in sorted(dirs):
            if (not prefix or d.startswith(prefix + "/")) and shown(d):
                oid = hashlib.sha1(f"{revision.sha}:{d}".encode()).hexdigest()
                out.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        for e in below:
            if shown(e.path):
                item: dict[str, Any] = {"type": "file", "oid": e.git_oid, "size": e.size, "path": e.path}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size()}
                out.append(item)
        return JSONResponse(out)

    # -- uploads ---------------------------------------------------------------------
    async def preupload(self, request: Request, repo_id: str, rev: str) -> Response:
        self.need_write(request)
        if request.query_params.get("create_pr"):
            raise HubError("zoo serve has no pull requests; push to a branch")
        body = await json_body(request)
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        current = {e.path: e for e in await run_in_threadpool(self.repos.entries, repo_id, revision.sha)}
        files = []
        entries = body.get("files")
        if not isinstance(entries, list):
            raise HubError("preupload needs a list of files")
        for f in entries:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("size", 0), int):
                raise HubError("each preupload file needs a path and an integer size")
            path = check_path(f["path"])
            size = f.get("size") or 0
            lfs = size >= self.settings.lfs_threshold
            have = current.get(path)
            oid = (have.sha256 if have.lfs else have.git_oid) if have is not None and have.lfs == lfs else None
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return JSONResponse({"files": files, "commitOid": revision.sha})

    async def lfs_batch(self, request: Request, repo_id: str) -> Response:
        self.need_write(request)
        check_repo_id(repo_id)
        await run_in_threadpool(self.repos.revision, repo_id, DEFAULT_BRANCH)  # the repository must exist
        body = await json_body(request)
        if body.get("operation") != "upload":
            raise HubError("the LFS batch API of zoo serve takes uploads; download through /resolve")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError("an LFS batch needs a list of objects")
        now = time.time()
        self.uploads = {k: t for k, t in self.uploads.items() if now - t < 2 * UPLOAD_TTL}
        out = []
        for obj in objects:
            oid, size = (str(obj.get("oid", "")), obj.get("size")) if isinstance(obj, dict) else ("", None)
            if len(oid) != 64 or not all(c in "0123456789abcdef" for c in oid) or not isinstance(size, int) \
                    or size < 0:
                out.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "oid must be a sha256 hex digest and size an int"}})
                continue
            if await self._known(repo_id, oid) == size:
                out.append({"oid": oid, "size": size})  # this repository has it: nothing to upload
                continue
            expires = int(now) + UPLOAD_TTL
            sig = self._sign(repo_id, oid, size, expires)
            href = (f"{base_url(request)}/api/lfs-upload/{oid}?repo={quote(repo_id, safe='')}&size={size}"
                    f"&expires={expires}&sig={sig}")
            out.append({"oid": oid, "size": size, "authenticated": True,
                        "actions": {"upload": {"href": href, "expires_in": UPLOAD_TTL}}})
        return JSONResponse({"transfer": "basic", "objects": out, "hash_algo": "sha256"}, media_type=JSON_LFS)

    async def _known(self, repo_id: str, oid: str) -> int | None:
        """The size of an LFS object this repository may commit without uploading it."""
        if (repo_id, oid) in self.uploads:
            return self.registry.store.path(oid).stat().st_size if self.registry.store.has(oid) else None
        return await run_in_threadpool(self.repos.repo_blob_size, repo_id, oid)

    def _sign(self, repo_id: str, oid: str, size: int, expires: int) -> str:
        return hmac.new(self.secret, f"{repo_id}\0{oid}\0{size}\0{expires}".encode(), hashlib.sha256).hexdigest()

    async def lfs_put(self, request: Request, oid: str) -> Response:
        q = request.query_params
        try:
            repo_id, size, expires = q["repo"], int(q["size"]), int(q["expires"])
        except (KeyError, ValueError):
            raise HubError("upload URL is missing its repository, size or expiry; ask the LFS batch API for a "
                           "new one", status=403, code="Forbidden") from None
        if not hmac.compare_digest(self._sign(repo_id, oid, size, expires), q.get("sig", "")) \
                or expires < time.time():
            raise HubError("upload URL is invalid or expired; ask the LFS batch API for a new one",
                           status=403, code="Forbidden")
        store = self.registry.store
        tmp = store.temp_path()
        try:
            digest, got = await receive_to_file(request.stream(), tmp, limit=size)
            if got != size or digest != oid:
                raise HubError(f"uploaded content does not match its oid (got {got} bytes, sha256 {digest[:12]})",
                               status=400, code="BadRequest")
            await run_in_threadpool(self._adopt, tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        self.uploads[repo_id, oid] = time.time()
        return Response(status_code=200)

    def _adopt(self, tmp: Path, digest: str) -> None:
        with self.registry.db.store_lock(exclusive=False):  # not while `zoo rm` removes blobs
            self.registry.store.adopt(tmp, digest)

    async def commit(self, request: Request, repo_id: str, branch: str) -> Response:
        holder = self.need_write(request)
        if request.query_params.get("create_pr"):
            raise HubError("zoo serve has no pull requests; push to a branch")
        await run_in_threadpool(self.repos.revision, repo_id, branch)
        change = Change(summary="")
        try:
            async for line in ndjson(request.stream()):
                await run_in_threadpool(self._commit_line, change, line)
            if not change.summary:
                raise HubError("a commit needs a header line with a summary")
            for path, (oid, size) in list(change.lfs.items()):
                known = await self._known(repo_id, oid)
                if known is None or (size is not None and size != known):
                    raise HubError(f"{path}: its content (sha256 {oid[:12]}) was not uploaded to {repo_id}; "
                                   "upload it through the LFS batch API first")
                change.lfs[path] = (oid, known)
            sha = await run_in_threadpool(self.repos.commit, repo_id, branch, change, holder.name)
            for oid, _ in change.lfs.values():
                self.uploads.pop((repo_id, oid), None)
        finally:
            change.discard()
        return JSONResponse({"commitUrl": f"{base_url(request)}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "commitMessage": change.summary, "pullRequestUrl": None})

    def _commit_line(self, change: Change, line: dict[str, Any]) -> None:
        key, value = line.get("key"), line.get("value")
        if not isinstance(value, dict):
            raise HubError("each commit line needs a 'value' object")
        if key == "header":
            change.summary = str(value.get("summary") or "")
            change.description = str(value.get("description") or "")
            change.parent = value.get("parentCommit")
            if change.parent is not None and not isinstance(change.parent, str):
                raise HubError("parentCommit must be a commit sha")
        elif key == "file":
            path = check_path(str(value.get("path")))
            if value.get("encoding", "base64") != "base64":
                raise HubError(f"{path}: only base64 content is accepted")
            try:
                data = base64.b64decode(value.get("content") or "", validate=True)
            except (binascii.Error, ValueError):
                raise HubError(f"{path}: content is not valid base64") from None
            change.files[path] = self.repos.stage(data)
        elif key == "lfsFile":
            path = check_path(str(value.get("path")))
            oid, size = str(value.get("oid")), value.get("size")  # copies name only the oid
            if size is not None and (not isinstance(size, int) or size < 0):
                raise HubError(f"{path}: size must be a non-negative integer")
            change.lfs[path] = (oid, size)
        elif key == "deletedFile":
            change.deleted_files.append(check_path(str(value.get("path"))))
        elif key == "deletedFolder":
            change.deleted_folders.append(str(value.get("path")))
        else:
            raise HubError(f"unknown commit operation {key!r}")

    async def validate_yaml(self, request: Request) -> Response:
        body = await json_body(request, limit=CARD_LIMIT)  # open to all: small, and parsed off the loop
        try:
            meta = await run_in_threadpool(card.read_front_matter, str(body.get("content") or ""))
            if meta is not None and not isinstance(meta, dict):
                raise ValueError("the front matter must be a mapping")
        except (yaml.YAMLError, ValueError) as e:
            return JSONResponse({"errors": [{"message": f"invalid model card metadata: {e}"}]}, status_code=400,
                                headers={"X-Error-Code": "InvalidMetadata"})
        return JSONResponse({})

    # -- downloads -------------------------------------------------------------------
    async def resolve(self, request: Request, repo_id: str, rev: str, path: str) -> Response:
        check_repo_id(repo_id)
        await self.need_read(request, repo_id)
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        try:
            entry = await run_in_threadpool(self.repos.entry, repo_id, revision.sha, path)
        except HubError as e:
            return error(e.status, e.code, str(e), headers={"X-Repo-Commit": revision.sha})
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": revision.sha, "Cache-Control": "no-cache"}
        return BlobFile(self.repos.blob(entry), headers=headers, media_type=media_type(path))


# -- helpers -----------------------------------------------------------------------------
def error(status: int, code: str, message: str, extra: dict | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    safe = message.encode("ascii", "replace").decode()[:500]
    return JSONResponse({"error": message, **(extra or {})}, status_code=status,
                        headers={"X-Error-Code": code, "X-Error-Message": safe, **(headers or {})})


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def sibling(e: Entry) -> dict[str, Any]:
    d: dict[str, Any] = {"rfilename": e.path, "size": e.size, "blobId": e.git_oid}
    if e.lfs:
        d["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size()}
    return d


def media_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    if path.endswith((".md", ".txt")):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


async def json_body(request: Request, limit: int = 16 * 1024 * 1024) -> dict[str, Any]:
    """A JSON object body, refused past ``limit`` bytes rather than buffered whole."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise HubError(f"request body over {limit >> 20} MiB", status=413, code="PayloadTooLarge")
    raw = bytes(buf)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise HubError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise HubError("the request body must be a JSON object")
    return body


async def ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parse a streamed NDJSON body one line at a time, holding at most one line."""
    buf = bytearray()
    async for chunk in chunks:
        start = len(buf)
        buf += chunk
        while (i := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[:i])
            del buf[: i + 1]
            start = 0
            if line.strip():
                yield parse_line(line)
        if len(buf) > MAX_INLINE_LINE:
            raise HubError(f"a commit line is over {MAX_INLINE_LINE >> 20} MiB; send large files through LFS",
                           status=413, code="PayloadTooLarge")
    if buf.strip():
        yield parse_line(bytes(buf))


def parse_line(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError:
        raise HubError("a commit line is not JSON") from None
    if not isinstance(obj, dict):
        raise HubError("a commit line must be a JSON object")
    return obj


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


# -- running -------------------------------------------------------------------------------
def make_app(registry: Registry, settings: ServeSettings) -> Starlette:
    if not 0 <= settings.lfs_threshold <= MAX_INLINE_LINE * 3 // 4 - 1024:  # base64 grows a file by 4/3
        raise ZooError(f"--lfs-threshold must be between 0 and {(MAX_INLINE_LINE * 3 // 4) >> 20} MiB: files "
                       "above it travel inside the commit")
    hub = HubApp(registry, settings)
    methods = ["GET", "HEAD", "POST", "PUT"]
    return Starlette(routes=[Route("/{path:path}", hub.dispatch, methods=methods)])


def bind(host: str, port: int) -> socket.socket:
    """Listen on ``host:port`` (port 0: a free one), with a clear error when taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ZooError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    sock.listen(128)
    return sock


def _server(app: Starlette, access_log: bool):
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            lifespan="off", timeout_keep_alive=30)
    return uvicorn.Server(config)


def serve(registry: Registry, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          on_ready=None, access_log: bool = True) -> None:
    """Serve until interrupted. ``on_ready(url)`` is called once the socket listens."""
    sock = bind(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = _server(make_app(registry, settings), access_log)
    if on_ready is not None:
        on_ready(url)
    server.run(sockets=[sock])


@contextlib.contextmanager
def running(registry: Registry, settings: ServeSettings, host: str = "127.0.0.1",
            port: int = 0) -> Iterator[str]:
    """Serve from a background thread for the duration of a ``with`` block; yields the URL."""
    sock = bind(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = _server(make_app(registry, settings), access_log=False)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        sock.close()
        raise ZooError(f"zoo serve did not start on {url}")
    try:
        yield url
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()
