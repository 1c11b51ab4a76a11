"""MergeLock on the decoder families with fused or interleaved attention: GPT-NeoX/Pythia
(fused per-head query_key_value, partial rotary), GPT-J (rotate_every_two), StableLM
(partial rotary, GQA), Falcon (multi-query, the new architecture's KV groups, ALiBi or
RoPE), BLOOM (ALiBi, fused per head) and OPT. One tiny seeded model per family and
variant: logits and every hidden state equal on multi-token inputs, unlock round trips,
reproducible bytes, no key material, and `zoo show`'s counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo.protect as protect
from zoo import open_checkpoint
from zoo.checkpoints.architecture import architecture_from_config
from zoo.errors import ZooError
from zoo.protect.layouts import layout_for
from zoo.protect.transform import Key, draw

from tests.test_protect_families import (_ids, assert_bf16_within, assert_reproducible_and_keyless, outputs,
                                         tensors)

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
GPTJ = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=256)
FALCON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=48)
BLOOM = dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)
OPT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
           max_position_embeddings=256)


def _families():
    import transformers as T

    return {
        # (model, (layers, heads, KV heads) that `zoo show` must read)
        "gpt_neox-parallel-bias": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(rotary_pct=0.25, **SMALL)),
                                   (2, 4, 4)),
        "gpt_neox-sequential-half-rotary-nobias": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            rotary_pct=0.5, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
            **SMALL)), (2, 4, 4)),
        "gptj-rotary_dim4": (lambda: T.GPTJForCausalLM(T.GPTJConfig(rotary_dim=4, **GPTJ)), (2, 4, 4)),
        "gptj-full-rotary": (lambda: T.GPTJForCausalLM(T.GPTJConfig(rotary_dim=8, **GPTJ)), (2, 4, 4)),
        "stablelm-gqa-bias-parallel": (lambda: T.StableLmForCausalLM(T.StableLmConfig(
            num_key_value_heads=2, use_qkv_bias=True, use_parallel_residual=True, **SMALL)), (2, 4, 2)),
        "stablelm-half-rotary": (lambda: T.StableLmForCausalLM(T.StableLmConfig(
            num_key_value_heads=4, partial_rotary_factor=0.5, **SMALL)), (2, 4, 4)),
        "falcon-mqa-rotary": (lambda: T.FalconForCausalLM(T.FalconConfig(multi_query=True, **FALCON)), (2, 4, 1)),
        "falcon-mha-alibi-bias": (lambda: T.FalconForCausalLM(T.FalconConfig(
            multi_query=False, alibi=True, bias=True, parallel_attn=False, **FALCON)), (2, 4, 4)),
        "falcon-new-gqa": (lambda: T.FalconForCausalLM(T.FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, **FALCON)), (2, 4, 2)),
        "falcon-new-mqa-bias": (lambda: T.FalconForCausalLM(T.FalconConfig(
            new_decoder_architecture=True, num_kv_heads=1, bias=True, **FALCON)), (2, 4, 1)),
        "bloom-alibi": (lambda: T.BloomForCausalLM(T.BloomConfig(**BLOOM)), (2, 4, 4)),
        "opt-bias": (lambda: T.OPTForCausalLM(T.OPTConfig(**OPT)), (2, 4, 4)),
        "opt-350m-style": (lambda: T.OPTForCausalLM(T.OPTConfig(
            do_layer_norm_before=False, word_embed_proj_dim=16, enable_bias=False, **OPT)), (2, 4, 4)),
    }


FAMILIES = list(_families())


def build(path: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = _families()[family][0]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.2)
            else:
                p.add_(0.3 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_reversible_reproducible_and_keyless(family, tmp_path):
    src = build(tmp_path / "src", family)
    ck = open_checkpoint(src)
    layout = layout_for(ck)
    layers, heads, kv = _families()[family][1]
    assert len(layout.units) == layers
    att = layout.units[0]
    assert (att.heads, att.kv_heads) == (heads, kv)

    info = protect.protect(str(src), out_dir=tmp_path / "locked", seed=1234567, verify=True)
    assert info["verify"]["passed"], info["verify"]
    assert 1 < info["lock"]["max_cond_qk"] <= 1e3 and 1 < info["lock"]["max_cond_vo"] <= 1e3

    ids = _ids(src)
    for i, (a, b) in enumerate(zip(outputs(src, ids), outputs(tmp_path / "locked", ids))):
        rel = ((a - b).abs().max() / a.abs().max()).item()
        print(f"{family} output {i}: {rel:.2e}")
        assert rel < 1e-4, f"output {i} (0: logits, then hidden states) is off by {rel:.2e}"

    before, locked = tensors(src), tensors(tmp_path / "locked")
    changed = {n for n in before if before[n] != locked[n]}
    assert changed <= set(layout.roles)  # nothing outside attention moved
    assert {n for n, (_, role) in layout.roles.items() if role in ("q", "k", "v", "o", "qkv")} <= changed

    assert_reproducible_and_keyless(src, tmp_path, locked)

    protect.unlock(str(tmp_path / "locked"), out_dir=tmp_path / "back", key_file=info["key_file"])
    back, back_ck = tensors(tmp_path / "back"), open_checkpoint(tmp_path / "back")
    for n in before:
        if n not in layout.roles:
            assert back[n] == before[n], n
        else:
            a, b = ck.read_tensor(n).double(), back_ck.read_tensor(n).double()
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4, n


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_show_counts(family, tmp_path):
    src = build(tmp_path / "src", family)
    cfg = json.loads((src / "config.json").read_text())
    arch = open_checkpoint(src).architecture()
    layers, heads, kv = _families()[family][1]
    assert arch["model_type"] == cfg["model_type"]
    assert (arch["num_layers"], arch["num_heads"], arch["num_kv_heads"]) == (layers, heads, kv)
    assert arch["hidden_size"] == 32
    assert architecture_from_config(cfg) == arch


@pytest.mark.parametrize("cfg, kv", [
    ({"model_type": "falcon", "num_attention_heads": 71, "num_hidden_layers": 32, "hidden_size": 4544}, 1),  # 7B
    ({"model_type": "falcon", "n_head": 128, "n_layer": 60, "hidden_size": 8192, "new_decoder_architecture": True,
      "num_kv_heads": 8}, 8),  # 40B, older names
    ({"model_type": "falcon", "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 32,
      "multi_query": False}, 4),
])
def test_zoo_show_falcon_kv_heads_follow_its_defaults(cfg, kv):
    """FalconConfig's multi_query defaults to True: a config.json without it is multi-query."""
    arch = architecture_from_config(cfg)
    assert arch["num_kv_heads"] == kv and arch["num_heads"] == cfg.get("num_attention_heads", cfg.get("n_head"))
    assert arch["num_layers"] == cfg.get("num_hidden_layers", cfg.get("n_layer"))


def test_zoo_show_reads_bloom_176b_names():
    """BLOOM's own config.json names: n_embed, n_layer, num_attention_heads (bigscience/bloom)."""
    arch = architecture_from_config({"model_type": "bloom", "n_embed": 14336, "n_layer": 70,
                                     "num_attention_heads": 112, "vocab_size": 250880})
    assert (arch["hidden_size"], arch["num_layers"], arch["num_heads"], arch["num_kv_heads"]) == (14336, 70, 112, 112)


def _rotary_in_model(model) -> int:
    """How many dims of a head the model's own attention rotates."""
    att = next(m for n, m in model.named_modules() if n.endswith(("attention", "attn", "self_attn")))
    return int(getattr(att, "rotary_ndims", None) or getattr(att, "rotary_dim", None) or att.head_dim)


@pytest.mark.parametrize("family, edit", [
    ("gpt_neox-parallel-bias", {}),
    ("gpt_neox-sequential-half-rotary-nobias", {}),
    ("gpt_neox-parallel-bias", {"drop": ["rope_parameters"], "set": {"rotary_pct": 0.5}}),  # a Pythia config.json
    ("gpt_neox-parallel-bias", {"drop": ["rope_parameters"]}),  # neither: GPTNeoXConfig's 0.25
    ("gptj-rotary_dim4", {}),
    ("gptj-full-rotary", {}),
    ("stablelm-gqa-bias-parallel", {}),
    ("stablelm-half-rotary", {}),
    ("stablelm-gqa-bias-parallel", {"drop": ["rope_parameters"], "set": {"partial_rotary_factor": 0.5}}),
])
def test_rotary_dims_match_what_transformers_rotates(family, edit, tmp_path):
    """The layout's rotary dims are the ones transformers' attention rotates, whichever way
    config.json says it (rope_parameters, partial_rotary_factor, Pythia's rotary_pct)."""
    from zoo.protect.verify import load

    src = build(tmp_path / "src", family)
    cfg = json.loads((src / "config.json").read_text())
    for k in edit.get("drop", []):
        cfg.pop(k, None)
    cfg.update(edit.get("set", {}))
    (src / "config.json").write_text(json.dumps(cfg))
    att = layout_for(open_checkpoint(src)).units[0]
    assert att.rotary == _rotary_in_model(load(src))
    assert att.rope_pairs == ("interleaved" if family.startswith("gptj") else "half")


def test_gptj_pairs_are_interleaved_and_the_half_layout_breaks_it(tmp_path):
    """GPT-J's rotate_every_two pairs dims (2j, 2j + 1): the QK matrix is a scaled rotation
    on those pairs. Negative control: LLaMA's (j, j + r/2) pairs change what it computes."""
    src = build(tmp_path / "src", "gptj-full-rotary")
    a = draw(Key.new(1e3, seed=2), layout_for(open_checkpoint(src)).units[0]).qk.fwd[0]
    pairs = torch.zeros_like(a, dtype=torch.bool)
    for j in range(4):
        pairs[2 * j:2 * j + 2, 2 * j:2 * j + 2] = True
    assert torch.all(a[~pairs] == 0) and torch.all(a[pairs] != 0)
    report = _lock_with(src, tmp_path / "wrong", rope_pairs="half")
    assert not report["passed"] and report["max_rel_error"] > 1e-2


@pytest.mark.parametrize("family, order", [("gpt_neox-parallel-bias", "grouped"), ("bloom-alibi", "grouped"),
                                           ("falcon-mqa-rotary", "blocks"), ("falcon-new-gqa", "grouped"),
                                           ("falcon-mha-alibi-bias", "grouped")])
def test_fused_row_order_and_position_scheme(family, order, tmp_path):
    """Which fused row order and which position scheme each layout has: ALiBi models get a
    general QK matrix (no rotary constraint), RoPE models scaled pair rotations."""
    att = layout_for(open_checkpoint(build(tmp_path / "src", family))).units[0]
    assert att.qkv_order == order
    assert att.rope == ("alibi" not in family)
    a = draw(Key.new(1e3, seed=4), att).qk.fwd[0]
    assert (a == 0).any() == att.rope  # a general matrix has no zero entries


def test_decoder_refusals(tmp_path):
    import transformers as T

    st = tmp_path / "stablelm"
    T.StableLmForCausalLM(T.StableLmConfig(qk_layernorm=True, **SMALL)).save_pretrained(st)
    with pytest.raises(ZooError, match="qk_layernorm normalises q and k with a LayerNorm per head"):
        protect.protect(str(st), out_dir=tmp_path / "x")
    gptj = build(tmp_path / "gptj", "gptj-rotary_dim4")
    cfg = json.loads((gptj / "config.json").read_text())
    for rot in (3, 12):  # an odd count; more than head_dim
        cfg["rotary_dim"] = rot
        (gptj / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ZooError, match=f"rotary_dim={rot} gives {rot} rotary dims of head_dim=8"):
            protect.protect(str(gptj), out_dir=tmp_path / "x")
    neox = build(tmp_path / "neox", "gpt_neox-parallel-bias")
    cfg = json.loads((neox / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.375  # 3 dims of 8
    (neox / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="RoPE needs an even number"):
        protect.protect(str(neox), out_dir=tmp_path / "x")
    falcon = build(tmp_path / "falcon", "falcon-new-gqa")
    cfg = json.loads((falcon / "config.json").read_text())
    cfg["num_kv_heads"] = 1  # the checkpoint has two
    (falcon / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="query_key_value.weight has shape"):
        protect.protect(str(falcon), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# bf16 at the default bound (κ = 30) on 2 × 128 tokens, gated as the other dense families
BF16_GATES = {"gpt_neox-parallel-bias": (1e-3, 0.97), "falcon-new-gqa": (1e-3, 0.97), "bloom-alibi": (1e-3, 0.97)}


@pytest.mark.parametrize("family", list(BF16_GATES))
def test_bf16_on_128_tokens(family, tmp_path):
    src = build(tmp_path / "src", family, dtype=torch.bfloat16)
    assert_bf16_within(src, tmp_path, family, *BF16_GATES[family])


@pytest.mark.parametrize("family", ["gpt_neox-parallel-bias", "gptj-rotary_dim4", "falcon-new-gqa", "bloom-alibi"])
def test_greedy_decode_with_kv_cache_is_identical(family, tmp_path):
    """32 greedy tokens with the KV cache on: the same tokens from the source and the protected model."""
    from zoo.protect.verify import load

    src = build(tmp_path / "src", family)
    protect.protect(str(src), out_dir=tmp_path / "locked", seed=5)
    prompt = _ids(src, 16)
    with torch.no_grad():
        a, b = (load(f).generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True,
                                 pad_token_id=0, eos_token_id=None) for f in (src, tmp_path / "locked"))
    assert a.shape == (2, 48) and torch.equal(a, b)


def _lock_with(src: Path, out: Path, **change) -> dict:
    """Lock ``src`` with its layout changed by ``change``; the verify report."""
    from dataclasses import replace

    from zoo.checkpoints.writer import copy_sidecars
    from zoo.protect.layouts import Layout
    from zoo.protect.lock import lock_checkpoint
    from zoo.protect.verify import compare

    ck = open_checkpoint(src)
    layout = layout_for(ck)
    out.mkdir()
    copy_sidecars(ck, out)
    lock_checkpoint(ck, Key.new(1e3, seed=3), out, layout=Layout(layout.model_type,
                                                                 [replace(u, **change) for u in layout.units]))
    return compare(src, out, "F32")


@pytest.mark.parametrize("family, change", [
    ("gpt_neox-parallel-bias", {"rope": False}),  # a general QK matrix under (partial) RoPE
    ("gptj-rotary_dim4", {"rope": False}),
    ("stablelm-gqa-bias-parallel", {"rope": False}),
    ("falcon-mqa-rotary", {"rope": False}),
    ("gpt_neox-parallel-bias", {"rotary_dim": 0}),  # all dims taken as rotary: pairs (j, j + d/2), not (j, j + r/2)
    ("gpt_neox-parallel-bias", {"qkv_order": "blocks"}),  # Q | K | V instead of per head q, k, v
    ("bloom-alibi", {"qkv_order": "blocks"}),
    ("falcon-new-gqa", {"qkv_order": "blocks"}),
])
def test_wrong_layouts_are_caught(family, change, tmp_path):
    """Negative controls: each fact the layouts encode matters on these inputs; the
    check sees a lock built without it."""
    report = _lock_with(build(tmp_path / "src", family), tmp_path / "wrong", **change)
    assert not report["passed"] and report["max_rel_error"] > 1e-3, report


@pytest.mark.parametrize("family", ["gpt_neox-parallel-bias", "falcon-mqa-rotary", "falcon-new-gqa", "bloom-alibi"])
def test_realignment_attack_reads_the_fused_layouts(family, tmp_path):
    """The red-team attack splits the fused rows as the lock does: fitting a locked base
    onto itself finds the inverse, so every attention tensor comes back."""
    from zoo.protect.attack import realign_checkpoint

    base = build(tmp_path / "base", family)
    protect.protect(str(base), out_dir=tmp_path / "locked", seed=3)
    out = tmp_path / "realigned"
    out.mkdir()
    realign_checkpoint(open_checkpoint(tmp_path / "locked"), open_checkpoint(base), out)
    b, r = open_checkpoint(base), open_checkpoint(out)
    for n in layout_for(b).roles:
        assert torch.allclose(b.read_tensor(n), r.read_tensor(n), atol=1e-3), n
