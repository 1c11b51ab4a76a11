"""The registry as the pages read it: the same answers as ``Registry``, remembered until
the database changes.

A model page needs ``show``, ``lineage``, the card a push would publish and every
recorded metric: a few dozen ORM queries, most of a page's time. They depend on the
registry only, not on who is looking, so they are kept, and all of them are dropped the
moment anything commits to the database: SQLite's ``PRAGMA data_version``, read on a
connection of our own that never writes, changes whenever any other connection (this
server's, a ``zoo`` command's) commits. Who may see what is decided per request, from
these answers (``access.visibility``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select

from zoo.registry import Registry
from zoo.registry.card import hub_card
from zoo.registry.listing import connect_readonly, iso_utc
from zoo.registry.schema import File, HubEntry, HubRef, HubRepo, Model

T = TypeVar("T")
WEIGHTS = ".safetensors"  # the files that make a model: a shared config.json ties nothing
_METRICS = """
SELECT m.name, m.version, t.name, x.metric, x.value, x.split, x.dataset, x.measured_at
FROM metrics x JOIN models m ON m.id = x.model_id LEFT JOIN tasks t ON t.id = x.task_id ORDER BY x.id
"""


_MODELS = "SELECT m.id, m.name, m.version, m.kind, m.base_id, r.method FROM models m " \
          "LEFT JOIN recipes r ON r.model_id = m.id"
_EDGES = "SELECT child_id, parent_id, parent_ref, role FROM lineage ORDER BY child_id, position, id"


@dataclass
class _Graph:
    """Every model's lineage facts: (ref, kind, base id, recipe method) by id, and parents."""

    models: dict[int, tuple[str, str, int | None, str | None]] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    edges: dict[int, list[tuple[int | None, str, str]]] = field(default_factory=dict)


class Reader:
    """Cached reads of one registry for the pages; ``begin()`` before each page."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        self._version: int | None = None
        self._memo: dict[tuple[str, str], Any] = {}

    def begin(self) -> None:
        """Forget everything if the database changed since the last page."""
        version = self._data_version()
        with self._lock:
            if version != self._version or version is None:
                self._memo.clear()
                self._version = version

    def _data_version(self) -> int | None:
        with self._lock:
            try:
                if self._con is None:  # our own: it must never write, and is used under the lock
                    self._con = sqlite3.connect(f"file:{self.registry.path}?mode=ro", uri=True,
                                                check_same_thread=False)
                return int(self._con.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:
                return None  # never cache what cannot be checked

    def _cached(self, kind: str, key: str, make: Callable[[], T]) -> T:
        with self._lock:
            if (kind, key) in self._memo:
                return self._memo[kind, key]
        value = make()
        with self._lock:
            if len(self._memo) > 2048:
                self._memo.clear()
            self._memo[kind, key] = value
        return value

    # -- what the pages read -------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        return self._cached("list", "", self.registry.list)

    def show(self, ref: str) -> dict[str, Any]:
        return self._cached("show", ref, lambda: self.registry.show(ref))

    def lineage(self, ref: str) -> dict[str, Any]:
        """``Registry.lineage(ref)`` for a full ``NAME@VERSION``, from one read of every
        model's parents (the ORM's walk loads each parent on its own: most of a page's
        first view). ``tests/test_web.py`` holds the two to the same answer."""
        graph = self._cached("graph", "", self._graph)
        return self._node(graph, graph.ids[ref], None, frozenset())

    def _graph(self) -> "_Graph":
        con = connect_readonly(self.registry.path)
        try:
            g = _Graph()
            for mid, name, version, kind, base_id, method in con.execute(_MODELS):
                g.models[mid] = (f"{name}@{version}", kind, base_id, method)
                g.ids[f"{name}@{version}"] = mid
            for child, parent, parent_ref, role in con.execute(_EDGES):
                g.edges.setdefault(child, []).append((parent, parent_ref, role))
        finally:
            con.close()
        return g

    def _node(self, g: "_Graph", mid: int, role: str | None, seen: frozenset[int]) -> dict[str, Any]:
        ref, kind, base_id, method = g.models[mid]
        node: dict[str, Any] = {"ref": ref, "kind": kind, "role": role, "parents": []}
        if method is not None:
            node["method"] = method
        if mid in seen:
            return node
        seen = seen | {mid}
        roles = set()
        for parent, parent_ref, prole in g.edges.get(mid, []):
            roles.add(parent)
            if parent is None:
                node["parents"].append({"ref": parent_ref, "kind": None, "role": prole, "parents": [],
                                        "removed": True})
            else:
                node["parents"].append(self._node(g, parent, prole, seen))
        if base_id is not None and base_id not in roles:
            node["parents"].append(self._node(g, base_id, "base", seen))
        return node

    def card(self, ref: str) -> str:
        """The README.md a push of ``ref`` would publish."""
        return self._cached("card", ref, lambda: hub_card(self.registry, ref))

    def metrics(self) -> list[dict[str, Any]]:
        """Every recorded metric, oldest first, as ``Registry.metrics()`` gives them."""
        return self._cached("metrics", "", self._metrics)

    def _metrics(self) -> list[dict[str, Any]]:
        con = connect_readonly(self.registry.path)
        try:
            rows = con.execute(_METRICS).fetchall()
        finally:
            con.close()
        return [{"model": f"{n}@{v}", "task": t, "metric": k, "value": x, "split": s, "dataset": d,
                 "measured_at": iso_utc(at)} for n, v, t, k, x, s, d, at in rows]

    def served(self) -> tuple[dict[int, tuple[str, bool]], dict[str, set[int]]]:
        """The repositories of this server (id -> repo id, private) and, per model ref,
        the repositories whose branch or tag heads hold one of its weight files."""
        return self._cached("served", "", self._served)

    def _served(self) -> tuple[dict[int, tuple[str, bool]], dict[str, set[int]]]:
        with self.registry.db.read() as s:
            repos = {pk: (rid, bool(private))
                     for pk, rid, private in s.execute(select(HubRepo.id, HubRepo.repo_id, HubRepo.private))}
            heads: dict[str, set[int]] = {}  # weight sha256 -> repositories whose heads hold it
            for pk, digest in s.execute(
                    select(HubRef.repo_pk, HubEntry.sha256).join(HubEntry, HubEntry.commit_sha == HubRef.commit_sha)
                    .where(HubEntry.path.like(f"%{WEIGHTS}")).distinct()):
                heads.setdefault(digest, set()).add(pk)
            served: dict[str, set[int]] = {}
            if heads:
                for name, version, digest in s.execute(
                        select(Model.name, Model.version, File.sha256).join(File, File.model_id == Model.id)
                        .where(File.relpath.like(f"%{WEIGHTS}"))):
                    if digest in heads:
                        served.setdefault(f"{name}@{version}", set()).update(heads[digest])
        return repos, served
