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

from tests.test_mergekit_parity import ROOT, _load, cases, inputs  # noqa: F401  (the corpus modules)

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
    info = merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=out)
    got = {}
    for f in sorted(Path(info["path"]).glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def test_every_case_has_its_fixture():
    assert set(MANIFEST["cases"]) == set(CASES)
    for name, case in CASES.items():
        got = MANIFEST["cases"][name]
        if case.get("zoo") == "refuse":
            assert got["rc"] != 0, name
        else:
            assert got["rc"] == 0 and not got["nan"] and (FIXTURES / f"{name}.safetensors").is_file(), name
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 1_000_000


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
