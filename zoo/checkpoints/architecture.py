"""Architecture facts from a model's ``config.json``: the fields the registry records."""

from __future__ import annotations

from typing import Any


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def architecture_from_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture fields the registry records, from a ``config.json`` dict.

    Names differ across model families (``n_embd`` for GPT-2, ``d_model`` for T5), and
    multi-tower models (CLIP) keep them in ``text_config``; both are handled.
    """
    if not config:
        return {}
    cfg = dict(config)
    if _first(cfg, "hidden_size", "n_embd", "n_embed", "d_model", "dim") is None:
        for sub in ("text_config", "language_config", "llm_config", "vision_config"):
            if isinstance(cfg.get(sub), dict):
                cfg = {**cfg[sub], "model_type": config.get("model_type")}
                break
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    arch = {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "hidden_size": _first(cfg, "hidden_size", "n_embd", "n_embed", "d_model", "dim"),
        "num_layers": _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        "num_heads": heads,
        "num_kv_heads": _falcon_kv_heads(cfg, heads) if config.get("model_type") == "falcon" else
        _first(cfg, "num_key_value_heads", "n_kv_heads", "multi_query_group_num") or heads,
        "vocab_size": _first(cfg, "vocab_size", "padded_vocab_size"),
    }
    arch.update(_encoder_decoder(config))
    return {k: v for k, v in arch.items() if v is not None}


def _encoder_decoder(cfg: dict[str, Any]) -> dict[str, Any]:
    """An encoder-decoder's layer and head counts per side (BART and Whisper name them
    ``encoder_layers``, ``decoder_attention_heads``...; T5 ``num_layers``,
    ``num_decoder_layers`` and one ``num_heads``). ``num_layers`` and ``num_heads`` are the
    encoder's, as transformers' ``num_hidden_layers`` and ``num_attention_heads`` are."""
    if not cfg.get("is_encoder_decoder") and _first(cfg, "encoder_layers", "num_decoder_layers") is None:
        return {}
    sides = {
        "encoder_layers": _first(cfg, "encoder_layers", "num_layers"),
        "decoder_layers": _first(cfg, "decoder_layers", "num_decoder_layers", "num_layers"),
        "encoder_heads": _first(cfg, "encoder_attention_heads", "num_heads"),
        "decoder_heads": _first(cfg, "decoder_attention_heads", "num_heads"),
    }
    if sides["encoder_layers"] is None:
        return {}
    counts = {"num_layers": sides["encoder_layers"], "num_heads": sides["encoder_heads"],
              "num_kv_heads": sides["encoder_heads"], **sides}
    return {k: v for k, v in counts.items() if v is not None}  # never erase a count read above


def _falcon_kv_heads(cfg: dict[str, Any], heads: Any) -> Any:
    """Falcon's KV heads, as FalconConfig reads them: ``num_kv_heads`` in the new (40B)
    architecture, one under ``multi_query`` (its default: Falcon-7B), else one per head."""
    if cfg.get("new_decoder_architecture", False):
        return cfg.get("num_kv_heads") or heads
    return 1 if cfg.get("multi_query", True) else heads
