"""``zoo registry copy``: a whole registry, rows and blobs, into an empty one elsewhere
(SQLite to PostgreSQL and back), verified, all or nothing.

The source is read under its store's shared lock and in one snapshot, so no blob it
names can vanish and no half-made change is seen. Every blob is copied into the
destination store's temp folder and hashed as it goes (a blob whose bytes no longer
match its name stops the copy). The rows then go in one write transaction on the
destination; before it commits, every table's row count is compared with the source's
and the blobs are sealed into place. Anything that fails rolls the rows back and removes
the blobs this copy put there, and a destination file this copy made is removed too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, MetaData, Table, Text, cast, func, select, text
from sqlalchemy.types import TypeDecorator

from zoo.errors import AlreadyExists, StorageError, ZooError
from zoo.progress import ProgressFactory, no_progress
from zoo.registry.catalogue import Registry
from zoo.registry.listing import discard_if_unused, relist
from zoo.registry.paths import Location
from zoo.registry.schema import Base
from zoo.registry.store import HeldInterrupts

BATCH = 5000  # rows per INSERT round trip


@dataclass
class CopyReport:
    """What a copy moved: rows per table, and blobs with their bytes (all verified)."""

    source: str
    destination: str
    rows: dict[str, int] = field(default_factory=dict)
    blobs: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "rows": self.rows,
                "models": self.rows.get("models", 0), "blobs": self.blobs, "bytes": self.bytes, "verified": True}


def _tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)  # parents before children


class _RawJSON(TypeDecorator[str]):
    """A JSON column's text as stored, passed through untouched: a SQL NULL and a JSON
    ``null`` both read back as None through the JSON type, so the copy moves the text."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None

    def result_processor(self, dialect: Any, coltype: Any) -> None:
        return None


def _raw(t: Table) -> tuple[Any, Table]:
    """The select that reads ``t``'s rows with JSON as text, and a twin of ``t`` that
    writes them so."""
    twin = Table(t.name, MetaData(), *(Column(c.name, _RawJSON() if isinstance(c.type, JSON) else c.type)
                                       for c in t.columns))
    cols = [cast(c, Text).label(c.name) if isinstance(c.type, JSON) else c for c in t.columns]
    return select(*cols).order_by(*_order(t)), twin


def _order(t: Table) -> list[Any]:
    return list(t.primary_key.columns)  # models by id: a base is always older than its experts


def _counts(conn: Any) -> dict[str, int]:
    return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in _tables()}


def copy_registry(source: Location, destination: Location, progress: ProgressFactory | None = None) -> CopyReport:
    """Copy the registry at ``source`` into ``destination``, which must be empty or new."""
    if (source.file, source.url) == (destination.file, destination.url):
        raise ZooError(f"{source.shown} is both the source and the destination; name another destination")
    if source.store.resolve() == destination.store.resolve() or (
            source.remote is not None and source.remote == destination.remote):
        shared = source.remote if source.remote is not None and source.remote == destination.remote \
            else source.store
        raise ZooError(f"the source and the destination share the store {shared}; give the destination "
                       "its own (--to-store)")
    progress = progress or no_progress
    made_file = destination.file is not None and not destination.file.exists()
    src = Registry(source)
    try:
        dst = Registry(destination, create=True)
    except BaseException:
        src.close()
        raise
    report = CopyReport(source.shown, destination.shown)
    try:
        with dst.db.store_lock(exclusive=True), src.db.store_lock(exclusive=False):
            _check_empty(dst)
            _copy(src, dst, report, progress)
    except BaseException:
        dst.close()
        src.close()
        if made_file:
            discard_if_unused(destination)
        raise
    dst.close()
    src.close()
    return report


def _check_empty(dst: Registry) -> None:
    with dst.engine.connect() as conn:
        used = {name: n for name, n in _counts(conn).items() if n}
    if used or dst.store.all_digests():
        what = ", ".join(f"{n} {name}" for name, n in sorted(used.items())) or "blobs in its store"
        raise AlreadyExists(f"{dst.location.shown} is not empty ({what}); copy into a new or empty registry")


def _copy(src: Registry, dst: Registry, report: CopyReport, progress: ProgressFactory) -> None:
    read = src.engine.execution_options(isolation_level="REPEATABLE READ") if src.db.on_server else src.engine
    with read.connect() as sconn, HeldInterrupts() as held:
        with sconn.begin():  # one snapshot of the source for the rows and the blob list
            counts = _counts(sconn)
            digests = sorted(src.store.all_digests())
            sizes = {d: src.store.size(d) for d in digests}
            advance = held.checked(progress("copying blobs", sum(sizes.values())))
            staged: list[tuple[Path, str]] = []
            sealed: list[str] = []
            try:
                for d in digests:
                    tmp, digest, size = dst.store.stage(src.store.path(d), advance)
                    staged.append((tmp, d))
                    if digest != d:
                        raise StorageError(f"blob {d} in {src.store.shown} does not match its hash (it reads as "
                                           f"{digest}); run `zoo verify` on the source and repair it first")
                    report.blobs, report.bytes = report.blobs + 1, report.bytes + size
                with dst.db.write() as s:
                    dconn = s.connection()
                    for t in _tables():
                        query, twin = _raw(t)
                        result = sconn.execute(query)
                        while batch := result.fetchmany(BATCH):
                            held.check()
                            dconn.execute(twin.insert(), [dict(r._mapping) for r in batch])
                    if dst.db.on_server:
                        _reset_sequences(dconn)
                    # each listing line is remade by the destination's database: the two
                    # engines format some values (a timestamp's zero microseconds) differently
                    relist(dconn.connection.dbapi_connection)
                    copied = _counts(dconn)
                    if copied != counts:
                        bad = {k: (counts[k], copied.get(k)) for k in counts if copied.get(k) != counts[k]}
                        raise StorageError(f"row counts differ after the copy ({bad}); nothing was kept")
                    report.rows = counts
                    held.check()  # the last moment to back out
                    for tmp, d in staged:
                        dst.store.seal(tmp, d, tmp)
                        sealed.append(d)
                    staged.clear()
                    on_disk = {d: dst.store.size(d) for d in digests}
                    if on_disk != sizes:
                        raise StorageError("the blobs in the destination store differ from the source's; "
                                           "nothing was kept")
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                for d in sealed:
                    dst.store.remove(d)
                raise


def _reset_sequences(conn: Any) -> None:
    """Rows came with their ids; PostgreSQL's id sequences must continue after them."""
    for t in _tables():
        pk = list(t.primary_key.columns)
        if len(pk) == 1 and pk[0].autoincrement in (True, "auto") and pk[0].type.python_type is int \
                and not pk[0].foreign_keys:
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{t.name}', '{pk[0].name}'), "
                              f"COALESCE((SELECT MAX({pk[0].name}) FROM {t.name}), 0) + 1, false)"))


__all__ = ["CopyReport", "copy_registry"]
