"""zoo merge against mergekit 0.1.5's own outputs for slices, gradients and
frankenmerges (bench/mergekit_corpus/slice_cases.py on four-layer inputs; fixtures
under tests/data/mergekit_slices/, made by ``make_fixtures.py --corpus slices``).

Every tensor bit for bit, under the same names (layers renumbered as mergekit numbers
them), and config.json's dtype and number of layers; what mergekit refuses, zoo
refuses in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo import merge
from zoo.errors import ZooError
from zoo.merge.recipe import evaluate

from tests.test_mergekit_parity import ROOT, _load, cases, check_fixtures, inputs, merged  # noqa: F401

FIXTURES = ROOT / "tests" / "data" / "mergekit_slices"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
slice_cases = _load("slice_cases")
CASES = slice_cases.CASES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_slices")
    assert inputs.build(root, slice_cases.LAYERS) == MANIFEST["inputs"], \
        "the inputs differ from those the fixtures were made from"
    return root


def test_every_case_has_its_fixture():
    check_fixtures(MANIFEST, CASES, FIXTURES, 1_000_000)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo") == "refuse"])
def test_zoo_refuses_what_mergekit_refuses(corpus, tmp_path, name):
    with pytest.raises(ZooError, match=CASES[name]["match"]) as e:
        merge.run(merge.from_dict(cases.recipe_for(CASES[name], str(corpus))), out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("zoo", "same") == "same"])
def test_zoo_writes_what_mergekit_writes(corpus, tmp_path, name):
    expected = MANIFEST["cases"][name]
    got, out = merged(corpus, tmp_path / "out", CASES[name])
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    assert set(got) == set(want)
    for tensor, w in want.items():
        g = got[tensor]
        assert g.dtype == w.dtype, (tensor, g.dtype, w.dtype)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), tensor
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == expected["config_dtype"]
    assert config["num_hidden_layers"] == expected["num_hidden_layers"]


def test_frankenmerge_loads_in_transformers(corpus, tmp_path):
    """Six layers stacked from two four-layer models: transformers loads all of them,
    and layer 3 of the merge is layer 1 of the second model."""
    transformers = pytest.importorskip("transformers")
    info = merge.run(merge.from_dict(cases.recipe_for(CASES["passthrough_stack_f32"], str(corpus))),
                     out_dir=tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(info["path"])
    assert len(model.model.layers) == 6
    e1 = load_file(str(corpus / "f32" / "e1" / "model.safetensors"))
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, e1["model.layers.1.mlp.up_proj.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, inputs.VOCAB) and bool(torch.isfinite(logits).all())


def test_gradient_points_as_mergekit_evaluates_them():
    """mergekit's interpolation: t * (n - 1), truncated, then linear between the two points."""
    grad = [0, 0.5, 1, 0.5, 0]
    assert [evaluate(grad, "x", t) for t in (0, 0.1, 0.25, 0.3, 1)] == pytest.approx([0, 0.2, 0.5, 0.6, 0])
    assert evaluate([True, False], "x", 0.99) is True  # no interpolation for booleans
    cond = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "*", "value": [1, 0]}]
    assert evaluate(cond, "model.layers.0.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate(cond, "model.layers.0.mlp.up_proj.weight", 0.25) == pytest.approx(0.75)
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.5) is None


@pytest.mark.parametrize("recipe, match", [
    ({"slices": [{"sources": [{"model": "{e0}", "layer_range": [2, 9]}]}]}, r"goes past its 4 layers"),
    ({"slices": [{"sources": [{"model": "{e0}", "layer_range": [2, 1]}]}]}, r"layer_range must be"),
    ({"slices": [{"sources": [{"model": "{e0}"}]}]}, r"layer_range must be"),
    ({"slices": []}, r"slices must be a non-empty list"),
    ({"slices": [{"sources": [{"model": "{e0}", "layer_range": [0, 4]}], "extra": 1}]}, r"unknown field"),
    ({"slices": [{"sources": [{"model": "{e0}", "layer_range": [0, 2]}, {"model": "{e0}", "layer_range": [2, 4]}]}],
      "merge_method": "linear", "parameters": {"weight": 1.0}}, r"same model twice"),
    ({"models": [{"model": "{e0}"}], "slices": [{"sources": [{"model": "{e0}", "layer_range": [0, 4]}]}]},
     r"either models or slices"),
    ({"models": [{"model": "{e0}", "parameters": {"scale": []}}]}, r"scale is an empty list"),
    ({"models": [{"model": "{e0}", "parameters": {"scale": [{"value": [{"value": 1}]}]}}]}, r"number or a gradient"),
])
def test_bad_slices_get_one_line(corpus, tmp_path, recipe, match):
    case = {"inputs": "f32", "recipe": {"merge_method": "passthrough", **recipe}}
    with pytest.raises(ZooError, match=match) as e:
        merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_slerp_needs_its_base_among_the_sources(corpus, tmp_path):
    case = {"inputs": "f32", "recipe": {"merge_method": "slerp", "base_model": "{base}", "parameters": {"t": 0.5},
                                        "slices": [{"sources": [{"model": "{e0}", "layer_range": [0, 4]},
                                                                {"model": "{e1}", "layer_range": [0, 4]}]}]}}
    with pytest.raises(ZooError, match=r"base model .* is not among its sources"):
        merge.from_dict(cases.recipe_for(case, str(corpus)))
