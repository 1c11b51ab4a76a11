"""Repositories served by ``zoo serve``: commits, branches and trees over the registry.

A repository is a chain of commits; each commit records its whole tree as rows of
``(path, sha256, size, git oid)``, and every file's bytes are one blob in the
registry's content-addressed store, shared with registered models. Branches are rows
too: ``main`` moves to each new commit, inside the transaction that records it, so a
commit on a stale ``parentCommit`` is refused rather than silently overwriting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from zoo.errors import Conflict, EntryNotFound, HubError, RepoNotFound, RevisionNotFound
from zoo.hub.git import COMMIT_SHA, DEFAULT_BRANCH, GITATTRIBUTES, git_blob_oid, is_lfs_oid, lfs_pointer
from zoo.hub.names import check_case_unique, check_new_repo_id, check_path
from zoo.hub.refs import BRANCH, SHORT_SHA, Ref, check_ref_name
from zoo.registry import Registry
from zoo.registry.schema import HubCommit, HubEntry, HubRef, HubRepo


@dataclass(frozen=True)
class Entry:
    """A file of a commit's tree: its bytes are the store's blob ``sha256``."""

    path: str
    sha256: str
    size: int
    git_oid: str
    lfs: bool

    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Revision:
    """A resolved revision: its commit, that commit's time, and the repository's privacy."""

    sha: str
    created_at: datetime
    private: bool
    repo_created_at: datetime | None = None


@dataclass(frozen=True)
class CommitInfo:
    """A commit as a listing shows it; ``author`` is who made it (None before zoo recorded it)."""

    sha: str
    summary: str
    description: str
    author: str | None
    created_at: datetime


@dataclass
class Change:
    """A commit's operations. Inline files are staged in the store's temp folder."""

    summary: str
    description: str = ""
    parent: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    lfs: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (sha256, size)
    deleted_files: list[str] = field(default_factory=list)
    deleted_folders: list[str] = field(default_factory=list)

    def discard(self) -> None:
        for tmp in self.files.values():
            tmp.unlink(missing_ok=True)


class HubRepos:
    """The served repositories of one registry."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.store = registry.store

    # -- repositories ---------------------------------------------------------------
    def create(self, repo_id: str, private: bool = False, author: str | None = None) -> bool:
        """Create a repository with its first commit (``.gitattributes``). False if it exists,
        also under another case (``ALICE/T1`` beside ``alice/t1``): the two would share one
        folder of a client's cache on a case-insensitive disk."""
        check_new_repo_id(repo_id)
        change = Change(summary="initial commit", files={".gitattributes": self.stage(GITATTRIBUTES)})
        try:
            with self.registry.db.store_lock(exclusive=False), self.registry.db.write() as s:
                if self._same_id(s, repo_id) is not None:  # in the write transaction: no race
                    return False
                repo = HubRepo(repo_type="model", repo_id=repo_id, private=private)
                s.add(repo)
                s.flush()
                self._record(s, repo, None, change, [], author)
        except IntegrityError:
            return False
        finally:
            change.discard()
        return True

    def same_id(self, repo_id: str) -> str | None:
        """The id of the repository that is ``repo_id`` regardless of case, if any."""
        with self.registry.db.read() as s:
            return self._same_id(s, repo_id)

    @staticmethod
    def _same_id(s, repo_id: str) -> str | None:
        # repository ids are ASCII, so SQLite's lower() is a full case fold for them
        return s.scalar(select(HubRepo.repo_id).where(HubRepo.repo_type == "model",
                                                      func.lower(HubRepo.repo_id) == repo_id.lower()).limit(1))

    def revision(self, repo_id: str, rev: str = DEFAULT_BRANCH) -> Revision:
        """Resolve a branch name or a commit sha of ``repo_id``."""
        with self.registry.db.read() as s:
            repo = self._repo(s, repo_id)
            commit = self._commit(s, repo, rev)
            return Revision(commit.sha, commit.created_at, repo.private, repo.created_at)

    def entries(self, repo_id: str, sha: str) -> list[Entry]:
        with self.registry.db.read() as s:
            rows = s.scalars(select(HubEntry).where(HubEntry.commit_sha == sha).order_by(HubEntry.path)).all()
            return [_entry(r) for r in rows]

    def entry(self, repo_id: str, sha: str, path: str) -> Entry:
        with self.registry.db.read() as s:
            row = s.get(HubEntry, (sha, path))
            if row is None:
                raise EntryNotFound(f"{path} not found in {repo_id} at {sha}")
            return _entry(row)

    def repo_blob_size(self, repo_id: str, sha256: str) -> int | None:
        """The size of a blob some commit of ``repo_id`` holds (None when none does)."""
        with self.registry.db.read() as s:
            repo = self._repo(s, repo_id)
            return s.scalar(select(HubEntry.size).join(HubCommit, HubCommit.sha == HubEntry.commit_sha)
                            .where(HubCommit.repo_pk == repo.id, HubEntry.sha256 == sha256).limit(1))

    def blob(self, entry: Entry) -> Path:
        return self.store.path(entry.sha256)

    def is_private(self, repo_id: str) -> bool:
        with self.registry.db.read() as s:
            return self._repo(s, repo_id).private

    # -- writing --------------------------------------------------------------------
    def stage(self, data: bytes) -> Path:
        """Write a file sent inline in a commit to the store's temp folder."""
        tmp = self.store.temp_path()
        try:
            tmp.write_bytes(data)
        except BaseException:  # a disk that fills keeps no part of it
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit(self, repo_id: str, branch: str, change: Change, author: str | None = None) -> str:
        """Record a commit on ``branch``; returns its sha.

        Refused with ``Conflict`` when ``change.parent`` is given and the branch has
        moved past it: the check and the branch update are one transaction.
        """
        if COMMIT_SHA.match(branch):
            raise HubError(f"cannot commit to a commit sha ({branch}); commit to a branch such as 'main'",
                           code="RevisionNotFound")
        if change.parent is not None and not (isinstance(change.parent, str) and COMMIT_SHA.match(change.parent)):
            raise HubError(f"parentCommit must be a 40-hex commit sha, not {change.parent!r}")
        try:
            with self.registry.db.store_lock(exclusive=False), self.registry.db.write() as s:
                repo = self._repo(s, repo_id)
                ref = s.get(HubRef, (repo.id, branch))
                if ref is None:
                    raise RevisionNotFound(f"branch {branch!r} not found in {repo_id}")
                if ref.kind != BRANCH:
                    raise HubError(f"{branch!r} is a tag of {repo_id}, and a tag never moves; commit to a branch",
                                   code="RevisionNotFound")
                if change.parent is not None and change.parent != ref.commit_sha:
                    raise Conflict(f"A commit has happened since {change.parent[:12]} on {repo_id}@{branch} "
                                   f"(now {ref.commit_sha[:12]}); refresh and try again")
                old = s.scalars(select(HubEntry).where(HubEntry.commit_sha == ref.commit_sha)).all()
                return self._record(s, repo, ref, change, [_entry(r) for r in old], author)
        finally:
            change.discard()

    def _seal(self, change: Change) -> dict[str, Entry]:
        """Move inline files into the store and check that large files were uploaded.

        Runs under the store's shared lock, so no blob seen here can be removed
        before the commit that references it.
        """
        adds: dict[str, Entry] = {}
        for path, (sha256, size) in change.lfs.items():
            check_path(path)
            if not is_lfs_oid(str(sha256)):
                raise HubError(f"{path}: invalid sha256 oid {sha256!r}")
            if self.store.size(sha256) != int(size):
                raise HubError(f"{path}: its content (sha256 {sha256[:12]}…) was not uploaded; "
                               "upload it through the LFS batch API first")
            adds[path] = Entry(path, sha256, int(size), git_blob_oid(lfs_pointer(sha256, int(size))), lfs=True)
        for path, tmp in change.files.items():
            check_path(path)
            data = tmp.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            self.store.adopt(tmp, digest)
            adds[path] = Entry(path, digest, len(data), git_blob_oid(data), lfs=False)
        return adds

    def _record(self, s, repo: HubRepo, ref: HubRef | None, change: Change, old: list[Entry],
                author: str | None) -> str:
        """Check the change against the parent's tree, then store its files and record it.

        Files are sealed into the store only once the change is known to apply, so a
        refused commit leaves no blob behind; the caller holds the store lock, so no
        blob checked here can be removed before the commit references it.
        """
        tree = {e.path: e for e in old}
        # Deleting what the tree holds needs no check: that is how a name refused today,
        # kept from an older commit, is removed.
        for path in change.deleted_files:
            if tree.pop(path, None) is None:
                raise EntryNotFound(f"cannot delete {check_path(path)}: not in {repo.repo_id}")
        for folder in change.deleted_folders:
            prefix = folder.rstrip("/") + "/"
            doomed = [p for p in tree if p.startswith(prefix)]
            if not doomed:
                check_path(folder.rstrip("/"))
            for p in doomed:
                del tree[p]
        paths = set(tree) | set(change.files) | set(change.lfs)
        for p in paths:  # a file may not also be a folder
            for i in range(1, p.count("/") + 1):
                if p.rsplit("/", i)[0] in paths:
                    raise HubError(f"{p}: {p.rsplit('/', i)[0]} is a file, not a folder")
        check_case_unique(tree, [*change.files, *change.lfs])
        tree.update(self._seal(change))
        now = datetime.now(timezone.utc)
        parent = ref.commit_sha if ref is not None else None
        body = json.dumps({"repo": repo.repo_id, "parent": parent, "summary": change.summary,
                           "description": change.description, "author": author, "time": now.isoformat(),
                           "tree": sorted((e.path, e.git_oid) for e in tree.values())}, sort_keys=True)
        sha = hashlib.sha1(body.encode()).hexdigest()
        s.add(HubCommit(sha=sha, repo_pk=repo.id, parent_sha=parent, summary=change.summary,
                        description=change.description, author=author, created_at=now,
                        entries=[HubEntry(path=e.path, sha256=e.sha256, size=e.size, git_oid=e.git_oid, lfs=e.lfs)
                                 for e in tree.values()]))
        s.flush()
        if ref is None:
            s.add(HubRef(repo_pk=repo.id, name=DEFAULT_BRANCH, commit_sha=sha))
        else:
            ref.commit_sha = sha
        return sha

    # -- history, branches and tags, removal --------------------------------------------
    def history(self, repo_id: str, rev: str = DEFAULT_BRANCH) -> list[CommitInfo]:
        """The commits that lead to ``rev``, newest first (``git log --first-parent``)."""
        with self.registry.db.read() as s:
            repo = self._repo(s, repo_id)
            sha: str | None = self._commit(s, repo, rev).sha
            rows = {c.sha: c for c in s.scalars(select(HubCommit).where(HubCommit.repo_pk == repo.id))}
            out: list[CommitInfo] = []
            while sha is not None and sha in rows and len(out) < len(rows):  # bounded even if a chain loops
                c = rows[sha]
                out.append(CommitInfo(c.sha, c.summary, c.description or "", c.author, c.created_at))
                sha = c.parent_sha
            return out

    def refs(self, repo_id: str) -> list[Ref]:
        """Every branch and tag of ``repo_id``, by name."""
        with self.registry.db.read() as s:
            repo = self._repo(s, repo_id)
            rows = s.scalars(select(HubRef).where(HubRef.repo_pk == repo.id).order_by(HubRef.name)).all()
            return [Ref(r.name, r.kind, r.commit_sha) for r in rows]

    def create_ref(self, repo_id: str, name: str, kind: str, start: str = DEFAULT_BRANCH) -> Ref:
        """A new branch or tag at the commit ``start`` resolves to; 409 if the name is taken."""
        check_ref_name(name, kind)
        taken = HubError(f"{name!r} already exists in {repo_id}", status=409, code="RefExists")
        try:
            with self.registry.db.write() as s:
                repo = self._repo(s, repo_id)
                sha = self._commit(s, repo, start).sha
                have = s.get(HubRef, (repo.id, name))
                if have is not None:
                    raise HubError(f"{name!r} already exists in {repo_id} as a {have.kind}", status=409,
                                   code="RefExists")
                s.add(HubRef(repo_pk=repo.id, name=name, commit_sha=sha, kind=kind))
        except IntegrityError:
            raise taken from None
        return Ref(name, kind, sha)

    def delete_ref(self, repo_id: str, name: str, kind: str) -> None:
        """Remove a branch or a tag. The commits stay (reachable by sha) until the repository goes."""
        if kind == BRANCH and name == DEFAULT_BRANCH:
            raise HubError(f"the default branch {DEFAULT_BRANCH!r} of {repo_id} cannot be deleted")
        with self.registry.db.write() as s:
            repo = self._repo(s, repo_id)
            ref = s.get(HubRef, (repo.id, name))
            if ref is None or ref.kind != kind:
                raise RevisionNotFound(f"{kind} {name!r} not found in {repo_id}")
            s.delete(ref)

    def delete(self, repo_id: str) -> None:
        """Remove a repository: its refs, commits and trees, in one transaction. Its blobs
        stay in the store until ``zoo gc`` finds nothing else uses them."""
        with self.registry.db.write() as s:
            pk = self._repo(s, repo_id).id
            commits = select(HubCommit.sha).where(HubCommit.repo_pk == pk).scalar_subquery()
            s.execute(delete(HubRef).where(HubRef.repo_pk == pk))
            s.execute(delete(HubEntry).where(HubEntry.commit_sha.in_(commits)))
            s.execute(delete(HubCommit).where(HubCommit.repo_pk == pk))
            s.execute(delete(HubRepo).where(HubRepo.id == pk))

    # -- lookups --------------------------------------------------------------------
    @staticmethod
    def _repo(s, repo_id: str) -> HubRepo:
        repo = s.scalar(select(HubRepo).where(HubRepo.repo_type == "model", HubRepo.repo_id == repo_id))
        if repo is None:
            raise RepoNotFound(f"repository {repo_id} not found")
        return repo

    @staticmethod
    def _commit(s, repo: HubRepo, rev: str) -> HubCommit:
        """A branch or tag name, else a commit sha or an unambiguous prefix of one (7 hex
        digits or more), as git resolves them: names first."""
        ref = s.get(HubRef, (repo.id, rev))
        sha = ref.commit_sha if ref is not None else rev.lower()
        commit = None
        if COMMIT_SHA.match(sha):
            commit = s.get(HubCommit, sha)
        elif SHORT_SHA.match(sha):
            # A range on the primary key: LIKE would not use its index.
            found = s.scalars(select(HubCommit).where(HubCommit.repo_pk == repo.id, HubCommit.sha >= sha,
                                                      HubCommit.sha < sha + "g").limit(2)).all()
            if len(found) > 1:
                raise RevisionNotFound(f"revision {rev!r} is ambiguous in {repo.repo_id}: several commits start "
                                       "with it; give more digits")
            commit = found[0] if found else None
        if commit is None or commit.repo_pk != repo.id:
            raise RevisionNotFound(f"revision {rev!r} not found in {repo.repo_id}")
        return commit

    def list_repos(self) -> list[dict]:
        """Every repository by id: privacy, ``main``'s head, creation and last commit times."""
        with self.registry.db.read() as s:
            rows = s.execute(
                select(HubRepo, HubRef.commit_sha, HubCommit.created_at)
                .outerjoin(HubRef, (HubRef.repo_pk == HubRepo.id) & (HubRef.name == DEFAULT_BRANCH))
                .outerjoin(HubCommit, HubCommit.sha == HubRef.commit_sha)
                .order_by(HubRepo.repo_id))
            return [{"repo_id": repo.repo_id, "private": repo.private, "sha": sha, "created_at": repo.created_at,
                     "last_modified": when or repo.created_at} for repo, sha, when in rows]


def _entry(r: HubEntry) -> Entry:
    return Entry(r.path, r.sha256, r.size, r.git_oid, r.lfs)


def folders(entries: Iterable[Entry]) -> set[str]:
    """Every folder that holds a file, at any depth."""
    out: set[str] = set()
    for e in entries:
        parts = e.path.split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out
