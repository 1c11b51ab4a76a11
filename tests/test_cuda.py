"""The merge engine on CUDA: the same bytes as on the CPU. Skipped without a GPU."""

from __future__ import annotations

import hashlib

import pytest
import torch

import zoo.merge as merge
from conftest import expert_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method, params, options", [
    ("task_arithmetic", {"weight": 0.3}, {}),
    ("ties", {"weight": 0.3, "density": 0.2}, {}),
    ("ties", {"weight": 0.3, "density": 0.2}, {"trim": "global", "normalize": False}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}, {}),
    ("linear", {"weight": 1.0}, {"weight": 1.0}),  # the global weight is the base's: linear averages it too
])
@pytest.mark.parametrize("chunk", [None, 100])
def test_cuda_merge_writes_the_cpu_bytes(tmp_path, method, params, options, chunk, monkeypatch):
    """Elementwise float32 arithmetic and exact thresholds: CUDA and CPU agree bit for
    bit, streamed in pieces or whole; DARE draws its masks on the CPU for this."""
    from zoo.merge import engine

    if chunk:
        monkeypatch.setattr(engine, "CHUNK_ELEMS", chunk)
        monkeypatch.setattr(engine, "CUDA_CHUNK_ELEMS", chunk)
        monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)
    base, experts = expert_family(tmp_path / "family")
    recipe = {"merge_method": method, "base_model": str(base), "parameters": options, "seed": 5,
              "dtype": "float32", "out_dtype": "bfloat16",
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
    recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in models],
              "parameters": {"t": 0.5} if method == "slerp" else {}}
    for dev in ("cpu", "cuda"):
        merge.run(merge.from_dict(recipe), out_dir=tmp_path / dev, device=dev)
    a, b = open_checkpoint(tmp_path / "cpu"), open_checkpoint(tmp_path / "cuda")
    for name in a.tensors:
        torch.testing.assert_close(a.read_tensor(name), b.read_tensor(name), rtol=1e-5, atol=1e-6)



def _learned_recipe(method: str, **params):
    from conftest import LABELS

    return merge.from_dict({"merge_method": method, "base_model": "base", "seed": 3,
                            "models": [{"model": f"e{i}"} for i in range(len(LABELS))], "parameters": params})


@pytest.mark.parametrize("method", ["adamerging", "concrete_ta", "concrete_adamerging"])
def test_learned_merges_run_on_cuda(registry, tiny, method):
    """In float32, AdaMerging's first loss on the GPU is the CPU's (same batch, same start)
    and full-batch steps lower it; Concrete draws its masks from a generator on the GPU, so
    its losses differ from the CPU's: finite, and the result comes back to the CPU."""
    import math

    from zoo.merge.learning import learn_from_plan
    from zoo.merge.plan import make_plan

    extra = {"stage2_steps": 3} if method == "concrete_adamerging" else {}
    rec = _learned_recipe(method, steps=12, lr=0.05, batch_size=48, precision="fp32", **extra)
    gpu, _ = learn_from_plan(make_plan(rec, registry), registry, torch.device("cuda"))
    assert all(math.isfinite(h["loss"]) for h in gpu.history)
    assert all(t.device.type == "cpu" for t in gpu.merged.values())
    if method == "adamerging":
        cpu, _ = learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))
        assert gpu.history[0]["loss"] == pytest.approx(cpu.history[0]["loss"], rel=1e-4)
        assert gpu.history[-1]["loss"] < gpu.history[0]["loss"]
    else:
        assert gpu.mask_bits and all(b.device.type == "cpu" for b in gpu.mask_bits.values())


def test_learned_merge_on_cuda_with_bf16_autocast_learns_and_registers(registry, tiny):
    """precision auto is bf16 autocast on CUDA: the loss still falls, and the registered
    model keeps the base's float32."""
    from zoo.merge.learning import learn_from_plan
    from zoo.merge.plan import make_plan
    from zoo import open_checkpoint

    rec = _learned_recipe("adamerging", steps=12, lr=0.05, batch_size=48)
    result, used = learn_from_plan(make_plan(rec, registry), registry, torch.device("cuda"))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    info = merge.run(rec, "ada-gpu", registry=registry, device="cuda")
    ck = open_checkpoint(registry.model_dir(info["ref"]))
    assert {ck.read_tensor(n).dtype for n in ck.tensors} == {torch.float32}
