"""Publishing a registered model to a Hub, protected by default.

This is where protection and transport meet: ``zoo/`` moves bytes and knows nothing
of MergeLock, ``protect/`` locks weights and knows nothing of Hubs. ``publish`` makes
the rule: an expert or a merge leaves the machine MergeLock-protected (protected
first, or an existing protected copy of that exact version reused) unless the caller
says ``protect_weights=False``. The key stays in the registry; only the model's files
and a model card built from the registry are uploaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from zoo.registry.card import hub_card
from zoo.errors import ZooError
from zoo.hub.client import check_push, push_folder
from zoo.hub.names import check_repo_id
from zoo.progress import ProgressFactory, no_progress
from zoo.registry import Registry

from zoo.protect.run import protect

PROTECTABLE = ("expert", "merged")


def protected_copy(registry: Registry, ref: str) -> str | None:
    """A protected model already made from exactly ``ref`` (that version), if any."""
    model = registry.show(ref)
    for dep in model["dependents"]:
        d = registry.show(dep)
        if d["kind"] == "protected" and any(p["role"] == "source" and p["ref"] == model["ref"] for p in d["parents"]):
            return d["ref"]
    return None


def _protect_for_push(registry: Registry, ref: str, progress: ProgressFactory, seed: int | None,
                      max_cond: float | None) -> tuple[str, bool]:
    """The protected model to push for ``ref``: (its ref, whether it was made now)."""
    have = protected_copy(registry, ref)
    if have is not None:
        return have, False
    model = registry.show(ref)
    name = f"{model['name']}-locked"
    if registry.has(name):
        name = f"{model['name']}-v{model['version']}-locked"
    try:
        out = protect(model["ref"], name, registry=registry, seed=seed, max_cond=max_cond, verify=True,
                      progress=progress)
    except ZooError as e:
        raise ZooError(f"cannot protect {model['ref']} before pushing it ({e}); pass --no-protect to push its "
                       "weights unprotected") from None
    return out["ref"], True


def stage(registry: Registry, ref: str, card: str) -> Path:
    """A folder of the model's files (links into the store) and its card, in the store's temp area."""
    folder = registry.store.temp_path(".push")
    folder.mkdir(parents=True)
    for f in registry.show(ref)["files"]:
        if f["path"] == "README.md":
            continue
        dest = folder / f["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f["location"], dest)
    tmp = folder / ".README.md.tmp"
    tmp.write_text(card)
    os.replace(tmp, folder / "README.md")
    return folder


def publish(
    registry: Registry,
    ref: str,
    repo_id: str,
    *,
    protect_weights: bool = True,
    private: bool = False,
    branch: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    protect_seed: int | None = None,
    protect_max_cond: float | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """Push ``ref`` to ``repo_id`` in one commit; experts and merges protected first.

    The token's right to push to ``repo_id`` is checked before anything is protected.
    Returns the push's commit, with ``pushed`` (the ref whose files went up) and
    ``protected_now`` when protection made a new registered model. An expert or a
    merge is pushed unprotected only with ``protect_weights=False``. ``protect_seed``
    and ``protect_max_cond`` are the protection's key seed and condition bound
    (``zoo.protect.protect``'s ``seed`` and ``max_cond``), used only when a protected
    copy is made now.
    """
    check_repo_id(repo_id)  # before protecting: a push that cannot go anywhere leaves nothing behind
    if not protect_weights and (protect_seed is not None or protect_max_cond is not None):
        raise ZooError("--seed and --max-cond set the key of the protection made at push, and --no-protect "
                       "makes none; drop one or the other")
    model = registry.show(ref)
    # who may push where is asked first: a refused push protects nothing and leaves nothing
    check_push(repo_id, endpoint=endpoint, token=token)
    pushed, made = model["ref"], False
    if model["kind"] in PROTECTABLE and protect_weights:
        pushed, made = _protect_for_push(registry, model["ref"], progress, protect_seed, protect_max_cond)
    card = hub_card(registry, pushed, title=repo_id.split("/")[-1])
    folder = stage(registry, pushed, card)
    try:
        info = registry.show(pushed)
        kind = info["kind"]
        digests = {f["path"]: f["sha256"] for f in info["files"] if f["path"] != "README.md"}
        result = push_folder(folder, repo_id, private=private, branch=branch, endpoint=endpoint, token=token,
                             digests=digests, message=f"Upload {pushed} with zoo",
                             description=f"{kind} model {pushed}" + (" (MergeLock-protected)"
                                                                      if kind == "protected" else ""))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**result, "source": model["ref"], "pushed": pushed, "kind": kind, "protected_now": made}
