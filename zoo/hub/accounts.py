"""Who may do what on ``zoo serve``: users, organisations, and their tokens.

Accounts live in the registry (``hub_accounts``, ``hub_members``, ``hub_tokens``), so a
team's server keeps them in the same transactions and backups as its repositories. A
user or an organisation is a namespace: repositories are ``namespace/name``. A token
belongs to one user and has a scope:

- ``read`` reads public repositories, and private ones in the user's namespaces
  (the user's own and those of its organisations);
- ``write`` also creates repositories in those namespaces, commits to them and deletes
  them, and nothing else.

A token is shown once, when it is made; only its sha256 is kept, so neither the
registry nor the server's memory holds one. Administration (users, organisations,
members, tokens) is done on the server's machine, through the CLI.
"""

from __future__ import annotations

import getpass
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from zoo.errors import AlreadyExists, NotFound, ZooError
from zoo.hub.names import check_new_repo_id
from zoo.registry import Registry
from zoo.registry.schema import HubAccount, HubMember, HubToken

PREFIX = "zoo_"
SCOPES = ("read", "write")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def namespace_of(repo_id: str) -> str | None:
    """The namespace of ``namespace/name``; None for a repository without one."""
    return repo_id.split("/", 1)[0] if "/" in repo_id else None


@dataclass(frozen=True)
class Holder:
    """The user a request's token belongs to, with that token's scope."""

    user: str
    scope: str
    token_id: str
    orgs: tuple[str, ...] = ()

    @property
    def can_write(self) -> bool:
        return self.scope == "write"

    def owns(self, repo_id: str) -> bool:
        """Whether ``repo_id`` lies in one of this user's namespaces (case-insensitively)."""
        ns = namespace_of(repo_id)
        return ns is not None and ns.lower() in {n.lower() for n in (self.user, *self.orgs)}


def check_account_name(name: str, what: str = "user") -> str:
    """A user or organisation name: a namespace of repository ids."""
    if not isinstance(name, str) or "/" in name:
        raise ZooError(f"invalid {what} name {name!r}: use letters, digits, '.', '-', '_'")
    try:
        check_new_repo_id(name)
    except ZooError:
        raise ZooError(f"invalid {what} name {name!r}: use letters, digits, '.', '-', '_' (at most 96), "
                       "starting and ending with a letter or digit, and not a word of the Hub's API") from None
    return name


class Accounts:
    """The users, organisations and tokens of one registry's server."""

    def __init__(self, registry: Registry):
        self.db = registry.db

    # -- accounts ----------------------------------------------------------------------
    def add_user(self, name: str) -> bool:
        """Add a user; False when it exists already."""
        return self._add(name, "user")

    def add_org(self, name: str, members: list[str] = ()) -> bool:
        """Add an organisation with ``members`` (existing users); False when it exists already."""
        check_account_name(name, "organisation")
        with self.db.write() as s:
            created = self._add_in(s, name, "org")
            org = self._account(s, name, "org")
            for m in members:
                self._join(s, org, self._account(s, m, "user"))
        return created

    def _add(self, name: str, kind: str) -> bool:
        check_account_name(name, "organisation" if kind == "org" else "user")
        with self.db.write() as s:
            return self._add_in(s, name, kind)

    def _add_in(self, s, name: str, kind: str) -> bool:
        have = s.scalar(select(HubAccount).where(func.lower(HubAccount.name) == name.lower()))
        if have is not None:
            if have.kind != kind:
                other = "an organisation" if have.kind == "org" else "a user"
                raise AlreadyExists(f"{have.name} is already {other}; a namespace is one or the other")
            return False
        s.add(HubAccount(name=name, kind=kind))
        s.flush()
        return True

    def add_member(self, org: str, user: str) -> bool:
        """Make ``user`` a member of ``org``; False when it already is."""
        with self.db.write() as s:
            return self._join(s, self._account(s, org, "org"), self._account(s, user, "user"))

    def remove_member(self, org: str, user: str) -> None:
        with self.db.write() as s:
            o, u = self._account(s, org, "org"), self._account(s, user, "user")
            if s.get(HubMember, (o.id, u.id)) is None:
                raise NotFound(f"{u.name} is not a member of {o.name}")
            s.execute(delete(HubMember).where(HubMember.org_pk == o.id, HubMember.user_pk == u.id))

    @staticmethod
    def _join(s, org: HubAccount, user: HubAccount) -> bool:
        if s.get(HubMember, (org.id, user.id)) is not None:
            return False
        s.add(HubMember(org_pk=org.id, user_pk=user.id))
        s.flush()
        return True

    @staticmethod
    def _account(s, name: str, kind: str) -> HubAccount:
        acc = s.scalar(select(HubAccount).where(func.lower(HubAccount.name) == str(name).lower()))
        if acc is None or acc.kind != kind:
            what = "organisation" if kind == "org" else "user"
            hint = "`zoo org add NAME`" if kind == "org" else "`zoo user add NAME`"
            raise NotFound(f"no {what} named {name!r} on this server; add it with {hint}")
        return acc

    def accounts(self) -> list[dict[str, Any]]:
        """Every user and organisation, with members (orgs) or organisations (users) and live tokens."""
        with self.db.read() as s:
            accs = s.scalars(select(HubAccount).order_by(HubAccount.kind.desc(), func.lower(HubAccount.name))).all()
            names = {a.id: a.name for a in accs}
            members = s.execute(select(HubMember.org_pk, HubMember.user_pk)).all()
            live = dict(s.execute(select(HubToken.user_pk, func.count()).where(HubToken.revoked_at.is_(None))
                                  .group_by(HubToken.user_pk)).all())
            out = []
            for a in accs:
                if a.kind == "org":
                    out.append({"name": a.name, "kind": "org",
                                "members": sorted(names[u] for o, u in members if o == a.id)})
                else:
                    out.append({"name": a.name, "kind": "user", "orgs": sorted(names[o] for o, u in members
                                                                                if u == a.id),
                                "tokens": live.get(a.id, 0)})
            return out

    def is_empty(self) -> bool:
        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(HubAccount)) == 0

    def namespace_exists(self, name: str) -> bool:
        with self.db.read() as s:
            return s.scalar(select(HubAccount.id).where(func.lower(HubAccount.name) == name.lower())) is not None

    # -- tokens ------------------------------------------------------------------------
    def create_token(self, user: str, scope: str = "write") -> dict[str, Any]:
        """A new token for ``user`` (added if missing). The token is in the result, and
        nowhere else: only its sha256 is kept."""
        if scope not in SCOPES:
            raise ZooError(f"unknown scope {scope!r}; choose read or write")
        check_account_name(user)
        token = PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(6)
        with self.db.write() as s:
            created = self._add_in(s, user, "user")
            acc = self._account(s, user, "user")
            s.add(HubToken(id=token_id, user_pk=acc.id, scope=scope, digest=digest(token)))
        return {"id": token_id, "user": acc.name, "scope": scope, "token": token, "user_created": created}

    def tokens(self, user: str | None = None, revoked: bool = False) -> list[dict[str, Any]]:
        """Tokens (never their values), newest first; revoked ones only with ``revoked``."""
        with self.db.read() as s:
            q = select(HubToken, HubAccount.name).join(HubAccount, HubAccount.id == HubToken.user_pk)
            if user is not None:
                q = q.where(HubToken.user_pk == self._account(s, user, "user").id)
            if not revoked:
                q = q.where(HubToken.revoked_at.is_(None))
            return [{"id": t.id, "user": name, "scope": t.scope, "created_at": _iso(t.created_at),
                     "revoked_at": _iso(t.revoked_at) if t.revoked_at else None}
                    for t, name in s.execute(q.order_by(HubToken.created_at.desc(), HubToken.id)).all()]

    def revoke(self, token_id: str) -> dict[str, Any]:
        """Revoke a token by its id (``zoo token list`` shows ids); it stops working at once."""
        with self.db.write() as s:
            t = s.get(HubToken, token_id)
            if t is None:
                raise NotFound(f"no token {token_id!r} on this server; `zoo token list` shows their ids")
            if t.revoked_at is None:
                t.revoked_at = datetime.now(timezone.utc)
            user = s.get(HubAccount, t.user_pk).name
            return {"id": t.id, "user": user, "scope": t.scope, "revoked_at": _iso(t.revoked_at)}

    def check(self, token: str | None) -> Holder | None:
        """The holder of ``token``, or None when it is unknown or revoked.

        Looked up by its sha256: the lookup's timing can say nothing about a token
        whose hash nobody knows.
        """
        if not token or len(token) > 256:
            return None
        with self.db.read() as s:
            row = s.execute(select(HubToken, HubAccount).join(HubAccount, HubAccount.id == HubToken.user_pk)
                            .where(HubToken.digest == digest(token), HubToken.revoked_at.is_(None))).first()
            if row is None:
                return None
            t, user = row
            orgs = s.scalars(select(HubAccount.name).join(HubMember, HubMember.org_pk == HubAccount.id)
                             .where(HubMember.user_pk == user.id).order_by(HubAccount.name)).all()
            return Holder(user.name, t.scope, t.id, tuple(orgs))

    # -- first run ---------------------------------------------------------------------
    def first_run(self) -> dict[str, Any] | None:
        """On a server with no accounts, add one user (the login name when it is a valid
        one, else ``admin``) with a write token; None when accounts exist."""
        if not self.is_empty():
            return None
        try:
            name = check_account_name(getpass.getuser())
        except (ZooError, OSError, KeyError):
            name = "admin"
        return self.create_token(name, "write")

    def import_token_file(self, file: Path) -> int:
        """Adopt the tokens of a token file from an older zoo (``name<TAB>scope<TAB>sha256``
        lines): each name becomes a user holding that token. Returns how many were new."""
        lines = _token_lines(file)
        n = 0
        with self.db.write() as s:
            for name, scope, dig in lines:
                self._add_in(s, name, "user")
                if s.scalar(select(HubToken.id).where(HubToken.digest == dig)) is not None:
                    continue
                s.add(HubToken(id="tok_" + secrets.token_hex(6), user_pk=self._account(s, name, "user").id,
                               scope=scope, digest=dig))
                n += 1
        return n


def legacy_token_file(registry: Path) -> Path:
    """Where an older zoo kept tokens: ``registry.db`` -> ``registry.tokens``."""
    return Path(registry).with_suffix(".tokens")


def _iso(t: datetime) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _token_lines(file: Path) -> list[tuple[str, str, str]]:
    """The lines of an older zoo's token file; one line of error for a file that is not one."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ZooError(f"{file} is not a token file (not UTF-8 text at byte {e.start}); move it away") from None
    except OSError as e:
        raise ZooError(f"cannot read token file {file}: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[1] not in SCOPES or len(parts[2]) != 64:
            raise ZooError(f"{file}:{i}: not a token line (name<TAB>scope<TAB>sha256); move the file away")
        try:
            check_account_name(parts[0])
        except ZooError as e:
            raise ZooError(f"{file}:{i}: {e}") from None
        out.append((parts[0], parts[1], parts[2]))
    return out
