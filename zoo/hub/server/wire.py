"""What ``zoo serve`` reads from and writes onto the wire, as the Hub does.

Error responses carry the Hub's ``X-Error-Code`` and ``X-Error-Message`` headers, which
``huggingface_hub`` turns into its own exceptions. Request bodies are read as
streams and refused past a limit, never buffered whole.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse

from zoo.errors import HubError
from zoo.hub.repos import Entry

MAX_INLINE_LINE = 64 * 1024 * 1024  # one NDJSON line (an inline file, base64)
JSON_LFS = "application/vnd.git-lfs+json"


def error(status: int, code: str, message: str, extra: dict | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    safe = message.encode("ascii", "replace").decode()[:500]
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
