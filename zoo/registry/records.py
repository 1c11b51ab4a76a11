"""Typed records the registry takes from zoo's own writers. Dicts appear only at the
JSON edge (the CLI's ``--json``, recipes and metadata stored as JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.checkpoints.heads import DEFAULT_HEAD_PATTERNS


@dataclass(frozen=True)
class Measurement:
    """A metric measured while a model was made (e.g. a parity merge's kept round)."""

    metric: str
    value: float
    task: str | None = None
    split: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class NewModel:
    """A model that zoo wrote itself (a merge, a protected or unlocked copy, a pulled
    repository), ready to register: ``folder`` lies in the store's temp area and its
    files move into the store with the sha256s computed while writing them (``digests``).

    ``parents`` are ``(role, ref)`` pairs and ``recipe`` what made the model: both go
    into the lineage. ``artifacts`` belong to the lineage rather than the checkpoint (a
    learned merge's mask). ``key`` is a protected model's key, stored in the same
    transaction, and so are ``metrics``.
    """

    folder: Path
    name: str
    kind: str
    digests: dict[str, str]
    base: str | None = None
    parents: Sequence[tuple[str, str]] = ()
    recipe: dict[str, Any] | None = None
    tasks: Sequence[str] = ()
    tags: Sequence[str] = ()
    metadata: dict[str, Any] | None = None
    head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS
    check_base: bool = False
    artifacts: dict[str, Path] = field(default_factory=dict)
    key: dict[str, Any] | None = None
    metrics: Sequence[Measurement] = ()
    hub_repo: str | None = None
    hub_revision: str | None = None
