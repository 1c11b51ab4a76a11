"""The one LoRA parser (zoo.checkpoints.lora), as the compatibility check and the merge
planner both use it: pairs and their scale, PEFT's pattern rule, GPT-2's Conv1D
(fan_in_fan_out), embeddings, and the variants that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo.merge as merge
from conftest import llama, lora_adapter
from zoo import compare, open_checkpoint
from zoo.checkpoints.lora import pattern_value, read_adapter
from zoo.errors import IncompatibleModels


def adapter(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    return path


def state(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.read_tensor(n) for n in ck.tensors}


def gpt2(path: Path) -> Path:
    """A tiny GPT-2: its attention and MLP weights are Conv1D, stored [in, out]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(path)
    return path


def test_pairs_and_scale(tmp_path):
    base = llama(tmp_path / "b")
    parsed = read_adapter(open_checkpoint(lora_adapter(tmp_path / "ad", base, r=4)))
    assert parsed.saved == {} and parsed.unsupported == []
    assert len(parsed.pairs) == 4  # q_proj and v_proj of 2 layers
    pair = parsed.pairs["model.layers.0.self_attn.q_proj.weight"]
    assert pair.complete and pair.scale == 2.0 and not pair.transpose and not pair.embedding
    assert pair.a == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_patterns_follow_peft(tmp_path):
    """rank_pattern / alpha_pattern keys are regexes matched at the end of the module
    name, at a dot: ``proj`` does not pick ``q_proj`` (a suffix test did)."""
    module = "model.layers.1.self_attn.v_proj"
    assert pattern_value({"v_proj": 16}, module, 4) == 16
    assert pattern_value({"proj": 16}, module, 4) == 4
    assert pattern_value({r"layers\.1\..*v_proj": 16}, module, 4) == 16
    assert pattern_value({r"layers\.0\..*v_proj": 16}, module, 4) == 4
    assert pattern_value({module: 16}, module, 4) == 16
    g = torch.Generator().manual_seed(0)
    ad = adapter(tmp_path / "ad", {
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": torch.randn(2, 32, generator=g),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": torch.randn(16, 2, generator=g),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(32, 4, generator=g),
    }, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1}, use_rslora=True)
    pairs = read_adapter(open_checkpoint(ad)).pairs
    assert pairs["model.layers.1.self_attn.v_proj.weight"].scale == pytest.approx(1 / 2 ** 0.5)
    assert pairs["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2)


def test_conv1d_adapter_with_fan_in_fan_out_checks_and_merges(tmp_path, registry):
    """GPT-2's c_attn weight is [in 8, out 24]; LoRA's A is [r, in] and B [out, r], and
    the update is (B @ A).T. The compatibility check once read the weight as [out, in]."""
    base = gpt2(tmp_path / "gpt2")
    w = open_checkpoint(base).tensors["transformer.h.0.attn.c_attn.weight"]
    assert w.shape == (8, 24)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g)
    ad = adapter(tmp_path / "ad", {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": A,
                                   "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": B},
                 fan_in_fan_out=True)
    report = compare(open_checkpoint(ad), open_checkpoint(base))
    assert report.ok, report.findings
    out = merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                                     "models": [{"model": str(ad), "parameters": {"weight": 1.0}}]}),
                    out_dir=tmp_path / "merged")
    got = state(Path(out["path"]))["transformer.h.0.attn.c_attn.weight"]
    b = state(base)["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(got, b + 2.0 * (B @ A).T)
    # the same pair without fan_in_fan_out does not fit the weight: refused with one line
    bad = adapter(tmp_path / "bad", {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": A,
                                     "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": B})
    assert {f.kind for f in compare(open_checkpoint(bad), open_checkpoint(base)).errors} == {"adapter"}
    with pytest.raises(IncompatibleModels, match="adapter mismatches"):
        merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                                   "models": [{"model": str(bad)}]}), out_dir=tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()


def test_embedding_pairs(tmp_path):
    base = llama(tmp_path / "b")  # embed_tokens [128, 32]
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 128, generator=g), torch.randn(32, 4, generator=g)
    ad = adapter(tmp_path / "ad", {"base_model.model.model.embed_tokens.lora_embedding_A": A,
                                   "base_model.model.model.embed_tokens.lora_embedding_B": B})
    assert compare(open_checkpoint(ad), open_checkpoint(base)).ok
    pair = read_adapter(open_checkpoint(ad)).pairs["model.embed_tokens.weight"]
    assert pair.embedding and torch.equal(pair.delta(A, B), (B @ A).T * 2.0)
    half = adapter(tmp_path / "half", {"base_model.model.model.embed_tokens.lora_embedding_A": A})
    errors = compare(open_checkpoint(half), open_checkpoint(base)).errors
    assert [(f.kind, f.detail) for f in errors] == [("adapter", "lora_embedding_A or lora_embedding_B is missing")]


def test_dora_and_lora_biases_are_refused_not_merged_as_plain_lora(tmp_path, registry):
    base = llama(tmp_path / "b")
    ok = lora_adapter(tmp_path / "ok", base)
    tensors = {n: open_checkpoint(ok).read_tensor(n) for n in open_checkpoint(ok).tensors}
    dora = dict(tensors)
    dora["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    biased = dict(tensors)
    biased["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(32)
    for name, t in (("dora", dora), ("biased", biased)):
        ad = adapter(tmp_path / name, t)
        report = compare(open_checkpoint(ad), open_checkpoint(base))
        assert {f.kind for f in report.errors} == {"adapter"} and "LoRA variant" in report.one_line()
        with pytest.raises(IncompatibleModels, match="LoRA variant"):
            merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                                       "models": [{"model": str(ad)}]}), out_dir=tmp_path / f"m-{name}")
