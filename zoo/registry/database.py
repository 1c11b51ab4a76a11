"""The registry database: SQLite in WAL mode, opened through SQLAlchemy.

Writes take the database lock at the start of their transaction (``BEGIN IMMEDIATE``),
so two processes adding models at once queue on the busy timeout instead of failing
with a lock upgrade error. The schema is brought up to date by Alembic on open.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from zoo.errors import ZooError
from zoo.registry.paths import not_a_registry, on_read_only_storage
from zoo.registry.store import BlobStore
from zoo.registry.migrations import SCHEMA_HEAD

BUSY_TIMEOUT_MS = 60_000


def make_engine(path: Path) -> Engine:
    """An engine for the registry at ``path``; on read-only storage it opens the file
    read-only and immutable (reads work; a write fails with one line)."""
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


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except OperationalError:
            return None


def upgrade(engine: Engine, path: Path) -> None:
    """Bring the schema to ``SCHEMA_HEAD``, running Alembic only when needed."""
    current = _current_revision(engine)
    if current == SCHEMA_HEAD:
        return
    if on_read_only_storage(path):
        raise ZooError(f"{path} is on read-only storage and its schema ({current}) is older than this zoo's; "
                       "upgrade a writable copy first")
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from filelock import FileLock

    cfg = Config()
    cfg.set_main_option("script_location", "zoo.registry:migrations")
    known = {r.revision for r in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current is not None and current not in known:
        raise ZooError(f"{path} was written by a newer zoo (schema {current}); upgrade zoo to use it")
    with FileLock(str(path) + ".lock"):
        from alembic import command

        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()


def upgrade_file(path: Path) -> None:
    """Bring the registry database at ``path`` up to date (``zoo list`` on an old file)."""
    engine = make_engine(path)
    try:
        upgrade(engine, path)
    except OperationalError as e:
        raise ZooError(f"cannot open registry {path}: {e.orig}") from None
    except DatabaseError as e:
        raise not_a_registry(path, e.orig) from None
    finally:
        engine.dispose()


class Database:
    """The doors into a registry's database and store that the layers above use: a read
    session, one write transaction, and the store lock. Opening it brings the schema up
    to date."""

    def __init__(self, path: Path, store: BlobStore):
        self.path = path
        self.store = store
        self.engine = make_engine(path)
        try:
            upgrade(self.engine, path)
        except OperationalError as e:
            raise ZooError(f"cannot open registry {path}: {e.orig}") from None
        except DatabaseError as e:
            raise not_a_registry(path, e.orig) from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (no write lock)."""
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, holding SQLite's write lock from its first statement."""
        try:
            with Session(self.engine.execution_options(zoo_write=True), expire_on_commit=False) as s:
                with s.begin():
                    yield s
        except OperationalError as e:
            raise ZooError(f"registry {self.path} is busy or unwritable: {e.orig}") from None

    @contextmanager
    def store_lock(self, exclusive: bool) -> Iterator[None]:
        """Adds share the store; removing blobs excludes them, so a blob never vanishes
        between its copy and the commit that references it."""
        self.store.ensure()
        fd = os.open(self.store.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)
