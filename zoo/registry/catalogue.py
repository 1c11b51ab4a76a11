"""The model registry: the Python API behind every ``zoo`` command.

A ``Registry`` is a SQLite database (``registry.db`` by default) plus a blob store
beside it (``registry.store/``). Every change to the database happens in one
transaction; files are copied into the store before that transaction starts, so an
interrupted ``add`` leaves no half-registered model.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from zoo.registry import database as db
from zoo.checkpoints.reader import Checkpoint, open_checkpoint
from zoo.registry.resolve import open_model  # noqa: F401 (open_model: re-exported)
from zoo.checkpoints.compat import CompatReport, compare, nonfinite
from zoo.checkpoints.heads import DEFAULT_HEAD_PATTERNS
from zoo.checkpoints.prompts import FORMAT as PROMPTS_FORMAT, is_prompt_file, prompt_splits
from zoo.errors import AlreadyExists, IncompatibleModels, InUse, NotFound, StorageError, ZooError
from zoo.registry.listing import iso_utc, list_models, relist
from zoo.registry.names import KINDS, parse_ref, validate_name
from zoo.registry.paths import Location, existing_registry, locate, missing_folder, registry_path
from zoo.registry.schema import File, HubCommit, HubEntry, HubRepo, LineageEdge, Metric, Model, ModelTag, ProtectionKey, Recipe, Task
from zoo.progress import ProgressFactory, no_progress
from zoo.registry.destination import collect_workspaces
from zoo.registry.records import Measurement, NewModel
from zoo.registry.store import BlobStore, HeldInterrupts, hash_file


def default_path() -> Path:
    """``$ZOO_REGISTRY``, else ``registry.db`` in the working directory."""
    return registry_path()


class Registry:
    """A local model registry. ``create=True`` makes the database if it is missing."""

    def __init__(self, path: str | os.PathLike[str] | Location | None = None, *, create: bool = False,
                 store: str | os.PathLike[str] | None = None):
        self.location = path if isinstance(path, Location) else locate(path, store)
        # The SQLite file, or the server's URL with its password masked (for messages).
        self.path: Path | str = self.location.file if self.location.file is not None else self.location.shown
        if self.location.file is not None and not self.location.file.exists():
            if not create:
                existing_registry(self.location.file)  # raises with the hint
            if not self.location.file.parent.is_dir():
                raise NotFound(f"cannot create a registry at {self.path}: {missing_folder(self.location.file.parent)}")
        if self.location.on_server and create and not self.location.store.parent.is_dir() \
                and self.location.remote is None:
            raise NotFound(f"cannot make the blob store {self.location.store}: "
                           f"{missing_folder(self.location.store.parent)}")
        self.store = _open_store(self.location)
        self.db = db.Database(self.location, self.store, create=create)
        self.engine = self.db.engine
        self.views = self.store.root / "views"

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------
    def _resolve(self, s: Session, ref: str) -> Model:
        name, version = parse_ref(ref)
        q = select(Model).where(Model.name == name)
        q = q.where(Model.version == version) if version is not None else q.order_by(Model.version.desc())
        m = s.scalars(q.limit(1)).first()
        if m is None:
            hint = f" (no version {version})" if version is not None and self._exists(s, name) else ""
            raise NotFound(f"no model named {ref!r} in {self.path}{hint}; `zoo list` shows what is registered")
        return m

    @staticmethod
    def _exists(s: Session, name: str) -> bool:
        return s.scalar(select(func.count()).select_from(Model).where(Model.name == name)) > 0

    def _task(self, s: Session, name: str, create: bool = False) -> Task:
        t = s.scalars(select(Task).where(Task.name == name)).first()
        if t is None:
            if not create:
                raise NotFound(f"no task named {name!r}; `zoo tasks` lists the registered tasks")
            t = Task(name=validate_name(name, "task"))
            s.add(t)
            s.flush()
        return t

    def file_path(self, f: File) -> Path:
        return Path(f.external_path) if f.external_path else self.store.path(f.sha256)

    def model_dir(self, ref: str) -> Path:
        """A standard Hugging Face folder for a registered model, without copying.

        In-place models are their own folder; stored models get a folder of read-only
        symlinks into the store, made once and reused.
        """
        with self.db.read() as s:
            m = self._resolve(s, ref)
            rows = list(m.files)
            key = f"{m.id}-{m.name}@{m.version}"
        files = [(f.relpath, self.file_path(f)) for f in rows]  # outside the session: may download (S3)
        for _, p in files:
            if not p.exists():
                raise StorageError(f"{p} is missing; run `zoo verify {ref}`")
        in_place = [p for _, p in files if not str(p).startswith(str(self.store.root))]
        if files and len(in_place) == len(files) and len({p.parent for p in in_place}) == 1 \
                and all(p.name == rel for rel, p in files):
            return in_place[0].parent
        view = self.views / key
        if view.is_dir():
            return view
        tmp = self.store.temp_path(".view")
        tmp.mkdir(parents=True)
        for rel, p in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, tmp / rel)
        self.views.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, view)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return view

    def checkpoint(self, ref: str) -> Checkpoint:
        """Open a registered model with the checkpoint reader."""
        return open_checkpoint(self.model_dir(ref))

    # -- add -----------------------------------------------------------------------
    def add(
        self,
        path: str | os.PathLike[str],
        name: str,
        kind: str = "expert",
        *,
        base: str | None = None,
        tasks: Sequence[str] = (),
        tags: Sequence[str] = (),
        in_place: bool = False,
        new_version: bool = False,
        metadata: dict[str, Any] | None = None,
        parents: Sequence[tuple[str, str]] = (),
        recipe: dict[str, Any] | None = None,
        head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS,
        progress: ProgressFactory | None = None,
    ) -> dict[str, Any]:
        """Register a checkpoint from disk (``zoo add``). Copies its files into the store
        unless ``in_place``; an expert or adapter is checked against its ``base`` first.
        A model merged elsewhere can bring its lineage: ``parents`` as ``(role, ref)``
        pairs and the ``recipe`` that made it."""
        return self._insert(path, name, kind, base=base, tasks=tasks, tags=tags, in_place=in_place,
                            new_version=new_version, metadata=metadata, parents=parents, recipe=recipe,
                            head_patterns=head_patterns, progress=progress)

    def register(self, new: NewModel, progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Register a model zoo wrote itself (see ``NewModel``): the writers' one door."""
        return self._insert(new.folder, new.name, new.kind, base=new.base, tasks=new.tasks, tags=new.tags,
                            metadata=new.metadata, parents=new.parents, recipe=new.recipe,
                            hub_repo=new.hub_repo, hub_revision=new.hub_revision, head_patterns=new.head_patterns,
                            progress=progress, adopt=new.digests, check_base=new.check_base,
                            artifacts=new.artifacts, key=new.key, metrics=new.metrics)

    def _insert(
        self,
        path: str | os.PathLike[str],
        name: str,
        kind: str,
        *,
        base: str | None,
        tasks: Sequence[str],
        tags: Sequence[str],
        metadata: dict[str, Any] | None,
        head_patterns: tuple[str, ...],
        progress: ProgressFactory | None,
        in_place: bool = False,
        new_version: bool = False,
        parents: Sequence[tuple[str, str]] = (),
        recipe: dict[str, Any] | None = None,
        hub_repo: str | None = None,
        hub_revision: str | None = None,
        adopt: dict[str, str] | None = None,
        check_base: bool = True,
        artifacts: dict[str, Path] | None = None,
        key: dict[str, Any] | None = None,
        metrics: Sequence[Measurement] = (),
    ) -> dict[str, Any]:
        """Register a checkpoint in three phases: read and check, copy into the store
        (outside any transaction, under a shared store lock), then one write transaction.
        ``adopt`` holds the digests of a folder zoo wrote in the store's temp area."""
        validate_name(name)
        if kind not in KINDS:
            raise ZooError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        for t in tasks:
            validate_name(t, "task")
        for t in tags:
            _validate_tag(t)
        progress = progress or no_progress
        ckpt = open_checkpoint(path)
        if ckpt.form == "adapter" and kind != "adapter":
            raise ZooError(f"{path} is a PEFT adapter; register it with --kind adapter")
        if kind == "adapter" and ckpt.form != "adapter":
            raise ZooError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
        if kind in ("expert", "adapter") and base is None:
            raise ZooError(f"an {kind} needs its base model: pass --base NAME")
        if kind == "base" and base is not None:
            raise ZooError("a base model has no base; drop --base or choose another --kind")
        key_id = _key_id(key) if key is not None else None

        # Read phase: names, base and parents must exist; the expert must fit its base.
        with self.db.read() as s:
            if self._exists(s, name) and not new_version:
                raise AlreadyExists(
                    f"a model named {name!r} already exists; choose another --name, "
                    "or pass --new-version to add a new version of it"
                )
            if new_version and self._exists(s, name):
                _same_model(self._resolve(s, name), kind, ckpt.architecture())
            base_ref = self._resolve(s, base).ref if base else None
            parent_refs = [(role, self._resolve(s, r).ref) for role, r in parents]
        if base_ref is not None and check_base:
            report = compare(ckpt, self.checkpoint(base_ref), name, base_ref, head_patterns)
            if not report.ok:
                raise IncompatibleModels(f"{report.one_line()}; run `zoo check {path} --base {base}` for the full list")

        # Copy phase: outside any transaction, under a shared store lock. Ctrl-C is held to
        # safe points (each chunk, and the moment before the blobs are sealed), and blobs are
        # sealed only inside the transaction, so an interrupted add leaves neither a temp
        # file nor a blob that no model uses.
        total = sum(p.stat().st_size for p in ckpt.files.values())
        advance = progress(f"{'hashing' if in_place else 'adding'} {name}", total)
        with self.db.store_lock(exclusive=False), HeldInterrupts() as held, self.store.staging() as staged:
            advance = held.checked(advance)
            self.store.clean_tmp()
            rows = []
            sealing: list[tuple[Path, str, Path]] = []  # (file, sha256, its source), sealed at the commit
            for rel, p in sorted(ckpt.files.items()):
                if in_place:
                    digest, size = hash_file(p, advance)
                    rows.append(File(relpath=rel, sha256=digest, size=size, external_path=str(p.resolve())))
                    continue
                if adopt is not None:
                    digest, size = adopt.get(rel), p.stat().st_size
                    if digest is None:
                        digest, size = hash_file(p, advance)
                    else:
                        advance(size)
                    ready = self.store.prepare(p, digest)  # on object storage: uploaded now, not in the transaction
                    if ready is not p:
                        staged.append(ready)
                    sealing.append((ready, digest, p))
                else:
                    tmp, digest, size = self.store.stage(p, advance)
                    staged.append(tmp)
                    sealing.append((tmp, digest, p))
                rows.append(File(relpath=rel, sha256=digest, size=size))
            if artifacts:
                if recipe is None:
                    raise ZooError("artifacts belong to a recipe; pass one")
                recipe = {**recipe, "artifacts": {}}
                for art, path in sorted(artifacts.items()):
                    tmp, digest, size = self.store.stage(Path(path))
                    staged.append(tmp)
                    sealing.append((tmp, digest, Path(path)))
                    recipe["artifacts"][art] = {"sha256": digest, "size": size, "file": f"{art}{Path(path).suffix}"}
            held.check()

            # Write phase: one transaction; the blobs are sealed just before it commits.
            arch = ckpt.architecture()
            try:
                with self.db.write() as s:
                    latest = s.scalar(select(func.max(Model.version)).where(Model.name == name))
                    if latest is not None and not new_version:
                        raise AlreadyExists(f"a model named {name!r} already exists; choose another --name")
                    m = Model(
                        name=name, version=(latest or 0) + 1, kind=kind, form=ckpt.form,
                        base=self._resolve(s, base_ref) if base_ref else None,
                        model_type=arch.get("model_type"), hidden_size=arch.get("hidden_size"),
                        num_layers=arch.get("num_layers"), num_heads=arch.get("num_heads"),
                        num_kv_heads=arch.get("num_kv_heads"), vocab_size=arch.get("vocab_size"),
                        architecture=arch or None,
                        tensor_count=ckpt.tensor_count, param_count=ckpt.param_count,
                        total_bytes=ckpt.total_bytes, dtypes=ckpt.dtypes,
                        source_type="hub" if hub_repo else ("zoo" if adopt is not None else "local"),
                        source_path=None if hub_repo or adopt is not None else str(Path(path).resolve()),
                        hub_repo=hub_repo, hub_revision=hub_revision, in_place=in_place,
                        meta=_merge_meta(metadata, ckpt),
                    )
                    m.files = rows
                    m.tags = [ModelTag(tag=t) for t in sorted(set(tags))]
                    m.tasks = [self._task(s, t, create=True) for t in dict.fromkeys(tasks)]
                    m.parents = [
                        LineageEdge(parent=self._resolve(s, r), parent_ref=r, role=role, position=i)
                        for i, (role, r) in enumerate(parent_refs)
                    ]
                    if recipe is not None:
                        m.recipe = Recipe(method=str(recipe.get("merge_method") or recipe.get("method") or "?"),
                                          recipe=recipe)
                    if key is not None:
                        m.key = ProtectionKey(key_id=key_id, key=key)
                    m.metrics = [Metric(task=self._task(s, x.task, create=True) if x.task else None,
                                        metric=x.metric, value=float(x.value), split=x.split,
                                        dataset=x.dataset) for x in metrics]
                    s.add(m)
                    s.flush()
                    _relist(s, [m.id])
                    held.check()  # the last moment to back out
                    for file, digest, source in sealing:
                        self.store.seal(file, digest, source)
                    result = _summary(m)
            except IntegrityError:
                raise AlreadyExists(f"a model named {name!r} was added concurrently; choose another --name") from None
        return result

    # -- queries -------------------------------------------------------------------
    def list(self, kind: str | None = None, base: str | None = None, task: str | None = None,
             tag: str | None = None) -> list[dict[str, Any]]:
        """Registered models ordered by name and version, filtered by kind, base, task and tag."""
        return list_models(self.location, kind=kind, base=base, task=task, tag=tag)

    def show(self, ref: str) -> dict[str, Any]:
        """Everything the registry knows about one model."""
        with self.db.read() as s:
            m = self._resolve(s, ref)
            d = _summary(m)
            d.update(
                architecture=m.architecture or {},
                tensors={"count": m.tensor_count, "parameters": m.param_count, "bytes": m.total_bytes,
                         "dtypes": m.dtypes},
                source={"type": m.source_type, "path": m.source_path, "hub_repo": m.hub_repo,
                        "hub_revision": m.hub_revision, "in_place": m.in_place},
                files=[{"path": f.relpath, "sha256": f.sha256, "size": f.size,
                        "location": f.external_path or self.store.where(f.sha256)} for f in m.files],
                parents=[{"role": e.role, "ref": e.parent_ref, "present": e.parent_id is not None}
                         for e in m.parents],
                recipe=m.recipe.recipe if m.recipe else None,
                metrics=[_metric(x) for x in m.metrics],
                dependents=sorted(x.ref for x in self._dependents(s, m)),
                metadata=m.meta or {},
                key_id=m.key.key_id if m.key is not None else None,
            )
            return d

    def artifact(self, ref: str, key: str) -> Path:
        """The stored file of one of a model's lineage artifacts (e.g. ``mask``)."""
        with self.db.read() as s:
            m = self._resolve(s, ref)
            entry = _artifacts(m).get(key)
            if entry is None:
                raise NotFound(f"{m.ref} has no {key!r} artifact")
            p = self.store.path(entry["sha256"])
        if not p.is_file():
            raise StorageError(f"the {key!r} artifact of {ref} is missing from the store ({p})")
        return p

    def attach_artifact(self, ref: str, key: str, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Add a lineage artifact to a model already registered (a data-aware merge's
        statistics of an expert): the file goes into the store, its entry into the
        model's recipe (one with only ``artifacts`` where it had none). A key it already
        has is kept as it is. Returns the entry."""
        with self.db.store_lock(exclusive=False), HeldInterrupts() as held, self.store.staging() as staged:
            tmp, digest, size = self.store.stage(Path(path))
            staged.append(tmp)
            held.check()
            with self.db.write() as s:
                m = self._resolve(s, ref)
                recipe = dict(m.recipe.recipe) if m.recipe else {}
                arts = dict(recipe.get("artifacts") or {})
                if key in arts:
                    return arts[key]
                arts[key] = {"sha256": digest, "size": size, "file": f"{key}{Path(path).suffix}"}
                recipe["artifacts"] = arts
                if m.recipe is not None:
                    m.recipe.recipe = recipe  # a new dict, so the JSON column sees the change
                else:
                    m.recipe = Recipe(method="artifacts", recipe=recipe)
                s.flush()
                held.check()  # the last moment to back out
                self.store.seal(tmp, digest, Path(path))
                return arts[key]

    # -- protection keys -----------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        """Where key files are written by default: ``registry.keys/`` beside a SQLite file,
        ``keys/`` in the store of a registry on a server."""
        return self.location.keys

    def key(self, ref: str) -> dict[str, Any] | None:
        """The key stored for a protected model, or None."""
        with self.db.read() as s:
            m = self._resolve(s, ref)
            return dict(m.key.key) if m.key is not None else None

    def set_key(self, ref: str, key: dict[str, Any], replace: bool = False) -> str:
        """Store a protected model's key (``zoo key import``); returns the model's ref."""
        key_id = _key_id(key)
        with self.db.write() as s:
            m = self._resolve(s, ref)
            if m.kind != "protected":
                raise ZooError(f"{m.ref} is a {m.kind} model; keys belong to protected models")
            if m.key is not None and m.key.key_id != key_id and not replace:
                raise AlreadyExists(f"{m.ref} already has key {m.key.key_id}; pass --replace to store key "
                                    f"{key_id} instead")
            if m.key is None:
                m.key = ProtectionKey(key_id=key_id, key=key)
            else:
                m.key.key_id, m.key.key = key_id, key
            return m.ref

    def lineage(self, ref: str) -> dict[str, Any]:
        """The tree of models this one was made from: merge parents, and each one's base."""
        with self.db.read() as s:
            return self._lineage_node(s, self._resolve(s, ref), role=None, seen=set())

    def _lineage_node(self, s: Session, m: Model, role: str | None, seen: set[int]) -> dict[str, Any]:
        node: dict[str, Any] = {"ref": m.ref, "kind": m.kind, "role": role, "parents": []}
        if m.recipe:
            node["method"] = m.recipe.method
        if m.id in seen:
            return node
        seen = seen | {m.id}
        roles = set()
        for e in m.parents:
            roles.add(e.parent_id)
            if e.parent is None:
                node["parents"].append({"ref": e.parent_ref, "kind": None, "role": e.role, "parents": [],
                                        "removed": True})
            else:
                node["parents"].append(self._lineage_node(s, e.parent, e.role, seen))
        if m.base is not None and m.base_id not in roles:
            node["parents"].append(self._lineage_node(s, m.base, "base", seen))
        return node

    @staticmethod
    def _dependents(s: Session, m: Model) -> list[Model]:
        by_base = s.scalars(select(Model).where(Model.base_id == m.id)).all()
        by_edge = s.scalars(select(Model).join(LineageEdge, LineageEdge.child_id == Model.id)
                            .where(LineageEdge.parent_id == m.id)).all()
        return list({x.id: x for x in [*by_base, *by_edge]}.values())

    # -- compatibility ---------------------------------------------------------------
    def check(self, refs: Sequence[str], base: str | None = None,
              head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS) -> list[CompatReport]:
        """Compare each model (a registry name or a path) with its base, and read every
        value of the model for NaN and infinities.

        The base is ``base`` when given, else each model's registered base.
        """
        if not refs:
            raise ZooError("name at least one model to check")
        base_ckpt = open_model(base, self)[0] if base else None
        reports = []
        for ref in refs:
            ckpt = open_model(ref, self)[0]
            if base_ckpt is not None:
                b, bname = base_ckpt, base
            else:
                if Path(ref).exists() and not self.has(ref):
                    raise ZooError(f"{ref} is a path: say which base to check it against with --base")
                with self.db.read() as s:
                    m = self._resolve(s, ref)
                    if m.base is None:
                        raise ZooError(f"{m.ref} has no registered base; pass --base")
                    bname = m.base.ref
                b = self.checkpoint(bname)
            report = compare(ckpt, b, ref, str(bname), head_patterns)
            report.findings += nonfinite(ckpt)
            reports.append(report)
        return reports

    def has(self, ref: str) -> bool:
        """Whether ``ref`` (NAME or NAME@N) names a registered model."""
        try:
            with self.db.read() as s:
                self._resolve(s, ref)
            return True
        except ZooError:
            return False

    def find_hub(self, repo_id: str, revision: str) -> str | None:
        """The model pulled from ``repo_id`` at commit ``revision``, if there is one."""
        with self.db.read() as s:
            m = s.scalars(select(Model).where(Model.hub_repo == repo_id, Model.hub_revision == revision)
                          .order_by(Model.id).limit(1)).first()
            return m.ref if m is not None else None

    # -- integrity and export ------------------------------------------------------
    def verify(self, ref: str | None = None, progress: ProgressFactory | None = None) -> list[dict[str, Any]]:
        """Re-hash files (and lineage artifacts) and report every one that changed or went missing.

        Without ``ref``, the files of the repositories ``zoo serve`` serves are checked
        too; their problems name the repository (``hub:namespace/name``)."""
        progress = progress or no_progress
        with self.db.read() as s:
            models = [self._resolve(s, ref)] if ref else s.scalars(
                select(Model).options(selectinload(Model.files)).order_by(Model.name, Model.version)).all()
            # Where each file is: its own path (registered in place), else None (the store's blob).
            items: list[tuple[str, str, str, int, Path | None]] = [
                (m.ref, f.relpath, f.sha256, f.size, Path(f.external_path) if f.external_path else None)
                for m in models for f in m.files]
            for m in models:  # lineage artifacts (a learned merge's mask) are checked too
                for key, a in _artifacts(m).items():
                    items.append((m.ref, f"artifact:{key}", a["sha256"], a["size"], None))
            if ref is None:
                served = s.execute(select(HubRepo.repo_id, HubEntry.path, HubEntry.sha256, HubEntry.size)
                                   .join(HubCommit, HubCommit.sha == HubEntry.commit_sha)
                                   .join(HubRepo, HubRepo.id == HubCommit.repo_pk).distinct()
                                   .order_by(HubRepo.repo_id, HubEntry.path)).all()
                items += [(f"hub:{repo}", path, digest, size, None) for repo, path, digest, size in served]
        total = sum({p or digest: size for _, _, digest, size, p in items}.values())
        advance = progress("verifying", total)
        seen: dict[Path | str, str | None] = {}
        problems = []
        for mref, rel, digest, size, p in items:
            where = p if p is not None else digest
            if where not in seen:
                if p is None:
                    seen[where] = self.store.rehash(digest, advance)
                else:
                    seen[where] = hash_file(p, advance)[0] if p.is_file() else None
            actual = seen[where]
            shown = str(p) if p is not None else self.store.where(digest)
            if actual is None:
                problems.append({"model": mref, "file": rel, "path": shown, "problem": "missing"})
            elif actual != digest:
                problems.append({"model": mref, "file": rel, "path": shown, "problem": "changed",
                                 "expected": digest, "actual": actual})
        return problems

    def export(self, ref: str, dest: str | os.PathLike[str], progress: ProgressFactory | None = None) -> Path:
        """Rebuild the model's standard Hugging Face folder at ``dest`` (which must not exist)."""
        dest = Path(dest).absolute()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ZooError(f"{dest} already exists and is not empty; choose a new folder")
        if not dest.parent.is_dir():
            raise ZooError(f"{missing_folder(dest.parent)}; choose a new folder in an existing one")
        with self.db.read() as s:
            m = self._resolve(s, ref)
            rows = list(m.files)
        files = [(f.relpath, self.file_path(f), f.size) for f in rows]
        advance = (progress or no_progress)(f"exporting {ref}", sum(sz for *_, sz in files))
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
        except OSError as e:
            raise StorageError(f"cannot write to {dest.parent}: {e.strerror or e}; choose another folder") from None
        try:
            for rel, p, size in files:
                if not p.is_file():
                    raise StorageError(f"{p} is missing; run `zoo verify {ref}`")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / rel)
                os.chmod(tmp / rel, 0o644)
                advance(size)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"cannot export to {dest}: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    # -- changes ---------------------------------------------------------------------
    def tag(self, ref: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        """Add and remove tags; returns the model's tags afterwards."""
        add, remove = list(add), list(remove)
        for t in add:
            _validate_tag(t)
        with self.db.write() as s:
            m = self._resolve(s, ref)
            have = {t.tag for t in m.tags}
            m.tags = [ModelTag(tag=t) for t in sorted((have | set(add)) - set(remove))]
            s.flush()
            _relist(s, [m.id])
            return [t.tag for t in m.tags]

    def remove(self, ref: str, force: bool = False) -> dict[str, Any]:
        """Remove a model and the blobs no other model uses.

        Refuses while other models depend on it (as their base or merge parent)
        unless ``force``; then those models keep their lineage by name.
        """
        with self.db.store_lock(exclusive=True):
            with self.db.write() as s:
                m = self._resolve(s, ref)
                deps = self._dependents(s, m)
                if deps and not force:
                    names = ", ".join(sorted(d.ref for d in deps)[:5])
                    raise InUse(f"{m.ref} is used by {len(deps)} model(s) ({names}); remove them first, or pass --force")
                own_artifacts = {a["sha256"] for a in _artifacts(m).values()}
                digests = {f.sha256 for f in m.files if not f.external_path} | own_artifacts
                removed = m.ref
                key = f"{m.id}-{m.name}@{m.version}"
                based = list(s.scalars(select(Model.id).where(Model.base_id == m.id)))  # their base goes
                s.delete(m)
                s.flush()
                _relist(s, based)
                still = self._in_use(s, digests, artifacts=bool(own_artifacts))
            for d in digests - still:
                self.store.remove(d)
            shutil.rmtree(self.views / key, ignore_errors=True)
        return {"removed": removed, "blobs_freed": len(digests - still), "dependents": sorted(d.ref for d in deps)}

    @staticmethod
    def _in_use(s: Session, digests: set[str] | None = None, artifacts: bool = True) -> set[str]:
        """The blobs among ``digests`` (every one, when None) that something uses: a
        model's files, a task's data, a served repository's commits, or (with
        ``artifacts``) a recipe's lineage artifacts."""
        used: set[str] = set()
        for col in (File.sha256, Task.data_sha256, HubEntry.sha256):
            q = select(col).where(col.is_not(None))
            used |= set(s.scalars(q.where(col.in_(digests)) if digests is not None else q.distinct()).all())
        if artifacts:
            for recipe in s.scalars(select(Recipe.recipe)):
                used |= {a["sha256"] for a in ((recipe or {}).get("artifacts") or {}).values()}
        return used if digests is None else used & digests

    def collect(self, older_than: float = 2 * 3600) -> dict[str, Any]:
        """Remove the store's blobs that nothing uses — uploads to ``zoo serve`` that were
        never committed, a commit refused after its upload — once they are older than
        ``older_than`` seconds (a younger one may still be on its way into a commit).

        Runs under the store's exclusive lock, so no add or commit is between copying a
        blob and recording it.
        """
        if not older_than >= 0:
            raise ZooError(f"--older-than {older_than:g} is not an age; give seconds, 0 or more")
        cutoff = time.time() - older_than
        removed, freed = 0, 0
        with self.db.store_lock(exclusive=True):
            self.store.clean_tmp()
            with self.db.read() as s:
                used = self._in_use(s)
            for d in sorted(self.store.all_digests() - used):
                info = self.store.info(d)
                if info is None:
                    continue
                size, stored_at = info
                if stored_at <= cutoff:
                    self.store.remove(d)
                    removed, freed = removed + 1, freed + size
            folders, folder_bytes = collect_workspaces(self.store.root)
            temporary, temporary_bytes = self.store.collect_temporary(cutoff)
        result = {"blobs_removed": removed, "folders_removed": folders,
                  "bytes_freed": freed + folder_bytes + temporary_bytes}
        if self.store.remote is not None:  # the object store's leftovers: temporary keys, unfinished uploads
            result["temporary_removed"] = temporary
        return result

    # -- tasks and metrics -----------------------------------------------------------
    def add_task(self, name: str, labels: Sequence[str] | None = None, data: str | os.PathLike[str] | None = None,
                 *, data_format: str | None = None, splits: dict[str, int] | None = None,
                 description: str | None = None, metadata: dict[str, Any] | None = None,
                 replace: bool = False) -> dict[str, Any]:
        """Register a task, its label set and its data file (copied into the store).

        The data is a zoo task file (safetensors: inputs and labels per split) or, for a
        generative task, a JSONL file of prompts with optional answers
        (``zoo.checkpoints.prompts``), checked line by line before anything is stored."""
        validate_name(name, "task")
        digest = None
        if data is not None and Path(data).is_file() and is_prompt_file(Path(data)):
            splits = splits or prompt_splits(Path(data))
            data_format = data_format or PROMPTS_FORMAT
        with self.db.store_lock(exclusive=False):
            if data is not None:
                if not Path(data).is_file():
                    raise NotFound(f"task data {data} does not exist")
                digest, _ = self.store.ingest(Path(data))
            with self.db.write() as s:
                t = s.scalars(select(Task).where(Task.name == name)).first()
                if t is None:
                    t = Task(name=name)
                    s.add(t)
                elif t.data_sha256 and not replace and (digest != t.data_sha256 or list(labels or []) != t.labels):
                    raise AlreadyExists(f"task {name!r} already exists with other data; pass replace=True")
                t.labels = list(labels) if labels is not None else t.labels
                t.data_sha256 = digest or t.data_sha256
                t.data_format = data_format or t.data_format
                t.splits = splits or t.splits
                t.description = description or t.description
                t.meta = metadata or t.meta
                s.flush()
                return _task(t)

    def tasks(self) -> list[dict[str, Any]]:
        with self.db.read() as s:
            return [_task(t) for t in s.scalars(select(Task).order_by(Task.name))]

    def task(self, name: str) -> dict[str, Any]:
        with self.db.read() as s:
            return _task(self._task(s, name))

    def task_data(self, name: str) -> Path:
        """The path of a task's data file in the store."""
        with self.db.read() as s:
            t = self._task(s, name)
            if not t.data_sha256:
                raise NotFound(f"task {name!r} has no data registered")
            p = self.store.path(t.data_sha256)
        if not p.is_file():
            raise StorageError(f"data of task {name!r} is missing from the store ({p})")
        return p

    def record_metric(self, ref: str, task: str | None, metric: str, value: float, *,
                      split: str | None = None, dataset: str | None = None) -> dict[str, Any]:
        with self.db.write() as s:
            m = self._resolve(s, ref)
            row = Metric(model_id=m.id, task=self._task(s, task) if task else None, metric=metric,
                         value=float(value), split=split, dataset=dataset)
            s.add(row)
            s.flush()
            return _metric(row)

    def metrics(self, ref: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        """Recorded metrics, oldest first, with the model they belong to."""
        with self.db.read() as s:
            q = select(Metric, Model).join(Model, Metric.model_id == Model.id).order_by(Metric.id)
            if ref:
                q = q.where(Metric.model_id == self._resolve(s, ref).id)
            if task:
                q = q.where(Metric.task.has(Task.name == task))
            return [{"model": m.ref, **_metric(x)} for x, m in s.execute(q)]


def _relist(s: Session, ids: list[int]) -> None:
    """Rewrite these models' ``zoo list --json`` lines inside the write transaction ``s``."""
    relist(s.connection().connection.dbapi_connection, ids)


def _open_store(location: Location) -> BlobStore:
    """The blob store of ``location``: a folder, or a bucket on object storage (boto3 is
    imported only then)."""
    if location.remote is None:
        return BlobStore(location.store)
    from zoo.registry.objectstore import S3BlobStore

    return S3BlobStore(location.remote, location.store)


def _key_id(key: dict[str, Any]) -> str:
    if "key_id" not in key:
        raise ZooError("a protection key needs its key_id")
    return str(key["key_id"])


def _same_model(previous: Model, kind: str, arch: dict[str, Any]) -> None:
    """A new version replaces the model it versions: same kind and architecture."""
    if previous.kind != kind:
        raise ZooError(f"{previous.ref} is a {previous.kind} model; a new version must be one too (got {kind}); "
                       "register it under another --name")
    before, now = previous.model_type, arch.get("model_type")
    if before and now and before != now:
        raise IncompatibleModels(f"{previous.ref} is a {before} model; a new version must be the same architecture "
                                 f"(got {now}); register it under another --name")


def _validate_tag(tag: str) -> None:
    if not tag or len(tag) > 128 or any(ord(c) < 32 for c in tag):
        raise ZooError(f"bad tag {tag!r}: use up to 128 printable characters")


def _merge_meta(meta: dict[str, Any] | None, ckpt: Checkpoint) -> dict[str, Any] | None:
    out = dict(meta or {})
    if ckpt.form == "adapter" and ckpt.config:
        out.setdefault("adapter", {k: ckpt.config.get(k) for k in
                                   ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
                                   if k in ckpt.config})
    return out or None


def _artifacts(m: Model) -> dict[str, dict[str, Any]]:
    """A model's lineage artifacts, by key, as its recipe lists them."""
    return ((m.recipe.recipe if m.recipe else None) or {}).get("artifacts") or {}


def _summary(m: Model) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "ref": m.ref,
        "kind": m.kind,
        "form": m.form,
        "base": m.base.ref if m.base is not None else None,
        "model_type": m.model_type,
        "parameters": m.param_count,
        "bytes": m.total_bytes,
        "tasks": [t.name for t in m.tasks],
        "tags": [t.tag for t in m.tags],
        "created_at": iso_utc(m.created_at),
    }


def _metric(x: Metric) -> dict[str, Any]:
    return {"task": x.task.name if x.task else None, "metric": x.metric, "value": x.value, "split": x.split,
            "dataset": x.dataset, "measured_at": iso_utc(x.measured_at)}


def _task(t: Task) -> dict[str, Any]:
    return {"name": t.name, "labels": t.labels, "description": t.description, "data_sha256": t.data_sha256,
            "data_format": t.data_format, "splits": t.splits, "metadata": t.meta or {}}


__all__ = ["Registry", "default_path", "open_model"]
