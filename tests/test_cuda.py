"""The merge engine on CUDA: the same bytes as on the CPU. Skipped without a GPU."""

from __future__ import annotations

import hashlib

import pytest
import torch

import merge
from conftest import expert_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method, params, options", [
    ("task_arithmetic", {"weight": 0.3}, {}),
    ("ties", {"weight": 0.3, "density": 0.2}, {}),
    ("ties", {"weight": 0.3, "density": 0.2}, {"trim": "global", "normalize": False}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}, {}),
    ("linear", {"weight": 1.0}, {}),
])
@pytest.mark.parametrize("chunk", [None, 100])
def test_cuda_merge_writes_the_cpu_bytes(tmp_path, method, params, options, chunk, monkeypatch):
    """Elementwise float32 arithmetic and exact thresholds: CUDA and CPU agree bit for
    bit, streamed in pieces or whole; DARE draws its masks on the CPU for this."""
    from merge import engine

    if chunk:
        monkeypatch.setattr(engine, "CHUNK_ELEMS", chunk)
        monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)
    base, experts = expert_family(tmp_path / "family")
    recipe = {"merge_method": method, "base_model": str(base), "parameters": options, "seed": 5,
              "models": [{"model": str(e), "parameters": params} for e in experts]}
    for dev in ("cpu", "cuda"):  # the same folder name: the model card names it
        (tmp_path / dev).mkdir()
        merge.run(merge.from_dict(recipe), out_dir=tmp_path / dev / "m", device=dev, shard_bytes=40_000)
    assert digests(tmp_path / "cpu" / "m") == digests(tmp_path / "cuda" / "m")


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_cuda_trigonometric_methods_agree_with_cpu(tmp_path, method):
    """acos, sin and norms round differently on the GPU: equal within float32 rounding."""
    from zoo import open_checkpoint

    base, experts = expert_family(tmp_path / "family", dtype=torch.float32)
    models = experts[:1] if method == "slerp" else experts
    recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in models]}
    for dev in ("cpu", "cuda"):
        merge.run(merge.from_dict(recipe), out_dir=tmp_path / dev, device=dev)
    a, b = open_checkpoint(tmp_path / "cpu"), open_checkpoint(tmp_path / "cuda")
    for name in a.tensors:
        torch.testing.assert_close(a.read_tensor(name), b.read_tensor(name), rtol=1e-5, atol=1e-6)
