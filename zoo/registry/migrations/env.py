"""Alembic environment: runs on the connection the registry hands over."""

from alembic import context
from sqlalchemy import create_engine

from zoo.registry.schema import Base

target_metadata = Base.metadata


def _run(connection) -> None:
    # Batch mode lets later revisions alter SQLite tables (copy-and-move).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _run(conn)
else:
    _run(connection)
