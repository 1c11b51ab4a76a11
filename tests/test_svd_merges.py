"""The SVD-era merges (TSV-M, Iso-C, Iso-CTS) against references computed here with
numpy/scipy on small matrices, their defining properties, and the streaming engine."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml

from zoo import merge
from zoo.errors import ZooError
from zoo.merge.methods import TensorContext, get_method
from zoo.merge.methods.iso import subspace_sizes
from zoo.merge.state_dicts import merge_state_dicts

from conftest import expert_family


def task_matrices(m=12, n=9, t=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((m, n))
    # correlated task updates: a shared low-rank part plus each task's own
    shared = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n))
    return base, [base + 0.05 * (shared + rng.standard_normal((m, n))) for _ in range(t)]


def nearest_orthogonal(a):
    """scipy's polar decomposition a = u p; u is the orthogonal Procrustes answer."""
    if a.shape[0] >= a.shape[1]:
        return scipy.linalg.polar(a)[0]
    return scipy.linalg.polar(a.T)[0].T


def ref_tsv(base, experts, alpha):
    deltas = [e - base for e in experts]
    t, (m, n) = len(deltas), deltas[0].shape
    r, k = min(m, n), min(m, n) // len(deltas)
    u_cat, s_cat, v_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, d in enumerate(deltas):
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        u_cat[:, i * k:(i + 1) * k], s_cat[i * k:(i + 1) * k], v_cat[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    return base + alpha * nearest_orthogonal(u_cat) @ np.diag(s_cat) @ nearest_orthogonal(v_cat)


def ref_iso_c(base, experts, alpha):
    u, s, vh = np.linalg.svd(sum(e - base for e in experts), full_matrices=False)
    return base + alpha * s.mean() * u @ vh


def ref_iso_cts(base, experts, alpha, fraction):
    deltas = [e - base for e in experts]
    t, (m, n) = len(deltas), deltas[0].shape
    r = min(m, n)
    k_c = int(r * fraction)
    k_t = round((r - k_c) / t)
    k_c = r - t * k_t
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [], [], []
    for d in deltas:
        rest = (np.eye(m) - u[:, :k_c] @ u[:, :k_c].T) @ d
        a, b, c = np.linalg.svd(rest, full_matrices=False)
        us.append(a[:, :k_t]), ss.append(b[:k_t]), vs.append(c[:k_t])
    u_all = np.concatenate(us + [u[:, :k_c]], axis=1)
    s_all = np.concatenate(ss + [s[:k_c]])
    v_all = np.concatenate(vs + [vh[:k_c]], axis=0)
    return base + alpha * s_all.mean() * nearest_orthogonal(u_all) @ nearest_orthogonal(v_all)


def zoo_merge(method, base, experts, name="layers.0.mlp.weight", **options):
    m = get_method(method)
    out = m.merge(torch.tensor(base), [torch.tensor(e) for e in experts], [{}] * len(experts), options,
                  TensorContext(name))
    return out.numpy()


@pytest.mark.parametrize("shape, t", [((12, 9), 3), ((9, 12), 3), ((16, 16), 4), ((10, 8), 2)])
def test_tsv_matches_the_reference(shape, t):
    base, experts = task_matrices(*shape, t=t)
    for alpha in (1.0, 0.7):
        np.testing.assert_allclose(zoo_merge("tsv", base, experts, alpha=alpha), ref_tsv(base, experts, alpha),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape, t", [((12, 9), 3), ((9, 12), 2), ((16, 16), 4)])
def test_iso_c_matches_the_reference(shape, t):
    base, experts = task_matrices(*shape, t=t)
    np.testing.assert_allclose(zoo_merge("iso_c", base, experts, scaling_factor=1.5),
                               ref_iso_c(base, experts, 1.5), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape, t, fraction", [((12, 9), 3, 0.8), ((9, 12), 3, 0.5), ((16, 16), 4, 0.8),
                                                ((20, 16), 2, 0.3)])
def test_iso_cts_matches_the_reference(shape, t, fraction):
    base, experts = task_matrices(*shape, t=t)
    np.testing.assert_allclose(
        zoo_merge("iso_cts", base, experts, scaling_factor=1.2, common_space_fraction=fraction),
        ref_iso_cts(base, experts, 1.2, fraction), rtol=0, atol=1e-10)


def test_tsv_factors_are_orthogonal_and_keep_each_tasks_top_singular_values():
    """U_perp diag(s) V_perp^T with orthonormal factors is itself an SVD, so the merge's
    singular values are exactly the tasks' own top-k values, all of them."""
    base, experts = task_matrices(16, 12, t=3)
    merged = zoo_merge("tsv", base, experts) - base
    k = 12 // 3
    expect = np.sort(np.concatenate([np.linalg.svd(e - base, compute_uv=False)[:k] for e in experts]))[::-1]
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), expect, rtol=1e-10, atol=1e-12)


def test_iso_spectra_are_flat():
    base, experts = task_matrices(16, 12, t=3)
    for method in ("iso_c", "iso_cts"):
        s = np.linalg.svd(zoo_merge(method, base, experts) - base, compute_uv=False)
        np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-10)
    s_sum = np.linalg.svd(sum(e - base for e in experts), compute_uv=False)
    # Iso-C keeps the sum's singular directions and its nuclear norm
    assert np.isclose(np.linalg.svd(zoo_merge("iso_c", base, experts) - base, compute_uv=False).sum(), s_sum.sum())


def test_other_tensors_get_the_mean_task_vector():
    base, experts = task_matrices(12, 9, t=3)
    mean = sum(e - base for e in experts) / 3
    for method, scale in (("tsv", "alpha"), ("iso_c", "scaling_factor"), ("iso_cts", "scaling_factor")):
        # a 1-D tensor, and a 2-D one excluded by name (an embedding, by default)
        np.testing.assert_allclose(zoo_merge(method, base[0], [e[0] for e in experts], **{scale: 2.0}),
                                   base[0] + 2.0 * mean[0], atol=1e-12)
        np.testing.assert_allclose(zoo_merge(method, base, experts, name="model.embed_tokens.weight"),
                                   base + mean, atol=1e-12)
        # "$^" excludes nothing: the embedding is SVD'd, as FusionBench does by default
        assert not np.allclose(zoo_merge(method, base, experts, name="model.embed_tokens.weight",
                                         exclude_keys="$^"), base + mean)


def test_identical_experts_and_float32():
    """One task vector repeated: TSV gives it back (scaled to its top 1/T), float32 works."""
    base, experts = task_matrices(8, 8, t=1)
    np.testing.assert_allclose(zoo_merge("tsv", base, experts), experts[0], atol=1e-10)
    b32 = torch.tensor(base, dtype=torch.float32)
    xs = [torch.tensor(e, dtype=torch.float32) for e in experts * 2]
    out = get_method("iso_c").merge(b32, xs, [{}, {}], {}, TensorContext("w"))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_iso_c(base, experts * 2, 1.0), atol=1e-5)


def test_subspace_sizes_round_as_the_reference():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)
    assert subspace_sizes(12, 8, 0.0) == (4, 1)  # a task share that would round past r is rounded down
    k_c, k_t = subspace_sizes(9, 3, 0.8)
    assert k_c + 3 * k_t == 9


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(ZooError, match="common_space_fraction"):
        merge_state_dicts("iso_cts", {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], common_space_fraction=2)
    with pytest.raises(ZooError, match="exclude_keys"):
        merge_state_dicts("tsv", {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], exclude_keys="(")
    with pytest.raises(ZooError, match="unknown per-model parameter 'weight'"):
        merge_state_dicts("iso_c", {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], [{"weight": 0.3}])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_streaming_engine_equals_in_memory_and_card(registry, tmp_path, method, monkeypatch):
    """Through the engine, embeddings and norms stream in pieces (chunk of 100), the
    matrices go whole; the bytes equal the in-memory merge's and the card says so."""
    from zoo.merge import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMS", 100)
    base, experts = expert_family(tmp_path)
    registry.add(base, "base", "base")
    for i, p in enumerate(experts):
        registry.add(p, f"e{i}", "expert", base="base", tasks=[f"t{i}"])
    recipe = merge.from_dict({"merge_method": method, "base_model": "base", "dtype": "float32",
                              "out_dtype": "bfloat16",  # computed as the in-memory reference is
                              "models": [{"model": f"e{i}"} for i in range(3)]})
    streamed = []
    real = get_method(method).merge
    monkeypatch.setattr(type(get_method(method)), "merge", lambda self, b, xs, p, o, ctx: (
        streamed.append((ctx.name, ctx.scratch)), real(b, xs, p, o, ctx))[1])
    info = merge.run(recipe, "m", registry=registry)
    folder = registry.model_dir(info["ref"])
    assert any(s for n, s in streamed if "embed" in n) and not any(s for n, s in streamed if "proj" in n)
    from zoo import open_checkpoint

    ck, b = open_checkpoint(folder), open_checkpoint(base)
    ref = merge_state_dicts(method, {n: b.read_tensor(n) for n in b.tensors},
                            [{n: open_checkpoint(e).read_tensor(n) for n in b.tensors} for e in experts])
    for name in b.tensors:
        assert torch.equal(ck.read_tensor(name), ref[name].to(ck.read_tensor(name).dtype)), name
    card = (folder / "README.md").read_text()
    assert f"merge_method: {method}" in card and "mean of the task vectors" in card
    assert yaml.safe_load(card.split("---")[1])["base_model_relation"] == "merge"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_cuda_agrees_with_cpu(tmp_path, method):
    """cuSOLVER's SVD rounds differently from LAPACK's: equal within float32 rounding of
    the task vectors (0.02 here)."""
    from zoo import open_checkpoint

    base, experts = expert_family(tmp_path / "family", dtype=torch.float32)
    recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts]}
    for dev in ("cpu", "cuda"):
        merge.run(merge.from_dict(recipe), out_dir=tmp_path / dev, device=dev)
    a, b = open_checkpoint(tmp_path / "cpu"), open_checkpoint(tmp_path / "cuda")
    for name in a.tensors:
        torch.testing.assert_close(a.read_tensor(name), b.read_tensor(name), rtol=1e-5, atol=1e-5)
