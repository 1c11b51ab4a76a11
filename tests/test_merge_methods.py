"""Each merge method against its paper's formula, on small tensors, with edge cases."""

from __future__ import annotations

import math
import re

import pytest
import torch

from zoo.merge.methods.params import REQUIRED

from zoo.merge import methods as M
from zoo.merge import state_dicts as S
from zoo.merge.methods import select
from zoo.merge.methods.ties import TrimThresholds
from zoo.errors import ZooError


def sd(**tensors):
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


@pytest.fixture
def family():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return base, experts


def test_task_arithmetic_formula(family):
    base, experts = family
    out = S.task_arithmetic(base, experts, weight=0.3)
    for k in base:
        expect = base[k] + 0.3 * sum(e[k] - base[k] for e in experts)
        torch.testing.assert_close(out[k], expect, rtol=0, atol=1e-6)


def test_task_arithmetic_lambda_and_zero_vectors(family):
    base, _ = family
    out = S.merge_state_dicts("task_arithmetic", base, [dict(base), dict(base)], [{"weight": 0.3}] * 2,
                              **{"lambda": 0.7})
    for k in base:
        assert torch.equal(out[k], base[k])  # zero task vectors give the base back exactly


def test_linear_is_a_weighted_average(family):
    base, experts = family
    out = S.linear(experts, weights=[1, 2, 3])
    for k in base:
        torch.testing.assert_close(out[k], (experts[0][k] + 2 * experts[1][k] + 3 * experts[2][k]) / 6)
    raw = S.merge_state_dicts("linear", None, experts, [{"weight": 0.5}] * 3, normalize=False)
    torch.testing.assert_close(raw["b"], 0.5 * sum(e["b"] for e in experts))


def reference_ties(base, experts, density, weights, normalize):
    """TIES by its definition, entry by entry."""
    out = base.clone().reshape(-1)
    deltas = []
    for e in experts:
        d = (e - base).reshape(-1)
        k = int(density * d.numel())
        keep = set(torch.argsort(d.abs(), descending=True)[:k].tolist()) if density < 1 else set(range(d.numel()))
        deltas.append(torch.tensor([d[i] if i in keep else 0.0 for i in range(d.numel())]))
    for i in range(out.numel()):
        vals = [w * d[i] for w, d in zip(weights, deltas)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(w, v) for w, v in zip(weights, vals) if v != 0 and math.copysign(1, v) == sign]
        total = sum(v for _, v in agree)
        if normalize:
            div = sum(w for w, _ in agree) or 1.0
            total = total / div
        out[i] += total
    return out.reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_its_definition(family, density, normalize):
    base, experts = family
    out = S.merge_state_dicts("ties", base, experts, [{"weight": 0.3, "density": density}] * 3, normalize=normalize)
    for k in base:
        expect = reference_ties(base[k], [e[k] for e in experts], density, [0.3] * 3, normalize)
        torch.testing.assert_close(out[k], expect, rtol=0, atol=1e-6)


def test_ties_all_equal_signs_is_the_mean_or_sum():
    base = sd(w=[0.0, 0.0, 0.0])
    experts = [sd(w=[1.0, 2.0, 3.0]), sd(w=[3.0, 2.0, 1.0])]
    mean = S.merge_state_dicts("ties", base, experts, [{"weight": 1.0, "density": 1.0}] * 2)
    assert mean["w"].tolist() == [2.0, 2.0, 2.0]
    total = S.merge_state_dicts("ties", base, experts, [{"weight": 1.0, "density": 1.0}] * 2, normalize=False)
    assert total["w"].tolist() == [4.0, 4.0, 4.0]


def test_ties_sign_election_by_mass():
    base = sd(w=[0.0, 0.0])
    experts = [sd(w=[3.0, -1.0]), sd(w=[-1.0, -1.0]), sd(w=[-1.0, 5.0])]
    out = S.merge_state_dicts("ties", base, experts, [{"weight": 1.0, "density": 1.0}] * 3)
    # entry 0: mass +1 -> keep only +3; entry 1: mass +3 -> keep only +5
    assert out["w"].tolist() == [3.0, 5.0]


def test_ties_zero_task_vectors():
    base = sd(w=[1.0, -2.0])
    out = S.merge_state_dicts("ties", base, [dict(base), dict(base)], [{"weight": 1.0, "density": 0.5}] * 2)
    assert torch.equal(out["w"], base["w"])


def test_dare_is_seeded_unbiased_and_rescaled(family):
    base, _ = family
    big_base = {"w": torch.zeros(200, 200)}
    expert = {"w": torch.ones(200, 200)}
    a = S.merge_state_dicts("dare_linear", big_base, [expert], [{"weight": 1.0, "density": 0.25}], seed=7)
    b = S.merge_state_dicts("dare_linear", big_base, [expert], [{"weight": 1.0, "density": 0.25}], seed=7)
    c = S.merge_state_dicts("dare_linear", big_base, [expert], [{"weight": 1.0, "density": 0.25}], seed=8)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    kept = a["w"] != 0
    # survivors rescaled to the task vector's L1 norm, as mergekit does: about 1/density
    assert torch.all(a["w"][kept] == torch.tensor(40000.0) / kept.sum().float())
    assert abs(a["w"][kept][0].item() - 4.0) < 0.2
    assert abs(kept.float().mean().item() - 0.25) < 0.01  # drop probability p = 0.75
    off = S.merge_state_dicts("dare_linear", big_base, [expert], [{"weight": 1.0, "density": 0.25}], seed=7,
                              rescale=False)
    assert torch.all(off["w"][off["w"] != 0] == 1.0)


def test_dare_ties_with_density_one_is_ties(family):
    base, experts = family
    p = [{"weight": 0.3, "density": 1.0}] * 3
    torch.testing.assert_close(S.merge_state_dicts("dare_ties", base, experts, p, normalize=True),
                               S.merge_state_dicts("ties", base, experts, p))


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = sd(w=[0.0] * 10)
    expert = sd(w=[float(i) for i in range(1, 11)])  # magnitudes 1..10
    out = S.merge_state_dicts("breadcrumbs", base, [expert], [{"weight": 1.0, "density": 0.5, "gamma": 0.2}])
    # drop the top 2 (9, 10) and the bottom 3 (1, 2, 3): keep 4..8
    assert out["w"].tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


def test_slerp_formula_and_endpoints():
    base = sd(w=[1.0, 0.0])
    other = sd(w=[0.0, 2.0])
    mid = S.slerp(base, other, t=0.5)["w"]
    theta = math.pi / 2
    expect = [math.sin(theta / 2) / math.sin(theta) * 1.0, math.sin(theta / 2) / math.sin(theta) * 2.0]
    torch.testing.assert_close(mid, torch.tensor(expect))
    assert torch.equal(S.slerp(base, other, t=0.0)["w"], base["w"])
    torch.testing.assert_close(S.slerp(base, other, t=1.0)["w"], other["w"])
    colinear = S.slerp(base, sd(w=[3.0, 0.0]), t=0.5)["w"]  # falls back to lerp
    torch.testing.assert_close(colinear, torch.tensor([2.0, 0.0]))


def test_model_stock_formula(family):
    base, experts = family
    out = S.model_stock(base, experts)
    for k in base:
        offs = [(e[k] - base[k]).reshape(-1) for e in experts]
        cos = [torch.dot(offs[i], offs[j]) / (offs[i].norm() * offs[j].norm()) for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / len(cos)
        t = 3 * c / (1 + 2 * c)
        expect = t * sum(e[k] for e in experts) / 3 + (1 - t) * base[k]
        torch.testing.assert_close(out[k], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_global_trim_uses_one_threshold_per_model(family, normalize):
    """trim: global ranks each task vector over the whole flattened model (the TIES
    paper): the same as per-tensor TIES on one concatenated tensor."""
    base, experts = family
    names = list(base)
    flat = lambda sd_: torch.cat([sd_[k].reshape(-1) for k in names])  # noqa: E731
    expect = reference_ties(flat(base), [flat(e) for e in experts], 0.2, [0.3] * 3, normalize)
    out = S.merge_state_dicts("ties", base, experts, [{"weight": 0.3, "density": 0.2}] * 3,
                              normalize=normalize, trim="global")
    torch.testing.assert_close(flat(out), expect, rtol=0, atol=1e-6)
    # and it differs from the per-tensor trim on this family (the test can fail)
    per_tensor = S.ties(base, experts, density=0.2, weight=0.3, normalize=normalize)
    assert not torch.equal(flat(per_tensor), flat(out))


def test_ties_global_trim_needs_one_density_and_scope_for_the_model():
    """Per-tensor filters can give tensors other densities or trims; a global threshold
    cannot honour those, so they are refused."""
    ties = M.get_method("ties")
    g = {"trim": "global"}
    with pytest.raises(ZooError, match="one density per model"):
        ties.model_collector([([{"density": 0.2}], g, 10), ([{"density": 0.5}], g, 10)])
    with pytest.raises(ZooError, match="every merged tensor"):
        ties.model_collector([([{"density": 0.2}], g, 10), ([{"density": 0.2}], {}, 10)])
    assert ties.model_collector([([{"density": 0.2}], {}, 10)]) is None  # per tensor: nothing global


def test_heads_and_integer_buffers_are_skipped():
    base = {"w": torch.zeros(2), "head": torch.zeros(10, 2), "ids": torch.arange(3)}
    e = {"w": torch.ones(2), "head": torch.zeros(3, 2), "ids": torch.arange(3)}
    out = S.task_arithmetic(base, [e], weight=0.3)
    assert set(out) == {"w"}


@pytest.mark.parametrize("bad, msg", [
    (dict(method="nope"), "unknown merge method"),
    (dict(model_params=[{"density": 0.0}]), "density must be in \\(0, 1\\]"),
    (dict(model_params=[{"density": 1.5}]), "density must be in \\(0, 1\\]"),
    (dict(model_params=[{"weight": float("nan")}]), "weight must be a finite number"),
    (dict(model_params=[{"frobnicate": 1}]), "unknown per-model parameter 'frobnicate'"),
    (dict(options={"colour": "red"}), "unknown parameter 'colour'"),
    (dict(options={"normalize": "yes"}), "normalize must be true or false"),
    (dict(options={"trim": "layer"}), "trim must be per_tensor or global"),
])
def test_bad_parameters_are_refused(bad, msg):
    base = {"w": torch.zeros(3)}
    with pytest.raises(ZooError, match=msg):
        S.merge_state_dicts(bad.get("method", "ties"), base, [{"w": torch.ones(3)}],
                            bad.get("model_params", [{"density": 0.5}]), **bad.get("options", {}))


def test_model_counts():
    base = {"w": torch.zeros(3)}
    with pytest.raises(ZooError, match="at most 1"):
        S.merge_state_dicts("slerp", base, [base, base])
    with pytest.raises(ZooError, match="at least 2"):
        S.model_stock(base, [base])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_task_arithmetic_is_bit_identical_to_stack_sum(n, dtype):
    """The in-place path must equal mergekit's order of operations exactly:
    base + (stack(x_i - base) * w).sum(0), with normalize and lambda. (torch reduces
    up to 4 rows in order; for 5 or more it may not, on sizes that are not a multiple
    of the vector width, and then zoo keeps its sequential order.)"""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(1000, generator=g, dtype=dtype)
    xs = [base + 0.01 * torch.randn(1000, generator=g, dtype=dtype) for _ in range(n)]
    ws = [0.3, 0.7, 1.3, 0.1, 2.0][:n]
    for normalize, lam in ((False, 1.0), (True, 1.0), (False, 0.5)):
        stacked = torch.stack([x - base for x in xs])
        w = torch.tensor(ws, dtype=dtype).unsqueeze(-1)
        mixed = (stacked * w).sum(dim=0)
        if normalize:
            mixed = mixed / w.sum(dim=0)
        if lam != 1:
            mixed = mixed * lam
        expect = base + mixed
        got = M.TaskArithmetic().merge(base, xs, [{"weight": x} for x in ws],
                                       {"normalize": normalize, "lambda": lam}, M.TensorContext("t"))
        assert torch.equal(got, expect)


@pytest.mark.parametrize("kind", ["normal", "clustered", "zeros"])
def test_radix_threshold_is_exact(kind):
    """The radix select agrees with a sort, on spread, tied and mostly-zero values."""
    g = torch.Generator().manual_seed(1)
    n = 300_000
    if kind == "normal":
        a = torch.randn(n, generator=g)
    elif kind == "clustered":
        a = torch.randint(-4, 5, (n,), generator=g).float()
    else:
        a = torch.zeros(n)
        a[:1000] = torch.rand(1000, generator=g)
    for k in (1, 7, n // 5, n // 2, n - 1, n):
        assert select.kth_largest_abs(a, k) == float(a.abs().sort(descending=True).values[k - 1])
        sel = select.TopKThreshold(k)  # the streaming two-pass select, in uneven pieces
        for p in (0, 1):
            for off in range(0, n, 70_001):
                sel.update(p, a[off:off + 70_001])
            sel.end_pass(p)
        assert sel.value() == float(a.abs().sort(descending=True).values[k - 1])


@pytest.mark.parametrize("sample", ["representative", "misleading for one model", "none"])
def test_streamed_trim_thresholds_take_one_pass_with_a_sample_and_stay_exact(sample):
    """Streamed tensors: with a sample of the inputs, one bracketed counting pass; the
    radix passes follow only for a model whose bracket missed; no sample, two passes."""
    g = torch.Generator().manual_seed(5)
    n = 200_000
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) * (i + 1) for i in range(3)]
    densities = [0.2, 0.5, 0.9]
    col = TrimThresholds(n, densities)
    idx = torch.arange(0, n, 7)
    if sample != "none":
        sampled = [x[idx].clone() for x in xs]
        if sample == "misleading for one model":
            sampled[1] = base[idx] + 5.0  # far larger than model 1's values: its bracket misses
        col.use_sample(base[idx], sampled)

    passes = []

    def pieces():
        passes.append(1)
        for off in range(0, n, 30_011):
            yield base[off:off + 30_011], [x[off:off + 30_011] for x in xs]

    got = col.gather(pieces)["thresholds"]
    for x, d, t in zip(xs, densities, got):
        assert t == float((x - base).abs().sort(descending=True).values[int(d * n) - 1])
    assert len(passes) == {"representative": 1, "misleading for one model": 3, "none": 2}[sample]


class _CountingSelect(select.TopKThreshold):
    made = 0

    def __init__(self, k):
        super().__init__(k)
        _CountingSelect.made += 1


@pytest.mark.parametrize("case", ["bracket", "sample misses", "bracket too wide"])
def test_bracketed_select_is_exact_and_falls_back(monkeypatch, case):
    """One counting pass inside a sampled bracket; where the strided sample does not
    represent the tensor, or the bracket is too wide, the two-pass select answers."""
    monkeypatch.setattr(select, "TopKThreshold", _CountingSelect)
    monkeypatch.setattr(select, "SELECT_SLICE", 50_000)  # several counting slices
    _CountingSelect.made = 0
    g = torch.Generator().manual_seed(3)
    n = 400_000
    a = torch.randn(n, generator=g) * 0.01
    if case == "sample misses":
        a[:: n // select.SELECT_SAMPLE] = 0  # exactly the sampled entries are zero: the bracket is all zeros
    if case == "bracket too wide":
        monkeypatch.setattr(select, "SELECT_MAX_BINS", 16)
    expected_fallback = case != "bracket"
    for k in (999, n // 5, n // 2):  # (near k = 1 or n the sample cannot bracket: tested above)
        assert select.kth_largest_abs(a, k) == float(a.abs().sort(descending=True).values[k - 1]), k
    assert _CountingSelect.made == (3 if expected_fallback else 0)


def test_every_method_documents_itself():
    """What the CLI help reads: a summary line, a paper, and a documented, checked
    default for every parameter."""
    assert list(M.METHODS) == ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "linear",
                               "slerp", "model_stock", "tsv", "iso_c", "iso_cts", "adamerging", "concrete_ta",
                               "concrete_adamerging", "parity", "breadcrumbs_ties", "della", "della_linear", "sce",
                               "nuslerp", "multislerp", "karcher", "arcee_fusion", "nearswap", "ram",
                               "ramplus_tl", "passthrough", "regmean", "fisher"]
    for name, m in M.METHODS.items():
        assert m.name == name and M.get_method(name) is m
        assert m.summary and "\n" not in m.summary, name
        assert m.reference and (re.search(r"arXiv \d{4}\.\d{4,5}", m.reference)
                                or re.search(r"\b(19|20)\d\d\b", m.reference)), name  # no arXiv id: a dated one
        rows = M.describe(m)
        assert [(r.scope, r.name) for r in rows] == [("global", k) for k in m.parameters] + \
            [("per-model", k) for k in m.model_parameters]
        for r in rows:
            table = m.parameters if r.scope == "global" else m.model_parameters
            assert r.doc and r.default == table[r.name].default, (name, r.name)
            if r.default is not None and r.default is not REQUIRED and table[r.name].check is not None:
                assert table[r.name].check(r.default) is None, (name, r.name)  # defaults pass their own check
    assert M.get_method("ties").reference.endswith("arXiv 2306.01708")
    assert [m.name for m in M.METHODS.values() if m.learned] == ["adamerging", "concrete_ta", "concrete_adamerging",
                                                                 "parity"]
    with pytest.raises(ZooError, match="unknown merge method 'nope'; choose one of adamerging"):
        M.get_method("nope")


def test_a_method_is_one_class_in_one_module():
    """No import cycle: the methods stand on the learned merges' toolbox (``learned/``:
    merger, loops, start records, data, runtime) and import nothing above them (plan,
    engine, recipe, run, learning, starts); the toolbox imports no method and nothing
    above it."""
    import ast
    from pathlib import Path

    root = Path(M.__file__).parent.parent

    def imports(path: Path) -> set[str]:
        """What ``path`` imports when it runs (not for type checking)."""
        tree = ast.parse(path.read_text())
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")]
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    above = {"zoo.merge.engine", "zoo.merge.plan", "zoo.merge.recipe", "zoo.merge.run", "zoo.merge.state_dicts",
             "zoo.merge.learning", "zoo.merge.starts", "zoo.merge"}
    for path in (root / "methods").glob("*.py"):
        assert not imports(path) & above, path.name
    for path in (root / "learned").glob("*.py"):
        wrong = [m for m in imports(path) if m.startswith("zoo.merge.methods") or m in above]
        assert not wrong, (path.name, wrong)


def test_numbers_in_exponent_form_are_numbers():
    """1e-3 is a float in YAML 1.2 and in mergekit's recipes; PyYAML's 1.1 rules made it a
    string, so `--param lr=1e-3` and `lambda: 3e2` in a recipe were refused."""
    from zoo.merge.recipe import from_dict, parse_param

    assert parse_param("lr=1e-3") == ("lr", 0.001)
    assert parse_param("lambda=3E2") == ("lambda", 300.0)
    assert parse_param("name=e5") == ("name", "e5")
    assert parse_param("weight=0.5") == ("weight", 0.5) and parse_param("steps=10") == ("steps", 10)
    import yaml
    from zoo.merge.recipe import RecipeLoader

    data = yaml.load("merge_method: task_arithmetic\nbase_model: b\nparameters: {lambda: 5e-1}\n"
                     "models: [{model: a, parameters: {weight: 1e0}}]\n", Loader=RecipeLoader)
    assert from_dict(data).parameters == {"lambda": 0.5}
