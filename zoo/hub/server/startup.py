"""Starting ``zoo serve``: the Starlette app over a registry, the socket, uvicorn."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from zoo.errors import ZooError
from zoo.hub.accounts import Accounts, legacy_token_file
from zoo.hub.server.app import HubApp, ServeSettings
from zoo.hub.server.web import WebApp
from zoo.hub.server.wire import MAX_INLINE_LINE, RefuseControlInURL
from zoo.registry import Registry


def open_accounts(registry: Registry, path: Path) -> list[str]:
    """Ready the server's accounts; returns the lines to tell the operator.

    Tokens of an older zoo's token file (``registry.tokens``) are adopted, each name
    becoming a user, and the file is renamed so that it is read once. A server with no
    accounts gets its first user, named after the login, with a write token shown once.
    """
    said = []
    accounts = Accounts(registry)
    legacy = legacy_token_file(path)
    if legacy.is_file():
        n = accounts.import_token_file(legacy)
        done = legacy.with_name(legacy.name + ".imported")
        os.replace(legacy, done)
        said.append(f"adopted {n} token(s) of {legacy} (each name is now a user); the file is kept as {done.name}")
    first = accounts.first_run()
    if first is not None:
        said.append(f"first run: added user {first['user']!r} with write token {first['token']} (shown once; "
                    f"more with `zoo token create --user NAME`, organisations with `zoo org add`)")
    return said


def check_settings(settings: ServeSettings) -> None:
    if not 0 <= settings.lfs_threshold <= MAX_INLINE_LINE * 3 // 4 - 1024:  # base64 grows a file by 4/3
        raise ZooError(f"--lfs-threshold must be between 0 and {(MAX_INLINE_LINE * 3 // 4) >> 20} MiB: files "
                       "above it travel inside the commit")


def make_app(registry: Registry, settings: ServeSettings) -> Starlette:
    check_settings(settings)
    hub = HubApp(registry, settings)
    web = WebApp(registry, open_reads=settings.open_reads)  # the pages, under /ui; the rest is the Hub's
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
    return Starlette(routes=[*web.routes(), Route("/{path:path}", hub.dispatch, methods=methods)],
                     middleware=[Middleware(RefuseControlInURL)])


def bind(host: str, port: int) -> socket.socket:
    """Listen on ``host:port`` (port 0: a free one), with a clear error when taken."""
    if not 0 <= port <= 65535:
        raise ZooError(f"--port {port} is not a port; choose one from 0 (any free one) to 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror:
        sock.close()
        raise ZooError(f"--host {host!r} is not an address of this machine; use 127.0.0.1 (the default) "
                       "or 0.0.0.0 for every interface") from None
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ZooError(f"cannot listen on {host}:{port}: the port is in use; choose another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ZooError(f"cannot listen on {host}:{port}: {host} is not an address of this machine; "
                           "use 127.0.0.1 (the default) or 0.0.0.0") from None
        raise ZooError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def _server(app: Starlette, access_log: bool):
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            lifespan="off", timeout_keep_alive=30)
    return uvicorn.Server(config)


def serve(registry: "Registry | Callable[[], Registry]", settings: ServeSettings, host: str = "127.0.0.1",
          port: int = 8000, on_ready: Callable[[str], None] | None = None, access_log: bool = True) -> None:
    """Serve until interrupted. ``on_ready(url)`` is called once the socket listens.
    ``registry`` may be a function that opens it: it is called only once the address is
    bound, so a bad --host or --port leaves no new registry behind."""
    check_settings(settings)
    sock = bind(host, port)
    try:
        registry = registry() if callable(registry) else registry
    except BaseException:
        sock.close()
        raise
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
