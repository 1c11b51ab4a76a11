"""Fast read-only listing of registered models.

``zoo list`` must answer in well under a second on a registry of ten thousand models,
and importing SQLAlchemy's ORM alone takes most of that on a small machine. So the
listing is one SQL query through the standard library's ``sqlite3`` (or, for a registry
on PostgreSQL, through ``psycopg`` directly); everything that writes goes through the
ORM in ``catalogue.py``, and ``Registry.list`` calls this.
"""

from __future__ import annotations

import json
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


def _open(where: Path | Location, kind: str | None) -> Any:
    """A read-only connection to an up-to-date registry (sqlite3, or psycopg on a server)."""
    if kind is not None and kind not in KINDS:
        raise ZooError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if _on_server(where):  # one connection both checks the schema and reads
        con = _server_connect(where)  # type: ignore[arg-type]
        try:
            revision = _server_revision(con)
        except BaseException:
            con.close()
            raise
        if revision == SCHEMA_HEAD:
            return con
        con.close()
        if revision is None:
            raise NotFound(f"no registry in {where.shown}; create one with `zoo init`")  # type: ignore[union-attr]
    elif schema_revision(where) == SCHEMA_HEAD:
        return connect_readonly(_file(where))
    from zoo.registry.database import upgrade_file  # SQLAlchemy and Alembic: only when needed

    upgrade_file(where)
    return _server_connect(where) if _on_server(where) else connect_readonly(_file(where))  # type: ignore[arg-type]


def _on_server(where: Path | Location) -> bool:
    return isinstance(where, Location) and where.on_server


def _filters(con: Any, shown: str, kind: str | None, base: str | None, task: str | None,
             tag: str | None) -> tuple[str, list[Any]]:
    """The WHERE clause (``?`` placeholders) and its arguments for the listing's filters."""
    where_: list[str] = []
    args: list[Any] = []
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
    return (" WHERE " + " AND ".join(where_) if where_ else ""), args


def _reading(where: Path | Location) -> Any:
    """Driver errors while reading, as one line."""
    shown = where.shown if isinstance(where, Location) else str(where)

    class _Errors:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind: Any, e: Any, tb: Any) -> None:
            if isinstance(e, sqlite3.OperationalError):
                raise ZooError(f"cannot read registry {shown}: {e}") from None
            if e is not None and _on_server(where) and type(e).__module__.startswith("psycopg"):
                raise server_error(where, e) from None  # type: ignore[arg-type]

    return _Errors()


def _row(r: tuple[Any, ...], tasks: dict[int, list[str]], tags: dict[int, list[str]]) -> dict[str, Any]:
    """A ``list_models`` row from one row of ``_SQL`` and the model's tasks and tags."""
    return {
        "name": r[1], "version": r[2], "ref": f"{r[1]}@{r[2]}", "kind": r[3], "form": r[4],
        "base": f"{r[5]}@{r[6]}" if r[5] is not None else None, "model_type": r[7],
        "parameters": r[8], "bytes": r[9], "tasks": tasks.get(r[0], []), "tags": tags.get(r[0], []),
        "created_at": iso_utc(r[10]),
    }


def _by_model(rows: list[tuple[Any, ...]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for mid, value in rows:
        out.setdefault(mid, []).append(value)
    return out


def list_models(where: Path | Location, kind: str | None = None, base: str | None = None, task: str | None = None,
                tag: str | None = None) -> list[dict[str, Any]]:
    """Registered models ordered by name and version, filtered by kind, base, task and tag."""
    con = _open(where, kind)
    shown = where.shown if isinstance(where, Location) else str(where)
    try:
        with _reading(where):
            # Byte order on both (SQLite's BINARY; PostgreSQL's "C"), whatever the server's locale.
            binary = ' COLLATE "C"' if _on_server(where) else ""
            clause, args = _filters(con, shown, kind, base, task, tag)
            rows = _rows(con, _SQL + clause + f" ORDER BY m.name{binary}, m.version", args)
            tasks = _by_model(_rows(con, _TASKS + binary))
            tags = _by_model(_rows(con, _TAGS + binary))
    finally:
        con.close()
    return [_row(r, tasks, tags) for r in rows]


def relist(con: Any, ids: list[int] | None = None) -> None:
    """Write the ``listing`` line of the models ``ids`` (every model, when None): ``json.dumps``
    of its ``list_models`` row, read through ``con`` (the raw sqlite3 or psycopg connection
    of the write transaction that changed them, so the line is what a listing would build
    after it commits). Every write that changes what ``zoo list`` shows of a model calls this."""
    if ids is not None and not ids:
        return
    binary = "" if isinstance(con, sqlite3.Connection) else ' COLLATE "C"'
    which = "" if ids is None else f" IN ({', '.join('?' * len(ids))})"
    wanted = list(ids or [])
    rows = _rows(con, _SQL + (f" WHERE m.id{which}" if which else ""), wanted)
    tasks = _by_model(_rows(con, _TASKS.replace(" ORDER BY", (f" WHERE mt.model_id{which}" if which else "")
                                               + " ORDER BY") + binary, wanted))
    tags = _by_model(_rows(con, _TAGS.replace(" ORDER BY", (f" WHERE model_id{which}" if which else "")
                                              + " ORDER BY") + binary, wanted))
    lines = [(json.dumps(_row(r, tasks, tags)), r[0]) for r in rows]
    sql = "UPDATE models SET listing = ? WHERE id = ?"
    if isinstance(con, sqlite3.Connection):
        con.executemany(sql, lines)
    else:
        with con.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), lines)


def model_lines(where: Path | Location, kind: str | None = None, base: str | None = None, task: str | None = None,
                tag: str | None = None) -> list[str]:
    """``zoo list --json``'s objects, one JSON line per model: ``json.dumps`` of each
    ``list_models`` row. Each model's line is written with the model (``relist``), so a
    listing of 100,000 models is one scan of ready text on either database."""
    con = _open(where, kind)
    shown = where.shown if isinstance(where, Location) else str(where)
    try:
        with _reading(where):
            binary = ' COLLATE "C"' if _on_server(where) else ""
            if _on_server(where):
                # One backend sorts the lines in memory: no parallel workers, no sort on disk.
                con.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                con.execute("SET LOCAL work_mem = '64MB'")
            clause, args = _filters(con, shown, kind, base, task, tag)
            lines = [r[0] for r in _rows(con, f"SELECT m.listing FROM models m{clause} "
                                              f"ORDER BY m.name{binary}, m.version", args)]
    finally:
        con.close()
    if any(line is None for line in lines):  # not expected: every write keeps the lines
        return [json.dumps(row) for row in list_models(where, kind, base, task, tag)]
    return lines


def _file(where: Path | Location) -> Path:
    return where.file if isinstance(where, Location) and where.file is not None else Path(where)  # type: ignore[arg-type]


def _server_revision(con: Any) -> str | None:
    if con.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:
        return None
    row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def schema_revision(where: Path | Location) -> str | None:
    """The registry's schema revision, read without SQLAlchemy (None if it has none)."""
    if isinstance(where, Location) and where.on_server:
        con = _server_connect(where)
        try:
            return _server_revision(con)
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
