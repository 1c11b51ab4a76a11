"""Fast read-only listing of registered models.

``zoo list`` must answer in well under a second on a registry of ten thousand models,
and importing SQLAlchemy's ORM alone takes most of that on a small machine. So the
listing is one SQL query through the standard library's ``sqlite3`` (or, for a registry
on PostgreSQL, through ``psycopg`` directly); everything that writes goes through the
ORM in ``catalogue.py``, and ``Registry.list`` calls this.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

from zoo.errors import NotFound, ZooError
from zoo.registry.migrations import SCHEMA_HEAD
from zoo.registry.names import KINDS, parse_ref
from zoo.registry.paths import Location, keys_path, not_a_registry, on_read_only_storage, server_error, store_path


_SQL = """
SELECT m.id, m.name, m.version, m.kind, m.form, b.name, b.version, m.model_type, m.param_count, m.total_bytes,
       m.created_at
FROM models m LEFT JOIN models b ON b.id = m.base_id
"""
_TASKS = "SELECT mt.model_id, t.name FROM model_tasks mt JOIN tasks t ON t.id = mt.task_id ORDER BY t.name"
_TAGS = "SELECT model_id, tag FROM model_tags ORDER BY tag"


def iso_utc(value: Any) -> str | None:
    """Registry timestamps are UTC; SQLite keeps them without a zone."""
    if value is None:
        return None
    text = value.isoformat() if hasattr(value, "isoformat") else str(value).replace(" ", "T", 1)
    return text if text.endswith("+00:00") else text + "+00:00"


def connect_readonly(path: Path) -> sqlite3.Connection:
    immutable = "&immutable=1" if on_read_only_storage(path) else ""
    con = sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True, timeout=60)
    con.execute("PRAGMA busy_timeout=60000")
    return con


def _server_connect(loc: Location) -> Any:
    """A read-only psycopg connection to a registry on PostgreSQL (UTC session)."""
    import psycopg

    try:
        con = psycopg.connect(loc.url or "", connect_timeout=10, options="-c timezone=UTC",
                              application_name="zoo", autocommit=False)
    except psycopg.Error as e:
        raise server_error(loc, e) from None
    con.read_only = True
    return con


def _rows(con: Any, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
    """``sql`` written with ``?`` placeholders, on either driver."""
    if isinstance(con, sqlite3.Connection):
        return con.execute(sql, args).fetchall()
    return con.execute(sql.replace("?", "%s"), args).fetchall()


def list_models(where: Path | Location, kind: str | None = None, base: str | None = None, task: str | None = None,
                tag: str | None = None) -> list[dict[str, Any]]:
    """Registered models ordered by name and version, filtered by kind, base, task and tag."""
    if kind is not None and kind not in KINDS:
        raise ZooError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    revision = schema_revision(where)
    if revision is None and isinstance(where, Location) and where.on_server:
        raise NotFound(f"no registry in {where.shown}; create one with `zoo init`")
    if revision != SCHEMA_HEAD:
        from zoo.registry.database import upgrade_file  # SQLAlchemy and Alembic: only when needed

        upgrade_file(where)
    on_server = isinstance(where, Location) and where.on_server
    shown = where.shown if isinstance(where, Location) else str(where)
    where_, args = [], []
    con = _server_connect(where) if on_server else connect_readonly(_file(where))
    try:
        if kind:
            where_.append("m.kind = ?")
            args.append(kind)
        if base:
            name, version = parse_ref(base)
            found = (_rows(con, "SELECT id FROM models WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
                     if version is None else
                     _rows(con, "SELECT id FROM models WHERE name = ? AND version = ? LIMIT 1", (name, version)))
            if not found:
                raise NotFound(f"no model named {base!r} in {shown}; `zoo list` shows what is registered")
            where_.append("m.base_id = ?")
            args.append(found[0][0])
        if task:
            where_.append("EXISTS (SELECT 1 FROM model_tasks mt JOIN tasks t ON t.id = mt.task_id "
                          "WHERE mt.model_id = m.id AND t.name = ?)")
            args.append(task)
        if tag:
            where_.append("EXISTS (SELECT 1 FROM model_tags g WHERE g.model_id = m.id AND g.tag = ?)")
            args.append(tag)
        # Byte order on both (SQLite's BINARY; PostgreSQL's "C"), whatever the server's locale.
        binary = ' COLLATE "C"' if on_server else ""
        sql = (_SQL + (" WHERE " + " AND ".join(where_) if where_ else "")
               + f" ORDER BY m.name{binary}, m.version")
        rows = _rows(con, sql, args)
        tasks: dict[int, list[str]] = {}
        tags: dict[int, list[str]] = {}
        for mid, name in _rows(con, _TASKS + binary):
            tasks.setdefault(mid, []).append(name)
        for mid, tag_ in _rows(con, _TAGS + binary):
            tags.setdefault(mid, []).append(tag_)
    except sqlite3.OperationalError as e:
        raise ZooError(f"cannot read registry {shown}: {e}") from None
    except Exception as e:
        if on_server and type(e).__module__.startswith("psycopg"):
            raise server_error(where, e) from None  # type: ignore[arg-type]
        raise
    finally:
        con.close()
    return [
        {
            "name": r[1], "version": r[2], "ref": f"{r[1]}@{r[2]}", "kind": r[3], "form": r[4],
            "base": f"{r[5]}@{r[6]}" if r[5] is not None else None, "model_type": r[7],
            "parameters": r[8], "bytes": r[9], "tasks": tasks.get(r[0], []), "tags": tags.get(r[0], []),
            "created_at": iso_utc(r[10]),
        }
        for r in rows
    ]


def _file(where: Path | Location) -> Path:
    return where.file if isinstance(where, Location) and where.file is not None else Path(where)  # type: ignore[arg-type]


def schema_revision(where: Path | Location) -> str | None:
    """The registry's schema revision, read without SQLAlchemy (None if it has none)."""
    if isinstance(where, Location) and where.on_server:
        con = _server_connect(where)
        try:
            if con.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:
                return None
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            return row[0] if row else None
        finally:
            con.close()
    path = _file(where)
    con = connect_readonly(path)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    except (sqlite3.OperationalError, TypeError):
        return None
    except sqlite3.DatabaseError as e:
        raise not_a_registry(path, e) from None
    finally:
        con.close()


def discard_if_unused(path: Path | Location) -> bool:
    """Remove a registry that holds nothing (no model, task or served repository) with its
    store and side files: what a command that made it and then failed leaves. Returns
    whether it was removed; a registry with anything in it is never touched, nor is a
    database on a server (its owner made it; an empty schema there is harmless)."""
    store = store_path(path) if not isinstance(path, Location) else path.store
    keys = keys_path(path) if not isinstance(path, Location) else path.keys
    if isinstance(path, Location):
        if path.file is None:
            return False
        path = path.file
    try:
        con = connect_readonly(path)
        try:
            used = sum(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                       for table in ("models", "tasks", "hub_repos"))
        finally:
            con.close()
    except sqlite3.Error:
        return False
    if used or any(p.is_file() for p in (store / "blobs").rglob("*")):
        return False
    for side in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
                 path.with_name(path.name + ".lock")):
        side.unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    if keys.is_dir() and not any(keys.iterdir()):
        keys.rmdir()
    return True
