"""Where a registry lives: ``--registry``, else ``$ZOO_REGISTRY``, else ``./registry.db``.

A registry is a SQLite file (a path, or ``sqlite:///PATH``) with its blob store beside
it, or a database on a PostgreSQL server (``postgresql://...``), whose blob store is a
folder named by ``--store`` or ``$ZOO_STORE``. ``locate`` turns either into a
``Location``; nothing here imports SQLAlchemy, so ``zoo list`` stays fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from zoo.errors import NotFound, ZooError

DEFAULT_FILENAME = "registry.db"
ENV_VAR = "ZOO_REGISTRY"
STORE_ENV_VAR = "ZOO_STORE"
SERVER_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Location:
    """Where one registry lives. ``file`` is the SQLite file, or None for a database on a
    server, reached at ``url`` (which may hold a password: show ``shown``, never ``url``)."""

    file: Path | None
    url: str | None
    store: Path
    keys: Path

    @property
    def on_server(self) -> bool:
        return self.file is None

    @property
    def shown(self) -> str:
        """The registry as messages name it: the file, or the URL with its password masked."""
        return str(self.file) if self.file is not None else mask_url(self.url or "")

    def __str__(self) -> str:
        return self.shown


def is_url(value: str | os.PathLike[str]) -> bool:
    return isinstance(value, str) and bool(_URL.match(value))


def mask_url(url: str) -> str:
    """``url`` with any password (in the user part or a ``password=`` parameter) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a database URL that cannot be parsed>"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_secret(text: str, url: str | None) -> str:
    """``text`` with the password of ``url`` (if any) masked wherever it appears."""
    if not url:
        return text
    try:
        parts = urlsplit(url)
        secrets = [parts.password] + [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    except ValueError:
        return text
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def server_error(loc: Location, e: BaseException | str) -> ZooError:
    """One line for a database server that cannot be reached or used: the server's first
    line of reason, the password masked, and what to check."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    reason = mask_secret(lines[0] if lines else type(e).__name__, loc.url)
    low = reason.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check the user and password in the URL"
    elif "does not exist" in low and "database" in low:
        hint = "create it first (createdb NAME), or fix the URL"
    elif any(w in low for w in ("connection refused", "could not connect", "timeout", "timed out", "no such file",
                                "name or service not known", "could not translate", "connection failed")):
        hint = "is the server running, and are the host and port right?"
    else:
        hint = "check the URL and the server"
    return ZooError(f"cannot open registry {loc.shown}: {reason}; {hint}")


def locate(registry: str | os.PathLike[str] | None = None, store: str | os.PathLike[str] | None = None, *,
           use_env: bool = True) -> Location:
    """The registry for ``--registry`` (else ``$ZOO_REGISTRY``, else ``./registry.db``) and
    ``--store`` (else ``$ZOO_STORE``; neither variable with ``use_env=False``). A SQLite
    registry keeps its store beside the file unless a store is named; a registry on a
    server needs one."""
    value = registry if registry is not None else (
        (os.environ.get(ENV_VAR) if use_env else None) or DEFAULT_FILENAME)
    if store is None and use_env:
        store = os.environ.get(STORE_ENV_VAR) or None
    if isinstance(value, str) and is_url(value):
        scheme = value.split("://", 1)[0].lower()
        if scheme == "sqlite":
            rest = value[len("sqlite://"):]
            if not rest.startswith("/") or rest == "/":
                raise ZooError(f"{value} names no file; write sqlite:///relative.db or sqlite:////absolute.db")
            value = rest[1:].split("?", 1)[0]
        elif scheme in SERVER_SCHEMES:
            if store is None:
                how = f"pass --store PATH or set ${STORE_ENV_VAR}" if use_env else "name its store folder"
                raise ZooError(f"a registry on a database server ({mask_url(value)}) keeps its blobs in a folder: "
                               f"{how}")
            root = Path(store).absolute()
            if root.exists() and not root.is_dir():
                raise ZooError(f"--store {root} is a file; name a folder for the blob store")
            return Location(file=None, url="postgresql://" + value.split("://", 1)[1], store=root,
                            keys=root / "keys")
        else:
            raise ZooError(f"{mask_url(value)}: zoo keeps registries in SQLite (a path or sqlite:///PATH) or "
                           "PostgreSQL (postgresql://USER@HOST/DATABASE)")
    file = registry_path(value)
    root = Path(store).absolute() if store is not None else store_path(file)
    return Location(file=file, url=None, store=root, keys=keys_path(file))


def registry_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The absolute registry path for an explicit path or the defaults."""
    p = Path(path if path is not None else (os.environ.get(ENV_VAR) or DEFAULT_FILENAME)).absolute()
    if p.is_dir():
        raise ZooError(f"{p} is a folder; the registry is a file in it, e.g. --registry {p / DEFAULT_FILENAME}")
    return p


def missing_folder(folder: Path) -> str:
    """Why a new file or folder cannot go into ``folder``: it is missing, or not a folder."""
    return f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist"


def existing_registry(path: str | os.PathLike[str] | None = None) -> Path:
    """Like ``registry_path``, but the registry must exist."""
    p = registry_path(path)
    if not p.exists():
        raise NotFound(f"no registry at {p}; create one with `zoo init`, or point --registry / ${ENV_VAR} "
                       "at an existing one")
    return p


def store_path(registry: Path) -> Path:
    """The blob store beside a registry: ``registry.db`` -> ``registry.store/``."""
    return registry.with_suffix(".store")


def keys_path(registry: Path) -> Path:
    """Key files beside a registry: ``registry.db`` -> ``registry.keys/``."""
    return registry.with_suffix(".keys")


def on_read_only_storage(path: Path) -> bool:
    """True when the registry's folder cannot be written (a read-only mount): SQLite then
    opens it as immutable, since nobody can change it, and reads work."""
    return path.exists() and not os.access(path.parent, os.W_OK)


def not_a_registry(path: Path, e: Exception) -> ZooError:
    """The error for a registry file that SQLite cannot read as a database."""
    return ZooError(f"{path} is not a zoo registry ({e}); point --registry at a registry.db, or move this file "
                    "away and run `zoo init`")
