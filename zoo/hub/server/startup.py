"""Starting ``zoo serve``: the Starlette app over a registry, the socket, uvicorn, and
with ``workers`` > 1 a pre-forked set of uvicorn processes over that one socket.

Workers share nothing in memory that a request depends on: the registry's database holds
the commits, refs, accounts and received uploads, and the upload-signing key is made
before the fork. A commit's ``parentCommit`` check and its branch update are one write
transaction, which on PostgreSQL holds the registry's advisory write lock from its first
statement, so two workers can never both move a branch from the same parent. Many
workers need a registry on PostgreSQL: a SQLite file serialises every write anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
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


MAX_WORKERS = 64


def check_workers(workers: int, on_server: bool) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ZooError(f"--workers {workers}: choose from 1 to {MAX_WORKERS}")
    if workers > 1 and not on_server:
        raise ZooError(f"--workers {workers} needs a registry on PostgreSQL (--registry postgresql://...): "
                       "a SQLite registry serialises every write, so it is served by one worker")


def serve(registry: "Registry | Callable[[], Registry]", settings: ServeSettings, host: str = "127.0.0.1",
          port: int = 8000, on_ready: Callable[[str], None] | None = None, access_log: bool = True,
          workers: int = 1) -> None:
    """Serve until interrupted. ``on_ready(url)`` is called once the socket listens.
    ``registry`` may be a function that opens it: it is called only once the address is
    bound, so a bad --host or --port leaves no new registry behind. ``workers`` > 1 (a
    registry on PostgreSQL) forks that many uvicorn processes over the one socket."""
    check_settings(settings)
    check_workers(workers, on_server=True)
    sock = bind(host, port)
    try:
        registry = registry() if callable(registry) else registry
        check_workers(workers, registry.db.on_server)
    except BaseException:
        sock.close()
        raise
    url = f"http://{host}:{sock.getsockname()[1]}"
    app = make_app(registry, settings)
    if on_ready is not None:
        on_ready(url)
    if workers == 1:
        _server(app, access_log).run(sockets=[sock])
        return
    try:
        Workers(app, registry, sock, access_log).run(workers)
    finally:
        sock.close()


class Workers:
    """A pre-forked set of uvicorn processes accepting on one listening socket.

    The parent only watches: a worker that dies is replaced (unless it died at once,
    which would recur: then all stop, with one line). SIGINT or SIGTERM asks every worker
    to finish what it is serving and stop (uvicorn's graceful shutdown); a second one
    forces them. Once all have exited the parent takes the first signal's default action,
    as one uvicorn process does, so Ctrl-C still ends in the CLI's one line.
    """

    QUICK_DEATH_S = 5.0  # a worker that dies this soon after its start would die again

    def __init__(self, app: Starlette, registry: Registry, sock: socket.socket, access_log: bool):
        self.app, self.registry, self.sock, self.access_log = app, registry, sock, access_log
        self.children: dict[int, float] = {}  # pid -> when it started
        self.signals: list[int] = []

    def run(self, n: int) -> None:
        # No connection of the parent's pool may be shared by the children: each opens its own.
        self.registry.db.engine.dispose()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        failure: str | None = None
        try:
            for _ in range(n):
                self._spawn()
            while self.children:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                started = self.children.pop(pid, None)
                if started is None or self.signals:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if time.monotonic() - started < self.QUICK_DEATH_S:
                    failure = f"a worker of zoo serve exited at start (status {code}); see its output above"
                    self._tell(signal.SIGTERM)
                    self.signals.append(signal.SIGTERM)
                else:
                    self._spawn()  # a crash of one worker does not take the server down
        finally:
            self._tell(signal.SIGKILL)  # only if the parent itself failed: none is left otherwise
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failure is not None:
            raise ZooError(failure)
        if self.signals:
            signal.raise_signal(self.signals[0])

    def _spawn(self) -> None:
        stops = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # none lands between the fork and the handlers
        pid = os.fork()
        if pid == 0:  # the worker: serve until told to stop, then leave without running the parent's code
            code = 0
            try:
                for sig in stops:
                    signal.signal(sig, signal.SIG_DFL)  # until uvicorn installs its own
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                _server(self.app, self.access_log).run(sockets=[self.sock])
            except BaseException:  # pragma: no cover - reported by uvicorn's log
                code = 1
            finally:
                os._exit(code)
        self.children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)

    def _on_signal(self, sig: int, _frame: object) -> None:
        # The first asks for a graceful stop; any further one forces (uvicorn: a second SIGINT).
        self._tell(signal.SIGTERM if not self.signals else signal.SIGINT)
        self.signals.append(sig)

    def _tell(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


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
