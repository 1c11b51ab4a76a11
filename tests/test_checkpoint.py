"""The checkpoint reader: three forms, header-only inspection, and corrupt input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import llama, lora_adapter, vit
from zoo import open_checkpoint, read_safetensors_header
from zoo.checkpoints.architecture import architecture_from_config
from zoo.errors import CheckpointError


def test_single_file_model_folder(tmp_path):
    ckpt = open_checkpoint(vit(tmp_path / "m"))
    ref = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert ckpt.form == "model"
    assert set(ckpt.files) == {"model.safetensors", "config.json"}
    assert ckpt.tensor_count == len(ref)
    assert ckpt.param_count == sum(t.numel() for t in ref.values())
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in ref.values())
    assert ckpt.dtypes == {"F32": len(ref)}
    for name, t in ref.items():
        assert ckpt.tensors[name].shape == tuple(t.shape)
        assert torch.equal(ckpt.read_tensor(name), t)
    arch = ckpt.architecture()
    assert arch["model_type"] == "vit" and arch["hidden_size"] == 32 and arch["num_layers"] == 2
    assert arch["num_heads"] == 4 and arch["num_kv_heads"] == 4


def test_sharded_folder(tmp_path):
    path = llama(tmp_path / "m", shard="40KB", dtype=torch.bfloat16)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1, "the fixture must produce shards"
    ckpt = open_checkpoint(path)
    assert {"model.safetensors.index.json", "config.json", *shards} <= set(ckpt.files)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(ckpt.tensors) == set(index)
    for name, info in ckpt.tensors.items():
        assert info.file.name == index[name]
        assert info.dtype == "BF16"
        assert torch.equal(ckpt.read_tensor(name), load_file(str(info.file))[name])
    arch = ckpt.architecture()
    assert arch["num_kv_heads"] == 2 and arch["vocab_size"] == 128 and arch["model_type"] == "llama"


def test_sharded_folder_with_missing_shard(tmp_path):
    path = llama(tmp_path / "m", shard="40KB")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(path)


def test_adapter_folder(tmp_path):
    base = llama(tmp_path / "base")
    ad = open_checkpoint(lora_adapter(tmp_path / "ad", base, r=4))
    assert ad.form == "adapter"
    assert ad.config["r"] == 4
    assert set(ad.files) == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(".lora_" in n for n in ad.tensors)
    assert ad.architecture() == {}


def test_bare_safetensors_file(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.zeros(0)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    assert ckpt.form == "file"
    assert ckpt.files == {"model.safetensors": tmp_path / "x.safetensors"}
    assert ckpt.metadata == {"k": "v"}
    assert torch.equal(ckpt.read_tensor("a"), t["a"])
    assert ckpt.read_tensor("b").shape == (0,)


def test_inspection_reads_headers_only(tmp_path, monkeypatch):
    """Overwrite every tensor byte: inspection must not notice, because it never reads them."""
    path = vit(tmp_path / "m")
    before = open_checkpoint(path)
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    f.write_bytes(bytes(raw))
    after = open_checkpoint(path)
    assert after.summary() == before.summary()
    assert after.tensors == before.tensors


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    p = tmp_path / f"pytorch_model{suffix}"
    p.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles.*safetensors"):
        open_checkpoint(p)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        open_checkpoint(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    return p


def test_truncated_file(tmp_path):
    good = vit(tmp_path / "m") / "model.safetensors"
    data = good.read_bytes()
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(_write(tmp_path, data[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(_write(tmp_path, data[:5]))


def test_absurd_header_length(tmp_path):
    with pytest.raises(CheckpointError, match="claims"):
        read_safetensors_header(_write(tmp_path, struct.pack("<Q", 1 << 60) + b"{}"))


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2]", b'{"a": {"dtype": "F32"}}',
                                    b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'])
def test_corrupt_header(tmp_path, header):
    with pytest.raises(CheckpointError, match="corrupt|unknown dtype|claims"):
        read_safetensors_header(_write(tmp_path, struct.pack("<Q", len(header)) + header + b"\0" * 8))


def test_architecture_fallbacks():
    assert architecture_from_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4,
                                     "vocab_size": 50}) == {
        "model_type": "gpt2", "hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4,
        "vocab_size": 50}
    clip = architecture_from_config({"model_type": "clip", "text_config": {"hidden_size": 16,
                                     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 99}})
    assert clip["hidden_size"] == 16 and clip["vocab_size"] == 99 and clip["model_type"] == "clip"
