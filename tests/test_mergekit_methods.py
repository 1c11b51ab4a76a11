"""zoo merge against mergekit 0.1.5's own outputs for the merge methods added for
issue 18 (bench/mergekit_corpus/method_cases.py; fixtures under
tests/data/mergekit_methods/, made by ``make_fixtures.py --corpus methods``).

Deterministic methods: every tensor bit for bit, and the dtype config.json names.
DELLA draws at random (mergekit from torch's global generator, zoo from one seeded per
tensor and model), so it is compared statistically: the merged task vector's kept
fraction, that fraction among the larger and the smaller half of each row's
magnitudes (MagPrune's tilt), and the rescale of what is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo import merge
from zoo.errors import ZooError

from tests.test_mergekit_parity import ROOT, _load, cases, check_fixtures, inputs, merged  # noqa: F401

FIXTURES = ROOT / "tests" / "data" / "mergekit_methods"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
method_cases = _load("method_cases")
CASES = method_cases.CASES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_methods")
    assert inputs.build(root) == MANIFEST["inputs"], "the inputs differ from those the fixtures were made from"
    return root


def _merge(corpus: Path, out: Path, case: dict) -> dict[str, torch.Tensor]:
    return merged(corpus, out, case)[0]


def test_every_case_has_its_fixture():
    check_fixtures(MANIFEST, CASES, FIXTURES, 1_000_000)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo") == "refuse"])
def test_zoo_refuses_what_mergekit_refuses(corpus, tmp_path, name):
    with pytest.raises(ZooError, match=CASES[name]["match"]) as e:
        _merge(corpus, tmp_path / "out", CASES[name])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo", "same") in ("same", "rounded")])
def test_zoo_writes_what_mergekit_writes(corpus, tmp_path, name):
    """Bit for bit; for ``rounded`` cases, mergekit's float32 tensors rounded once to
    the dtype its own config.json names (what zoo writes)."""
    got = _merge(corpus, tmp_path / "out", CASES[name])
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    config_dtype = MANIFEST["cases"][name]["config_dtype"]
    assert set(got) == set(want)
    for tensor, w in want.items():
        g = got[tensor]
        if CASES[name].get("zoo") == "rounded":
            assert w.dtype == torch.float32 and g.dtype == getattr(torch, config_dtype), (tensor, g.dtype)
            w = w.to(g.dtype)
        assert g.dtype == w.dtype, (tensor, g.dtype, w.dtype)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), tensor
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == config_dtype


def _della_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 expert: dict[str, torch.Tensor]) -> dict[str, float]:
    """Over every tensor: the kept fraction of the merged task vector; that fraction
    among the larger and the smaller half of each row's magnitudes of the expert's task
    vector; and the L1 norm of the merged task vector over the expert's."""
    kept = n = top = bottom = half = 0
    l1_out = l1_in = 0.0
    for name, b in base.items():
        tv = (expert[name].float() - b.float())
        out = (merged[name].float() - b.float())
        rows = tv.reshape(-1, tv.shape[-1]) if tv.dim() >= 2 else tv.reshape(1, -1)
        orows = out.reshape(rows.shape)
        nz = orows != 0
        order = rows.abs().argsort(dim=1)
        h = rows.shape[1] // 2
        bottom += int(nz.gather(1, order[:, :h]).sum())
        top += int(nz.gather(1, order[:, -h:]).sum())
        half += rows.shape[0] * h
        kept += int(nz.sum())
        n += nz.numel()
        l1_out += float(out.abs().sum())
        l1_in += float(tv.abs().sum())
    return {"kept": kept / n, "top": top / half, "bottom": bottom / half, "l1": l1_out / l1_in}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo") == "random"])
def test_della_matches_mergekit_statistically(corpus, tmp_path, name):
    case = CASES[name]
    got = _merge(corpus, tmp_path / "out", case)
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype for k in want)
    family = corpus / case["inputs"]
    base = load_file(str(family / "base" / "model.safetensors"))
    e0 = load_file(str(family / "e0" / "model.safetensors"))
    zs, ms = _della_stats(got, base, e0), _della_stats(want, base, e0)
    # about 4,400 entries: the standard error of a kept fraction is below 0.01
    for key in ("kept", "top", "bottom"):
        assert abs(zs[key] - ms[key]) < 0.04, (key, zs, ms)
    assert zs["top"] > zs["bottom"] + 0.05  # MagPrune keeps large entries more often
    assert abs(zs["l1"] - ms["l1"]) < 0.05 * ms["l1"], (zs, ms)
    # the seed decides the draw: the same recipe twice writes the same bytes
    again = _merge(corpus, tmp_path / "again", case)
    assert all(torch.equal(again[k], got[k]) for k in got)


@pytest.mark.parametrize("name", ["nearswap_f32", "nearswap_bf16", "ram_f32", "ram_bf16"])
def test_elementwise_methods_stream_in_pieces(corpus, tmp_path, monkeypatch, name):
    """nearswap and ram are elementwise: streamed in pieces of 100 entries they write the same bytes."""
    from zoo.merge import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMS", 100)
    got = _merge(corpus, tmp_path / "out", CASES[name])
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    assert all(torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)) for k, w in want.items())


# -- large tensors stream: the same methods with every tensor merged in pieces ------------------------------
# Cases where bfloat16 entries tie at a selection's cut-off: streamed, the first ties in
# order are kept (the whole-tensor sort's or topk's order is out of reach), still exactly k.
TIE_PICKS = {"sce_topk_bf16", "breadcrumbs_ties_bf16"}


def _stream_everything(monkeypatch, chunk: int, hold: bool) -> None:
    """Every tensor streamed in pieces of ``chunk`` elements; ``hold``: read once and held
    (the engine's path up to 16M elements), else read again for each pass."""
    from zoo.merge import engine
    from zoo.merge.methods import streamed

    monkeypatch.setattr(streamed, "WHOLE_MAX_ELEMS", 0)
    monkeypatch.setattr(engine, "CHUNK_ELEMS", chunk)
    if not hold:
        monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference, in units of the dtype's epsilon times the tensor's largest magnitude."""
    scale = float(want.double().abs().max()) or 1.0
    return float((got.double() - want.double()).abs().max()) / scale / torch.finfo(got.dtype).eps


@pytest.mark.parametrize("hold", [True, False], ids=["held", "reread"])
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo", "same") in ("same", "rounded")])
def test_streamed_methods_stay_within_rounding_of_mergekit(corpus, tmp_path, monkeypatch, name, hold):
    """Streamed in pieces of 100 entries (what a tensor over 1M entries gets), every method
    writes mergekit's tensors up to the rounding of its whole-tensor sums (streamed in
    float64): at most 8 epsilons of the tensor's largest magnitude (measured: at most
    2.1 in float32, 4.5 in bfloat16, where mergekit's own bf16 arithmetic rounds more).
    Where bf16 entries tie at a selection's cut-off, other tied entries may be kept."""
    _stream_everything(monkeypatch, 100, hold)
    got = _merge(corpus, tmp_path / "out", CASES[name])
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    differ = total = 0
    for tensor, w in want.items():
        g, w = got[tensor], w.to(got[tensor].dtype)
        differ, total = differ + int((g != w).sum()), total + g.numel()
        if name not in TIE_PICKS:
            assert _ulps(g, w) <= 8, (tensor, _ulps(g, w))
    if name in TIE_PICKS:
        assert differ < 0.02 * total, (differ, total)


RANDOM_CASES = [n for n, c in CASES.items() if c.get("zoo") == "random"]
DARE_CASES = {
    "dare_linear_rescaled_f32": {"inputs": "f32", "recipe": {
        "merge_method": "dare_linear", "base_model": "{base}",
        "models": [{"model": "{e0}", "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": "{e1}", "parameters": {"weight": 0.7, "density": 0.3}}]}},
    "dare_ties_rescaled_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "dare_ties", "base_model": "{base}",
        "models": [{"model": "{e0}", "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": "{e1}", "parameters": {"weight": 0.7, "density": 0.3}}]}},
}


@pytest.mark.parametrize("name", RANDOM_CASES + list(DARE_CASES))
def test_streamed_random_methods_draw_the_same_masks(corpus, tmp_path, monkeypatch, name):
    """DARE and DELLA streamed: each model's generator goes on from piece to piece, so the
    masks are those of the whole tensor; only the L1 rescale's sums round differently."""
    case = CASES.get(name) or DARE_CASES[name]
    whole = _merge(corpus, tmp_path / "whole", case)
    _stream_everything(monkeypatch, 64, hold=False)
    got = _merge(corpus, tmp_path / "out", case)
    for tensor, w in whole.items():
        assert ((got[tensor] == 0) == (w == 0)).all(), tensor
        assert _ulps(got[tensor], w) <= 2, (tensor, _ulps(got[tensor], w))


@pytest.mark.parametrize("recipe", [
    {"merge_method": "slerp", "parameters": {"t": 0.3}, "models": ["{e0}"]},
    {"merge_method": "model_stock", "models": ["{e0}", "{e1}", "{e2}"]},
    {"merge_method": "model_stock", "parameters": {"filter_wise": True}, "models": ["{e0}", "{e1}", "{e2}"]},
    {"merge_method": "breadcrumbs", "models": [("{e0}", {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                               ("{e1}", {"weight": 0.7, "density": 0.5})]},
], ids=["slerp", "model_stock", "model_stock_filter_wise", "breadcrumbs"])
def test_streamed_merge_stays_within_rounding_of_the_whole_merge(corpus, tmp_path, monkeypatch, recipe):
    """The methods without a mergekit fixture here: streamed against zoo's whole-tensor merge."""
    models = [{"model": m} if isinstance(m, str) else {"model": m[0], "parameters": m[1]} for m in recipe["models"]]
    case = {"inputs": "f32", "recipe": {**recipe, "base_model": "{base}", "models": models}}
    whole = _merge(corpus, tmp_path / "whole", case)
    _stream_everything(monkeypatch, 100, hold=False)
    got = _merge(corpus, tmp_path / "out", case)
    for tensor, w in whole.items():
        assert _ulps(got[tensor], w) <= 8, (tensor, _ulps(got[tensor], w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_outlier_cut_keeps_exactly_what_breadcrumbs_keeps(dtype):
    """Breadcrumbs' kept range from two streamed order statistics: the same entries as the
    whole-tensor sort without ties; with bf16 ties, exactly as many."""
    from zoo.merge.methods.breadcrumbs import OutlierCuts
    from zoo.merge.methods.sparsify import trim_outliers

    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(5000, generator=g) * 0.02).to(dtype)
    cuts = OutlierCuts(delta.numel(), [(0.37, 0.05)], rescale=False)
    pieces = [delta[i:i + 333] for i in range(0, delta.numel(), 333)]
    cuts.gather(lambda: (((None, [p]) for p in pieces)), deltas=True)
    stats = cuts.result()
    mask = torch.cat([stats["cuts"][0].mask(p, stats["runs"][0]) for p in pieces])
    want = trim_outliers(delta, 0.37, 0.05) != 0
    assert int(mask.sum()) == int(0.37 * delta.numel())
    if dtype == torch.float32:
        assert torch.equal(mask, want | ((delta == 0) & mask))


def test_streamed_quartile_sample_is_the_whole_tensors(monkeypatch):
    """arcee_fusion streamed: the sampled importances, taken block by block, give the
    whole tensor's quartiles exactly."""
    from zoo.merge.methods import arcee_fusion as af

    monkeypatch.setattr(af, "QUANTILE_SAMPLE", 500)
    g = torch.Generator().manual_seed(1)
    base, x = torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g)
    want = af.quartiles(af.importance(x, base), torch.Generator().manual_seed(9))
    sample = af.QuartileSample(x.numel(), 64, torch.Generator().manual_seed(9))
    sample.gather(lambda: ((b.reshape(-1), [y.reshape(-1)]) for b, y in zip(base.split(7), x.split(7))))
    assert torch.equal(sample.result()["quartiles"], want)


def test_generators_draw_the_same_in_pieces():
    """What streamed DARE and DELLA rely on: torch's CPU rand and bernoulli consume a
    generator element by element, so pieces drawn in turn equal one whole draw."""
    whole = torch.rand(100_003, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat([torch.rand(n, generator=g) for n in (1, 17, 4096, 95_889)]), whole)
    p = whole.view(-1)[:100_000].reshape(100, 1000).to(torch.bfloat16)
    one = torch.bernoulli(p, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(torch.cat([torch.bernoulli(p[a:b], generator=g) for a, b in ((0, 3), (3, 64), (64, 100))]), one)


@pytest.mark.parametrize("hold", [True, False], ids=["held", "reread"])
@pytest.mark.parametrize("name", ["ties_rescale_f32", "ties_rescale_bf16"])
def test_streamed_ties_rescale_stays_within_rounding_of_mergekit(corpus, tmp_path, monkeypatch, name, hold):
    """TIES with ``rescale`` streamed: the thresholds' passes, then one for the L1 sums
    (issue 18's fixtures). Re-read bf16 pieces keep the first ties at the cut-off."""
    _stream_everything(monkeypatch, 100, hold)
    got = _merge(corpus, tmp_path / "out", cases.CASES[name])
    want = load_file(str(ROOT / "tests" / "data" / "mergekit" / f"{name}.safetensors"))
    differ = total = 0
    for tensor, w in want.items():
        g = got[tensor]
        differ, total = differ + int((g != w).sum()), total + g.numel()
        if hold or g.dtype == torch.float32:
            assert _ulps(g, w) <= 8, (tensor, _ulps(g, w))
    assert differ < 0.02 * total or g.dtype == torch.float32, (differ, total)
