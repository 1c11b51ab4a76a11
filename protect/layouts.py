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
from dataclasses import dataclass, field, replace
from typing import Any

from zoo.checkpoints.reader import FLOAT_DTYPES, Checkpoint
from zoo.errors import ZooError


# Known architectures that normalise q and k and have no QK-norm layout here: a general QK
# transform changes what they compute (MergeLock, arXiv 2509.01548). Refused with that reason
# rather than "unknown".
QK_NORM_TYPES = ("olmoe", "cohere2", "chameleon")


@dataclass(frozen=True)
class Attention:
    """One attention sublayer in a checkpoint.

    ``tensors`` maps a role to a tensor name: ``q``, ``k``, ``v``, ``o`` and the optional
    ``q_bias``, ``k_bias``, ``v_bias``; GPT-2 and Phi-3 have ``qkv`` (and GPT-2
    ``qkv_bias``) instead of the first three; QK-norm models add ``q_norm`` and ``k_norm``;
    DeBERTa-v2 adds ``pos_q`` and ``pos_k`` (and their biases), its relative position
    projections, which take the q and the k side's transform.
    The O bias is never transformed, so it has no role.

    - ``rotary_dim``: how many leading dims of each head RoPE rotates (partial rotary);
      the rest carry no position. Meaningful only with ``rope``; 0 means all of them.
    - ``qk_norm``: ``"head"`` when q and k are RMS-normalised per head with one weight of
      ``head_dim`` shared by all heads (Qwen3, Gemma 3), ``"full"`` when over the whole
      projection with one weight per head (OLMo 2). The QK transform is then only a
      per-RoPE-pair scale folded into the norm weights; ``norm_offset`` is 1 where the
      norm multiplies by (1 + w) (Gemma).
    - ``permute``: also permute KV groups, and query heads within each group.
    - ``qkv_order``: how a fused ``qkv`` tensor orders its rows: ``"blocks"`` (Q all | K all |
      V all: GPT-2, Phi-3, Falcon's multi-query) or ``"grouped"`` (per KV group its query
      heads, then its K head, then its V head; with one query head per group that is per
      head q, k, v: GPT-NeoX, BLOOM, Falcon).
    - ``rope_pairs``: ``"half"`` where RoPE pairs dims (j, j + r/2) (``rotate_half``),
      ``"interleaved"`` where it pairs (2j, 2j + 1) (GPT-J's ``rotate_every_two``).
    """

    unit: str
    tensors: dict[str, str]
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool = False
    row_vectors: bool = False
    rotary_dim: int = 0
    qk_norm: str | None = None
    norm_offset: float = 0.0
    permute: bool = False
    qkv_order: str = "blocks"
    rope_pairs: str = "half"

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def rotary(self) -> int:
        """The dims RoPE rotates in each head (all of them unless partial)."""
        return (self.rotary_dim or self.head_dim) if self.rope else 0


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
    rotary_dim: int = 0  # 0: all of head_dim (or no RoPE)


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
    qk_norm: str | None = None  # see Attention
    norm_offset: float = 0.0
    permute: bool = False
    # Attention fields that depend on the config (Falcon's fused order, ALiBi instead of RoPE)
    variant: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: {}


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


def _partial_rotary(cfg: dict[str, Any]) -> float:
    """``partial_rotary_factor``, wherever config.json keeps it (top level, the rope
    parameters, or per layer type as Gemma 3 nests them)."""
    partial = cfg.get("partial_rotary_factor", 1.0)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor", partial)
        for sub in rope.values():
            if isinstance(sub, dict) and float(sub.get("partial_rotary_factor", 1.0)) != 1.0:
                partial = sub["partial_rotary_factor"]
    return float(partial if partial is not None else 1.0)


def _rope_checks(cfg: dict[str, Any]) -> None:
    partial = _partial_rotary(cfg)
    if partial != 1.0:
        raise ZooError(f"partial_rotary_factor={partial}: partial RoPE is not supported for {cfg.get('model_type')}")


def _partial_dims(cfg: dict[str, Any], unit: str) -> Dims:
    """RoPE dims for models whose attention rotates only the first int(head_dim × factor)
    dims of each head and passes the rest through (Phi, Phi-3)."""
    d = _rope_dims(cfg, unit)
    rot = int(d.head_dim * _partial_rotary(cfg))
    if rot <= 0 or rot > d.head_dim or rot % 2:
        raise ZooError(f"partial_rotary_factor={_partial_rotary(cfg)} gives {rot} rotary dims of head_dim="
                       f"{d.head_dim}; RoPE needs an even number of them")
    return Dims(d.heads, d.kv_heads, d.head_dim, d.hidden, rot)


def _phi_checks(cfg: dict[str, Any]) -> None:
    if cfg.get("qk_layernorm"):
        raise ZooError("Phi with qk_layernorm normalises q and k per head with a LayerNorm (mean removed, "
                       "bias added), which a QK transform would break; MergeLock supports Phi without it")


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
# Qwen3, Gemma 3 and OLMo 2 normalise q and k before RoPE: only a per-pair scale folded into
# the norm weights keeps qᵀk, so head permutations add to the (full) VO transform
_QK_NORM_HEAD = replace(_LLAMA, suffixes={**_LLAMA.suffixes, "q_norm": "q_norm.weight", "k_norm": "k_norm.weight"},
                        required=(*_QKVO, "q_norm", "k_norm"), qk_norm="head", permute=True)
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
    # MoE: the attention is Mistral's / Qwen2's; experts, shared experts and routers are untouched
    "mixtral": _LLAMA,
    "qwen2_moe": _LLAMA,
    # Gemma: head_dim is its own config entry; Gemma 2's logit soft-capping and sliding
    # windows act on qᵀk, which the transform leaves unchanged
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "qwen3": _QK_NORM_HEAD,
    "qwen3_moe": _QK_NORM_HEAD,
    "gemma3_text": replace(_QK_NORM_HEAD, norm_offset=1.0),  # Gemma's RMSNorm multiplies by (1 + w)
    "olmo2": replace(_QK_NORM_HEAD, qk_norm="full"),
    "phi": Arch(
        unit=r"(?:.+\.)?layers\.\d+\.self_attn",
        suffixes={**_PROJ, "o": "dense.weight"},
        required=_QKVO,
        dims=_partial_dims,
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
        checks=_phi_checks,
        rope=True,
    ),
    "phi3": Arch(
        unit=r"(?:.+\.)?layers\.\d+\.self_attn",
        suffixes={"qkv": "qkv_proj.weight", "o": "o_proj.weight"},  # rows: Q all | K all | V all
        required=("qkv", "o"),
        dims=_partial_dims,
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
        rope=True,
    ),
    "t5": Arch(
        unit=r"(?:.+\.)?(?:en|de)coder\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)",
        suffixes={"q": "q.weight", "k": "k.weight", "v": "v.weight", "o": "o.weight"},
        required=_QKVO,
        dims=_t5_dims,
        expected=lambda cfg: int(cfg["num_layers"]) + 2 * int(cfg.get("num_decoder_layers") or cfg["num_layers"]),
    ),
}
ARCHS["clip_text_model"] = ARCHS["clip_vision_model"] = ARCHS["clip"]
SUPPORTED = ("bert", "roberta", "vit", "clip", "gpt2", "llama", "mistral", "qwen2", "t5", "mixtral", "qwen2_moe",
             "qwen3", "qwen3_moe", "gemma3_text", "olmo2", "gemma", "gemma2", "phi", "phi3")


# Encoders and encoder-decoders: DistilBERT, ALBERT, ELECTRA, DeBERTa-v2, BART, Whisper. None has
# RoPE, so each gets the general QK transform, as BERT and T5 do.
def _albert_expected(cfg: dict[str, Any]) -> int:
    """ALBERT stores ``num_hidden_groups`` × ``inner_group_num`` layers and applies them
    ``num_hidden_layers`` times in all: one transform per stored (shared) layer keeps
    every application exact, since each uses the same locked weights."""
    return int(cfg.get("num_hidden_groups", 1)) * int(cfg.get("inner_group_num", 1))


def _seq2seq_dims(cfg: dict[str, Any], unit: str) -> Dims:
    """BART and Whisper: the encoder's self-attention has ``encoder_attention_heads``; the
    decoder's self- and cross-attention ``decoder_attention_heads`` (cross-attention
    projects the encoder's states into the decoder's heads)."""
    side = "decoder" if re.search(r"(?:^|\.)decoder\.layers\.", unit) else "encoder"
    return _heads(cfg, f"{side}_attention_heads", "d_model", "config.json")


_SEQ2SEQ = Arch(
    unit=r"(?:.+\.)?(?:en|de)coder\.layers\.\d+\.(?:self_attn|encoder_attn)",
    suffixes={**_PROJ, "o": "out_proj.weight"},
    required=_QKVO,
    dims=_seq2seq_dims,
    expected=lambda cfg: int(cfg["encoder_layers"]) + 2 * int(cfg["decoder_layers"]),
)
ENCODER_ARCHS: dict[str, Arch] = {
    "distilbert": Arch(
        unit=r"(?:.+\.)?transformer\.layer\.\d+\.attention",
        suffixes={"q": "q_lin.weight", "q_bias": "q_lin.bias", "k": "k_lin.weight", "k_bias": "k_lin.bias",
                  "v": "v_lin.weight", "v_bias": "v_lin.bias", "o": "out_lin.weight"},
        required=_QKVO,
        dims=lambda cfg, unit: _heads(cfg, "n_heads", "dim", "config.json"),
        expected=lambda cfg: int(cfg["n_layers"]),
    ),
    "albert": Arch(
        unit=r"(?:.+\.)?encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\.attention",
        suffixes={**_SEPARATE, "o": "dense.weight"},
        required=_QKVO,
        dims=lambda cfg, unit: _heads(cfg, "num_attention_heads", "hidden_size", "config.json"),
        expected=_albert_expected,
        checks=_bert_checks,
    ),
    "electra": _BERT,
    # Disentangled attention (arXiv 2006.03654): besides qᵀk, the content-to-position term
    # q·k_r and the position-to-content term k·q_r, with k_r and q_r the relative position
    # embeddings projected per head by W_K and W_Q (share_att_key) or by pos_key_proj and
    # pos_query_proj. The position projections take the transform of their side, q_r → A·q_r
    # and k_r → A⁻ᵀ·k_r, so q'·k_r' = qᵀAᵀA⁻ᵀk_r and k'·q_r' = kᵀA⁻¹A·q_r: both terms exact.
    "deberta-v2": Arch(
        unit=r"(?:.+\.)?encoder\.layer\.\d+\.attention",
        suffixes={"q": "self.query_proj.weight", "q_bias": "self.query_proj.bias",
                  "k": "self.key_proj.weight", "k_bias": "self.key_proj.bias",
                  "v": "self.value_proj.weight", "v_bias": "self.value_proj.bias",
                  "pos_q": "self.pos_query_proj.weight", "pos_q_bias": "self.pos_query_proj.bias",
                  "pos_k": "self.pos_key_proj.weight", "pos_k_bias": "self.pos_key_proj.bias",
                  "o": "output.dense.weight"},
        required=_QKVO,
        dims=lambda cfg, unit: _heads(cfg, "num_attention_heads", "hidden_size", "config.json"),
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
    ),
    "bart": _SEQ2SEQ,
    "whisper": _SEQ2SEQ,  # the conv front end and both position tables are outside attention: untouched
}
ARCHS.update(ENCODER_ARCHS)
SUPPORTED += tuple(ENCODER_ARCHS)


# --- Decoder families with fused or interleaved attention: GPT-NeoX/Pythia, GPT-J, StableLM,
# Falcon, BLOOM, OPT. Their configs name the same facts differently, so each reads its own keys.

def _cfg(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` that config.json sets (older configs use older names)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise KeyError(keys[0])
    return default


def _heads_of(cfg: dict[str, Any], heads: tuple[str, ...], hidden: tuple[str, ...]) -> Dims:
    """``_heads`` under whichever of the names config.json uses."""
    def pick(keys: tuple[str, ...]) -> str:
        return next((k for k in keys if cfg.get(k) is not None), keys[0])

    return _heads(cfg, pick(heads), pick(hidden), "config.json")


def _rotary(d: Dims, rot: int, what: str) -> Dims:
    """``d`` with ``rot`` rotary dims per head, refused unless RoPE can pair them."""
    if rot <= 0 or rot > d.head_dim or rot % 2:
        raise ZooError(f"{what} gives {rot} rotary dims of head_dim={d.head_dim}; RoPE needs an even number "
                       "of them, at most head_dim")
    return Dims(d.heads, d.kv_heads, d.head_dim, d.hidden, 0 if rot == d.head_dim else rot)


def _factor(cfg: dict[str, Any], default: float, *legacy: str) -> float:
    """The partial rotary factor as transformers reads it: ``rope_parameters`` first, then the
    top-level key, then the family's legacy key (GPT-NeoX's ``rotary_pct``), then its default."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
        return float(rope["partial_rotary_factor"])
    return float(_cfg(cfg, "partial_rotary_factor", *legacy, default=default))


def _neox_dims(cfg: dict[str, Any], unit: str) -> Dims:
    d = _heads(cfg, "num_attention_heads", "hidden_size", "config.json")
    factor = _factor(cfg, 0.25, "rotary_pct")  # GPTNeoXConfig's default
    return _rotary(d, int(d.head_dim * factor), f"partial_rotary_factor={factor}")


def _gptj_dims(cfg: dict[str, Any], unit: str) -> Dims:
    d = _heads_of(cfg, ("n_head", "num_attention_heads"), ("n_embd", "hidden_size"))
    rot = cfg.get("rotary_dim", 64)  # GPTJConfig's default; null rotates the whole width, as transformers does
    return _rotary(d, d.hidden if rot is None else int(rot), f"rotary_dim={rot}")


def _stablelm_dims(cfg: dict[str, Any], unit: str) -> Dims:
    d = _rope_dims({k: v for k, v in cfg.items() if k != "head_dim"}, unit)  # head_dim is hidden / heads
    factor = _factor(cfg, 0.25)  # StableLmConfig's default
    return _rotary(d, int(d.head_dim * factor), f"partial_rotary_factor={factor}")


def _stablelm_checks(cfg: dict[str, Any]) -> None:
    if cfg.get("qk_layernorm"):
        raise ZooError("StableLM with qk_layernorm normalises q and k with a LayerNorm per head (the mean removed "
                       "over all of the head's dims, rotary and pass-through alike), which a QK transform on the "
                       "weights would break; MergeLock supports StableLM without it")


def _falcon_kv(cfg: dict[str, Any]) -> int:
    """Falcon's KV heads: ``num_kv_heads`` in the new (40B) architecture, one with
    multi-query (FalconConfig's default), else one per query head."""
    heads = int(_cfg(cfg, "num_attention_heads", "n_head"))
    if cfg.get("new_decoder_architecture", False):
        return int(cfg.get("num_kv_heads") or heads)
    return 1 if cfg.get("multi_query", True) else heads


def _falcon_dims(cfg: dict[str, Any], unit: str) -> Dims:
    d = _heads_of(cfg, ("num_attention_heads", "n_head"), ("hidden_size", "n_embed"))
    kv = _falcon_kv(cfg)
    if kv <= 0 or d.heads % kv:
        raise ZooError(f"num_kv_heads={kv} does not divide num_attention_heads={d.heads}")
    if not cfg.get("alibi", False) and d.head_dim % 2:
        raise ZooError(f"head_dim={d.head_dim} is odd; RoPE pairs dimensions")
    return Dims(d.heads, kv, d.head_dim, d.hidden)


def _falcon_checks(cfg: dict[str, Any]) -> None:
    if not cfg.get("alibi", False):
        _rope_checks(cfg)  # Falcon rotates every dim of a head


def _falcon_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    """query_key_value rows: per KV group its query heads, K, V (new architecture; without
    multi-query that is per head q, k, v); multi-query: all Q heads, then K, then V."""
    mqa = not cfg.get("new_decoder_architecture", False) and cfg.get("multi_query", True)
    return {"qkv_order": "blocks" if mqa else "grouped", "rope": not cfg.get("alibi", False)}


_FUSED = {"qkv": "query_key_value.weight", "qkv_bias": "query_key_value.bias", "o": "dense.weight"}
_DECODERS: dict[str, Arch] = {
    # query_key_value rows per head: q, k, v; rotate_half over the first rotary_pct of each head
    "gpt_neox": Arch(
        unit=r"(?:.+\.)?layers\.\d+\.attention",
        suffixes=_FUSED,
        required=("qkv", "o"),
        dims=_neox_dims,
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
        rope=True,
        variant=lambda cfg: {"qkv_order": "grouped"},
    ),
    # rotate_every_two: RoPE pairs dims (2j, 2j + 1) of the first rotary_dim
    "gptj": Arch(
        unit=r"(?:.+\.)?h\.\d+\.attn",
        suffixes={**_PROJ, "o": "out_proj.weight"},
        required=_QKVO,
        dims=_gptj_dims,
        expected=lambda cfg: int(_cfg(cfg, "n_layer", "num_hidden_layers")),
        rope=True,
        variant=lambda cfg: {"rope_pairs": "interleaved"},
    ),
    # LLaMA's projections (GQA, optional biases), rotate_half over the first partial_rotary_factor
    "stablelm": Arch(
        unit=r"(?:.+\.)?layers\.\d+\.self_attn",
        suffixes={**_PROJ, "o": "o_proj.weight"},
        required=_QKVO,
        dims=_stablelm_dims,
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
        checks=_stablelm_checks,
        rope=True,
    ),
    "falcon": Arch(
        unit=r"(?:.+\.)?h\.\d+\.self_attention",
        suffixes=_FUSED,
        required=("qkv", "o"),
        dims=_falcon_dims,
        expected=lambda cfg: int(_cfg(cfg, "num_hidden_layers", "n_layer")),
        checks=_falcon_checks,
        variant=_falcon_variant,
    ),
    # ALiBi is added to qᵀk, which the transform keeps: a general QK matrix; rows per head q, k, v
    "bloom": Arch(
        unit=r"(?:.+\.)?h\.\d+\.self_attention",
        suffixes=_FUSED,
        required=("qkv", "o"),
        dims=lambda cfg, unit: _heads_of(cfg, ("n_head", "num_attention_heads"), ("hidden_size", "n_embed")),
        expected=lambda cfg: int(_cfg(cfg, "n_layer", "num_hidden_layers")),
        variant=lambda cfg: {"qkv_order": "grouped"},
    ),
    # learned absolute positions, separate projections with biases
    "opt": Arch(
        unit=r"(?:.+\.)?layers\.\d+\.self_attn",
        suffixes={**_PROJ, "o": "out_proj.weight"},
        required=_QKVO,
        dims=lambda cfg, unit: _heads(cfg, "num_attention_heads", "hidden_size", "config.json"),
        expected=lambda cfg: int(cfg["num_hidden_layers"]),
    ),
}
ARCHS.update(_DECODERS)
SUPPORTED = (*SUPPORTED, *_DECODERS)


def _expected_shapes(arch: Arch, d: Dims) -> dict[str, tuple[int, ...]]:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if arch.row_vectors:  # Conv1D weights are [in, out]
        return {"qkv": (d.hidden, 3 * q), "qkv_bias": (3 * q,), "o": (q, d.hidden)}
    norms = {"q_norm": (q,), "k_norm": (kv,)} if arch.qk_norm == "full" else {"q_norm": (d.head_dim,),
                                                                              "k_norm": (d.head_dim,)}
    return {"q": (q, d.hidden), "q_bias": (q,), "k": (kv, d.hidden), "k_bias": (kv,),
            "v": (kv, d.hidden), "v_bias": (kv,), "o": (d.hidden, q), "qkv": (q + 2 * kv, d.hidden),
            "qkv_bias": (q + 2 * kv,), **norms,
            "pos_q": (q, d.hidden), "pos_q_bias": (q,), "pos_k": (kv, d.hidden), "pos_k_bias": (kv,)}


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
    arch = ARCHS.get(mt)
    if mt == "gemma3":
        raise ZooError("'gemma3' is Gemma 3 with its vision tower (a SigLIP encoder beside the language model); "
                       "MergeLock supports the text-only 'gemma3_text' (Gemma3ForCausalLM)")
    try:
        if arch is not None:  # an architecture's own refusal names the precise reason
            arch.checks(cfg)
    except KeyError as e:
        raise ZooError(f"config.json has no {e.args[0]!r}, which a {mt} model needs") from None
    if (arch is None or arch.qk_norm is None) and (mt in QK_NORM_TYPES or any(
            re.search(r"\.(q_norm|k_norm|q_layernorm|k_layernorm)\.", n) for n in ckpt.tensors)):
        raise ZooError(f"{mt!r} normalises queries and keys per head (QK-norm), which a general QK transform "
                       f"would break; MergeLock supports {', '.join(SUPPORTED)}")
    if arch is None:
        raise ZooError(f"MergeLock does not support model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    try:
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
            fields = dict(rope=arch.rope, row_vectors=arch.row_vectors, rotary_dim=d.rotary_dim,
                          qk_norm=arch.qk_norm, norm_offset=arch.norm_offset, permute=arch.permute)
            result.append(Attention(unit, dict(sorted(tensors.items())), d.heads, d.kv_heads, d.head_dim,
                                    **{**fields, **arch.variant(cfg)}))
    except KeyError as e:
        raise ZooError(f"config.json has no {e.args[0]!r}, which a {mt} model needs") from None
    if len(result) != expected:
        raise ZooError(f"found {len(result)} attention layers in the checkpoint, but config.json promises "
                       f"{expected}; the checkpoint does not match the {mt} layout")
    return Layout(mt, result)


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
