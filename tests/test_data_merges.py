"""The data-aware merges, RegMean (arXiv 2212.09849) and Fisher merging (arXiv
2111.09832): each formula against an independent numpy reference, the statistics
against a plain transformers model run the textbook way, the lineage artifacts' round
trip (a re-merge needs no data), and the bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo.merge as merge
from zoo.errors import ZooError
from zoo.merge.methods.fisher import coefficients, fisher_average
from zoo.merge.methods.regmean import regmean_solve, shrink, solve_spd
from zoo.merge.state_dicts import merge_state_dicts
from zoo.merge.statistics import FORMAT, Settings


def recipe(method: str, n: int = 3, **params):
    return merge.from_dict({"merge_method": method, "base_model": "base", "parameters": params,
                            "models": [{"model": f"e{i}"} for i in range(n)]})


def weights(registry, name: str) -> dict[str, torch.Tensor]:
    folder = registry.model_dir(name)
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def artifacts_of(registry, ref: str) -> dict[str, dict]:
    return (registry.show(ref)["recipe"] or {}).get("artifacts") or {}


# -- the formulas against numpy ------------------------------------------------------------
def test_regmean_with_alpha_one_is_least_squares_on_the_concatenated_inputs():
    rng = np.random.default_rng(0)
    d_in, d_out, tokens = 6, 4, 20
    xs = [rng.normal(size=(tokens, d_in)) for _ in range(3)]
    ws = [rng.normal(size=(d_out, d_in)) for _ in range(3)]
    # numpy: the one W minimising sum_i ||X_i W^T - X_i W_i^T||^2
    x = np.concatenate(xs)
    y = np.concatenate([xi @ wi.T for xi, wi in zip(xs, ws)])
    expected = np.linalg.lstsq(x, y, rcond=None)[0].T
    grams = [torch.tensor(xi.T @ xi / tokens) for xi in xs]  # per-token means, equal token counts
    got = regmean_solve([torch.tensor(w, dtype=torch.float32) for w in ws], grams, 1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_regmean_shrinks_the_off_diagonal_as_the_paper_says():
    rng = np.random.default_rng(1)
    d_in, d_out = 5, 3
    grams, ws = [], []
    for _ in range(2):
        x = rng.normal(size=(9, d_in))
        grams.append(x.T @ x / 9)
        ws.append(rng.normal(size=(d_out, d_in)))
    alpha = 0.3
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    expected = np.linalg.solve(sum(shrunk), sum(g @ w.T for g, w in zip(shrunk, ws))).T
    got = regmean_solve([torch.tensor(w) for w in ws], [torch.tensor(g) for g in grams], alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    g = torch.tensor(grams[0])
    np.testing.assert_allclose(torch.diagonal(shrink(g, alpha)).numpy(), np.diag(grams[0]))
    # alpha = 0: diagonal Grams, so each input column's weights are averaged by its energy
    got0 = regmean_solve([torch.tensor(w) for w in ws], [torch.tensor(g) for g in grams], 0.0)
    d = [np.diag(g) for g in grams]
    np.testing.assert_allclose(got0.numpy(), sum(di * w for di, w in zip(d, ws)) / sum(d), rtol=1e-10)


def test_a_singular_gram_gets_the_ridge_and_a_zero_one_the_mean():
    x = np.ones((4, 3))  # rank 1: the summed Gram is singular
    g = torch.tensor(x.T @ x / 4)
    w = [torch.eye(3, dtype=torch.float64), 2 * torch.eye(3, dtype=torch.float64)]
    out = regmean_solve(w, [g, g], 1.0)
    assert torch.isfinite(out).all()
    # on the inputs the experts saw (all-ones rows), the merge gives their mean output
    ones = torch.ones(1, 3, dtype=torch.float64)
    torch.testing.assert_close(ones @ out.T, ones @ ((w[0] + w[1]) / 2).T, rtol=1e-4, atol=1e-4)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(regmean_solve(w, [zero, zero], 1.0), (w[0] + w[1]) / 2)
    with pytest.raises(ZooError, match="not positive definite"):
        solve_spd(torch.full((2, 2), float("nan"), dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))


def test_fisher_is_the_fisher_weighted_mean():
    rng = np.random.default_rng(2)
    thetas = [rng.normal(size=(4, 5)) for _ in range(3)]
    fishers = [rng.uniform(0, 2, size=(4, 5)) for _ in range(3)]
    eps = 1e-6
    expected = sum((f + eps) * t for f, t in zip(fishers, thetas)) / sum(f + eps for f in fishers)
    c = coefficients(3, None, eps)
    got = fisher_average([torch.tensor(t) for t in thetas], [torch.tensor(f) for f in fishers], c, eps)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # normalize_fisher_weight: c_i proportional to 1 / (||F_i|| + eps)
    norms = [float(np.linalg.norm(f)) for f in fishers]
    inv = np.array([1 / (n + eps) for n in norms])
    ci = inv / inv.sum() / 3
    np.testing.assert_allclose(coefficients(3, norms, eps), ci)
    expected = sum(c_ * (f + eps) * t for c_, f, t in zip(ci, fishers, thetas)) / \
        sum(c_ * (f + eps) for c_, f in zip(ci, fishers))
    got = fisher_average([torch.tensor(t) for t in thetas], [torch.tensor(f) for f in fishers],
                         coefficients(3, norms, eps), eps)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # an entry no expert moves (all Fisher zero) gets the plain mean
    zero = [np.zeros((4, 5))] * 3
    got = fisher_average([torch.tensor(t) for t in thetas], [torch.tensor(f) for f in zero], c, eps)
    np.testing.assert_allclose(got.numpy(), sum(thetas) / 3, rtol=1e-9)


# -- the statistics, against a plain transformers model -------------------------------------
def _expert_module(path):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(path).eval()


def _pool(registry, task: str, n: int) -> torch.Tensor:
    from zoo.checkpoints.taskdata import load_split

    return load_split(registry.task_data(task), "train")[0][:n]


def test_statistics_match_a_plain_run_of_the_expert(registry, tiny):
    """Grams from forward hooks and the Fisher from one backward per batch on the
    expert loaded as an ordinary transformers model, against what the merge stored."""
    merge.run(recipe("regmean"), "rm", registry=registry, device="cpu")
    merge.run(recipe("fisher"), "fm", registry=registry, device="cpu")
    _, experts = tiny
    arts = artifacts_of(registry, "e1")
    gram_key = next(k for k in arts if k.startswith("gram-"))
    fisher_key = next(k for k in arts if k.startswith("fisher-"))
    grams = load_file(str(registry.artifact("e1", gram_key)))
    fisher = load_file(str(registry.artifact("e1", fisher_key)))
    model = _expert_module(experts[1])
    # transformers 5 renames some weights on load: the checkpoint's name for each module's
    from zoo.merge.learned.runtime import build_body

    ck = {mod: name for name, mod in build_body(registry.checkpoint("e1"), torch.device("cpu")).to_module.items()}
    x = _pool(registry, "t1", 256)  # 48 examples: two batches of 32 and 16

    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")]
    with torch.no_grad():
        for s in range(0, len(x), 32):
            model(pixel_values=x[s:s + 32])
    for h in hooks:
        h.remove()
    assert sorted(grams) == sorted(ck.get(f"{n}.weight", f"{n}.weight") for n in seen)
    for n, parts in seen.items():
        inputs = torch.cat(parts).double()
        torch.testing.assert_close(grams[ck.get(f"{n}.weight", f"{n}.weight")].double(), inputs.T @ inputs / len(inputs), rtol=1e-5,
                                   atol=1e-6)

    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in range(0, len(x), 32):
        model.zero_grad()
        logits = model(pixel_values=x[s:s + 32]).logits
        p = torch.softmax(logits, -1).detach()
        (p.sqrt() * torch.log_softmax(logits, -1)).sum().backward()
        for n, q in model.named_parameters():
            squares[n] += q.grad ** 2
    body = {ck.get(n, n): v / len(x) for n, v in squares.items() if not n.startswith("classifier")}
    assert sorted(fisher) == sorted(body)
    for n, v in body.items():
        torch.testing.assert_close(fisher[n], v, rtol=1e-4, atol=1e-12)


def test_the_merge_applies_each_rule_to_its_tensors(registry, tiny):
    merge.run(recipe("regmean", reduce_non_diagonal_ratio=0.5), "rm", registry=registry, device="cpu")
    merged = weights(registry, "rm")
    experts = [weights(registry, f"e{i}") for i in range(3)]
    record = registry.show("rm")["recipe"]["statistics"]
    grams = [load_file(str(registry.artifact(f"e{i}", e["artifact"]))) for i, e in enumerate(record["experts"])]
    assert record["tensors"]["closed_form"] == len(grams[0]) == 12  # 2 layers x 6 linear layers
    for name, m in merged.items():
        if name.startswith("classifier"):
            continue
        if name in grams[0]:
            want = regmean_solve([e[name] for e in experts], [g[name] for g in grams], 0.5).float()
        else:
            assert name in record["tensors"]["mean_tensors"]
            want = (experts[0][name] + experts[1][name] + experts[2][name]) / 3
        torch.testing.assert_close(m, want, rtol=1e-6, atol=1e-6)
    card = (registry.model_dir("rm") / "README.md").read_text()
    assert "12 tensors got the RegMean closed form" in card and "lineage artifacts" in card

    merge.run(recipe("fisher", normalize_fisher_weight=False), "fm", registry=registry, device="cpu")
    record = registry.show("fm")["recipe"]["statistics"]
    fishers = [load_file(str(registry.artifact(f"e{i}", e["artifact"]))) for i, e in enumerate(record["experts"])]
    merged = weights(registry, "fm")
    for name, m in merged.items():
        if not name.startswith("classifier"):
            want = fisher_average([e[name] for e in experts], [f[name] for f in fishers], [1 / 3] * 3, 1e-6)
            torch.testing.assert_close(m, want, rtol=1e-6, atol=1e-7)
    assert "batch approximation" in (registry.model_dir("fm") / "README.md").read_text()


# -- the lineage artifacts -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_re_merge_needs_no_data_and_gives_the_same_bytes(registry, tiny, method):
    merge.run(recipe(method), "first", registry=registry, device="cpu")
    kind = "gram" if method == "regmean" else "fisher"
    for i in range(3):
        arts = artifacts_of(registry, f"e{i}")
        assert len([k for k in arts if k.startswith(kind + "-")]) == 1
    for i in range(3):  # the task data leaves the store
        os.remove(registry.task_data(f"t{i}"))

    def no_model_run(*a, **k):
        raise AssertionError("the statistics were collected again")
    import zoo.merge.statistics as statistics

    saved = statistics.build_body
    statistics.build_body = no_model_run
    try:
        merge.run(recipe(method), "second", registry=registry, device="cpu")
    finally:
        statistics.build_body = saved
    for f in sorted(p.name for p in registry.model_dir("first").glob("*.safetensors")):
        assert (registry.model_dir("first") / f).read_bytes() == (registry.model_dir("second") / f).read_bytes()
    assert registry.show("second")["recipe"]["statistics"] == registry.show("first")["recipe"]["statistics"]
    # other settings need the data again, and say it is gone in one line
    other = {"num_regmean_examples": 16} if method == "regmean" else {"num_fisher_examples": 16}
    with pytest.raises(ZooError, match="missing from the store"):
        merge.run(recipe(method, **other), "third", registry=registry, device="cpu")
    assert not registry.has("third")
    assert registry.verify() == []  # the artifacts are checked and whole


def test_the_key_follows_the_settings_and_the_data():
    s = Settings("gram", 256, 32, "train")
    assert s.key("a" * 64) == Settings("gram", 256, 32, "train").key("a" * 64)
    assert len({s.key("a" * 64), s.key("b" * 64), Settings("gram", 128, 32, "train").key("a" * 64),
                Settings("gram", 256, 32, "val").key("a" * 64), Settings("fisher", 256, 32, "train").key("a" * 64)}) == 5


def test_unregistered_experts_from_a_data_file(registry, tiny, tmp_path):
    """Experts given as paths, their data as files: the statistics are collected and
    used, with no lineage to keep them in."""
    base, experts = tiny
    data = [str(registry.task_data(f"t{i}")) for i in range(3)]
    copies = []
    for i, d in enumerate(data):
        copies.append(tmp_path / f"t{i}.safetensors")
        shutil.copy(d, copies[-1])
    r = merge.from_dict({"merge_method": "regmean", "base_model": str(base),
                         "models": [{"model": str(e), "parameters": {"data": str(c)}}
                                    for e, c in zip(experts, copies)]})
    merge.run(r, out_dir=tmp_path / "out", device="cpu")
    merge.run(recipe("regmean"), "registered", registry=registry, device="cpu")
    a = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = weights(registry, "registered")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# -- bad input: one line each ---------------------------------------------------------------
def test_an_expert_without_task_data(registry, tiny):
    registry.add(tiny[1][0], "lonely", "expert", base="base")
    r = merge.from_dict({"merge_method": "fisher", "base_model": "base",
                         "models": [{"model": "e1"}, {"model": "lonely"}]})
    with pytest.raises(ZooError, match=r"lonely has no task data \(fisher runs each expert"):
        merge.run(r, "x", registry=registry, device="cpu")
    assert not registry.has("x")


def test_a_model_transformers_cannot_run(registry, tiny, tmp_path):
    base, experts = tiny
    odd = tmp_path / "odd-base"
    shutil.copytree(base, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForAnything"]
    (odd / "config.json").write_text(json.dumps(cfg))
    r = merge.from_dict({"merge_method": "regmean", "base_model": str(odd),
                         "models": [{"model": str(e), "parameters": {"data": str(registry.task_data(f"t{i}"))}}
                                    for i, e in enumerate(experts)]})
    with pytest.raises(ZooError, match="names no transformers architecture"):
        merge.run(r, out_dir=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    # inputs the model cannot take: one line naming the expert
    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, str(bad))
    r = merge.from_dict({"merge_method": "regmean", "base_model": str(base),
                         "models": [{"model": str(e), "parameters": {"data": str(bad)}} for e in experts]})
    with pytest.raises(ZooError, match="transformers could not run"):
        merge.run(r, out_dir=tmp_path / "out", device="cpu")


def test_statistics_that_do_not_match_the_tensors(registry, tiny, tmp_path):
    merge.run(recipe("regmean"), "rm", registry=registry, device="cpu")
    key = next(k for k in artifacts_of(registry, "e2") if k.startswith("gram-"))
    good = load_file(str(registry.artifact("e2", key)))
    name = sorted(good)[0]
    # another expert (e0) whose artifact under its key holds a Gram of the wrong size
    key0 = next(k for k in artifacts_of(registry, "e0") if k.startswith("gram-"))
    bad = {**good, name: torch.eye(good[name].shape[0] + 1)}
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path), metadata={"format": FORMAT, "kind": "gram", "examples": "48"})
    registry.add(tiny[1][0], "e0b", "expert", base="base", tasks=["t0"])
    registry.attach_artifact("e0b", key0, path)
    r = merge.from_dict({"merge_method": "regmean", "base_model": "base",
                         "models": [{"model": "e0b"}, {"model": "e1"}, {"model": "e2"}]})
    with pytest.raises(ZooError, match=f"do not match tensor {name}"):
        merge.run(r, "x", registry=registry, device="cpu")
    assert not registry.has("x")


@pytest.mark.parametrize("params, message", [
    ({"reduce_non_diagonal_ratio": 1.5}, "must be in"),
    ({"num_regmean_examples": 0}, "whole number"),
    ({"steps": 10}, "does not train"),
])
def test_bad_parameters(registry, tiny, params, message):
    with pytest.raises(ZooError, match=message):
        merge.run(recipe("regmean", **params), "x", registry=registry, device="cpu")


def test_in_memory_merge_says_it_needs_the_pipeline():
    sd = {"w": torch.zeros(2, 2)}
    with pytest.raises(ZooError, match="statistics collected by running them"):
        merge_state_dicts("fisher", sd, [sd, sd])


# -- parity from the best data-free merge ------------------------------------------------------
def test_a_tsv_merge_rebuilds_as_a_parity_start(registry, tiny):
    """TSV-M's merge as per-task directions (each task's block of the whitened matrix)
    with their coefficients: sum_t w_t d_t is the registered merge's task vector."""
    from zoo.merge.starts import resolve_start

    merge.run(merge.from_dict({"merge_method": "tsv", "base_model": "base", "parameters": {"alpha": 1.3},
                               "models": [{"model": f"e{i}"} for i in range(3)]}), "t", registry=registry, device="cpu")
    base = weights(registry, "base")
    merged = weights(registry, "t")
    names = [n for n in merged if not n.startswith("classifier")]
    tvs = [{n: weights(registry, f"e{i}")[n] - base[n] for n in names} for i in range(3)]
    refs = [m["model"] for m in registry.show("t")["recipe"]["models"]]
    start = resolve_start("t", {}, refs, registry.show("t")["recipe"]["base_model"], registry, tvs)
    assert start.record["method"] == "tsv"
    for n in names:
        rebuilt = base[n] + sum(w * d[n] for w, d in zip(start.weights[n], start.directions))
        torch.testing.assert_close(rebuilt, merged[n], rtol=1e-5, atol=1e-6)
    matrix = next(n for n in names if merged[n].dim() == 2)
    assert start.weights[matrix] == [1.3] * 3 and not torch.equal(start.directions[0][matrix], tvs[0][matrix])
