"""zoo: a local registry for base models, fine-tuned experts, adapters, merges and
protected models, with the checkpoint reader everything else builds on.

Names are imported on first use, so ``zoo list`` does not pay for SQLAlchemy's ORM.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "checkpoints.reader", "TensorInfo": "checkpoints.reader",
    "open_checkpoint": "checkpoints.reader", "read_safetensors_header": "checkpoints.reader",
    "CompatReport": "checkpoints.compat", "Finding": "checkpoints.compat", "compare": "checkpoints.compat",
    "ZooError": "errors",
    "Registry": "registry.catalogue", "default_path": "registry.catalogue",
    "list_models": "registry.listing",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
