"""The corpus's tiny, seeded input families: Llama, Mistral and GPT-2, float32 and bfloat16.

Each family folder holds a base and three experts (the base plus seeded noise), plus
edge-case models: ``s0`` (``e0`` written in two shards with an index), ``t0`` (``e0``
with a tokenizer whose vocabulary differs: one token renamed), ``m0`` (``e0`` missing
one layer weight), ``q0``/``q1`` (experts whose deltas are multiples of 1/128 of the
noise scale, so magnitudes tie at every density cut-off, even in float32), and ``h0``
(``e0`` stored in float16, for mixed-dtype groups). Written with safetensors and
hand-written ``config.json`` files, so no byte depends on transformers' initialisation.
GPT-2 keeps its layout: Conv1D weights stored ``[in, out]`` and ``lm_head`` tied to
``wte`` (not saved).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from inputs import tokenizer_files

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, LAYERS = 16, 32, 64, 4, 2, 4
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
ARCHS = ("llama", "mistral", "gpt2")


def config(arch: str, dtype: str) -> dict:
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": HIDDEN, "n_layer": LAYERS,
                "n_head": HEADS, "n_positions": 32, "n_ctx": 32, "vocab_size": VOCAB, "n_inner": None,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype}
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[arch]
    cfg = {"architectures": [cls], "model_type": arch, "hidden_size": HIDDEN, "intermediate_size": INTER,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "mistral":
        cfg["sliding_window"] = None
    return cfg


def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    if arch == "gpt2":
        out = {"transformer.wte.weight": (VOCAB, HIDDEN), "transformer.wpe.weight": (32, HIDDEN)}
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            out.update({p + "ln_1.weight": (HIDDEN,), p + "ln_1.bias": (HIDDEN,),
                        p + "attn.c_attn.weight": (HIDDEN, 3 * HIDDEN), p + "attn.c_attn.bias": (3 * HIDDEN,),
                        p + "attn.c_proj.weight": (HIDDEN, HIDDEN), p + "attn.c_proj.bias": (HIDDEN,),
                        p + "ln_2.weight": (HIDDEN,), p + "ln_2.bias": (HIDDEN,),
                        p + "mlp.c_fc.weight": (HIDDEN, 4 * HIDDEN), p + "mlp.c_fc.bias": (4 * HIDDEN,),
                        p + "mlp.c_proj.weight": (4 * HIDDEN, HIDDEN), p + "mlp.c_proj.bias": (HIDDEN,)})
        out.update({"transformer.ln_f.weight": (HIDDEN,), "transformer.ln_f.bias": (HIDDEN,)})
        return out
    kv = HIDDEN // HEADS * KV_HEADS
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                    p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def _write(folder: Path, sd: dict[str, torch.Tensor], cfg: dict, tok: dict[str, str], shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    if shards == 1:
        save_file({n: sd[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, cut = {}, (len(names) + 1) // 2
        for k, part in enumerate((names[:cut], names[cut:])):
            fname = f"model-{k + 1:05d}-of-00002.safetensors"
            save_file({n: sd[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for fname, text in tok.items():
        (folder / fname).write_text(text)


def _other_tokenizer() -> dict[str, str]:
    files = tokenizer_files()
    tok = json.loads(files["tokenizer.json"])
    tok["model"]["vocab"]["w63x"] = tok["model"]["vocab"].pop("w63")  # one token renamed
    files["tokenizer.json"] = json.dumps(tok, indent=2)
    return files


def _lora(folder: Path, dtype: torch.dtype) -> None:
    """A PEFT LoRA adapter (rank 2, alpha 4) on every layer's q_proj and v_proj."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(400)
    kv = HIDDEN // HEADS * KV_HEADS
    sd = {}
    for i in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}."
            sd[p + "lora_A.weight"] = (torch.randn(2, HIDDEN, generator=g) * 0.1).to(dtype)
            sd[p + "lora_B.weight"] = (torch.randn(out, 2, generator=g) * 0.1).to(dtype)
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": None, "inference_mode": True}, indent=2))


def build(root: Path) -> list[str]:
    """Write every family under ``root`` (``llama-f32/base``, ...); return the family names."""
    names = []
    for arch in ARCHS:
        for tag, dtype in DTYPES.items():
            fam = f"{arch}-{tag}"
            names.append(fam)
            cfg = config(arch, "float32" if tag == "f32" else "bfloat16")
            g = torch.Generator().manual_seed(7)
            base = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes(arch).items()}
            if arch == "gpt2":  # layer norms near one, as trained models have them
                base = {n: (t + 1.0 if ".ln_" in n and n.endswith("weight") else t) for n, t in base.items()}
            models = {"base": base}
            for i in range(3):
                g = torch.Generator().manual_seed(200 + i)
                models[f"e{i}"] = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
            for i in range(2):
                g = torch.Generator().manual_seed(300 + i)
                models[f"q{i}"] = {n: t + torch.randint(-3, 4, t.shape, generator=g).float() / 128 * 0.01
                                   for n, t in base.items()}
            tok = tokenizer_files()
            for name, sd in models.items():
                _write(root / fam / name, {n: t.to(dtype) for n, t in sd.items()}, cfg, tok)
            e0 = {n: t.to(dtype) for n, t in models["e0"].items()}
            _write(root / fam / "s0", e0, cfg, tok, shards=2)
            _write(root / fam / "t0", e0, cfg, _other_tokenizer())
            dropped = "model.layers.1.post_attention_layernorm.weight" if arch != "gpt2" else "transformer.h.1.ln_2.bias"
            _write(root / fam / "m0", {n: t for n, t in e0.items() if n != dropped}, cfg, tok)
            if arch == "llama":
                _lora(root / fam / "l0", dtype)
            h_cfg = {**cfg, "torch_dtype": "float16"}
            _write(root / fam / "h0", {n: t.to(torch.float16) for n, t in models["e0"].items()}, h_cfg, tok)
    return names
