"""MergeLock: equivalence per architecture on multi-token inputs, unlock round trips,
reproducible tensors, no key material in the output, keys in the registry, refusals, and
the realignment attack."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import zoo.protect as protect
from zoo.protect.layouts import layout_for
from zoo.protect.lock import lock_checkpoint
from zoo.protect.transform import Key, draw
from zoo.protect.verify import compare
from tests.conftest import llama
from zoo import open_checkpoint
from zoo.errors import ZooError
from zoo.checkpoints.writer import copy_sidecars


def _configs():
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=99, **small)),
        "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=99, **small)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=2, num_channels=1, **small)),
        "clip": lambda: T.CLIPModel(T.CLIPConfig(
            text_config=dict(vocab_size=99, **small),
            vision_config=dict(image_size=8, patch_size=2, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37), projection_dim=16)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=99, num_key_value_heads=2, **small)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(vocab_size=99, num_key_value_heads=2, **small)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=99, num_key_value_heads=2, **small)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                              num_decoder_layers=3, num_heads=4)),
    }


ARCHS = list(_configs())
EXPECTED_LAYERS = {"bert": 2, "roberta": 2, "vit": 2, "clip": 4, "gpt2": 2, "llama": 2, "mistral": 2, "qwen2": 2,
                   "t5": 2 + 2 * 3}


def tiny(path: Path, arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    model = _configs()[arch]()
    with torch.no_grad():  # larger than the init's tiny weights, so attention is not near-uniform
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.2)
    model.to(dtype).save_pretrained(path)
    return path


def _tensors(folder: Path) -> dict[str, bytes]:
    ck = open_checkpoint(folder)
    return {n: ck.read_bytes(n) for n in ck.tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_protect_is_exact_reversible_reproducible_and_keyless(arch, tmp_path):
    src = tiny(tmp_path / "src", arch)
    ck = open_checkpoint(src)
    layout = layout_for(ck)
    assert len(layout.units) == EXPECTED_LAYERS[arch]
    if arch == "qwen2":
        assert {"q_bias", "k_bias", "v_bias"} <= set(layout.units[0].tensors)

    info = protect.protect(str(src), out_dir=tmp_path / "locked", seed=1234567, verify=True)
    v = info["verify"]
    assert v["passed"] and v["max_rel_error"] <= 1e-4 and v["top1_agreement"] == 1.0
    assert v["input_shape"].get("input_ids", [2, 16])[1] >= 8  # multi-token: a single token hides RoPE errors
    assert 1 < info["lock"]["max_cond_qk"] <= 1e3 and 1 < info["lock"]["max_cond_vo"] <= 1e3

    before, locked = _tensors(src), _tensors(tmp_path / "locked")
    changed = {n for n in before if before[n] != locked[n]}
    assert changed == set(layout.roles)  # every Q/K/V/O tensor moved, nothing else did

    # the same seed gives the same tensors (the headers' salted key check values differ); another seed other ones
    protect.protect(str(src), out_dir=tmp_path / "again", seed=1234567)
    assert _tensors(tmp_path / "again") == locked
    protect.protect(str(src), out_dir=tmp_path / "other", seed=7654321)
    assert _tensors(tmp_path / "other") != locked

    # no key material in any output file (the random-seed case: the seed is not findable)
    rnd = protect.protect(str(src), out_dir=tmp_path / "random")
    key, _ = protect.read_key_file(rnd["key_file"])
    assert stat.S_IMODE(os.stat(rnd["key_file"]).st_mode) == 0o600
    assert Path(rnd["key_file"]).parent == tmp_path  # beside the folder, never inside it
    for f in (tmp_path / "random").iterdir():
        data = f.read_bytes()
        for form in (f"{key.seed:x}", str(key.seed), key.seed.to_bytes(16, "little").hex()):
            assert form.encode() not in data, f.name
    assert key.key_id in (tmp_path / "random" / "README.md").read_text()

    # unlock round trip: untouched tensors byte for byte, transformed ones within float32 rounding × cond
    protect.unlock(str(tmp_path / "locked"), out_dir=tmp_path / "back", key_file=info["key_file"])
    back = _tensors(tmp_path / "back")
    orig_ck, back_ck = open_checkpoint(src), open_checkpoint(tmp_path / "back")
    for n in before:
        if n in layout.roles:
            a, b = orig_ck.read_tensor(n).double(), back_ck.read_tensor(n).double()
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4, n
        else:
            assert back[n] == before[n], n


def test_rope_needs_pair_rotations_and_multi_token_inputs(tmp_path):
    """Negative control: the published general-GL QK transform breaks a RoPE model, the
    check sees it on 16 tokens, and a single token would have hidden it."""
    src = tiny(tmp_path / "src", "llama")
    ck = open_checkpoint(src)
    layout = layout_for(ck)
    for att in layout.units:
        object.__setattr__(att, "rope", False)  # pretend there is no RoPE: general A on QK
    out = tmp_path / "wrong"
    out.mkdir()
    copy_sidecars(ck, out)
    lock_checkpoint(ck, Key.new(1e3, seed=3), out, layout=layout)
    report = compare(src, out, "F32")
    assert not report["passed"] and report["max_rel_error"] > 1e-2

    import zoo.protect.verify as verify

    one = dict(verify.probe_inputs(json.loads((src / "config.json").read_text())))
    one["input_ids"] = one["input_ids"][:, :1]
    with torch.no_grad():
        a = verify.load(src)(**one).logits
        b = verify.load(out)(**one).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


def test_rope_transform_commutes_and_gqa_groups_share(tmp_path):
    src = tiny(tmp_path / "src", "llama")
    att = layout_for(open_checkpoint(src)).units[0]
    assert (att.heads, att.kv_heads, att.head_dim, att.rope) == (4, 2, 8, True)
    t = draw(Key.new(1e3, seed=5), att)
    a = t.qk.fwd[0]
    half = att.head_dim // 2
    theta = torch.rand(half, dtype=torch.float64) * 6.0
    rot = torch.zeros(att.head_dim, att.head_dim, dtype=torch.float64)  # rotate_half layout: pairs (j, j + d/2)
    j = torch.arange(half)
    rot[j, j], rot[j, j + half], rot[j + half, j], rot[j + half, j + half] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    assert torch.allclose(a @ rot, rot @ a, atol=1e-12)
    assert torch.allclose(t.qk.fwd @ t.qk.inv, torch.eye(att.head_dim, dtype=torch.float64).expand(2, -1, -1), atol=1e-12)
    assert torch.allclose(t.vo.fwd @ t.vo.inv, torch.eye(att.head_dim, dtype=torch.float64).expand(2, -1, -1), atol=1e-9)
    s = torch.linalg.svdvals(t.vo.fwd[0])
    assert (s.max() / s.min()).item() <= 1e3 * (1 + 1e-9)


def test_bf16_is_gated_on_kl_and_unlocks_within_rounding(tmp_path):
    src = tiny(tmp_path / "src", "qwen2", dtype=torch.bfloat16)
    info = protect.protect(str(src), out_dir=tmp_path / "locked", seed=1, verify=True)
    assert info["verify"]["gate"].startswith("kl") and info["verify"]["kl"] <= 1e-3
    assert info["lock"]["max_cond_qk"] <= 30 and info["lock"]["max_cond_vo"] <= 30
    protect.unlock(str(tmp_path / "locked"), out_dir=tmp_path / "back", key_file=info["key_file"])
    a, b = open_checkpoint(src), open_checkpoint(tmp_path / "back")
    eps = 2.0**-8  # bf16's spacing at 1
    for n in layout_for(a).roles:
        x, y = a.read_tensor(n).double(), b.read_tensor(n).double()
        assert ((x - y).abs().max() / x.abs().max()).item() < 10 * eps, n


def test_sharded_in_and_out(tmp_path):
    src = llama(tmp_path / "src", shard="20KB")
    assert (src / "model.safetensors.index.json").exists()
    protect.protect(str(src), out_dir=tmp_path / "locked", seed=2, shard_bytes=30_000, verify=True)
    out = open_checkpoint(tmp_path / "locked")
    assert (tmp_path / "locked" / "model.safetensors.index.json").exists() and len(set(
        t.file for t in out.tensors.values())) > 1
    assert list(out.tensors) == list(open_checkpoint(src).tensors)


# -- the registry: lineage, keys, unlock, export / import ---------------------------------
def test_registry_protect_unlock_and_keys(registry, tmp_path):
    base = tiny(tmp_path / "base", "gpt2")
    expert = tiny(tmp_path / "expert", "gpt2", seed=1)
    registry.add(base, "base", "base")
    registry.add(expert, "expert", "expert", base="base", tasks=["t"])
    info = protect.protect("expert", "expert-locked", registry=registry, seed=9, verify=True)
    shown = registry.show("expert-locked")
    assert shown["kind"] == "protected" and shown["base"] == "base@1" and shown["tasks"] == ["t"]
    assert shown["parents"] == [{"role": "source", "ref": "expert@1", "present": True}]
    assert shown["recipe"]["key_id"] == info["key_id"] == shown["key_id"]
    stored = registry.key("expert-locked")
    assert int(stored["seed"], 16) == 9 and "seed" not in json.dumps(shown["recipe"])
    key_file = Path(info["key_file"])
    assert key_file == registry.keys_dir / "expert-locked@1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # unlock with the registry's key: registered as an expert again, error reported against the source
    out = protect.unlock("expert-locked", "expert-back", registry=registry)
    assert registry.show("expert-back")["kind"] == "expert"
    assert out["unlock"]["compared_with"] == "expert@1" and out["unlock"]["max_rel_error"] < 1e-4

    # export and import; a key that belongs to another model is refused
    exported = protect.export_key(registry, "expert-locked", tmp_path / "k.key")
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert protect.import_key(registry, exported) == {"model": "expert-locked@1", "key_id": info["key_id"]}
    other = protect.protect("expert", out_dir=tmp_path / "other-folder", registry=registry, seed=10)
    with pytest.raises(ZooError, match="does not belong"):
        protect.import_key(registry, other["key_file"], "expert-locked")
    with pytest.raises(ZooError, match="does not unlock"):
        protect.unlock("expert-locked", "nope", registry=registry, key_file=other["key_file"])
    assert not registry.has("nope")
    with pytest.raises(ZooError, match="already protected"):
        protect.protect("expert-locked", "twice", registry=registry)


def test_interrupted_protect_leaves_nothing(registry, tmp_path, monkeypatch):
    src = tiny(tmp_path / "src", "bert")
    registry.add(src, "m", "base")
    import zoo.protect.lock as lock_mod

    calls = {"n": 0}
    real = lock_mod.apply

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lock_mod, "apply", failing)
    with pytest.raises(KeyboardInterrupt):
        protect.protect("m", "m-locked", registry=registry)
    assert not registry.has("m-locked")
    assert not list(registry.keys_dir.glob("*")) if registry.keys_dir.exists() else True
    assert not any(registry.store.root.joinpath("tmp").iterdir())


# -- refusals -------------------------------------------------------------------------
def test_refusals(tmp_path):
    import transformers as T

    bigcode = tmp_path / "bigcode"
    T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=99, n_embd=32, n_layer=1, n_head=4,
                                               n_inner=37)).save_pretrained(bigcode)
    with pytest.raises(ZooError, match="does not support model_type 'gpt_bigcode'; supported: bert"):
        protect.protect(str(bigcode), out_dir=tmp_path / "x")

    cohere = tmp_path / "cohere"  # QK-norm (a LayerNorm per head) without a layout
    T.CohereForCausalLM(T.CohereConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=37,
                                       use_qk_norm=True)).save_pretrained(cohere)
    with pytest.raises(ZooError, match="QK-norm"):
        protect.protect(str(cohere), out_dir=tmp_path / "x")

    src = tiny(tmp_path / "bert", "bert")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ZooError, match="needs the model's config.json"):
        protect.protect(str(bare), out_dir=tmp_path / "x")

    cfg = json.loads((src / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="does not divide hidden_size=32"):
        protect.protect(str(src), out_dir=tmp_path / "x")
    cfg["num_attention_heads"], cfg["position_embedding_type"] = 4, "relative_key"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="absolute position embeddings only"):
        protect.protect(str(src), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.key").exists()


def test_cli_protect_unlock_key(zoo_cli, tmp_path):
    src = tiny(tmp_path / "src", "vit")
    assert zoo_cli("add", src, "--name", "v", "--kind", "base")[0] == 0
    code, out, err = zoo_cli("protect", "v", "--out", "v-locked", "--verify", "--seed", "4")
    assert code == 0, err
    assert "top-1 agreement 100.0%" in out and "mode 0600" in out
    code, out, _ = zoo_cli("key", "export", "v-locked", "--out", tmp_path / "v.key", "--json")
    assert code == 0 and json.loads(out)["key_file"] == str(tmp_path / "v.key")
    code, out, err = zoo_cli("unlock", "v-locked", "--key", tmp_path / "v.key", "--out", "v-back", "--json")
    assert code == 0, err
    assert json.loads(out)["unlock"]["max_rel_error"] < 1e-4 and json.loads(out)["kind"] == "base"
    code, out, err = zoo_cli("key", "import", tmp_path / "v.key")
    assert code == 0 and "stored key" in out
    code, _, err = zoo_cli("protect", tmp_path / "nowhere", "--out", "z")
    assert code == 1 and err.count("\n") == 1 and "neither a registered model nor a path" in err


# -- the realignment attack (spec A.8) --------------------------------------------------
def test_realignment_attack_recovers_most_of_a_small_task_vector(registry, tmp_path):
    from zoo.protect.attack import realign

    base = tiny(tmp_path / "base", "vit")
    ft = tmp_path / "ft"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(tmp_path / "ft.st"))
    import shutil

    shutil.copytree(base, ft)
    os.replace(tmp_path / "ft.st", ft / "model.safetensors")
    registry.add(base, "base", "base")
    registry.add(ft, "ft", "expert", base="base")
    protect.protect("ft", "ft-locked", registry=registry, seed=1)
    realign(registry, "ft-locked", "ft-realigned")
    roles = layout_for(registry.checkpoint("ft")).roles
    b, f = registry.checkpoint("base"), registry.checkpoint("ft")
    lk, rl = registry.checkpoint("ft-locked"), registry.checkpoint("ft-realigned")
    for n in roles:
        if not n.endswith(".weight"):
            continue
        delta = (f.read_tensor(n) - b.read_tensor(n)).norm()
        assert (lk.read_tensor(n) - f.read_tensor(n)).norm() > 5 * delta, n
        assert (rl.read_tensor(n) - f.read_tensor(n)).norm() < delta, n  # most of the task vector is back


@pytest.mark.parametrize("where", ["query", "other"])
def test_non_finite_weights_are_refused_by_name(registry, tmp_path, where):
    """A NaN or an infinity in any tensor (a transformed one or one copied as is) stops the
    protection with the tensor's name; nothing is registered, no key or temp file is left."""
    from safetensors.torch import load_file, save_file

    from conftest import db_dump, store_listing

    src = tiny(tmp_path / "src", "bert")
    sd = load_file(str(src / "model.safetensors"))
    name = sorted(n for n in sd if (n.endswith("query.weight") if where == "query" else "dense" in n and
                                    "attention" not in n and n.endswith(".weight")))[0]
    sd[name].view(-1)[1] = float("nan") if where == "query" else float("inf")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    registry.add(src, "m", "base")
    before, blobs = db_dump(registry.path), store_listing(registry.path)
    with pytest.raises(ZooError, match=rf"^{name} has NaN or infinite values; nothing was written"):
        protect.protect("m", "m-locked", registry=registry)
    with pytest.raises(ZooError, match="NaN or infinite"):
        protect.protect(str(src), out_dir=tmp_path / "out", registry=registry)
    assert db_dump(registry.path) == before and store_listing(registry.path) == blobs
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.key").exists()
    assert not list(registry.keys_dir.glob("*")) if registry.keys_dir.exists() else True
