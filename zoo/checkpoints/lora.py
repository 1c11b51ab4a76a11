"""LoRA adapters in PEFT's layout: the one parser that the compatibility check and the
merge planner share.

An adapter checkpoint holds, per adapted module, a pair ``lora_A`` / ``lora_B`` (linear
layers; GPT-2's Conv1D with ``fan_in_fan_out``) or ``lora_embedding_A`` /
``lora_embedding_B`` (embeddings), under PEFT's ``base_model.model.`` prefix and
optionally an adapter name; and full tensors saved by ``modules_to_save`` (task heads).
The base weight then changes by scale · B @ A (transposed for embeddings and
fan_in_fan_out), with scale = alpha / r (alpha / sqrt(r) with rsLoRA; Hu et al., arXiv
2106.09685; Kalajdzievski, arXiv 2312.03732), where ``rank_pattern`` and
``alpha_pattern`` override r and alpha for the modules they name, as PEFT matches them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.reader import Checkpoint

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
# module . part [. adapter name] [.weight]
_PART = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")
# parts of LoRA variants whose update is not scale · B @ A (DoRA's magnitudes, AdaLoRA's
# singular values, lora_bias): refused, never merged as if they were plain LoRA
_UNSUPPORTED = re.compile(r"\.(lora_magnitude_vector|lora_E)(\.|$)|\.lora_(?:embedding_)?[AB](?:\.[^.]+)?\.bias$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: delta = scale · B @ A for the base weight ``module.weight``."""

    module: str
    a: str | None  # the A tensor's name in the adapter (None: missing)
    b: str | None
    scale: float
    rank: int  # the configured rank (r or rank_pattern)
    transpose: bool = False  # fan_in_fan_out layers (GPT-2 Conv1D): the weight is [in, out]
    embedding: bool = False

    @property
    def target(self) -> str:
        return self.module + ".weight"

    @property
    def complete(self) -> bool:
        return self.a is not None and self.b is not None

    def fits(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
        """Whether B[out, r] @ A[r, in] (embeddings: A[r, rows], B[dim, r]) changes a base
        weight of shape ``target``."""
        if len(a_shape) != 2 or len(b_shape) != 2 or len(target) != 2 or a_shape[0] != b_shape[1]:
            return False
        out_f, in_f = (target[1], target[0]) if self.transpose or self.embedding else target
        return b_shape[0] == out_f and a_shape[1] == in_f

    def delta(self, a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
        """scale · B @ A in float32, in the base weight's orientation."""
        import torch

        d = (b.to(torch.float32) @ a.to(torch.float32)) * self.scale
        return d.T if self.embedding or self.transpose else d


@dataclass
class Adapter:
    """What an adapter checkpoint holds, by the base tensor each part belongs to."""

    pairs: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> pair
    saved: dict[str, str] = field(default_factory=dict)  # base tensor name -> full tensor in the adapter
    unsupported: list[str] = field(default_factory=list)  # tensors of LoRA variants (DoRA, AdaLoRA, biases)


def base_name(name: str) -> str:
    """An adapter tensor's name without PEFT's prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A ``rank_pattern`` / ``alpha_pattern`` value for ``module``: the first key that,
    as a regular expression, matches the end of the module name at a dot (PEFT's rule)."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return default


def read_adapter(ckpt: Checkpoint) -> Adapter:
    """Parse an adapter checkpoint: its LoRA pairs (with their scale from the config),
    its saved full tensors, and the parts of variants zoo cannot merge."""
    cfg = ckpt.config or {}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rs = bool(cfg.get("use_rslora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    out = Adapter()
    parts: dict[str, dict[str, str]] = {}
    for name in ckpt.tensors:
        key = base_name(name)
        if _UNSUPPORTED.search(key):
            out.unsupported.append(name)
            continue
        m = _PART.match(key[:-len(".weight")] if key.endswith(".weight") else key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = name
        else:  # a full tensor saved by modules_to_save
            out.saved[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = name
    for module, p in parts.items():
        rank = pattern_value(rank_pattern, module, r)
        a = pattern_value(alpha_pattern, module, alpha)
        scale = a / math.sqrt(rank) if rs else a / rank
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        prefix = "lora_embedding_" if embedding else "lora_"
        pair = LoraPair(module, p.get(prefix + "A"), p.get(prefix + "B"), scale, rank,
                        transpose=fan_in_fan_out and not embedding, embedding=embedding)
        out.pairs[pair.target] = pair
    return out
