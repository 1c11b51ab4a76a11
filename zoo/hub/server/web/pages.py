"""The web pages' routes: the zoo, a model, compare, and the login that turns a token
into a session. Everything lives under ``/ui``, which no Hub client route can reach:
the routes match exact shapes (``/ui/models/NAME`` is three parts, a Hub download is at
least four) and anything else under ``/ui`` falls through to the Hub's routing."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from zoo.errors import NotFound, ZooError
from zoo.hub.accounts import Accounts, Holder
from zoo.hub.server.web.access import SESSION_COOKIE, SESSION_SECONDS, Sessions, visibility
from zoo.hub.server.web.reader import Reader
from zoo.hub.server.web.data import Filters, compare_page, model_page, zoo_page
from zoo.hub.server.web.svg import model_url
from zoo.registry import Registry

PREFIX = "/ui"
FORM_LIMIT = 4096  # the login form: one token
STATIC = {"zoo.css": "text/css; charset=utf-8"}
# No script, no outside resource, no framing: a card can neither run code nor call home.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # a page depends on who is looking
}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("zoo.hub.server.web", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["bytes"] = human_bytes
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v
    env.globals["model_url"] = model_url
    return env


def human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class WebApp:
    """The pages of one server: its registry, accounts and read rule (``open_reads``)."""

    def __init__(self, registry: Registry, open_reads: bool = True):
        self.registry = registry
        self.open_reads = open_reads
        self.accounts = Accounts(registry)
        self.sessions = Sessions(self.accounts)
        self.reader = Reader(registry)
        self.env = _env()

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.zoo, methods=["GET", "HEAD"]),
            Route(PREFIX + "/", self.zoo, methods=["GET", "HEAD"]),
            Route(PREFIX + "/models/{ref}", self.model, methods=["GET", "HEAD"]),
            Route(PREFIX + "/compare", self.compare, methods=["GET", "HEAD"]),
            Route(PREFIX + "/login", self.login, methods=["GET", "HEAD", "POST"]),
            Route(PREFIX + "/logout", self.logout, methods=["POST"]),
            Route(PREFIX + "/static/{name}", self.static, methods=["GET", "HEAD"]),
        ]

    # -- who is looking ----------------------------------------------------------------
    async def viewer(self, request: Request) -> Holder | None:
        """A bearer token (as the API takes it), else the session cookie's login."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return await run_in_threadpool(self.accounts.check, auth[7:].strip())
        return await run_in_threadpool(self.sessions.holder, request.cookies.get(SESSION_COOKIE))

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(**context)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    async def _show(self, request: Request, template: str, build, *args: Any) -> Response:
        """Render ``template`` over ``build(registry, visibility, *args)`` for this viewer."""
        started = time.perf_counter()
        holder = await self.viewer(request)
        if holder is None and not self.open_reads:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303,
                                    headers=HEADERS)
        try:
            data = await run_in_threadpool(self._build, holder, build, *args)
        except NotFound as e:
            return self.page("message.html", 404, holder=holder, title="Not found", message=str(e))
        except ZooError as e:
            return self.page("message.html", 400, holder=holder, title="Cannot show this", message=str(e))
        resp = self.page(template, holder=holder, data=data)
        resp.headers["Server-Timing"] = f"page;dur={(time.perf_counter() - started) * 1000:.1f}"
        return resp

    def _build(self, holder: Holder | None, build, *args: Any) -> Any:
        self.reader.begin()
        return build(self.reader, visibility(self.reader, holder), *args)

    # -- pages -------------------------------------------------------------------------
    async def zoo(self, request: Request) -> Response:
        p = request.query_params
        f = Filters(*(p.get(k, "")[:200] for k in ("kind", "base", "task", "tag", "q")))
        return await self._show(request, "zoo.html", zoo_page, f)

    async def model(self, request: Request) -> Response:
        return await self._show(request, "model.html", model_page, request.path_params["ref"])

    async def compare(self, request: Request) -> Response:
        return await self._show(request, "compare.html", compare_page, request.query_params.getlist("m")[:100])

    async def login(self, request: Request) -> Response:
        nxt = _safe_next(request.query_params.get("next"))
        if request.method != "POST":
            holder = await self.viewer(request)
            return self.page("login.html", holder=holder, next=nxt, failed=False)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_LIMIT:
                return self.page("message.html", 413, holder=None, title="Too large",
                                 message="The login form takes one token.")
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        nxt = _safe_next((form.get("next") or [nxt])[0])
        got = await run_in_threadpool(self.sessions.login, token) if token else None
        if got is None:  # the token is never echoed back
            return self.page("login.html", 401, holder=None, next=nxt, failed=True)
        sid, _ = got
        resp = RedirectResponse(nxt, status_code=303, headers=HEADERS)
        resp.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_SECONDS, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
        return resp

    async def logout(self, request: Request) -> Response:
        self.sessions.logout(request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse(PREFIX, status_code=303, headers=HEADERS)
        resp.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return resp

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return self.page("message.html", 404, holder=None, title="Not found", message=f"no file {name!r} here")
        data = resources.files("zoo.hub.server.web").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC[name], headers={**HEADERS, "Cache-Control": "max-age=3600"})


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a page of this site only (no open redirect)."""
    if not target or not target.startswith(PREFIX) or target.startswith("//") or "\\" in target:
        return PREFIX
    return quote(target, safe="/?&=@%+-_.~")
