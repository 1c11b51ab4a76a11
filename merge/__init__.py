"""The merge engine: streaming, per-tensor merges over safetensors.

``merge.run(recipe, out=NAME, registry=reg)`` plans the merge, streams it to disk and
registers the result with its lineage; ``merge.methods`` holds the methods, one class
each; ``merge.state_dicts`` merges state dicts in memory (``merge_state_dicts``, one
function per method, ``learn_merge``).
"""

from zoo.merge.methods import METHODS
from zoo.merge.recipe import Recipe, from_cli, from_dict, load, with_overrides
from zoo.merge.run import run
from zoo.merge.state_dicts import merge_state_dicts

__all__ = ["METHODS", "Recipe", "from_cli", "from_dict", "load", "merge_state_dicts", "run", "with_overrides"]
