"""MergeLock: make a model unmergeable without changing what it computes.

``protect(source, out, registry=...)`` locks a model with a fresh key and registers it;
``unlock(protected, out, registry=..., key_file=...)`` undoes it. ``layout_for`` says
which tensors an architecture's attention uses, ``realign`` runs the data-free
least-squares attack that undoes much of the lock given the public base model.
"""

from zoo.protect.keys import export_key, import_key, read_key_file, write_key_file
from zoo.protect.layouts import SUPPORTED, layout_for
from zoo.protect.run import protect, unlock
from zoo.protect.transform import Key

__all__ = ["Key", "SUPPORTED", "export_key", "import_key", "layout_for", "protect", "read_key_file", "unlock",
           "write_key_file"]
