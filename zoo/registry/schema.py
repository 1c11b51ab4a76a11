"""The registry's tables, as SQLAlchemy 2.x ORM classes.

The tables themselves are created and changed only by the versioned migrations in
``zoo/migrations``; these classes must match the latest migration (a test checks).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from zoo.registry.names import KINDS



# Byte and parameter counts pass 2**31 (a 7B model): SQLite's INTEGER is 64-bit already,
# PostgreSQL's is not, so there they are BIGINT (SQLite's table definitions are unchanged).
Count = Integer().with_variant(BigInteger(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Task(Base):
    """A task: its label set and where its evaluation data lives."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    labels: Mapped[list[str] | None] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(Text)
    # The task's data is a blob in the store (a safetensors file of split tensors).
    data_sha256: Mapped[str | None] = mapped_column(String(64))
    data_format: Mapped[str | None] = mapped_column(String(32))
    splits: Mapped[dict[str, int] | None] = mapped_column(JSON)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Model(Base):
    """A registered model: base, expert, adapter, merged or protected."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_models_name_version"),
        CheckConstraint(f"kind IN {KINDS!r}", name="ck_models_kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    base_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    form: Mapped[str] = mapped_column(String(16))  # model | adapter | file

    model_type: Mapped[str | None] = mapped_column(String(64))
    hidden_size: Mapped[int | None] = mapped_column(Integer)
    num_layers: Mapped[int | None] = mapped_column(Integer)
    num_heads: Mapped[int | None] = mapped_column(Integer)
    num_kv_heads: Mapped[int | None] = mapped_column(Integer)
    vocab_size: Mapped[int | None] = mapped_column(Integer)
    architecture: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    tensor_count: Mapped[int] = mapped_column(Integer)
    param_count: Mapped[int] = mapped_column(Count)
    total_bytes: Mapped[int] = mapped_column(Count)
    dtypes: Mapped[dict[str, int]] = mapped_column(JSON)

    source_type: Mapped[str] = mapped_column(String(16))  # local | hub | zoo
    source_path: Mapped[str | None] = mapped_column(Text)
    hub_repo: Mapped[str | None] = mapped_column(String(256))
    hub_revision: Mapped[str | None] = mapped_column(String(64))
    in_place: Mapped[bool] = mapped_column(Boolean, default=False)

    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The model's `zoo list --json` line, rewritten by every write that changes it, so a
    # listing of 100,000 models reads text instead of building it (listing.relist).
    listing: Mapped[str | None] = mapped_column(Text)

    base: Mapped["Model | None"] = relationship(remote_side=[id], foreign_keys=[base_id])
    files: Mapped[list["File"]] = relationship(back_populates="model", cascade="all, delete-orphan",
                                               order_by="File.relpath")
    tags: Mapped[list["ModelTag"]] = relationship(cascade="all, delete-orphan", order_by="ModelTag.tag")
    tasks: Mapped[list[Task]] = relationship(secondary="model_tasks", order_by=Task.name)
    parents: Mapped[list["LineageEdge"]] = relationship(
        foreign_keys="LineageEdge.child_id", cascade="all, delete-orphan", order_by="LineageEdge.position",
        back_populates="child")
    recipe: Mapped["Recipe | None"] = relationship(cascade="all, delete-orphan", uselist=False)
    metrics: Mapped[list["Metric"]] = relationship(cascade="all, delete-orphan", order_by="Metric.id")
    key: Mapped["ProtectionKey | None"] = relationship(cascade="all, delete-orphan", uselist=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ModelTask(Base):
    __tablename__ = "model_tasks"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, index=True)


class ModelTag(Base):
    __tablename__ = "model_tags"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class File(Base):
    """One file of a model, by its path inside a standard Hugging Face folder."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("model_id", "relpath", name="uq_files_model_relpath"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    relpath: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Count)
    # Absolute path for models registered --in-place; NULL when the blob is in the store.
    external_path: Mapped[str | None] = mapped_column(Text)

    model: Mapped[Model] = relationship(back_populates="files")


class LineageEdge(Base):
    """One parent of a merged or protected model. ``parent_ref`` survives a forced removal."""

    __tablename__ = "lineage"

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    parent_ref: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))  # base | expert | source | teacher ...
    position: Mapped[int] = mapped_column(Integer, default=0)

    child: Mapped[Model] = relationship(foreign_keys=[child_id], back_populates="parents")
    parent: Mapped[Model | None] = relationship(foreign_keys=[parent_id])


class Recipe(Base):
    """The full recipe (method and parameters) that made a merged or protected model."""

    __tablename__ = "recipes"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    method: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)


class ProtectionKey(Base):
    """The key that unlocks a protected model (a seed and the algorithm's parameters).

    zoo/ stores it as given; ``protect/`` knows what it means. It is never written into
    the model's files.
    """

    __tablename__ = "protection_keys"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Metric(Base):
    """A score of one model on one task."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    split: Mapped[str | None] = mapped_column(String(32))
    dataset: Mapped[str | None] = mapped_column(String(256))
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    task: Mapped[Task | None] = relationship()


class HubRepo(Base):
    """A repository served by ``zoo serve``: its files live in the registry's blob store."""

    __tablename__ = "hub_repos"
    __table_args__ = (UniqueConstraint("repo_type", "repo_id", name="uq_hub_repos_type_id"),
                      # `ALICE/T1` beside `alice/t1` would collide in clients' caches on
                      # case-insensitive disks
                      Index("uq_hub_repos_type_lower_id", "repo_type", func.lower("repo_id"), unique=True))

    id: Mapped[int] = mapped_column(primary_key=True)
    repo_type: Mapped[str] = mapped_column(String(16))
    repo_id: Mapped[str] = mapped_column(String(256))
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HubCommit(Base):
    """One commit: its parent and its whole file tree (``HubEntry`` rows)."""

    __tablename__ = "hub_commits"

    sha: Mapped[str] = mapped_column(String(40), primary_key=True)
    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), index=True)
    parent_sha: Mapped[str | None] = mapped_column(String(40))
    summary: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    entries: Mapped[list["HubEntry"]] = relationship(cascade="all, delete-orphan", order_by="HubEntry.path")


class HubEntry(Base):
    """A file in a commit's tree: a blob in the store, with its git object id."""

    __tablename__ = "hub_entries"

    commit_sha: Mapped[str] = mapped_column(ForeignKey("hub_commits.sha", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Count)
    git_oid: Mapped[str] = mapped_column(String(40))
    lfs: Mapped[bool] = mapped_column(Boolean, default=False)


class HubRef(Base):
    """A branch or a tag. A commit moves its branch; a tag never moves. Branches and
    tags share one set of names, so a name resolves to one commit."""

    __tablename__ = "hub_refs"

    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    commit_sha: Mapped[str] = mapped_column(ForeignKey("hub_commits.sha"))
    kind: Mapped[str] = mapped_column(String(8), default="branch", server_default="branch")  # branch | tag


class HubAccount(Base):
    """A user or an organisation of ``zoo serve``: a namespace that owns repositories."""

    __tablename__ = "hub_accounts"
    __table_args__ = (CheckConstraint("kind in ('user', 'org')", name="ck_hub_accounts_kind"),
                      Index("uq_hub_accounts_lower_name", func.lower("name"), unique=True))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(96), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HubMember(Base):
    """A user's membership of an organisation."""

    __tablename__ = "hub_members"

    org_pk: Mapped[int] = mapped_column(ForeignKey("hub_accounts.id", ondelete="CASCADE"), primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("hub_accounts.id", ondelete="CASCADE"), primary_key=True,
                                         index=True)


class HubToken(Base):
    """A user's token: only its sha256 is kept. Revoked tokens stay, for the record."""

    __tablename__ = "hub_tokens"
    __table_args__ = (CheckConstraint("scope in ('read', 'write')", name="ck_hub_tokens_scope"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("hub_accounts.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(8))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class HubUpload(Base):
    """An LFS object received for a repository and not yet committed: a commit may name
    it. Kept in the database, so every worker of one server sees the uploads of all."""

    __tablename__ = "hub_uploads"

    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True)
    oid: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
