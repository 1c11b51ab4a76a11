"""``zoo moe``: a mixture-of-experts model assembled from dense fine-tunes of one base,
from mergekit-moe's YAML (``config``), with routers initialised from each expert's
prompts (``router``), written as Mixtral or Qwen2-MoE (``layouts``) through zoo's one
streaming writer and registered with its parents (``build``).
"""

from zoo.merge.moe.build import MoeOptions, build
from zoo.merge.moe.config import ExpertSpec, MoeConfig, MoeConfigError, from_dict, load

__all__ = ["ExpertSpec", "MoeConfig", "MoeConfigError", "MoeOptions", "build", "from_dict", "load"]
