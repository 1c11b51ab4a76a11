"""The routes over a repository's history: commit listings, branches and tags, and
removing a whole repository, each answered as the Hub answers ``huggingface_hub``.

Listings page as the Hub's do: ``?p=`` (from 0) and ``limit``, with the next page in a
``Link: <...>; rel="next"`` header, which the client's ``paginate`` follows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from zoo.errors import HubError, RepoNotFound
from zoo.hub.git import DEFAULT_BRANCH
from zoo.hub.names import check_repo_id
from zoo.hub.refs import BRANCH, TAG
from zoo.hub.repos import HubRepos
from zoo.hub.server.wire import json_body

PAGE = 50  # items per page when the client sets no limit
MAX_PAGE = 1000


def hub_time(when: datetime) -> str:
    """A time as the Hub writes it (``2024-05-01T12:00:00.000Z``); SQLite hands back naive UTC."""
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def paged(request: Request, items: Sequence[Any], default: int = PAGE) -> Response:
    """One page of ``items`` (``?p=``, ``?limit=``), with a ``Link`` to the next one."""
    try:
        page = int(request.query_params.get("p", 0))
        limit = int(request.query_params.get("limit", default))
    except ValueError:
        raise HubError("p and limit must be integers") from None
    if page < 0 or not 1 <= limit <= MAX_PAGE:
        raise HubError(f"p must be 0 or more and limit between 1 and {MAX_PAGE}")
    start = page * limit
    headers = {}
    if start + limit < len(items):
        nxt = request.url.include_query_params(p=page + 1, limit=limit)
        headers["Link"] = f'<{nxt}>; rel="next"'
    return JSONResponse(list(items[start:start + limit]), headers=headers)


class HistoryRoutes:
    """Handlers that ``HubApp`` mixes in; they use its repositories and its permission checks."""

    repos: HubRepos

    async def need_write(self, request: Request, repo_id: str | None = None) -> Any:
        raise NotImplementedError

    async def need_read(self, request: Request, repo_id: str | None = None) -> None:
        raise NotImplementedError

    async def list_commits(self, request: Request, repo_id: str, rev: str) -> Response:
        await self.need_read(request, repo_id)
        commits = await run_in_threadpool(self.repos.history, repo_id, rev)
        return paged(request, [{"id": c.sha, "title": c.summary, "message": c.description,
                                "authors": [{"user": c.author}] if c.author else [], "date": hub_time(c.created_at)}
                               for c in commits])

    async def list_refs(self, request: Request, repo_id: str) -> Response:
        await self.need_read(request, repo_id)
        refs = await run_in_threadpool(self.repos.refs, repo_id)

        def shown(kind: str) -> list[dict[str, str]]:
            return [{"name": r.name, "ref": r.git_ref, "targetCommit": r.sha} for r in refs if r.kind == kind]

        out: dict[str, Any] = {"branches": shown(BRANCH), "converts": [], "tags": shown(TAG)}
        if request.query_params.get("include_prs"):
            out["pullRequests"] = []  # zoo serve has no pull requests
        return JSONResponse(out)

    async def create_branch(self, request: Request, repo_id: str, branch: str) -> Response:
        await self.need_write(request, repo_id)
        body = await json_body(request)
        start = body.get("startingPoint") or DEFAULT_BRANCH
        if not isinstance(start, str):
            raise HubError("startingPoint must be a revision")
        await run_in_threadpool(self.repos.create_ref, repo_id, branch, BRANCH, start)
        return JSONResponse({})

    async def create_tag(self, request: Request, repo_id: str, rev: str) -> Response:
        await self.need_write(request, repo_id)
        body = await json_body(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise HubError("a tag needs a 'tag' name")
        # The Hub keeps a tag's message; zoo serve's tags are lightweight, so it is not kept.
        await run_in_threadpool(self.repos.create_ref, repo_id, tag, TAG, rev)
        return JSONResponse({})

    async def delete_ref(self, request: Request, repo_id: str, name: str, kind: str) -> Response:
        await self.need_write(request, repo_id)
        await run_in_threadpool(self.repos.delete_ref, repo_id, name, kind)
        return JSONResponse({})

    async def delete_repo(self, request: Request) -> Response:
        body = await json_body(request)
        if body.get("type") not in (None, "model"):
            raise RepoNotFound("zoo serve holds model repositories only: no datasets or Spaces")
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not isinstance(org, (str, type(None))):
            raise HubError("repo delete needs a 'name' (and an 'organization' for a namespace)")
        repo_id = check_repo_id(f"{org}/{name}" if org else name)
        await self.need_write(request, repo_id)
        await run_in_threadpool(self.repos.delete, repo_id)
        return JSONResponse({})
