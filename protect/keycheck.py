"""The key check value: what lets unlock tell the right key from a wrong one.

Every shard a protect writes carries, in its safetensors header metadata, the entry
``zoo_mergelock``: JSON with the algorithm, its version, a fresh random 128-bit salt
and HMAC-SHA256 keyed with the whole key (seed, bound, algorithm, version) over a
context string and that salt. Whoever holds a key can recompute the value and so check
the key against the model's own files, wherever they came from (a folder, a pull, a
``zoo add``); no registry record is needed.

The value identifies the key without revealing it. With a random 128-bit seed nothing
can be learned from it. A small ``--seed`` can be searched from it by trying seeds, one
HMAC per guess per model (the salt is per model, so no table serves two models) which
is no easier than from the public ``key_id`` (one sha256 per guess). Models protected
before this check existed carry no metadata; ``lock_record`` falls back to the key id
their registry recipe or card records.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import yaml

from zoo.checkpoints.reader import MERGELOCK_METADATA, Checkpoint, read_safetensors_header
from zoo.errors import ZooError
from zoo.registry import card

from zoo.protect.transform import ALGORITHM, VERSION, Key

METADATA_KEY = MERGELOCK_METADATA  # the safetensors header metadata entry
CHECK = "hmac-sha256"
CONTEXT = b"zoo-mergelock-key-check\0"
SALT_BYTES = 16
# the protected card's "- key id: `…`" and the Hub card's "(key id `…`)"
CARD_KEY_ID = re.compile(r"key id:? `([0-9a-f]{16})`")


@dataclass(frozen=True)
class KeyCheck:
    """A model's public key check value and the salt it was made with (hex)."""

    salt: str
    value: str

    @classmethod
    def new(cls, key: Key) -> "KeyCheck":
        salt = secrets.token_hex(SALT_BYTES)
        return cls(salt, _value(key, salt))

    def matches(self, key: Key) -> bool:
        return hmac.compare_digest(self.value, _value(key, self.salt))

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of a protected shard (``format`` kept for loaders)."""
        entry = {"algorithm": ALGORITHM, "version": VERSION, "check": CHECK, "salt": self.salt,
                 "key_check": self.value}
        return {"format": "pt", METADATA_KEY: json.dumps(entry, sort_keys=True, separators=(",", ":"))}


def _value(key: Key, salt: str) -> str:
    return hmac.new(key.material, CONTEXT + bytes.fromhex(salt), "sha256").hexdigest()


def _parse(label: str, raw: str) -> KeyCheck:
    bad = ZooError(f"{label} carries malformed MergeLock metadata ({METADATA_KEY}); the files were altered")
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        raise bad from None
    if not isinstance(d, dict):
        raise bad
    if d.get("algorithm") != ALGORITHM or d.get("version") != VERSION or d.get("check") != CHECK:
        raise ZooError(f"{label} was protected with {d.get('algorithm')!r} version {d.get('version')!r} "
                       f"({d.get('check')!r}); this zoo unlocks {ALGORITHM} version {VERSION} ({CHECK})")
    salt, value = d.get("salt"), d.get("key_check")
    if not (isinstance(salt, str) and re.fullmatch(r"[0-9a-f]{32}", salt)
            and isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise bad
    return KeyCheck(salt, value)


def read_check(ckpt: Checkpoint, label: str) -> KeyCheck | None:
    """The check value every shard of ``ckpt`` carries, or None when none carries one.

    Shards that disagree (some stamped, some not, or stamped differently) are refused:
    no protect writes such a model.
    """
    found = {read_safetensors_header(f)[1].get(METADATA_KEY) for f in {t.file for t in ckpt.tensors.values()}}
    if found == {None} or not found:
        return None
    if len(found) > 1:
        raise ZooError(f"{label}: its shards carry different MergeLock metadata; the files were altered")
    return _parse(label, found.pop())


def _card_key_id(ckpt: Checkpoint) -> str | None:
    """The key id a MergeLock card (tagged ``mergelock``) names, if the model has one."""
    path = ckpt.files.get("README.md")
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
        front = card.read_front_matter(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # a hostile card records nothing
        return None
    if not isinstance(front, dict) or card.MERGELOCK_TAG not in (front.get("tags") or []):
        return None
    ids = set(CARD_KEY_ID.findall(text))
    return ids.pop() if len(ids) == 1 else None


@dataclass(frozen=True)
class LockRecord:
    """What a protected model holds to check a key against: its check value or, for a
    model protected before check values, the key id its recipe or card records."""

    label: str
    check: KeyCheck | None
    key_id: str | None  # the recorded key id, when there is one
    how: str  # what the key is checked against, in words

    def verify(self, key: Key, refusal: str = "does not unlock") -> str:
        """Refuse ``key`` unless it is this model's; returns what it was checked against."""
        locked = f", which was locked with key {self.key_id}" if self.key_id else ""
        if self.check is not None:
            if not self.check.matches(key):
                raise ZooError(f"key {key.key_id} {refusal} {self.label}{locked}: the model's MergeLock key check "
                               "value does not match this key")
        elif key.key_id != self.key_id:
            raise ZooError(f"key {key.key_id} {refusal} {self.label}{locked} (it was protected before key check "
                           f"values; checked against {self.how})")
        return self.how


def lock_record(label: str, ckpt: Checkpoint, info: dict[str, Any] | None) -> LockRecord:
    """How a key for ``ckpt`` (the model ``label``, with its registry record ``info``
    when registered) is checked. The check value in the files decides; a model protected
    before check values is checked against the key id its registry recipe records, else
    its card's. A model with none of these is refused: there is nothing to unlock.
    """
    check = read_check(ckpt, label)
    recipe = (info or {}).get("recipe") or {}
    recorded = recipe.get("key_id") if recipe.get("method") == ALGORITHM else None
    if check is not None:
        return LockRecord(label, check, recorded, "the key check value in its files")
    if recorded is not None:
        return LockRecord(label, None, recorded, "the key id its registry recipe records")
    recorded = _card_key_id(ckpt)
    if recorded is not None:
        return LockRecord(label, None, recorded, "the key id its model card records")
    if (info or {}).get("kind") == "protected":
        raise ZooError(f"{label} carries no MergeLock metadata and nothing records its key id, so no key can be "
                       "checked against it; nothing to unlock")
    raise ZooError(f"{label} is not protected (no MergeLock metadata); nothing to unlock")
