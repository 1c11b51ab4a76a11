"""The tokenizer corpus: tiny Llama models whose vocabularies differ, and recipes that
use ``tokenizer_source``, the ``tokenizer:`` block, ``chat_template`` and the
``base+adapter`` model syntax, each run through mergekit 0.1.5
(make_tokenizer_fixtures.py) and through ``zoo merge`` (tests/test_mergekit_tokenizers.py).

Inputs, per dtype folder (``f32``, ``bf16``): ``base`` (64 tokens: ``<unk>``, ``<s>``,
``</s>`` and ``w3``..``w63``); ``e0`` (the base's vocabulary); ``a0`` (adds the special
tokens ``<|im_start|>`` and ``<|im_end|>``, 66 rows); ``a1`` (renames ``w63`` to
``w63x`` in its BPE vocabulary and adds ``<|im_end|>`` and ``<tool>``, 66 rows); ``a2``
(adds ``<|im_end|>``; its embeddings are padded to 72 rows, and config.json says 72);
and ``l0``, a PEFT LoRA adapter for the base. a0 and a1 carry one chat template, a2
another. Written with safetensors and hand-made JSON, so no byte depends on
transformers' initialisation.

A case's ``zoo`` is ``same`` (every tensor, config.json's vocab_size and dtype, and the
tokenizer files bit for bit), ``close`` (the same, but tensors within float32
rounding: slerp) or ``refuse`` (with a line matching ``match``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, LAYERS = 16, 32, 64, 4, 2, 1
TEMPLATE_A = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
              "{% endif %}")
TEMPLATE_B = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
# (added tokens, renamed BPE tokens, embedding rows, chat template) per model
VOCABS: dict[str, tuple[list[str], dict[str, str], int, str | None]] = {
    "base": ([], {}, VOCAB, None),
    "e0": ([], {}, VOCAB, None),
    "a0": (["<|im_start|>", "<|im_end|>"], {}, VOCAB + 2, TEMPLATE_A),
    "a1": (["<|im_end|>", "<tool>"], {"w63": "w63x"}, VOCAB + 2, TEMPLATE_A),
    "a2": (["<|im_end|>"], {}, 72, TEMPLATE_B),
}


def _config(dtype: str, rows: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": rows, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "dtype": dtype,
            "bos_token_id": 1, "eos_token_id": 2}


def _shapes(rows: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    out = {"model.embed_tokens.weight": (rows, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                    p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (rows, HIDDEN)})
    return out


def _tokenizer(added: list[str], renamed: dict[str, str], template: str | None) -> dict[str, str]:
    """A word-level BPE tokenizer (no merges) with ``added`` special tokens after its vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{renamed.get(f"w{i}", f"w{i}"): i for i in range(3, VOCAB)}}
    specials = [("<unk>", 0), ("<s>", 1), ("</s>", 2)] + [(t, VOCAB + k) for k, t in enumerate(added)]
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for c, i in specials],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": []}}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                              "unk_token": "<unk>", "model_max_length": 64}
    if template is not None:
        config["chat_template"] = template
    return {"tokenizer.json": json.dumps(tok, indent=2), "tokenizer_config.json": json.dumps(config, indent=2)}


def _lora(folder: Path, dtype: torch.dtype) -> None:
    """A PEFT LoRA adapter (rank 2, alpha 4) on q_proj and v_proj."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(401)
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


def build(root: Path) -> dict[str, dict[str, str]]:
    """Write every input under ``root`` (``f32/base``, ..., ``bf16/l0``); return each
    model's files' sha256, keyed by its folder relative to ``root``."""
    digests = {}
    for tag, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(4321)
        full = {n: torch.randn(s, generator=g) * 0.05 for n, s in _shapes(72).items()}
        for k, (name, (added, renamed, rows, template)) in enumerate(VOCABS.items()):
            g = torch.Generator().manual_seed(500 + k)
            noise = 0.0 if name == "base" else 0.01
            sd = {n: (t + noise * torch.randn(t.shape, generator=g))[:_shapes(rows)[n][0]]
                  for n, t in full.items()}
            folder = root / tag / name
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: t.to(dtype).contiguous() for n, t in sd.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
            cfg = _config("float32" if dtype == torch.float32 else "bfloat16", rows)
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            for fname, text in _tokenizer(added, renamed, template).items():
                (folder / fname).write_text(text)
        _lora(root / tag / "l0", dtype)
        for name in [*VOCABS, "l0"]:
            folder = root / tag / name
            digests[f"{tag}/{name}"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                        for p in sorted(folder.iterdir())}
    return digests


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", **({"parameters": params} if params else {})}


CASES: dict[str, dict[str, Any]] = {
    # union: new BPE token (w63x), added tokens in one model (<|im_start|>, <tool>) and in two (<|im_end|>: mean)
    "union_task_arithmetic_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "union",
        "models": [_m("a0", weight=0.5), _m("a1", weight=0.5)]}},
    "union_linear_three_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "linear", "base_model": "{base}", "tokenizer_source": "union", "parameters": {"weight": 0.25},
        "models": [_m("a0"), _m("a1", weight=0.4), _m("a2")]}},
    "union_ties_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "tokenizer_source": "union",
        "models": [_m("a0", weight=0.6, density=0.5), _m("a2", weight=0.4, density=0.7)]}},
    # base: the base's 64 tokens; a1 lacks w63, so its row is the base's
    "base_differs_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "base",
        "models": [_m("a0", weight=0.5), _m("a1", weight=0.5)]}},
    # a model: a1's tokenizer (w63x, <|im_end|>, <tool>)
    "model_source_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "{a1}",
        "models": [_m("a0", weight=0.3), _m("a1", weight=0.7)]}},
    # slerp over rebuilt embedding rows
    "model_source_slerp_f32": {"inputs": "f32", "recipe": {
        "merge_method": "slerp", "base_model": "{base}", "tokenizer_source": "{a2}", "parameters": {"t": 0.3},
        "models": [_m("a2")]}},
    # the tokenizer block: union, tokens with a zero row, a forced row from another token, padding
    "block_tokens_pad_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 32, "tokens": {
            "<pad>": {"source": {"kind": "zero"}},
            "<|im_end|>": {"source": {"kind": "model_token", "model": "{a0}", "token": "w5"}, "force": True},
            "<tool>": {"source": "{a1}"},
            "w7": {"source": {"kind": "model_token", "model": "{a1}", "token_id": 9}, "force": True}}},
        "models": [_m("a0", weight=0.5), _m("a1", weight=0.5)]}},
    "block_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "linear", "base_model": "{base}", "parameters": {"weight": 0.5},
        "tokenizer": {"source": "base", "tokens": {
            "w5": {"source": {"kind": "model_token", "model": "{a0}", "token": "<|im_start|>"}, "force": True}}},
        "models": [_m("a0"), _m("a2")]}},
    # a new token on the base's tokenizer: mergekit 0.1.5 adds it to the base's own
    # tokenizer object, then fails (KeyError) building the base's permutation
    "block_base_new_token_bf16": {"inputs": "bf16", "zoo": "refuse", "match": "new token", "recipe": {
        "merge_method": "linear", "base_model": "{base}", "parameters": {"weight": 0.5},
        "tokenizer": {"source": "base", "tokens": {"<|im_end|>": {"source": "{a0}"}}},
        "models": [_m("a0"), _m("a2")]}},
    # a built-in template name: zoo does not ship mergekit's template files
    "chat_builtin_name_f32": {"inputs": "f32", "zoo": "refuse", "match": "chatml", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "base",
        "chat_template": "chatml", "models": [_m("e0", weight=0.5)]}},
    # chat templates: the most common among the inputs, a literal Jinja template, one with no tokenizer_source
    "chat_auto_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "union",
        "chat_template": "auto", "models": [_m("a0", weight=0.5), _m("a1", weight=0.5), _m("a2", weight=0.5)]}},
    "chat_literal_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "base",
        "chat_template": TEMPLATE_B, "models": [_m("e0", weight=0.5)]}},
    "chat_no_tokenizer_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "chat_template": TEMPLATE_A,
        "models": [_m("e0", weight=0.5)]}},
    # base+adapter: the adapter merged into its base (PEFT's merge_and_unload), then merged
    "lora_linear_f32": {"inputs": "f32", "recipe": {
        "merge_method": "linear", "models": [{"model": "{base}+{l0}", "parameters": {"weight": 0.5}},
                                             _m("e0", weight=0.5)]}},
    "lora_task_arithmetic_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "models": [{"model": "{base}+{l0}", "parameters": {"weight": 1.0}}, _m("e0", weight=0.5)]}},
}


def recipe_for(case: dict[str, Any], root: str) -> dict[str, Any]:
    """The case's recipe with ``{name}`` (and ``{a}+{b}``) filled in with folders under ``root``."""
    def path(ref: str) -> str:
        return "+".join(f"{root}/{case['inputs']}/{p}" for p in ref.strip("{}").split("}+{"))

    def fill(x: Any) -> Any:
        if isinstance(x, str):
            return path(x) if x.startswith("{") and x.endswith("}") and "%" not in x else x
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return x

    return fill(copy.deepcopy(case["recipe"]))
