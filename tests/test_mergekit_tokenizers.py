"""Tokenizers, chat templates and ``model+adapter`` against mergekit 0.1.5's own outputs.

The fixtures under tests/data/mergekit_tokenizers/ were written by
bench/mergekit_corpus/make_tokenizer_fixtures.py from the seeded inputs of
bench/mergekit_corpus/tokenizer_cases.py (tiny Llama models whose vocabularies differ:
added special tokens, a renamed BPE token, padded embeddings). The test rebuilds the
inputs, checks them against the manifest, runs each recipe through zoo and compares
every tensor bit for bit, config.json's vocab_size and dtype, and every tokenizer file
byte for byte (with another transformers than the fixtures': the tokens and their ids,
and the chat template). Recipes mergekit cannot run, and names zoo does not ship, are refused
with one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from zoo import merge
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "mergekit_tokenizers"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"mergekit_corpus_{name}", ROOT / "bench" / "mergekit_corpus" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cases = _load("tokenizer_cases")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_tokenizers")
    assert cases.build(root) == MANIFEST["inputs"], "the inputs differ from those the fixtures were made from"
    return root


def test_every_case_has_its_fixture():
    assert set(MANIFEST["cases"]) == set(cases.CASES)
    for name, case in cases.CASES.items():
        got = MANIFEST["cases"][name]
        if case.get("zoo") == "refuse":
            continue
        assert got["rc"] == 0 and not got["nan"] and (FIXTURES / f"{name}.safetensors").is_file(), name


@pytest.mark.parametrize("name", [n for n, c in cases.CASES.items() if c.get("zoo", "same") in ("same", "close")])
def test_zoo_writes_what_mergekit_writes(corpus, tmp_path, name):
    expected = MANIFEST["cases"][name]
    info = merge.run(merge.from_dict(cases.recipe_for(cases.CASES[name], str(corpus))), out_dir=tmp_path / "out")
    out = Path(info["path"])
    got = {}
    for f in sorted(out.glob("model*.safetensors")):
        got.update(load_file(str(f)))
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    assert set(got) == set(want)
    for tensor, w in want.items():
        g = got[tensor]
        assert g.dtype == w.dtype and g.shape == w.shape, (tensor, g.dtype, w.dtype, g.shape, w.shape)
        if cases.CASES[name].get("zoo") == "close":  # slerp: float32 sums in another order
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), tensor
    config = json.loads((out / "config.json").read_text())
    assert {"vocab_size": config.get("vocab_size"), "dtype": config.get("dtype", config.get("torch_dtype"))} \
        == expected["config"]
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "added_tokens.json", "tokenizer.model")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name in names}
    if transformers.__version__ == MANIFEST["mergekit"].split()[2]:
        assert files == expected["tokenizer"]  # byte for byte: both saved by the same transformers
    else:  # another transformers writes other bytes: the same files, tokens at the same ids, same template
        assert set(files) == set(expected["tokenizer"])
        mine = FIXTURES / f"{name}.tokenizer"
        for f in ("tokenizer.json", "chat_template.jinja"):
            if (mine / f).exists():
                a, b = (out / f).read_text(), (mine / f).read_text()
                assert (_tokens(a) == _tokens(b)) if f == "tokenizer.json" else a == b, f


def _tokens(text: str) -> dict[str, int]:
    data = json.loads(text)
    return {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens") or []}}


@pytest.mark.parametrize("name", [n for n, c in cases.CASES.items() if c.get("zoo") == "refuse"])
def test_zoo_refuses(corpus, tmp_path, name):
    case = cases.CASES[name]
    with pytest.raises(ZooError, match=case["match"]) as e:
        merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, match", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "not both"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}}, "exactly one"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "elsewhere"}}}}, "not one of the merged models"),
    ({"tokenizer_source": "elsewhere"}, "not one of the merged models"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "{a0}"}}}}, "is not in"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "{a0}", "token_id": 999}}}}},
     "has no token"),
    ({"tokenizer": {"tokens": {"<x>": {}}}}, "gives no source"),
    ({"chat_template": "{% x %}"}, "not a valid template"),
])
def test_bad_tokenizer_settings_are_one_line(corpus, tmp_path, recipe, match):
    full = {"merge_method": "task_arithmetic", "base_model": "{base}",
            "models": [{"model": "{a0}", "parameters": {"weight": 0.5}}], **recipe}
    with pytest.raises(ZooError, match=match) as e:
        merge.run(merge.from_dict(cases.recipe_for({"inputs": "f32", "recipe": full}, str(corpus))),
                  out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)


def test_adapter_reference_must_be_an_adapter(corpus, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "{base}+{e0}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ZooError, match="not a LoRA adapter"):
        merge.run(merge.from_dict(cases.recipe_for({"inputs": "f32", "recipe": recipe}, str(corpus))),
                  out_dir=tmp_path / "out")


def test_adapter_reference_takes_one_plus(corpus, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "{base}+{l0}+{l0}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ZooError, match="MODEL\\+ADAPTER"):
        merge.run(merge.from_dict(cases.recipe_for({"inputs": "f32", "recipe": recipe}, str(corpus))),
                  out_dir=tmp_path / "out")


def test_adapter_reference_as_the_base_is_refused(corpus, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": "{base}+{l0}",
              "models": [{"model": "{e0}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ZooError, match="not as the base"):
        merge.run(merge.from_dict(cases.recipe_for({"inputs": "f32", "recipe": recipe}, str(corpus))),
                  out_dir=tmp_path / "out")
