"""The fault corpus's world: a seeded registry and a folder of hostile inputs, built
once per session and copied for each case, so every case starts from the same state."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import llama, lora_adapter, vit
from zoo.checkpoints.taskdata import save_task_data

REGISTRY_FILES = ("registry.db", "registry.store", "registry.keys")


def _raw_safetensors(path: Path, header: bytes | dict, body: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written byte by byte: any header, any claimed length."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def _copy_with(src: Path, dst: Path, data: bytes | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if data is not None:
        (dst / "model.safetensors").write_bytes(data)
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hostile_inputs(fx: Path) -> None:
    """Checkpoints no reader should trust, each under its own name in ``fx``."""
    good = (fx / "parity" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    _copy_with(fx / "parity", fx / "trunc", good[: len(good) // 2])
    _copy_with(fx / "parity", fx / "trunc-header", good[: 8 + n // 2])
    corrupt = bytearray(good)
    corrupt[8:16] = b"\x00garbage"
    _copy_with(fx / "parity", fx / "corrupt", bytes(corrupt))
    _copy_with(fx / "parity", fx / "absurd", struct.pack("<Q", 2**62) + good[8:])
    _copy_with(fx / "parity", fx / "huge-claim", struct.pack("<Q", 1 << 40) + good[8:])
    _copy_with(fx / "parity", fx / "seven-bytes", good[:7])
    _copy_with(fx / "parity", fx / "zero-bytes", b"")
    sd = load_file(str(fx / "parity" / "model.safetensors"))
    body = "vit.encoder.layer.0.attention.attention.query.weight"
    _copy_with(fx / "parity", fx / "nan", tensors={**sd, body: torch.full_like(sd[body], float("nan"))})
    _copy_with(fx / "parity", fx / "inf", tensors={**sd, body: torch.full_like(sd[body], float("inf"))})
    head = "classifier.bias"
    _copy_with(fx / "parity", fx / "nan-head", tensors={**sd, head: torch.full_like(sd[head], float("nan"))})
    (fx / "bad").mkdir()
    b = fx / "bad"
    _raw_safetensors(b / "nonjson.safetensors", b"this is not json at all!", bytes(16))
    _raw_safetensors(b / "list.safetensors", b"[1, 2, 3]", bytes(16))
    _raw_safetensors(b / "dtype.safetensors", {"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    _raw_safetensors(b / "overlap.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    _raw_safetensors(b / "past-end.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}},
                     bytes(16))
    _raw_safetensors(b / "negative.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}},
                     bytes(16))
    _raw_safetensors(b / "shape.safetensors", {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
                     bytes(16))
    _raw_safetensors(b / "neg-shape.safetensors", {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
                     bytes(16))
    _raw_safetensors(b / "no-offsets.safetensors", {"a": {"dtype": "F32", "shape": [4]}}, bytes(16))
    _raw_safetensors(b / "reversed.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
                     bytes(16))
    _raw_safetensors(b / "utf8.safetensors", b"\xff\xfe{}", bytes(16))
    _raw_safetensors(b / "claims-more.safetensors", b"{}", length=1 << 20)
    save_file({}, str(b / "empty.safetensors"))
    (b / "pickle").mkdir()
    (b / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04\x95...")
    (b / "ckpt.pt").write_bytes(b"\x80\x04\x95...")
    (b / "loop").symlink_to(b / "loop")
    (b / "dangling").symlink_to(b / "nowhere")
    (b / "emptydir").mkdir()
    (b / "notes").mkdir()
    (b / "notes" / "README.md").write_text("no weights here\n")
    _copy_with(fx / "parity", b / "bad-config")
    (b / "bad-config" / "config.json").write_text("{not json")
    (b / "text.txt").write_text("just text\n")


def recipes(fx: Path) -> None:
    """Recipes with every kind of mistake."""
    r = fx / "recipes"
    r.mkdir()
    ta = "merge_method: task_arithmetic\nbase_model: base\n"
    texts = {
        "ok": ta + "models:\n  - model: parity\n",
        "no-method": "base_model: base\nmodels:\n  - model: parity\n",
        "no-models": ta,
        "no-base": "merge_method: ties\nmodels:\n  - model: parity\n  - model: mod3\n",
        "unknown-method": "merge_method: frankenmerge\nbase_model: base\nmodels:\n  - model: parity\n",
        "method-number": "merge_method: 42\nbase_model: base\nmodels:\n  - model: parity\n",
        "models-string": ta + "models: parity\n",
        "models-dict": ta + "models: {model: parity}\n",
        "model-missing": ta + "models:\n  - weight: 1.0\n",
        "model-number": ta + "models:\n  - model: 17\n",
        "nonexistent": ta + "models:\n  - model: ghost\n",
        "bad-version": ta + "models:\n  - model: parity@9\n",
        "unknown-param": ta + "parameters:\n  wibble: 1\nmodels:\n  - model: parity\n",
        "param-string": ta + "parameters:\n  lambda: lots\nmodels:\n  - model: parity\n",
        "param-nan": ta + "parameters:\n  lambda: .nan\nmodels:\n  - model: parity\n",
        "param-inf": ta + "parameters:\n  lambda: .inf\nmodels:\n  - model: parity\n",
        "weight-nan": ta + "models:\n  - model: parity\n    parameters:\n      weight: .nan\n",
        "weight-list": ta + "models:\n  - model: parity\n    parameters:\n      weight: [1, x]\n",
        "density-high": "merge_method: ties\nbase_model: base\nmodels:\n  - model: parity\n    parameters:\n"
                        "      density: 1.5\n",
        "density-neg": "merge_method: ties\nbase_model: base\nmodels:\n  - model: parity\n    parameters:\n"
                       "      density: -0.1\n",
        "density-zero": "merge_method: dare_linear\nbase_model: base\nmodels:\n  - model: parity\n    parameters:\n"
                        "      density: 0\n",
        "slerp-t": "merge_method: slerp\nbase_model: base\nparameters:\n  t: 7\nmodels:\n  - model: parity\n",
        "slerp-two": "merge_method: slerp\nbase_model: base\nmodels:\n  - model: parity\n  - model: mod3\n",
        "dtype": ta + "dtype: float7\nmodels:\n  - model: parity\n",
        "top-list": "- merge_method: ties\n",
        "top-scalar": "42\n",
        "empty": "",
        "not-yaml": "merge_method: [unclosed\n  base_model: {\n",
        "tabs": "merge_method:\ttask_arithmetic\n\tbase_model: base\n",
        "unknown-key": ta + "frobnicate: yes\nmodels:\n  - model: parity\n",
        "base-missing-model": "merge_method: task_arithmetic\nbase_model: ghost\nmodels:\n  - model: parity\n",
        "escape": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ../../../../etc\n",
        "abs-path": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: /etc\n",
        "wide": ta + "models:\n  - model: " + str(fx / "wide") + "\n",
        "adapter-base": "merge_method: task_arithmetic\nbase_model: ad\nmodels:\n  - model: parity\n",
        "python-tag": "merge_method: !!python/object/apply:os.system ['true']\nbase_model: base\n"
                      "models:\n  - model: parity\n",
        "anchors": ta + "x: &a [1]\ny: &b [*a, *a]\nmodels:\n  - model: parity\n",
        "bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
                 + "merge_method: ties\nbase_model: base\nmodels: *i\n"),
        "dup-keys": "merge_method: ties\nmerge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: parity\n",
        "bad-slices": "merge_method: task_arithmetic\nslices:\n  - sources: 3\n",
    }
    for name, text in texts.items():
        (r / f"{name}.yml").write_text(text)
    (r / "latin1.yml").write_bytes(b"merge_method: ties\n\xff\xfe base_model: base\n")
    (r / "nul.yml").write_bytes(b"merge_method: ties\x00\nbase_model: base\n")
    with open(r / "huge.yml", "w") as f:  # 64 MB of one comment line
        f.write("merge_method: ties\n#")
        f.write("x" * (64 << 20))
        f.write("\n")
    (r / "dir.yml").mkdir()


def keys(fx: Path, wrong_key: dict) -> None:
    k = fx / "keys"
    k.mkdir()
    (k / "wrong.key").write_text(json.dumps(wrong_key))
    (k / "garbage.key").write_bytes(b"\x00\x01garbage")
    (k / "empty.key").write_text("")
    (k / "list.key").write_text("[1, 2, 3]\n")
    (k / "other-format.key").write_text(json.dumps({"format": "ssh-rsa", "model": "locked@1"}))
    tampered = dict(wrong_key)
    tampered["key_id"] = "0" * 32
    (k / "tampered.key").write_text(json.dumps(tampered))


def build(root: Path) -> tuple[Path, Path]:
    """``root/fx`` (inputs) and ``root/reg`` (registry.db, its store and keys)."""
    import zoo.protect as protect
    from zoo import Registry
    from zoo.protect.keys import FORMAT, key_record
    from zoo.protect.transform import Key

    fx, reg_dir = root / "fx", root / "reg"
    reg_dir.mkdir(parents=True)
    vit(fx / "base", 10, seed=0)
    vit(fx / "parity", 2, seed=1)
    vit(fx / "mod3", 3, seed=2)
    vit(fx / "wide", 2, seed=3, hidden=48)
    llama(fx / "lb")
    lora_adapter(fx / "ad", fx / "lb")
    lora_adapter(fx / "ad-bad", fx / "lb", bad_shape=True)
    g = torch.Generator().manual_seed(1)
    save_task_data(fx / "parity-data.safetensors",
                   {s: (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g))
                    for s in ("train", "val", "test")}, ["0", "1"])
    hostile_inputs(fx)
    recipes(fx)
    reg = Registry(reg_dir / "registry.db", create=True)
    try:
        reg.add(fx / "base", "base", "base")
        reg.add_task("parity", ["0", "1"], data=fx / "parity-data.safetensors")
        reg.add_task("mod3", ["0", "1", "2"])
        reg.add(fx / "parity", "parity", "expert", base="base", tasks=["parity"])
        reg.add(fx / "mod3", "mod3", "expert", base="base", tasks=["mod3"])
        reg.add(fx / "lb", "lb", "base")
        reg.add(fx / "ad", "ad", "adapter", base="lb")
        protect.protect("parity", "locked", registry=reg, seed=7)
        protect.protect("parity", out_dir=fx / "locked-dir", registry=reg, seed=8,
                        key_file=fx / "locked-dir.key")
    finally:
        reg.close()
    keys(fx, {"format": FORMAT, "model": "locked@1", **key_record(Key.new(1e3))})
    return fx, reg_dir
