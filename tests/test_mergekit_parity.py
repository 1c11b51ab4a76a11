"""zoo merge against mergekit 0.1.5's own outputs, one recipe (at least) per divergence
of issue 18.

CI has no mergekit, so mergekit's outputs are fixtures under tests/data/mergekit/, made
by bench/mergekit_corpus/make_fixtures.py from the tiny seeded inputs of
bench/mergekit_corpus/inputs.py. The test rebuilds those inputs, checks their sha256
against the manifest (so the fixtures belong to them), runs each recipe through zoo and
compares: every tensor bit for bit, the dtype ``config.json`` names, and the
tokenizer (vocabulary and settings). Recipes mergekit refuses, or where it writes NaN,
zoo must refuse with one line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo import merge
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "bench" / "mergekit_corpus"
FIXTURES = ROOT / "tests" / "data" / "mergekit"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"mergekit_corpus_{name}", CORPUS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


inputs = _load("inputs")
cases = _load("cases")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_corpus")
    digests = inputs.build(root)
    assert digests == MANIFEST["inputs"], "the inputs differ from those the fixtures were made from"
    return root


def merged(corpus: Path, out: Path, case: dict) -> tuple[dict[str, torch.Tensor], Path]:
    """A corpus case merged by zoo into ``out``: its tensors, and the folder written."""
    info = merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=out)
    folder, got = Path(info["path"]), {}
    for f in sorted(folder.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got, folder


def check_fixtures(manifest: dict, corpus_cases: dict, fixtures: Path, max_bytes: int) -> None:
    """Every case has mergekit's outcome on record: a refusal, or a clean merge stored as
    a fixture; and the fixtures stay small."""
    assert set(manifest["cases"]) == set(corpus_cases)
    for name, case in corpus_cases.items():
        got = manifest["cases"][name]
        if case.get("zoo") == "refuse":
            assert got["rc"] != 0, name
        else:
            assert got["rc"] == 0 and not got["nan"] and (fixtures / f"{name}.safetensors").is_file(), name
    assert sum(p.stat().st_size for p in fixtures.iterdir()) < max_bytes


def _tokenizer(folder: Path) -> dict | None:
    import hashlib

    if not (folder / "tokenizer.json").exists():
        return None
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for tok in data.get("added_tokens") or []:
        vocab[tok["content"]] = tok["id"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    return {"vocab_sha256": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest(),
            "model_max_length": cfg.get("model_max_length")}


def test_every_case_has_its_fixture():
    assert set(MANIFEST["cases"]) == set(cases.CASES)
    for name, case in cases.CASES.items():
        got = MANIFEST["cases"][name]
        if case.get("zoo") == "refuse":
            assert got["rc"] != 0 or got["nan"], name  # mergekit refuses, or writes NaN
        else:
            assert got["rc"] == 0 and not got["nan"] and (FIXTURES / f"{name}.safetensors").is_file(), name
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 2_000_000


@pytest.mark.parametrize("name", [n for n, c in cases.CASES.items() if c.get("zoo") == "refuse"])
def test_zoo_refuses_what_mergekit_refuses(corpus, tmp_path, name):
    case = cases.CASES[name]
    with pytest.raises(ZooError, match=case["match"]) as e:
        merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n, c in cases.CASES.items() if c.get("zoo", "same") == "same"])
def test_zoo_writes_what_mergekit_writes(corpus, tmp_path, name):
    case = cases.CASES[name]
    expected = MANIFEST["cases"][name]
    info = merge.run(merge.from_dict(cases.recipe_for(case, str(corpus))), out_dir=tmp_path / "out")
    out = Path(info["path"])
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = load_file(str(FIXTURES / f"{name}.safetensors"))
    assert set(got) == set(want)
    for tensor, w in want.items():
        g = got[tensor]
        assert g.dtype == w.dtype, (tensor, g.dtype, w.dtype)
        # bit for bit: the same operations in the same order and rounding as mergekit
        assert torch.equal(g.view(torch.uint8) if g.dtype != torch.bool else g,
                           w.view(torch.uint8) if w.dtype != torch.bool else w), tensor
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == expected["config_dtype"]
    assert _tokenizer(out) == expected["tokenizer"]


@pytest.mark.parametrize("source, match", [
    ("elsewhere", r"is not one of the merged models"),
])
def test_tokenizer_source_must_name_a_merged_model(corpus, tmp_path, source, match):
    """A tokenizer_source that is neither base, union nor a merged model is refused with
    one line (differing vocabularies themselves merge: tests/test_mergekit_tokenizers.py)."""
    import shutil

    root = tmp_path / "in"
    shutil.copytree(corpus / "f32", root / "f32")
    tok = json.loads((root / "f32" / "e1" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["w63x"] = tok["model"]["vocab"].pop("w63")  # one token renamed
    (root / "f32" / "e1" / "tokenizer.json").write_text(json.dumps(tok))
    case = {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": source,
        "models": [{"model": "{e0}", "parameters": {"weight": 0.5}}, {"model": "{e1}", "parameters": {"weight": 0.5}}]}}
    with pytest.raises(ZooError, match=match):
        merge.run(merge.from_dict(cases.recipe_for(case, str(root))), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
