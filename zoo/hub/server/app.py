"""The requests ``zoo serve`` answers: routing, auth, and one handler per Hub endpoint.

Who may do what is ``zoo.hub.accounts``'s: writes need a write token of a user who
owns the repository's namespace (``zoo token create --user NAME``); reads are open
unless the server runs with ``open_reads=False`` (``--private-reads``) or the
repository is private, which only its namespace's users see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from zoo.errors import HubError, RepoNotFound, ZooError
from zoo.hub.git import DEFAULT_BRANCH, is_lfs_oid
from zoo.hub.names import check_new_repo_id, check_path, check_repo_id
from zoo.hub.refs import BRANCH, TAG
from zoo.hub.repos import Change, Entry, HubRepos, folders
from zoo.hub.server import refusals
from zoo.hub.server.history import MAX_PAGE, HistoryRoutes, hub_time, paged
from zoo.hub.server.cards import CARDS, check_card, check_commit
from zoo.hub.server.blobs import BlobChecks, RangeFile, VerifiedBlob, presigned, stamp
from zoo.hub.server.uploads import Uploads
from zoo.hub.server.wire import JSON_LFS, base_url, error, json_body, media_type, ndjson, sibling
from zoo.hub.accounts import Accounts, Holder
from zoo.registry import Registry

log = logging.getLogger("zoo.serve")

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's own cut: larger files go through LFS
CARD_LIMIT = 1024 * 1024  # the body of a validate-yaml request
PATHS_INFO_LIMIT = 4 * 1024 * 1024  # a paths-info form: 1000 paths of up to 1024 characters, URL-encoded
KEYWORDS = {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "tag",
            "xet-write-token", "xet-read-token"}
UNSUPPORTED = {"discussions", "settings", "resolve-cache", "compare", "super-squash", "treesize",
               "notebook", "scan"}
SORTS = {"lastModified": "last_modified", "createdAt": "created_at", "id": "repo_id"}


@dataclass
class ServeSettings:
    """How a server treats its clients."""

    open_reads: bool = True
    lfs_threshold: int = LFS_THRESHOLD


class HubApp(HistoryRoutes):
    """The request handlers, over one registry."""

    def __init__(self, registry: Registry, settings: ServeSettings):
        self.registry = registry
        self.repos = HubRepos(registry)
        self.settings = settings
        self.uploads = Uploads(registry)
        self.accounts = Accounts(registry)
        self.checks = BlobChecks()

    # -- auth ------------------------------------------------------------------------
    async def holder(self, request: Request) -> Holder | None:
        """The user of the request's bearer token (None: no token, or not a live one)."""
        if "zoo.holder" not in request.scope:  # looked up once per request
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            request.scope["zoo.holder"] = await run_in_threadpool(self.accounts.check, token) if token else None
        return request.scope["zoo.holder"]

    async def need_write(self, request: Request, repo_id: str | None = None) -> Holder:
        """The holder of the request's token, refused unless it may write to ``repo_id``
        (or, without one, write at all). Writing is for write tokens, in the holder's
        own namespace and those of its organisations."""
        holder = await self.holder(request)
        if holder is None:
            raise HubError("writing needs a token of this server (`zoo token create --user NAME` on the server)",
                           status=401, code="Unauthorized")
        if not holder.can_write:
            raise HubError(f"token {holder.token_id} of {holder.user} is read-only", status=403, code="Forbidden")
        if repo_id is not None and not holder.owns(repo_id):
            await self.need_read(request, repo_id)  # a private repository stays invisible: 404
            raise HubError(f"{holder.user} may not write to {repo_id}: it is neither {holder.user}'s namespace nor "
                           "one of its organisations'", status=403, code="Forbidden")
        return holder

    async def need_read(self, request: Request, repo_id: str | None = None) -> Holder | None:
        """The holder (or None), refused unless it may read ``repo_id``. A private
        repository answers exactly as a missing one to whoever may not read it, so
        private names cannot be probed."""
        holder = await self.holder(request)
        if holder is None and not self.settings.open_reads:
            # as the Hub answers anonymous reads of what they may not see
            raise RepoNotFound(f"{repo_id or 'this server'}: reading needs a token of this server (`zoo token create "
                               "--user NAME --scope read` on the server)", status=401)
        if repo_id is not None:
            private = await run_in_threadpool(self.repos.is_private, repo_id)
            if private and not (holder is not None and holder.owns(repo_id)):
                raise RepoNotFound(f"repository {repo_id} not found")
        return holder

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
                return await self.whoami(request)
            if rest == ["repos", "create"] and method == "POST":
                return await self.create_repo(request)
            if rest == ["repos", "delete"] and method == "DELETE":
                return await self.delete_repo(request)
            if rest == ["validate-yaml"] and method == "POST":
                return await self.validate_yaml(request)
            if rest == ["models"] and method == "GET":
                return await self.list_repos(request)
            if len(rest) == 2 and rest[0] == "lfs-upload" and method == "PUT":
                return await self.lfs_put(request, rest[1])
            if rest[:1] == ["models"] and len(rest) >= 2:
                return await self._repo_api(request, method, rest[1:])
        if parts[:1] == ["api"] and parts[1:] in (["datasets"], ["spaces"]) and method == "GET":
            return JSONResponse([])  # list_datasets, list_spaces: this server holds none
        if refusals.is_other_kind(parts):
            raise refusals.other_kind(parts)
        if len(parts) >= 5 and parts[-4:] == ["info", "lfs", "objects", "batch"] and parts[-5].endswith(".git") \
                and method == "POST":
            repo_id = "/".join(parts[:-4])[: -len(".git")]
            return await self.lfs_batch(request, repo_id)
        if refusals.is_git(request, parts):
            return refusals.not_git(request, parts)
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
            raise HubError(f"zoo serve does not serve /{verb} (no discussions, pull requests, settings or "
                           "copies)", status=501, code="NotImplemented")
        check_repo_id(repo_id)
        rev = args[0] if args else DEFAULT_BRANCH
        if verb in ("", "revision") and method == "GET":
            return await self.model_info(request, repo_id, "/".join(args) if args else DEFAULT_BRANCH)
        if verb == "tree" and method == "GET":
            return await self.tree(request, repo_id, rev, "/".join(args[1:]))
        if verb == "paths-info" and method == "POST":
            return await self.paths_info(request, repo_id, "/".join(args) if args else DEFAULT_BRANCH)
        if verb == "preupload" and method == "POST":
            return await self.preupload(request, repo_id, rev)
        if verb == "commit" and method == "POST":
            return await self.commit(request, repo_id, rev)
        if verb == "commits" and method == "GET":
            return await self.list_commits(request, repo_id, rev)
        if verb == "refs" and not args and method == "GET":
            return await self.list_refs(request, repo_id)
        if verb in ("branch", "tag") and len(args) == 1:
            if verb == "branch" and method == "POST":
                return await self.create_branch(request, repo_id, args[0])
            if verb == "tag" and method == "POST":
                return await self.create_tag(request, repo_id, args[0])
            if method == "DELETE":
                return await self.delete_ref(request, repo_id, args[0], BRANCH if verb == "branch" else TAG)
        if verb in ("xet-write-token", "xet-read-token"):
            raise HubError("zoo serve does not speak Xet; set HF_HUB_DISABLE_XET=1 in the client's environment",
                           status=501, code="XetNotSupported")
        raise HubError(f"no route for {method} /api/models/{'/'.join(rest)}", status=404, code="NotFound")

    # -- repositories ----------------------------------------------------------------
    async def whoami(self, request: Request) -> Response:
        holder = await self.holder(request)
        if holder is None:
            raise HubError("Invalid credentials in Authorization header", status=401, code="Unauthorized")
        orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"} for o in holder.orgs]
        return JSONResponse({"type": "user", "name": holder.user, "fullname": holder.user, "email": None,
                             "emailVerified": False, "isPro": False, "canPay": False, "orgs": orgs,
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": holder.token_id, "role": holder.scope}}})

    async def create_repo(self, request: Request) -> Response:
        holder = await self.need_write(request)
        body = await json_body(request)
        if body.get("type", "model") not in ("model", None):
            raise HubError("zoo serve holds model repositories only")
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not isinstance(org, (str, type(None))):
            raise HubError("repo create needs a 'name'")
        if org is None and "/" in name:
            org, name = name.split("/", 1)
        repo_id = check_new_repo_id(f"{org or holder.user}/{name}")  # as the Hub: no namespace is the user's own
        if not holder.owns(repo_id):
            raise HubError(f"{holder.user} may not create repositories in {org}: it is neither {holder.user}'s "
                           "namespace nor one of its organisations'", status=403, code="Forbidden")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        created = await run_in_threadpool(self.repos.create, repo_id, private, holder.user)
        url = f"{base_url(request)}/{repo_id}"
        if not created:  # maybe under another case: name the one that exists
            repo_id = await run_in_threadpool(self.repos.same_id, repo_id) or repo_id
            return error(409, "RepoExists", f"You already created this model repo: {repo_id}",
                         {"url": f"{base_url(request)}/{repo_id}"})
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    async def list_repos(self, request: Request) -> Response:
        """``list_models``: ``author``, ``search`` (part of the id, any case), ``sort`` with
        ``direction`` (-1, the default, newest or last first), ``limit``, and pages."""
        holder = await self.need_read(request)
        q = request.query_params
        sort, direction = q.get("sort"), q.get("direction", "-1")
        if sort is not None and sort not in SORTS:
            raise HubError(f"zoo serve sorts models by {', '.join(sorted(SORTS))}, not {sort!r}")
        if direction not in ("-1", "1"):
            raise HubError("direction is -1 (descending) or 1 (ascending)")
        repos = await run_in_threadpool(self.repos.list_repos)
        author, search = q.get("author"), (q.get("search") or "").lower()

        def wanted(r: dict[str, Any]) -> bool:
            owner = (_author(r["repo_id"]) or "").lower()
            return ((not r["private"] or (holder is not None and holder.owns(r["repo_id"]))) and search in r["repo_id"].lower()
                    and (author is None or owner == author.lower()))

        repos = [r for r in repos if wanted(r)]
        if sort is not None:
            repos.sort(key=lambda r: r[SORTS[sort]], reverse=direction == "-1")
        return paged(request, [{"id": r["repo_id"], "modelId": r["repo_id"], "author": _author(r["repo_id"]),
                                "sha": r["sha"], "private": r["private"], "createdAt": hub_time(r["created_at"]),
                                "lastModified": hub_time(r["last_modified"])} for r in repos], default=MAX_PAGE)

    async def model_info(self, request: Request, repo_id: str, rev: str) -> Response:
        await self.need_read(request, repo_id)
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        entries = await run_in_threadpool(self.repos.entries, repo_id, revision.sha)
        card = await run_in_threadpool(self._card_data, entries)
        when = hub_time(revision.created_at)
        created = hub_time(revision.repo_created_at or revision.created_at)
        return JSONResponse({
            "_id": revision.sha, "id": repo_id, "modelId": repo_id, "author": _author(repo_id), "sha": revision.sha,
            "private": revision.private, "gated": False, "disabled": False, "lastModified": when, "createdAt": created,
            "downloads": 0, "likes": 0, "tags": card.get("tags") or [],
            "library_name": card.get("library_name"), "cardData": card or None,
            "siblings": [sibling(e) for e in entries],
        })

    def _card_data(self, entries: list[Entry]) -> dict[str, Any]:
        readme = next((e for e in entries if e.path == "README.md"), None)
        if readme is None:
            return {}
        return CARDS.card_data(readme.sha256, self.repos.blob(readme), f"README.md (sha256 {readme.sha256[:12]})")

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
                out.append(_folder_item(revision.sha, d))
        for e in below:
            if shown(e.path):
                out.append(_file_item(e))
        return JSONResponse(out)

    async def paths_info(self, request: Request, repo_id: str, rev: str) -> Response:
        """``get_paths_info`` (``HfFileSystem``, copies): the files and folders among a
        form's ``paths``; the others are left out, as the Hub does."""
        await self.need_read(request, repo_id)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > PATHS_INFO_LIMIT:
                raise HubError(f"paths-info body over {PATHS_INFO_LIMIT >> 10} KiB", status=413,
                               code="PayloadTooLarge")
        paths = parse_qs(buf.decode("utf-8", "replace")).get("paths", [])
        if len(paths) > 1000:
            raise HubError("paths-info takes at most 1000 paths per request")
        revision = await run_in_threadpool(self.repos.revision, repo_id, rev)
        entries = await run_in_threadpool(self.repos.entries, repo_id, revision.sha)
        files, dirs = {e.path: e for e in entries}, folders(entries)
        out = []
        for p in dict.fromkeys(p.strip("/") for p in paths):
            if p in files:
                out.append(_file_item(files[p]))
            elif p in dirs:
                out.append(_folder_item(revision.sha, p))
        return JSONResponse(out)

    # -- uploads ---------------------------------------------------------------------
    async def preupload(self, request: Request, repo_id: str, rev: str) -> Response:
        await self.need_write(request, repo_id)
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
        check_repo_id(repo_id)
        await self.need_write(request, repo_id)
        await run_in_threadpool(self.repos.revision, repo_id, DEFAULT_BRANCH)  # the repository must exist
        body = await json_body(request)
        if body.get("operation") != "upload":
            raise HubError("the LFS batch API of zoo serve takes uploads; download through /resolve")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError("an LFS batch needs a list of objects")
        now = time.time()
        out = []
        for obj in objects:
            oid, size = (str(obj.get("oid", "")), obj.get("size")) if isinstance(obj, dict) else ("", None)
            if not is_lfs_oid(oid) or not isinstance(size, int) or size < 0:
                out.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "oid must be a sha256 hex digest and size an int"}})
                continue
            if await self._known(repo_id, oid) == size:
                out.append({"oid": oid, "size": size})  # this repository has it: nothing to upload
                continue
            out.append({"oid": oid, "size": size, "authenticated": True,
                        "actions": {"upload": self.uploads.action(base_url(request), repo_id, oid, size, now)}})
        return JSONResponse({"transfer": "basic", "objects": out, "hash_algo": "sha256"}, media_type=JSON_LFS)

    async def _known(self, repo_id: str, oid: str) -> int | None:
        """The size of an LFS object this repository may commit without uploading it."""
        if await run_in_threadpool(self.uploads.holds, repo_id, oid):
            return self.uploads.stored_size(oid)
        return await run_in_threadpool(self.repos.repo_blob_size, repo_id, oid)

    async def lfs_put(self, request: Request, oid: str) -> Response:
        repo_id, size = self.uploads.authorise(oid, request.query_params)
        await self.uploads.receive(request.stream(), repo_id, oid, size)
        return Response(status_code=200)

    async def commit(self, request: Request, repo_id: str, branch: str) -> Response:
        holder = await self.need_write(request, repo_id)
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
            await run_in_threadpool(check_commit, change, self.repos.store)  # a bad card commits nothing
            sha = await run_in_threadpool(self.repos.commit, repo_id, branch, change, holder.user)
            await run_in_threadpool(self.uploads.committed, repo_id, [oid for oid, _ in change.lfs.values()])
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
            path = self._new_path(change, value)
            if value.get("encoding", "base64") != "base64":
                raise HubError(f"{path}: only base64 content is accepted")
            try:
                data = base64.b64decode(value.get("content") or "", validate=True)
            except (binascii.Error, ValueError):
                raise HubError(f"{path}: content is not valid base64") from None
            change.files[path] = self.repos.stage(data)
        elif key == "lfsFile":
            path = self._new_path(change, value)
            oid, size = str(value.get("oid")), value.get("size")  # copies name only the oid
            if size is not None and (not isinstance(size, int) or size < 0):
                raise HubError(f"{path}: size must be a non-negative integer")
            change.lfs[path] = (oid, size)
        elif key == "deletedFile":  # checked against the tree: a name refused today may be deleted
            change.deleted_files.append(str(value.get("path")))
        elif key == "deletedFolder":
            change.deleted_folders.append(str(value.get("path")))
        else:
            raise HubError(f"unknown commit operation {key!r}")

    @staticmethod
    def _new_path(change: Change, value: dict[str, Any]) -> str:
        """The path a commit line adds, checked, and refused when the commit adds it twice
        (before anything of the second is staged)."""
        path = check_path(str(value.get("path")))
        if path in change.files or path in change.lfs:
            raise HubError(f"{path} appears twice in this commit; send each file once", code="InvalidPath")
        return path

    async def validate_yaml(self, request: Request) -> Response:
        body = await json_body(request, limit=CARD_LIMIT)  # open to all: small, and parsed off the loop
        try:
            await run_in_threadpool(check_card, str(body.get("content") or ""))
        except HubError as e:
            return JSONResponse({"errors": [{"message": str(e)}]}, status_code=e.status,
                                headers={"X-Error-Code": e.code})
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
        if request.method == "HEAD":  # metadata, from the registry: a damaged blob is refused by its GET
            return Response(headers={**headers, "Content-Length": str(entry.size), "Accept-Ranges": "bytes",
                                     "Content-Type": media_type(path)})
        moved = await run_in_threadpool(presigned, self.registry.store, entry.sha256, entry.size, path, headers)
        if moved is not None:  # a large blob on object storage: fetched from there, as the Hub's CDN
            return moved
        blob, what = await run_in_threadpool(self.repos.blob, entry), f"{repo_id}@{revision.sha[:12]}/{path}"
        at = stamp(blob)
        whole = at is not None and at[0] == entry.size and self.checks.known(entry.sha256, at) is not False
        if whole and "range" in request.headers:  # a range is not hashed on the way: the whole blob is, first
            whole = await run_in_threadpool(self.checks.check, entry.sha256, blob)
        if not whole:
            log.error("%s: the stored blob (sha256 %s) is missing or does not match its hash; refused. Run "
                      "`zoo verify` on the server", what, entry.sha256)
            raise HubError(f"{path}: the server's copy is damaged, so it is not served; the server's operator "
                           "should run `zoo verify`", status=500, code="CorruptBlob")
        if "range" in request.headers:
            return RangeFile(blob, headers=headers, media_type=media_type(path))
        return VerifiedBlob(blob, entry.sha256, entry.size, self.checks, what, headers, media_type(path))


def _author(repo_id: str) -> str | None:
    """A repository's author, as the Hub names it: its namespace."""
    return repo_id.split("/")[0] if "/" in repo_id else None


def _file_item(e: Entry) -> dict[str, Any]:
    """A file as tree listings and paths-info show it."""
    item: dict[str, Any] = {"type": "file", "oid": e.git_oid, "size": e.size, "path": e.path}
    if e.lfs:
        item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size()}
    return item


def _folder_item(sha: str, path: str) -> dict[str, Any]:
    """A folder: git would name it by its tree's hash; zoo keeps no trees, so it names it
    by the commit and path, which is as stable."""
    return {"type": "directory", "oid": hashlib.sha1(f"{sha}:{path}".encode()).hexdigest(), "size": 0, "path": path}
