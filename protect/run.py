"""``protect`` and ``unlock``: stream a model through MergeLock and register the result.

A protected model is registered as kind ``protected`` with its source in the lineage
and its key in the registry (same transaction), and the key is also written to a key
file with mode 0600. Key material never enters the model's files: the card and the
recipe carry only the public ``key_id``, the shards' headers a salted key check value
(``keycheck``) that unlock checks every key against. Output appears only when complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from zoo.checkpoints.reader import Checkpoint
from zoo.registry import card
from zoo.errors import AlreadyExists, NotFound, ZooError
from zoo.progress import ProgressFactory, no_progress
from zoo.registry.resolve import open_model
from zoo.registry.destination import Destination
from zoo.registry.records import NewModel
from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES, copy_sidecars, write_file

from zoo.protect.keycheck import lock_record, read_check
from zoo.protect.keys import key_record, read_key_file, write_key_file
from zoo.protect.layouts import Layout, layout_for
from zoo.protect.lock import LockStats, lock_checkpoint
from zoo.protect.transform import ALGORITHM, DEFAULT_MAX_COND, VERSION, Key

if TYPE_CHECKING:
    from zoo.registry import Registry


@dataclass
class Source:
    label: str
    ckpt: Checkpoint
    info: dict[str, Any] | None  # the registry's record, when registered


def _open(label: str, registry: "Registry | None") -> Source:
    ckpt, info = open_model(label, registry)
    return Source(info["ref"] if info else label, ckpt, info)


def _dtype(ckpt: Checkpoint, layout: Layout) -> str:
    """The dtype most attention tensors have; it picks the default bound and the gate."""
    return Counter(ckpt.tensors[n].dtype for n in layout.roles).most_common(1)[0][0]


def _new_model(folder: Path, name: str, kind: str, src: Source, recipe: dict[str, Any], digests: dict[str, str],
               key: dict[str, Any] | None = None) -> NewModel:
    """The result as the registry takes it: the source's base, tasks and metadata, and
    the source as lineage parent."""
    info = src.info or {}
    return NewModel(folder, name, kind, digests, base=None if kind == "base" else info.get("base"),
                    parents=[("source", src.label)] if src.info else [], recipe=recipe,
                    tasks=info.get("tasks", ()), metadata=info.get("metadata") or None, key=key)


def protected_card(name: str, source: Source, key: Key, stats: LockStats, check: dict[str, Any] | None) -> str:
    """The protected model's card: what was done and the public key id, never the key."""
    base = (source.info or {}).get("base")
    front = card.front_matter([base] if base else [], None, [card.TAG, card.MERGELOCK_TAG, "protected"])
    lines = [
        f"Protected with zoo's MergeLock (version {VERSION}). Every attention layer's query-key and "
        "value-output branches carry per-head invertible transforms, so this model computes the same "
        "outputs as the model it was made from, but merging its weights with other fine-tuned models "
        "(task arithmetic, TIES and the like) gives a broken model.", "",
        f"- attention layers: {stats.layers} ({stats.model_type}); tensors transformed: {stats.tensors}",
        f"- condition numbers: QK ≤ {stats.cond_qk:.3g}, VO ≤ {stats.cond_vo:.3g} (bound {key.max_cond:g})",
        f"- key id: `{key.key_id}` (the key itself is not in this repository)",
    ]
    if check is not None:
        lines.append(f"- verified: max relative logit error {check['max_rel_error']:.2e}, top-1 agreement "
                     f"{100 * check['top1_agreement']:.1f}%, KL {check['kl']:.2e} on a {check['input_shape']} probe")
    lines += ["", "MergeLock protects the weights against naive merging only: the outputs are unchanged, so "
              "distilling from this model works as well as from the original, and a least-squares realignment "
              "against the public base model can undo much of the transform.", ""]
    return card.render(front, name, lines)


def protect(source: str, out: str | None = None, *, registry: "Registry | None" = None,
            out_dir: str | Path | None = None, seed: int | None = None, max_cond: float | None = None,
            key_file: str | Path | None = None, verify: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Protect ``source`` (a registry name or a model folder) with a fresh key.

    With ``out`` the result is registered as a ``protected`` model; with ``out_dir``
    it is written to that folder. The key goes into the registry (with ``out``) and
    into ``key_file`` (default: ``registry.keys/NAME@V.key``, or ``DIR.key`` beside an
    ``out_dir``). ``verify`` runs both models with ``transformers`` before anything is
    kept and refuses a result outside the tolerance. ``seed`` makes the key (and so the
    tensors) reproducible; without it the seed is 128 random bits. Every shard's header
    carries a fresh salted key check value.
    """
    dest = Destination.check(out, out_dir, registry, shard_bytes)
    src = _open(source, registry)
    if src.info is not None and src.info["kind"] == "protected":
        raise ZooError(f"{src.label} is already protected; protect its source instead")
    if read_check(src.ckpt, src.label) is not None:
        raise ZooError(f"{src.label} is already protected (it carries MergeLock metadata); protect its source instead")
    layout = layout_for(src.ckpt, src.label)
    dtype = _dtype(src.ckpt, layout)
    key = Key.new(DEFAULT_MAX_COND.get(dtype, 30.0) if max_cond is None else max_cond, seed)
    owner = f"{out}@1" if dest.registers else dest.label  # a new name, so its first version
    default = registry.keys_dir / f"{owner}.key" if dest.registers else dest.path.with_name(f"{owner}.key")
    key_path = Path(key_file) if key_file else default
    if key_path.exists():
        raise AlreadyExists(f"{key_path} already exists; choose another --key-file")
    name = dest.label
    key_written = None
    with dest.workspace(".protect") as folder:
        try:
            stats = lock_checkpoint(src.ckpt, key, folder, layout=layout, shard_bytes=shard_bytes,
                                    progress=progress, label=name)
            digests = {**stats.digests, **copy_sidecars(src.ckpt, folder, heads=True)}
            check = None
            if verify:
                from zoo.protect.verify import compare

                check = compare(src.ckpt.path, folder, dtype,
                                {"max_cond_qk": stats.cond_qk, "max_cond_vo": stats.cond_vo})
                if not check["passed"]:
                    raise ZooError(f"verification failed: max relative error {check['max_rel_error']:.2e}, top-1 "
                                   f"agreement {100 * check['top1_agreement']:.1f}%, KL {check['kl']:.2e} "
                                   f"(gate: {check['gate']}); nothing was written. Try a smaller --max-cond")
            digests["README.md"] = write_file(folder / "README.md",
                                              protected_card(name, src, key, stats, check).encode())
            recipe = {"method": ALGORITHM, "version": VERSION, "max_cond": key.max_cond, "key_id": key.key_id,
                      "source": src.label, "source_kind": (src.info or {}).get("kind"), "lock": stats.to_dict(),
                      **({"verify": check} if check is not None else {})}
            key_written = write_key_file(key_path, key, owner)
            result = dest.keep(_new_model(folder, name, "protected", src, recipe, digests, key=key_record(key)))
            result = {**result, "key_file": str(key_written), "key_id": key.key_id, "lock": stats.to_dict(),
                      **({"verify": check} if check is not None else {})}
            key_written = None  # kept with its model
            return result
        finally:
            if key_written is not None:  # the model was not kept, so neither is its key
                key_written.unlink(missing_ok=True)


def _key_for(src: Source, registry: "Registry | None", key_file: str | Path | None) -> tuple[Key, str]:
    """The key (from ``key_file``, else the registry) once checked against the model;
    and what it was checked against. Refuses an unprotected model before asking for a key."""
    record = lock_record(src.label, src.ckpt, src.info)
    if key_file is not None:
        key, _ = read_key_file(key_file)
    else:
        stored = registry.key(src.label) if src.info else None
        if stored is None:
            raise NotFound(f"no key for {src.label} in the registry; pass --key FILE")
        key = Key.from_dict(stored)
    return key, record.verify(key)


def unlock(source: str, out: str | None = None, *, registry: "Registry | None" = None,
           out_dir: str | Path | None = None, key_file: str | Path | None = None, kind: str | None = None,
           shard_bytes: int = DEFAULT_SHARD_BYTES, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Undo the lock of ``source`` with its key (from ``key_file``, else the registry).

    The result is registered (kind ``kind``, default the source's original kind) or
    written to ``out_dir``. When the original model is still registered, every
    restored tensor is compared with it and the largest relative error is reported.
    A key that does not match the model's key check value (or, for a model protected
    before check values, its recorded key id) is refused, and so is a model that is not
    protected; nothing is written then. ``key_check`` says what the key was checked against.
    """
    dest = Destination.check(out, out_dir, registry, shard_bytes)
    src = _open(source, registry)
    key, checked = _key_for(src, registry, key_file)
    layout = layout_for(src.ckpt, src.label)
    recipe_src = ((src.info or {}).get("recipe") or {})
    original = recipe_src.get("source")
    reference = registry.checkpoint(original) if registry is not None and original and registry.has(original) else None
    name = dest.label
    with dest.workspace(".unlock") as folder:
        stats = lock_checkpoint(src.ckpt, key, folder, unlock=True, layout=layout, shard_bytes=shard_bytes,
                                progress=progress, label=name, reference=reference)
        digests = {**stats.digests, **copy_sidecars(src.ckpt, folder, heads=True)}
        text = card.render(card.front_matter(tags=[card.TAG]), name,
                           [f"Unlocked from `{src.label}` with MergeLock key `{key.key_id}`.", ""])
        digests["README.md"] = write_file(folder / "README.md", text.encode())
        report = {**stats.to_dict(), "dtype": _dtype(src.ckpt, layout),
                  "compared_with": original if reference is not None else None}
        recipe = {"method": f"{ALGORITHM}-unlock", "version": VERSION, "key_id": key.key_id, "source": src.label,
                  "unlock": report}
        kept = dest.keep(_new_model(folder, name, kind or recipe_src.get("source_kind") or "expert", src,
                                    recipe, digests))
        return {**kept, "unlock": report, "key_check": checked}
