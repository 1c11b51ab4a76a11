"""Key files: a protected model's key as a small JSON file readable by its owner only.

The registry holds every key it made; a key file carries one to another machine
(``zoo key export`` / ``zoo key import``) or is the only copy when a model is protected
into a plain folder. Files are created with mode 0600 under a temporary name and
renamed into place, and never overwrite an existing file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import AlreadyExists, NotFound, StorageError, ZooError

from zoo.protect.keycheck import lock_record
from zoo.protect.transform import Key

if TYPE_CHECKING:
    from zoo.registry import Registry

FORMAT = "zoo-protection-key-v1"


def key_record(key: Key) -> dict[str, Any]:
    """The key as the registry stores it: its fields plus the public ``key_id``."""
    return {**key.to_dict(), "key_id": key.key_id}


def write_key_file(path: str | os.PathLike[str], key: Key, model: str) -> Path:
    """Write ``key`` for ``model`` (a ref or folder name) to ``path``, mode 0600."""
    path = Path(path).absolute()
    if path.exists():
        raise AlreadyExists(f"{path} already exists; choose another key file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StorageError(f"cannot write the key file {path}: {e.strerror or e}") from None
    data = (json.dumps({"format": FORMAT, "model": model, **key_record(key)}, indent=2) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the file appeared meanwhile, unlike rename
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists; choose another key file") from None
    except OSError as e:
        raise StorageError(f"cannot write the key file {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_key_file(path: str | os.PathLike[str]) -> tuple[Key, str | None]:
    """The key in a key file and the model it names."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no key file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path} is not a zoo key file ({e.__class__.__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ZooError(f"{path} is not a zoo key file (expected format {FORMAT!r})")
    key = Key.from_dict(d)
    if d.get("key_id") not in (None, key.key_id):
        raise ZooError(f"{path}: the key does not match its key_id; the file was altered")
    return key, d.get("model")


def export_key(registry: "Registry", ref: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the registry's key for a protected model to a key file (default
    ``NAME@V.key`` in the working directory)."""
    stored = registry.key(ref)
    model = registry.show(ref)["ref"]
    if stored is None:
        raise NotFound(f"the registry holds no key for {model}; import one with `zoo key import FILE`")
    return write_key_file(path or f"{model}.key", Key.from_dict(stored), model)


def import_key(registry: "Registry", path: str | os.PathLike[str], model: str | None = None,
               replace: bool = False) -> dict[str, str]:
    """Store a key file's key for ``model`` (default: the model the file names).

    The key is checked against the model first, as unlock checks it: against the key
    check value its files carry or, for a model protected before check values, the key
    id its recipe or card records. A key that does not match is refused.
    """
    key, named = read_key_file(path)
    target = model or named
    if not target:
        raise ZooError(f"{path} names no model; pass --model NAME")
    info = registry.show(target)
    if info["kind"] == "protected":  # other kinds: set_key says keys belong to protected models
        lock_record(info["ref"], registry.checkpoint(info["ref"]), info).verify(key, "does not belong to")
    ref = registry.set_key(target, key_record(key), replace=replace)
    return {"model": ref, "key_id": key.key_id}
