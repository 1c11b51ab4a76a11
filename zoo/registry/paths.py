"""Where a registry lives: ``--registry``, else ``$ZOO_REGISTRY``, else ``./registry.db``.

A registry is a SQLite file (a path, or ``sqlite:///PATH``) with its blob store beside
it, or a database on a PostgreSQL server (``postgresql://...``), whose blob store is a
folder named by ``--store`` or ``$ZOO_STORE``. Either may keep its blobs on S3-compatible
object storage instead (``--store s3://BUCKET/PREFIX``); a local folder then holds the
read-through cache and the temporary area. ``locate`` turns all of these into a
``Location``; nothing here imports SQLAlchemy or boto3, so ``zoo list`` stays fast.
"""

from __future__ import annotations

import hashlib
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
S3_LOCAL_ENV_VAR = "ZOO_S3_CACHE"  # the local folder of a store on S3: cache, temp area
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Location:
    """Where one registry lives. ``file`` is the SQLite file, or None for a database on a
    server, reached at ``url`` (which may hold a password: show ``shown``, never ``url``)."""

    file: Path | None
    url: str | None
    store: Path  # the blob store's folder; for blobs on S3, its local cache and temp area
    keys: Path
    remote: str | None = None  # s3://BUCKET/PREFIX where the blobs live on object storage

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
    remote = None
    if isinstance(store, str) and is_url(store):
        remote = s3_url(store)
        store = None
    if isinstance(value, str) and is_url(value):
        scheme = value.split("://", 1)[0].lower()
        if scheme == "sqlite":
            rest = value[len("sqlite://"):]
            if not rest.startswith("/") or rest == "/":
                raise ZooError(f"{value} names no file; write sqlite:///relative.db or sqlite:////absolute.db")
            value = rest[1:].split("?", 1)[0]
        elif scheme in SERVER_SCHEMES:
            url = "postgresql://" + value.split("://", 1)[1]
            if remote is not None:
                root = s3_local(remote, mask_url(url))
                return Location(file=None, url=url, store=root, keys=root / "keys", remote=remote)
            if store is None:
                how = f"pass --store PATH or set ${STORE_ENV_VAR}" if use_env else "name its store folder"
                raise ZooError(f"a registry on a database server ({mask_url(value)}) keeps its blobs in a folder: "
                               f"{how}")
            root = Path(store).absolute()
            if root.exists() and not root.is_dir():
                raise ZooError(f"--store {root} is a file; name a folder for the blob store")
            return Location(file=None, url=url, store=root, keys=root / "keys")
        else:
            raise ZooError(f"{mask_url(value)}: zoo keeps registries in SQLite (a path or sqlite:///PATH) or "
                           "PostgreSQL (postgresql://USER@HOST/DATABASE)")
    file = registry_path(value)
    if remote is not None:
        return Location(file=file, url=None, store=s3_local(remote, None, file), keys=keys_path(file), remote=remote)
    root = Path(store).absolute() if store is not None else store_path(file)
    return Location(file=file, url=None, store=root, keys=keys_path(file))


def s3_url(value: str) -> str:
    """``value`` as ``s3://BUCKET`` or ``s3://BUCKET/PREFIX`` (no trailing slash), or one line why not."""
    scheme, _, rest = value.partition("://")
    if scheme.lower() != "s3":
        raise ZooError(f"--store {mask_url(value)}: zoo keeps blobs in a folder (a path) or on S3-compatible "
                       "object storage (s3://BUCKET/PREFIX)")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ZooError(f"--store {value}: {bucket!r} is not a bucket name (3 to 63 lowercase letters, digits, "
                       "dots and hyphens)")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") or any(ord(c) < 32 for c in p) for p in parts) or "?" in prefix or "#" in prefix:
        raise ZooError(f"--store {value}: the prefix must be plain folder names, e.g. s3://{bucket}/team/zoo")
    return "/".join([f"s3://{bucket}", *parts])


def s3_local(remote: str, server: str | None, file: Path | None = None) -> Path:
    """The local folder of a store on S3: ``$ZOO_S3_CACHE``, else ``registry.store/`` beside
    a SQLite file, else one folder per registry and store under ``$XDG_DATA_HOME/zoo/s3``."""
    chosen = os.environ.get(S3_LOCAL_ENV_VAR)
    if chosen:
        root = Path(chosen).absolute()
    elif file is not None:
        root = store_path(file)
    else:
        data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        tag = hashlib.sha256(f"{server}\0{remote}".encode()).hexdigest()[:16]
        root = (data / "zoo" / "s3" / tag).absolute()
    if root.exists() and not root.is_dir():
        raise ZooError(f"${S3_LOCAL_ENV_VAR} {root} is a file; name a folder for the local cache of {remote}")
    return root


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
