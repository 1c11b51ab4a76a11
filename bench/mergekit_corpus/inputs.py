"""The tiny, seeded input models of the mergekit parity corpus.

Built from a fixed torch generator and written with safetensors and a hand-written
``config.json``, so the bytes do not depend on transformers' initialisation: the
parity test rebuilds them and checks their sha256 against the fixture manifest.
A one-layer Llama (hidden 16, vocabulary 64), in float32 and in bfloat16: a base and
three experts (the base plus seeded noise), and a tokenizer in ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, LAYERS = 16, 32, 64, 4, 2, 1
EXPERTS = 3


def llama_config(dtype: str, layers: int = LAYERS) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "dtype": dtype,
            "bos_token_id": 1, "eos_token_id": 2}


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                    p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def tokenizer_files() -> dict[str, str]:
    """A word-level BPE tokenizer over VOCAB tokens (no merges), as a fast tokenizer saves it."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for c, i in list(vocab.items())[:3]],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": []}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 64}
    return {"tokenizer.json": json.dumps(tok, indent=2), "tokenizer_config.json": json.dumps(config, indent=2)}


def build(root: Path, layers: int = LAYERS) -> dict[str, dict[str, str]]:
    """Write every input model under ``root`` (``f32/base``, ``f32/e0``, ..., ``bf16/...``),
    with ``layers`` layers; return each model's files' sha256, keyed by its folder
    relative to ``root``."""
    digests = {}
    for tag, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(1234)
        base = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes(layers).items()}
        models = {"base": base}
        for i in range(EXPERTS):
            g = torch.Generator().manual_seed(100 + i)
            models[f"e{i}"] = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        for name, sd in models.items():
            folder = root / tag / name
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: t.to(dtype).contiguous() for n, t in sd.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
            cfg = llama_config("float32" if dtype == torch.float32 else "bfloat16", layers)
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            files = tokenizer_files()
            if name == "e2":  # one expert's tokenizer differs in a setting only (not its vocabulary)
                files["tokenizer_config.json"] = files["tokenizer_config.json"].replace('"model_max_length": 64',
                                                                                          '"model_max_length": 32')
            for fname, text in files.items():
                (folder / fname).write_text(text)
            digests[f"{tag}/{name}"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                        for p in sorted(folder.iterdir())}
    return digests
