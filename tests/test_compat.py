"""The compatibility check, finding by finding, on real tiny checkpoints."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from conftest import llama, lora_adapter, vit
from zoo import compare, open_checkpoint


def kinds(report, severity=None):
    return sorted({(f.kind, f.tensor) for f in report.findings if severity is None or f.severity == severity})


def test_experts_with_own_heads_are_compatible(tmp_path):
    base = open_checkpoint(vit(tmp_path / "b", 10))
    rep = compare(open_checkpoint(vit(tmp_path / "e", 2, seed=1)), base)
    assert rep.ok
    assert rep.head_tensors() == ["classifier.bias", "classifier.weight"]
    assert all(f.severity == "info" for f in rep.findings)


def test_shape_mismatch(tmp_path):
    base = open_checkpoint(vit(tmp_path / "b"))
    rep = compare(open_checkpoint(vit(tmp_path / "e", 2, hidden=48)), base)
    assert not rep.ok
    # every body tensor depends on the hidden size, so every one is reported
    assert {f.tensor for f in rep.errors} == {n for n in base.tensors if not n.startswith("classifier.")}
    assert {f.kind for f in rep.errors} == {"shape"}
    assert "shape mismatches" in rep.one_line()


def test_missing_extra_and_dtype(tmp_path):
    base_dir = vit(tmp_path / "b")
    sd = load_file(str(base_dir / "model.safetensors"))
    dropped = "vit.encoder.layer.1.output.dense.bias"
    del sd[dropped]
    sd["vit.extra.weight"] = torch.zeros(3)
    sd["vit.layernorm.weight"] = sd["vit.layernorm.weight"].half()
    save_file(sd, str(tmp_path / "e.safetensors"))
    rep = compare(open_checkpoint(tmp_path / "e.safetensors"), open_checkpoint(base_dir))
    assert ("missing", dropped) in kinds(rep, "error")
    assert ("extra", "vit.extra.weight") in kinds(rep, "error")
    assert ("dtype", "vit.layernorm.weight") in kinds(rep, "warning")
    assert len(rep.errors) == 2


def test_vocab_size_difference(tmp_path):
    rep = compare(open_checkpoint(llama(tmp_path / "e", vocab=160)), open_checkpoint(llama(tmp_path / "b", vocab=128)))
    assert ("vocab", None) in kinds(rep, "error")
    assert ("shape", "model.embed_tokens.weight") in kinds(rep, "error")
    assert ("shape", "lm_head.weight") in kinds(rep, "error")


def test_tied_versus_untied(tmp_path):
    rep = compare(open_checkpoint(llama(tmp_path / "e", tie=False)), open_checkpoint(llama(tmp_path / "b", tie=True)))
    assert ("tied", None) in kinds(rep, "warning")
    # lm_head.weight is explained by the tie difference, not reported as an extra tensor
    assert ("extra", "lm_head.weight") not in kinds(rep)
    same = compare(open_checkpoint(llama(tmp_path / "e2", tie=True, seed=3)), open_checkpoint(tmp_path / "b"))
    assert same.findings == []


def test_identical_models_have_no_findings(tmp_path):
    p = llama(tmp_path / "b")
    assert compare(open_checkpoint(p), open_checkpoint(p)).findings == []


def test_lora_adapter_against_base(tmp_path):
    base = llama(tmp_path / "b")
    good = compare(open_checkpoint(lora_adapter(tmp_path / "good", base)), open_checkpoint(base))
    assert good.ok, good.findings
    bad = compare(open_checkpoint(lora_adapter(tmp_path / "bad", base, bad_shape=True)), open_checkpoint(base))
    assert not bad.ok
    assert {f.kind for f in bad.errors} == {"adapter"}
    other = compare(open_checkpoint(lora_adapter(tmp_path / "wide", base)),
                    open_checkpoint(vit(tmp_path / "v")))
    assert {f.kind for f in other.errors} == {"missing"}


def test_check_reads_every_value_for_nan_and_infinities(tmp_path, registry):
    """`zoo check` reports a tensor holding NaN or an infinity, by name, as an error (the
    header comparison alone cannot see it); a finite model stays ok."""
    from zoo.checkpoints.compat import nonfinite

    base = vit(tmp_path / "b")
    expert = vit(tmp_path / "e", 2, seed=1)
    registry.add(base, "base", "base")
    registry.add(expert, "e", "expert", base="base")
    assert nonfinite(open_checkpoint(expert)) == [] and registry.check(["e"])[0].ok
    sd = load_file(str(expert / "model.safetensors"))
    name = sorted(n for n in sd if n.endswith("query.weight"))[0]
    sd[name].view(-1)[3] = float("nan")
    last = sorted(sd)[-1]
    sd[last].view(-1)[-1] = float("-inf")
    save_file(sd, str(expert / "model.safetensors"))
    found = nonfinite(open_checkpoint(expert), piece=5)  # a NaN found in any piece, not only the first
    assert {(f.severity, f.kind, f.tensor) for f in found} == {("error", "nonfinite", name),
                                                                ("error", "nonfinite", last)}
    rep = registry.check([str(expert)], base="base")[0]
    assert not rep.ok and {f.tensor for f in rep.errors} == {name, last}
