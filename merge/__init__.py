"""The merge engine: streaming, per-tensor merges over safetensors.

``merge.run(recipe, out=NAME, registry=reg)`` plans the merge, streams it to disk and
registers the result with its lineage; ``merge.methods`` has one in-memory function
per method over state dicts.
"""

from zoo.merge.methods import METHODS, merge_state_dicts
from zoo.merge.recipe import Recipe, from_cli, from_dict, load, with_overrides
from zoo.merge.run import run

__all__ = ["METHODS", "Recipe", "from_cli", "from_dict", "load", "merge_state_dicts", "run", "with_overrides"]
