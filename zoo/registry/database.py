"""The registry database, opened through SQLAlchemy: a SQLite file in WAL mode, or a
database on a PostgreSQL server.

Writes are serialised on both. On SQLite a write takes the database lock at the start of
its transaction (``BEGIN IMMEDIATE``), so two processes adding models at once queue on
the busy timeout instead of failing with a lock upgrade error. On PostgreSQL a write
takes a transaction-level advisory lock (``pg_advisory_xact_lock``), released by its
commit or rollback; reads never wait for it (MVCC). The store lock is ``flock`` on a
file in the store for SQLite, a session-level advisory lock on PostgreSQL, and Alembic
runs under a file lock or an advisory lock likewise. The schema is brought up to date by
Alembic on open.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from zoo.errors import NotFound, ZooError
from zoo.registry.paths import Location, mask_secret, not_a_registry, on_read_only_storage, server_error
from zoo.registry.store import BlobStore
from zoo.registry.migrations import SCHEMA_HEAD

BUSY_TIMEOUT_MS = 60_000
# Advisory lock keys (one 64-bit key space per PostgreSQL database): "zoo" and a role.
WRITE_LOCK = 0x7A6F6F_0001
STORE_LOCK = 0x7A6F6F_0002
MIGRATE_LOCK = 0x7A6F6F_0003
CONNECT_TIMEOUT_S = 10


def make_engine(where: Path | Location) -> Engine:
    """An engine for a registry. A SQLite file on read-only storage opens read-only and
    immutable (reads work; a write fails with one line)."""
    if isinstance(where, Location) and where.on_server:
        return _server_engine(where)
    path = where.file if isinstance(where, Location) else where
    assert path is not None
    read_only = on_read_only_storage(path)
    url = f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true" if read_only else f"sqlite:///{path}"
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not read_only:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("zoo_write") else "BEGIN")

    return engine


def _server_engine(loc: Location) -> Engine:
    """PostgreSQL through psycopg 3. Sessions run in UTC, so timestamps read back as the
    registry wrote them; a write transaction first takes the write lock."""
    assert loc.url is not None
    url = "postgresql+psycopg://" + loc.url.split("://", 1)[1]
    # A store lock and a write transaction each hold a connection, and `zoo serve` runs
    # many requests at once: room for them, bounded well below the server's 100.
    engine = create_engine(url, pool_pre_ping=True, pool_size=15, max_overflow=15, pool_timeout=60,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c timezone=UTC",
                                         "application_name": "zoo"})

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        if conn.get_execution_options().get("zoo_write"):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    return engine


def connection_error(loc: Location | Path, e: Exception) -> ZooError:
    """One line for a database that cannot be reached or used, password masked."""
    orig = getattr(e, "orig", None) or e
    if isinstance(loc, Location) and loc.on_server:
        return server_error(loc, orig)
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return ZooError(f"cannot open registry {loc.file if isinstance(loc, Location) else loc}: "
                    f"{lines[0] if lines else type(orig).__name__}")


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
                return None
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError):
            return None


def has_schema(engine: Engine) -> bool:
    """True when the database holds a zoo registry (an Alembic version table)."""
    return _current_revision(engine) is not None


def upgrade(engine: Engine, where: Path | Location) -> None:
    """Bring the schema to ``SCHEMA_HEAD``, running Alembic only when needed."""
    loc = where if isinstance(where, Location) else None
    path = where.file if isinstance(where, Location) else where
    shown = where.shown if isinstance(where, Location) else str(where)
    current = _current_revision(engine)
    if current == SCHEMA_HEAD:
        return
    if path is not None and on_read_only_storage(path):
        raise ZooError(f"{path} is on read-only storage and its schema ({current}) is older than this zoo's; "
                       "upgrade a writable copy first")
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", "zoo.registry:migrations")
    known = {r.revision for r in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current is not None and current not in known:
        raise ZooError(f"{shown} was written by a newer zoo (schema {current}); upgrade zoo to use it")
    from alembic import command

    if loc is not None and loc.on_server:
        # The advisory lock is the server's counterpart of the file lock: one migrator at a time.
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATE_LOCK})")
            try:
                conn.commit()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATE_LOCK})")
                conn.commit()
        return
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()


def upgrade_file(where: Path | Location) -> None:
    """Bring the registry database at ``where`` up to date (``zoo list`` on an old file)."""
    engine = make_engine(where)
    try:
        upgrade(engine, where)
    except (OperationalError, InterfaceError) as e:
        raise connection_error(where, e) from None
    except DatabaseError as e:
        if isinstance(where, Location) and where.on_server:
            raise connection_error(where, e) from None
        raise not_a_registry(where.file if isinstance(where, Location) else where, e.orig) from None
    finally:
        engine.dispose()


class Database:
    """The doors into a registry's database and store that the layers above use: a read
    session, one write transaction, and the store lock. Opening it brings the schema up
    to date; ``create=False`` on a server refuses a database that holds no registry."""

    def __init__(self, where: Path | Location, store: BlobStore, *, create: bool = True):
        self.location = where if isinstance(where, Location) else None
        self.on_server = self.location is not None and self.location.on_server
        self.path = where.shown if isinstance(where, Location) and where.on_server else (
            where.file if isinstance(where, Location) else where)
        self.store = store
        self.engine = make_engine(where)
        try:
            if self.on_server and not create and not has_schema(self.engine):
                raise NotFound(f"no registry in {self.path}; create one with `zoo init`")
            upgrade(self.engine, where)
        except (OperationalError, InterfaceError) as e:
            self.engine.dispose()
            raise connection_error(where, e) from None
        except DatabaseError as e:
            self.engine.dispose()
            if self.on_server:
                raise connection_error(where, e) from None
            raise not_a_registry(Path(self.path), e.orig) from None
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (no write lock)."""
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, holding the registry's write lock from its first statement."""
        try:
            with Session(self.engine.execution_options(zoo_write=True), expire_on_commit=False) as s:
                with s.begin():
                    yield s
        except OperationalError as e:
            reason = mask_secret(str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__,
                                 self.location.url if self.location else None)
            raise ZooError(f"registry {self.path} is busy or unwritable: {reason}") from None

    @contextmanager
    def store_lock(self, exclusive: bool) -> Iterator[None]:
        """Adds share the store; removing blobs excludes them, so a blob never vanishes
        between its copy and the commit that references it."""
        self.store.ensure()
        if self.on_server:
            with self._advisory(STORE_LOCK, exclusive):
                yield
            return
        fd = os.open(self.store.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _advisory(self, key: int, exclusive: bool) -> Iterator[None]:
        """A session-level advisory lock held on its own connection for the block: the
        server releases it if this process dies, as the kernel does a flock."""
        how = "" if exclusive else "_shared"
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock{how}({key})")
            conn.commit()
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock{how}({key})")
                conn.commit()
