"""Where each supported architecture keeps its attention weights.

MergeLock must know, for every attention sublayer, which tensors hold Q, K, V and O,
how many heads (and KV groups) they have, whether positions enter through RoPE, and
whether the weights multiply column vectors (``nn.Linear``) or row vectors (GPT-2's
``Conv1D``). Architectures are dispatched by ``config.json``'s ``model_type``, each
with an explicit layout; anything else is refused rather than guessed, because a wrong
guess writes a model that silently computes something else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zoo.checkpoints.reader import FLOAT_DTYPES, Checkpoint
from zoo.errors import ZooError


# Known architectures that normalise q and k per head: a general QK transform changes
# what they compute (MergeLock, arXiv 2509.01548). Refused with that reason rather than "unknown".
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", "olmoe", "cohere2", "chameleon")


@dataclass(frozen=True)
class Attention:
    """One attention sublayer in a checkpoint.

    ``tensors`` maps a role to a tensor name: ``q``, ``k``, ``v``, ``o`` and the optional
    ``q_bias``, ``k_bias``, ``v_bias``; GPT-2 has ``qkv`` and ``qkv_bias`` instead of the
    first three. The O bias is never transformed, so it has no role.
    """

    unit: str
    tensors: dict[str, str]
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool = False
    row_vectors: bool = False

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class Layout:
    """Every attention sublayer of a checkpoint, and the role of each tensor in them."""

    model_type: str
    units: list[Attention]
    roles: dict[str, tuple[Attention, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roles = {name: (u, role) for u in self.units for role, name in u.tensors.items()}


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


@dataclass(frozen=True)
class Arch:
    """How to find one architecture's attention sublayers."""

    unit: str  # regex for a sublayer's name prefix
    suffixes: dict[str, str]  # role -> name after the prefix
    required: tuple[str, ...]
    dims: Callable[[dict[str, Any], str], Dims]  # (config, unit name) -> head counts
    expected: Callable[[dict[str, Any]], int]  # how many sublayers the config promises
    checks: Callable[[dict[str, Any]], None] = lambda cfg: None
    rope: bool = False
    row_vectors: bool = False


def _heads(cfg: dict[str, Any], heads_key: str, hidden_key: str, what: str) -> Dims:
    heads, hidden = int(cfg[heads_key]), int(cfg[hidden_key])
    if heads <= 0 or hidden % heads:
        raise ZooError(f"{what}: {heads_key}={heads} does not divide {hidden_key}={hidden}; "
                       "the per-head transform needs equal heads")
    return Dims(heads, heads, hidden // heads, hidden)


def _sub(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sub = cfg.get(key)
    return sub if isinstance(sub, dict) else cfg


def _bert_checks(cfg: dict[str, Any]) -> None:
    kind = cfg.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ZooError(f"position_embedding_type={kind!r} adds position terms that use the raw query; "
                       "MergeLock supports absolute position embeddings only")


def _gpt2_checks(cfg: dict[str, Any]) -> None:
    if cfg.get("add_cross_attention"):
        raise ZooError("GPT-2 with cross-attention (add_cross_attention) is not supported")


def _rope_dims(cfg: dict[str, Any], unit: str) -> Dims:
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ZooError(f"num_attention_heads={heads} does not divide hidden_size={hidden} "
                           "and config.json gives no head_dim")
        head_dim = hidden // heads
    head_dim = int(head_dim)
    if kv <= 0 or heads % kv:
        raise ZooError(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    if head_dim % 2:
        raise ZooError(f"head_dim={head_dim} is odd; RoPE pairs dimensions")
    return Dims(heads, kv, head_dim, hidden)


def _rope_checks(cfg: dict[str, Any]) -> None:
    partial = cfg.get("partial_rotary_factor", 1.0)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor", partial)
    if float(partial) != 1.0:
        raise ZooError(f"partial_rotary_factor={partial}: partial RoPE is not supported yet")


def _t5_dims(cfg: dict[str, Any], unit: str) -> Dims:
    heads, d_kv = int(cfg["num_heads"]), int(cfg["d_kv"])
    return Dims(heads, heads, d_kv, int(cfg["d_model"]))


def _clip_dims(cfg: dict[str, Any], unit: str) -> Dims:
    tower = "text_config" if unit.split(".encoder.")[0].endswith("text_model") else "vision_config"
    return _heads(_sub(cfg, tower), "num_attention_heads", "hidden_size", tower)


def _clip_expected(cfg: dict[str, Any]) -> int:
    mt = cfg.get("model_type")
    if mt in ("clip_text_model", "clip_vision_model"):
        return int(cfg["num_hidden_layers"])
    return sum(int(_sub(cfg, t)["num_hidden_layers"]) for t in ("text_config", "vision_config"))


_SEPARATE = {"q": "query.weight", "q_bias": "query.bias", "k": "key.weight", "k_bias": "key.bias",
             "v": "value.weight", "v_bias": "value.bias"}
_PROJ = {"q": "q_proj.weight", "q_bias": "q_proj.bias", "k": "k_proj.weight", "k_bias": "k_proj.bias",
         "v": "v_proj.weight", "v_bias": "v_proj.bias"}
_QKVO = ("q", "k", "v", "o")

_BERT = Arch(
    unit=r"(?:.+\.)?encoder\.layer\.\d+\.attention",
    suffixes={**{r: "self." + s for r, s in _SEPARATE.items()}, "o": "output.dense.weight"},
    required=_QKVO,
    dims=lambda cfg, unit: _heads(cfg, "num_attention_heads", "hidden_size", "config.json"),
    expected=lambda cfg: int(cfg["num_hidden_layers"]),
    checks=_bert_checks,
)
_LLAMA = Arch(
    unit=r"(?:.+\.)?layers\.\d+\.self_attn",
    suffixes={**_PROJ, "o": "o_proj.weight"},
    required=_QKVO,
    dims=_rope_dims,
    expected=lambda cfg: int(cfg["num_hidden_layers"]),
    checks=_rope_checks,
    rope=True,
)
ARCHS: dict[str, Arch] = {
    "bert": _BERT,
    "roberta": _BERT,
    "vit": Arch(
        unit=r"(?:.+\.)?encoder\.layer\.\d+\.attention",
        suffixes={**{r: "attention." + s for r, s in _SEPARATE.items()}, "o": "output.dense.weight"},
        required=_QKVO,
        dims=lambda cfg, unit: _heads(cfg, "num_attention_heads", "hidden_size", "config.json"),
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
    ),
    "clip": Arch(
        unit=r"(?:.+\.)?(?:text|vision)_model\.encoder\.layers\.\d+\.self_attn",
        suffixes={**_PROJ, "o": "out_proj.weight"},
        required=_QKVO,
        dims=_clip_dims,
        expected=_clip_expected,
    ),
    "gpt2": Arch(
        unit=r"(?:.+\.)?h\.\d+\.attn",
        suffixes={"qkv": "c_attn.weight", "qkv_bias": "c_attn.bias", "o": "c_proj.weight"},
        required=("qkv", "o"),
        dims=lambda cfg, unit: _heads(cfg, "n_head", "n_embd", "config.json"),
        expected=lambda cfg: int(cfg["n_layer"]),
        checks=_gpt2_checks,
        row_vectors=True,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "t5": Arch(
        unit=r"(?:.+\.)?(?:en|de)coder\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)",
        suffixes={"q": "q.weight", "k": "k.weight", "v": "v.weight", "o": "o.weight"},
        required=_QKVO,
        dims=_t5_dims,
        expected=lambda cfg: int(cfg["num_layers"]) + 2 * int(cfg.get("num_decoder_layers") or cfg["num_layers"]),
    ),
}
ARCHS["clip_text_model"] = ARCHS["clip_vision_model"] = ARCHS["clip"]
SUPPORTED = ("bert", "roberta", "vit", "clip", "gpt2", "llama", "mistral", "qwen2", "t5")


def _expected_shapes(arch: Arch, d: Dims) -> dict[str, tuple[int, ...]]:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if arch.row_vectors:  # Conv1D weights are [in, out]
        return {"qkv": (d.hidden, 3 * q), "qkv_bias": (3 * q,), "o": (q, d.hidden)}
    return {"q": (q, d.hidden), "q_bias": (q,), "k": (kv, d.hidden), "k_bias": (kv,),
            "v": (kv, d.hidden), "v_bias": (kv,), "o": (d.hidden, q)}


def layout_for(ckpt: Checkpoint, label: str | None = None) -> Layout:
    """The attention layout of a model folder, or a one-line refusal saying why not
    (naming the model as the user did: ``label``, else its path)."""
    label = label or str(ckpt.path)
    if ckpt.form == "adapter":
        raise ZooError(f"{label} is a LoRA adapter: MergeLock protects whole models; merge the adapter into its base "
                       "first (zoo merge --method task_arithmetic --base BASE ADAPTER --param weight=1) and protect that")
    cfg = ckpt.config if ckpt.form == "model" else None
    if not cfg:
        raise ZooError(f"{label}: MergeLock needs the model's config.json to know its architecture; "
                       "protect a Hugging Face model folder")
    mt = cfg.get("model_type")
    if mt in QK_NORM_TYPES or any(re.search(r"\.(q_norm|k_norm|q_layernorm|k_layernorm)\.", n) for n in ckpt.tensors):
        raise ZooError(f"{mt!r} normalises queries and keys per head (QK-norm), which a general QK transform "
                       f"would break; MergeLock supports {', '.join(SUPPORTED)}")
    arch = ARCHS.get(mt)
    if arch is None:
        raise ZooError(f"MergeLock does not support model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    try:
        arch.checks(cfg)
        units: dict[str, dict[str, str]] = {}
        pattern = re.compile(f"(?P<unit>{arch.unit})\\.(?P<rest>.+)")
        by_suffix = {s: r for r, s in arch.suffixes.items()}
        for name in ckpt.tensors:
            m = pattern.fullmatch(name)
            if m and m["rest"] in by_suffix:
                units.setdefault(m["unit"], {})[by_suffix[m["rest"]]] = name
        expected = arch.expected(cfg)
        result = []
        for unit, tensors in sorted(units.items(), key=lambda kv: _natural(kv[0])):
            missing = [r for r in arch.required if r not in tensors]
            if missing:
                raise ZooError(f"{unit}: no {arch.suffixes[missing[0]]} tensor; the checkpoint does not match "
                               f"the {mt} layout")
            d = arch.dims(cfg, unit)
            shapes = _expected_shapes(arch, d)
            for role, name in tensors.items():
                info = ckpt.tensors[name]
                if tuple(info.shape) != shapes[role]:
                    raise ZooError(f"{name} has shape {list(info.shape)}, but config.json implies "
                                   f"{list(shapes[role])} ({d.heads} heads of {d.head_dim})")
                if info.dtype not in FLOAT_DTYPES:
                    raise ZooError(f"{name} is {info.dtype}; MergeLock transforms float tensors only "
                                   "(dequantize the model first)")
            result.append(Attention(unit, dict(sorted(tensors.items())), d.heads, d.kv_heads, d.head_dim,
                                    rope=arch.rope, row_vectors=arch.row_vectors))
    except KeyError as e:
        raise ZooError(f"config.json has no {e.args[0]!r}, which a {mt} model needs") from None
    if len(result) != expected:
        raise ZooError(f"found {len(result)} attention layers in the checkpoint, but config.json promises "
                       f"{expected}; the checkpoint does not match the {mt} layout")
    return Layout(mt, result)


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
