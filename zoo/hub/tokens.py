"""Bearer tokens for ``zoo serve``.

A token is shown once, when it is created; the token file keeps only its sha256,
with a name and a scope (``read`` or ``write``), one per line. The server compares
hashes in constant time, so neither the file nor the server's memory holds a token.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import AlreadyExists, NotFound, ZooError
from zoo.registry.names import validate_name

PREFIX = "zoo_"
SCOPES = ("read", "write")


def default_token_file(registry: Path) -> Path:
    """Tokens beside a registry: ``registry.db`` -> ``registry.tokens``."""
    return Path(registry).with_suffix(".tokens")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Holder:
    name: str
    scope: str

    @property
    def can_write(self) -> bool:
        return self.scope == "write"


def create_token(file: Path, name: str, scope: str = "write") -> str:
    """Add a token to ``file`` (made with mode 0600 if missing); returns the token."""
    validate_name(name, "token")
    if scope not in SCOPES:
        raise ZooError(f"unknown scope {scope!r}; choose read or write")
    file = Path(file)
    if not file.parent.is_dir():
        raise NotFound(f"cannot write tokens to {file}: {file.parent} does not exist; create it or pass --token-file")
    lock = os.open(file.with_name(f".{file.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two creates at once must not drop a line
        lines = _lines(file) if file.exists() else []
        _parse(lines, file)  # a damaged file is refused, never appended to
        if any(line.split("\t")[0] == name for line in lines if line.strip()):
            raise AlreadyExists(f"a token named {name!r} is already in {file}; choose another --name")
        token = PREFIX + secrets.token_urlsafe(32)
        lines.append(f"{name}\t{scope}\t{_digest(token)}")
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, file)
    finally:
        os.close(lock)
    return token


class TokenSet:
    """The tokens a server accepts. Loaded from a file, it re-reads the file when it
    changes, so a token made with ``zoo token create`` works without a restart."""

    def __init__(self, entries: dict[str, Holder] | None = None, file: Path | None = None):
        self._entries = entries or {}
        self._file = file
        self._stamp = _stamp(file) if file is not None else None

    @classmethod
    def load(cls, file: Path, missing_ok: bool = False) -> "TokenSet":
        """Tokens from ``file``; with ``missing_ok`` a missing file is an empty set, filled
        once ``zoo token create`` writes it."""
        file = Path(file)
        if not file.is_file():
            if missing_ok:
                return cls({}, file)
            raise NotFound(f"no token file at {file}; create a token with `zoo token create --name NAME`")
        return cls(_read(file), file)

    def _refresh(self) -> None:
        if self._file is None:
            return
        stamp = _stamp(self._file)
        if stamp != self._stamp:
            try:
                self._entries = _read(self._file) if stamp is not None else {}
            except ZooError:
                return  # a half-edited file: keep the tokens we had
            self._stamp = stamp

    def __len__(self) -> int:
        self._refresh()
        return len(self._entries)

    def check(self, token: str | None) -> Holder | None:
        """The holder of ``token``, or None when it is unknown."""
        if not token:
            return None
        self._refresh()
        digest = _digest(token)
        found = None
        for known, holder in self._entries.items():  # every entry, so timing says nothing
            if hmac.compare_digest(known, digest):
                found = holder
        return found


def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _lines(file: Path) -> list[str]:
    """The token file's lines; one line of error for a file that is not one."""
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ZooError(f"{file} is not a token file (not UTF-8 text at byte {e.start}); move it away and make "
                       "tokens again with `zoo token create`") from None
    except OSError as e:
        raise ZooError(f"cannot read token file {file}: {e.strerror or e}") from None


def _read(file: Path) -> dict[str, Holder]:
    return _parse(_lines(file), file)


def _parse(lines: list[str], file: Path) -> dict[str, Holder]:
    """Token hash -> holder, from the file's lines; one line of error for a bad line."""
    entries: dict[str, Holder] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[1] not in SCOPES or len(parts[2]) != 64:
            raise ZooError(f"{file}:{i}: not a token line (name<TAB>scope<TAB>sha256)")
        entries[parts[2]] = Holder(parts[0], parts[1])
    return entries
