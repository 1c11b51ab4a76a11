"""The two MoE checkpoints ``zoo moe`` writes, as transformers (v5) lays them out.

* **Mixtral** (llama or mistral experts, no shared expert): each layer's MLP becomes
  ``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] (each expert's
  gate_proj rows, then its up_proj rows) and ``mlp.experts.down_proj`` [experts,
  hidden, intermediate], with the router ``mlp.gate.weight`` [experts, hidden].
* **Qwen2-MoE** (llama, mistral or qwen2 experts, exactly one shared expert): each
  expert's MLP as ``mlp.experts.{i}.{gate,up,down}_proj.weight`` (transformers fuses
  them on load), the shared expert's as ``mlp.shared_expert.*``, the router
  ``mlp.gate.weight`` and the shared expert's gate ``mlp.shared_expert_gate.weight``
  [1, hidden]. Qwen2-MoE's attention has q/k/v biases: a llama base gets zeros.

Everything outside the MLPs (embeddings, attention, norms, lm_head) is the base's. Both
are the layouts mergekit-moe writes (its ``mixtral`` and ``qwen`` outputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zoo.errors import IncompatibleModels, ZooError
from zoo.merge.moe.config import RANDOM_MODES, MoeConfig

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
DENSE = re.compile(r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
                   r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
                   r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight)$")
QKV_BIAS = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias$")
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer old checkpoints saved; transformers recomputes it


@dataclass(frozen=True)
class Source:
    """One input tensor: ``model`` 0 is the base, then the experts, then the shared experts."""

    model: int
    tensor: str
    residual: bool = False  # a down_proj: the expert's residual_scale applies


@dataclass(frozen=True)
class Planned:
    """One output tensor: its sources laid end to end (a fused tensor stacks several),
    zeros, or router rows ``router = (layer, first row, rows)``."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[Source, ...] = ()
    zeros: bool = False
    router: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Layout:
    """An MoE output architecture: which configs it takes, its config.json, its tensors."""

    name: str  # as mergekit names it
    model_types: tuple[str, ...]
    transformers_class: str

    def refusal(self, config: MoeConfig, model_type: str) -> str | None:
        """Why this layout cannot build ``config`` (None: it can)."""
        if self.name == "Mixtral":
            if config.shared_experts:
                return "Mixtral has no shared experts"
        elif len(config.shared_experts) != 1:
            return "Qwen MoE needs exactly one shared expert"
        elif config.gate_mode not in RANDOM_MODES and not config.shared_experts[0].positive_prompts:
            return "Qwen MoE's shared expert needs positive_prompts for its gate"
        if model_type not in self.model_types:
            return f"{self.name} takes {' or '.join(self.model_types)} experts, not {model_type}"
        return None

    def model_config(self, base: Any, num_experts: int, experts_per_token: int, dtype: Any) -> Any:
        """The output's transformers config, from the base's."""
        import transformers

        if self.name == "Mixtral":
            if not isinstance(base, transformers.MistralConfig):
                mistral = transformers.MistralConfig(**base.to_dict())
                mistral.sliding_window = None
                mistral.max_position_embeddings = base.max_position_embeddings
                base = mistral
            out = transformers.MixtralConfig(**base.to_dict())
            out.num_local_experts = num_experts
        else:
            from transformers.models.qwen2_moe import Qwen2MoeConfig

            out = Qwen2MoeConfig(**base.to_dict())
            out.num_experts = num_experts
            out.decoder_sparse_step = 1
            out.norm_topk_prob = True
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
            out.moe_intermediate_size = out.intermediate_size
        out.architectures = [self.transformers_class]
        out.num_experts_per_tok = experts_per_token
        out.sliding_window = None
        if dtype is not None:
            out.dtype = dtype
        return out

    def plan(self, base: dict[str, tuple[int, ...]], num_experts: int, num_shared: int) -> list[Planned]:
        """Every output tensor, from the base's tensor names and shapes (the experts match them)."""
        out: list[Planned] = []
        mlp: dict[int, dict[str, tuple[int, ...]]] = {}
        for name, shape in base.items():
            m = MLP.match(name)
            if m:
                mlp.setdefault(int(m.group(1)), {})[m.group(2)] = shape
            elif DENSE.match(name) or (self.name != "Mixtral" and QKV_BIAS.match(name)):
                out.append(Planned(name, shape, (Source(0, name),)))
            elif not SKIPPED.search(name):
                raise IncompatibleModels(f"the base's tensor {name} has no place in a {self.name} model "
                                         "(zoo moe takes llama-style decoders without MLP or output biases)")
        if not mlp:
            raise IncompatibleModels("the base has no model.layers.N.mlp.{gate,up,down}_proj weights to make "
                                     "experts of")
        experts = range(1, 1 + num_experts)
        for layer, parts in sorted(mlp.items()):
            missing = {"gate_proj", "up_proj", "down_proj"} - set(parts)
            if missing:
                raise IncompatibleModels(f"layer {layer} of the base has no mlp.{sorted(missing)[0]}.weight")
            prefix = f"model.layers.{layer}.mlp"
            hidden = parts["gate_proj"][1]
            src = {p: f"{prefix}.{p}.weight" for p in parts}
            if self.name == "Mixtral":
                inter = parts["gate_proj"][0]
                out.append(Planned(f"{prefix}.experts.gate_up_proj", (num_experts, 2 * inter, hidden),
                                   tuple(Source(e, src[p]) for e in experts for p in ("gate_proj", "up_proj"))))
                out.append(Planned(f"{prefix}.experts.down_proj", (num_experts, *parts["down_proj"]),
                                   tuple(Source(e, src["down_proj"], residual=True) for e in experts)))
            else:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    for i, e in enumerate(experts):
                        out.append(Planned(f"{prefix}.experts.{i}.{p}.weight", parts[p],
                                           (Source(e, src[p], residual=p == "down_proj"),)))
                    out.append(Planned(f"{prefix}.shared_expert.{p}.weight", parts[p],
                                       (Source(1 + num_experts, src[p], residual=p == "down_proj"),)))
                out.append(Planned(f"{prefix}.shared_expert_gate.weight", (num_shared, hidden),
                                   router=(layer, num_experts, num_shared)))
            out.append(Planned(f"{prefix}.gate.weight", (num_experts, hidden), router=(layer, 0, num_experts)))
        if self.name != "Mixtral":  # Qwen2-MoE's attention has q/k/v biases: zeros where the base has none
            for name, shape in list(base.items()):
                m = re.match(r"^(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight$", name)
                if m and f"{m.group(1)}.bias" not in base:
                    out.append(Planned(f"{m.group(1)}.bias", (shape[0],), zeros=True))
        return sorted(out, key=lambda p: natural(p.name))


def natural(name: str) -> tuple[Any, ...]:
    """Sort key putting layer 2 before layer 10."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


MIXTRAL = Layout("Mixtral", ("llama", "mistral"), "MixtralForCausalLM")
QWEN_MOE = Layout("Qwen MoE", ("llama", "mistral", "qwen2"), "Qwen2MoeForCausalLM")
LAYOUTS = (MIXTRAL, QWEN_MOE)
# mergekit-moe's other outputs, which zoo does not write
NOT_WRITTEN = ("deepseek", "qwen3")


def choose(config: MoeConfig, model_type: str) -> Layout:
    """The output layout for ``config`` (Mixtral when both fit, as mergekit prefers it)."""
    wanted = (config.architecture or "").lower()
    candidates = [lay for lay in LAYOUTS if lay.name.lower().startswith(wanted)]
    if not candidates:
        if any(n.startswith(wanted) or wanted.startswith(n) for n in NOT_WRITTEN):
            raise ZooError(f"architecture {config.architecture!r}: zoo moe writes Mixtral or Qwen MoE (Qwen2-MoE) "
                           "checkpoints only")
        raise ZooError(f"architecture {config.architecture!r} is not an MoE output zoo knows; use mixtral or qwen")
    if not any(model_type in lay.model_types for lay in LAYOUTS):
        raise IncompatibleModels(f"{model_type} models have no MoE counterpart here: Mixtral takes llama or "
                                 "mistral experts, Qwen2-MoE llama, mistral or qwen2 ones")
    reasons = []
    for lay in candidates:
        why = lay.refusal(config, model_type)
        if why is None:
            return lay
        reasons.append(why)
    raise ZooError("no MoE output fits this config: " + "; ".join(reasons))
