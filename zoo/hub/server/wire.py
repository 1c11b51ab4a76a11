"""What ``zoo serve`` reads from and writes onto the wire, as the Hub does.

Error responses carry the Hub's ``X-Error-Code`` and ``X-Error-Message`` headers, which
``huggingface_hub`` turns into its own exceptions. Request bodies are read as
streams and refused past a limit, never buffered whole; JSON is refused past a nesting
depth, and a URL path with a control character before it is routed.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from zoo.errors import HubError
from zoo.hub.repos import Entry

MAX_INLINE_LINE = 64 * 1024 * 1024  # one NDJSON line (an inline file, base64)
JSON_LFS = "application/vnd.git-lfs+json"
MAX_JSON_DEPTH = 64  # nesting of any JSON body or commit line; the Hub's own are 3 deep at most
HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # a header with one is never sent: no reply at all
URL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1


def error(status: int, code: str, message: str, extra: dict | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    safe = HEADER_UNSAFE.sub("?", message.encode("ascii", "replace").decode()[:500])
    return JSONResponse({"error": message, **(extra or {})}, status_code=status,
                        headers={"X-Error-Code": code, "X-Error-Message": safe, **(headers or {})})


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def sibling(e: Entry) -> dict[str, Any]:
    """A file as model info lists it."""
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
    body = _loads(bytes(buf) or b"{}", "the request body")
    if not isinstance(body, dict):
        raise HubError("the request body must be a JSON object")
    return body


def _loads(raw: bytes, what: str) -> Any:
    """JSON, refused (400) when malformed or nested deeper than ``MAX_JSON_DEPTH``."""
    try:
        obj = json.loads(raw)
    except RecursionError:  # json's C decoder stops at the interpreter's recursion limit
        deep = True
    except ValueError:
        raise HubError(f"{what} is not JSON") from None
    else:
        deep = not _shallow(obj, MAX_JSON_DEPTH)
    if deep:
        raise HubError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _shallow(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests at most ``limit`` levels of arrays and objects (walked without recursion)."""
    todo = [(obj, 1)]
    while todo:
        o, depth = todo.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


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
                yield parse_line(_bounded(line))
        _bounded(buf)
    if buf.strip():
        yield parse_line(bytes(buf))


def _bounded(line: bytes | bytearray) -> bytes | bytearray:
    if len(line) > MAX_INLINE_LINE:
        raise HubError(f"a commit line is over {MAX_INLINE_LINE >> 20} MiB; send large files through LFS",
                       status=413, code="PayloadTooLarge")
    return line


def parse_line(line: bytes) -> dict[str, Any]:
    obj = _loads(line, "a commit line")
    if not isinstance(obj, dict):
        raise HubError("a commit line must be a JSON object")
    return obj


class RefuseControlInURL:
    """ASGI middleware: a URL path holding a control character (C0, DEL or C1), sent raw or
    percent-encoded, gets a 400 before routing. (Routing would miss it, and an error
    message quoting it would put it in a header, which is never sent.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = (scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")).split(b"?", 1)[0]
            bad = re.search(rb"[\x00-\x1f\x7f]", raw) or URL_CONTROL.search(
                unquote_to_bytes(raw).decode("utf-8", "replace"))
            if bad is not None:
                c = bad.group()
                code = c[0] if isinstance(c, bytes) else ord(c)
                await error(400, "InvalidPath", f"the URL path holds the control character U+{code:04X}; "
                                                "no repository id or file path may contain one")(scope, receive, send)
                return
        await self.app(scope, receive, send)
