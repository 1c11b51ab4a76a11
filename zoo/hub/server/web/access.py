"""Who sees what on the web pages: the same rules as the Hub API, applied to models.

The registry has no private flag for models; a model is private when the repositories
of this server that serve it are all private. A repository serves a model when the head
of one of its branches or tags holds one of the model's weight files (the same sha256),
which is what a ``zoo push`` to this server leaves. So a model pushed only to
``alice/x`` (private) is seen by alice and the members of her organisations, exactly
as the API lets them download it; a model no repository serves, or one that a public
repository serves too (its bytes are public there), is public. With ``--private-reads``
every page needs a token, as every API read does.

Browsers send no bearer token: the login form takes one once, checks it, and keeps a
random session id in an HttpOnly, SameSite=Strict cookie. The server keeps the token's
id and user, never the token, and asks the accounts on every request whether the token
still lives, so a revoked token logs its sessions out at once.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from zoo.errors import NotFound
from zoo.hub.accounts import Accounts, Holder
from zoo.hub.server.web.reader import Reader

SESSION_COOKIE = "zoo_session"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class ServedRepo:
    """A repository of this server that serves a model."""

    repo_id: str
    private: bool


@dataclass
class Visibility:
    """Which registered models one viewer may see, and the repositories each is served by."""

    holder: Holder | None
    served: dict[str, list[ServedRepo]] = field(default_factory=dict)  # ref -> repositories serving it
    hidden: set[str] = field(default_factory=set)  # refs this viewer may not see
    hidden_repos: set[str] = field(default_factory=set)  # private repository ids (lower case) not the viewer's

    def sees(self, ref: str) -> bool:
        return ref not in self.hidden

    def repos(self, ref: str) -> list[ServedRepo]:
        """The repositories serving ``ref`` that this viewer may see."""
        return [r for r in self.served.get(ref, []) if not r.private or self._owns(r.repo_id)]

    def _owns(self, repo_id: str) -> bool:
        return self.holder is not None and self.holder.owns(repo_id)


def visibility(reader: Reader, holder: Holder | None) -> Visibility:
    """The models ``holder`` (None: an anonymous viewer) may see."""
    repos, served = reader.served()
    out = Visibility(holder)
    out.hidden_repos = {rid.lower() for rid, private in repos.values() if private and not out._owns(rid)}
    for ref, pks in served.items():
        out.served[ref] = sorted((ServedRepo(*repos[pk]) for pk in pks), key=lambda r: r.repo_id.lower())
        if all(r.private for r in out.served[ref]) and not any(out._owns(r.repo_id) for r in out.served[ref]):
            out.hidden.add(ref)
    return out


@dataclass(frozen=True)
class Session:
    """A browser's login: the token's id and user, never the token."""

    token_id: str
    user: str
    expires: float


class Sessions:
    """Browser sessions of one server, in memory: a restart logs everyone out."""

    def __init__(self, accounts: Accounts):
        self.accounts = accounts
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def login(self, token: str) -> tuple[str, Holder] | None:
        """A new session id for a live token, with its holder; None for anything else."""
        holder = self.accounts.check(token)
        if holder is None:
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires > now}
            self._by_id[sid] = Session(holder.token_id, holder.user, now + SESSION_SECONDS)
        return sid, holder

    def holder(self, sid: str | None) -> Holder | None:
        """The holder behind a session id, re-checked: its token must still live, and the
        organisations are read anew (membership may have changed since the login)."""
        if not sid:
            return None
        with self._lock:
            sess = self._by_id.get(sid)
        if sess is None or sess.expires <= time.time():
            return None
        try:
            live = {t["id"]: t for t in self.accounts.tokens(sess.user)}
        except NotFound:  # the user is gone
            live = {}
        tok = live.get(sess.token_id)
        if tok is None:
            self.logout(sid)
            return None
        orgs = next((a["orgs"] for a in self.accounts.accounts() if a["kind"] == "user"
                     and a["name"].lower() == sess.user.lower()), [])
        return Holder(tok["user"], tok["scope"], tok["id"], tuple(orgs))

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

