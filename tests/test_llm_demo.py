"""The LLM demo zoo's builder and the generative task data (JSONL prompts) it writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from zoo.checkpoints.prompts import Prompt, read_prompts, write_prompts
from zoo.errors import PromptDataError
from zoo.demo import llm_tasks
from zoo.demo.llm_zoo import LLM_QUICK, build_llm_zoo, encode, exact_match, greedy, llm_zoo


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory) -> Path:
    folder, rec = llm_zoo(LLM_QUICK, cache=tmp_path_factory.mktemp("llm-cache"), log=lambda _: None)
    assert rec is not None
    return folder


def test_layout(zoo_folder: Path) -> None:
    for model in ["base"] + [f"experts/{t}" for t in LLM_QUICK.tasks]:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (zoo_folder / model / name).is_file(), (model, name)
    for task in LLM_QUICK.tasks:
        sizes = {s: len(read_prompts(zoo_folder / "tasks" / task / f"{s}.jsonl")) for s in ("pool", "val", "test")}
        assert sizes == LLM_QUICK.split_sizes()
    meta = json.loads((zoo_folder / "llm_demo.json").read_text())
    assert meta["key"] == LLM_QUICK.key() == zoo_folder.name


def test_splits_are_disjoint_and_answers_right(zoo_folder: Path) -> None:
    for task in LLM_QUICK.tasks:
        seen: set[str] = set()
        for split in ("pool", "val", "test"):
            rows = read_prompts(zoo_folder / "tasks" / task / f"{split}.jsonl")
            prompts = {r.prompt for r in rows}
            assert len(prompts) == len(rows) and not prompts & seen
            seen |= prompts
    assert llm_tasks.sample("add", __import__("random").Random(1)).prompt.startswith("add:")
    rows = read_prompts(zoo_folder / "tasks" / "rev" / "test.jsonl")
    assert all(r.answer == r.prompt[4:-1][::-1] for r in rows)


def test_same_seed_same_bytes_whatever_the_callers_threads(zoo_folder: Path, tmp_path: Path) -> None:
    """The build runs on its own fixed thread setting with deterministic algorithms, so a
    caller's thread count changes no byte, and the caller's settings come back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = build_llm_zoo(LLM_QUICK, tmp_path / "again", log=lambda _: None).folder
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)
    assert _digest(again) == _digest(zoo_folder)


def test_cache_key_holds_config_threads_and_versions(monkeypatch) -> None:
    import dataclasses

    from zoo.demo import llm_zoo as mod

    key = LLM_QUICK.key()
    assert dataclasses.replace(LLM_QUICK, seed=1).key() != key
    monkeypatch.setattr(mod, "LLM_BUILD_THREADS", 2)
    assert LLM_QUICK.key() != key
    monkeypatch.setattr(mod, "LLM_BUILD_THREADS", 1)
    env = mod.llm_build_environment()
    assert set(env["versions"]) >= {"torch", "transformers", "tokenizers", "safetensors"}
    monkeypatch.setattr(mod, "llm_build_environment", lambda: {**env, "versions": {**env["versions"], "torch": "0"}})
    assert LLM_QUICK.key() != key


def test_bad_config_is_refused(tmp_path: Path) -> None:
    import dataclasses

    with pytest.raises(ValueError, match="unknown LLM demo task"):
        build_llm_zoo(dataclasses.replace(LLM_QUICK, tasks=("nope",)), tmp_path / "x", log=lambda _: None)
    with pytest.raises(ValueError, match="base_mix has 2 shares for 3 tasks"):
        build_llm_zoo(dataclasses.replace(LLM_QUICK, base_mix=(1.0, 1.0)), tmp_path / "y", log=lambda _: None)
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_cache_is_reused(zoo_folder: Path) -> None:
    folder, rec = llm_zoo(LLM_QUICK, cache=zoo_folder.parent, log=lambda _: None)
    assert folder == zoo_folder and rec is None


def test_transformers_loads_and_decodes(zoo_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_folder / "experts" / "add")
    model = AutoModelForCausalLM.from_pretrained(zoo_folder / "experts" / "add").eval()
    ids = tok("add:12+34=")["input_ids"]
    assert ids == [tok.bos_token_id] + encode("add:12+34=")
    assert tok.decode(encode("Ab:9"), skip_special_tokens=True) == "Ab:9"
    # transformers' own generate agrees with the demo's greedy decoder
    prompts = ["add:12+34=", "rev:abc="]
    texts = []
    for p in prompts:
        batch = tok(p, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    assert texts == greedy(model, prompts, 6)
    score = exact_match(model, read_prompts(zoo_folder / "tasks" / "add" / "test.jsonl"))
    assert 0.0 <= score <= 1.0


# --- generative task data: JSONL prompts -------------------------------------------------------


def _chars(p: Prompt) -> tuple[int, int]:
    return len(p.prompt), len(p.answer or "")


def test_prompts_round_trip(tmp_path: Path) -> None:
    rows = [Prompt("add:1+2=", "3"), Prompt("unlabeled prompt"), Prompt("ünï\"code", "ok")]
    assert write_prompts(tmp_path / "p.jsonl", rows) == 3
    assert read_prompts(tmp_path / "p.jsonl") == rows
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # no temp file left


@pytest.mark.parametrize("text, message", [
    ('{"answer": "3"}\n', 'line 1: missing "prompt"'),
    ('{"prompt": "a"}\n{"prompt": "b", \n', "line 2: invalid JSON"),
    ("", "no prompts in it (an empty pool)"),
    ("\n  \n", "no prompts in it (an empty pool)"),
    ('["a", "b"]\n', "line 1: expected an object"),
    ('{"prompt": ""}\n', 'line 1: "prompt" must be a non-empty string'),
    ('{"prompt": "a", "answer": 3}\n', 'line 1: "answer" must be a string'),
    ('{"prompt": "a", "label": "x"}\n', "line 1: unknown field(s) 'label'"),
])
def test_bad_prompt_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(PromptDataError) as err:
        read_prompts(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # nothing written


def test_answer_longer_than_context(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    write_prompts(path, [Prompt("short", "x" * 10), Prompt("p" * 30, "y" * 3), Prompt("q", "z" * 40)])
    rows = read_prompts(path)
    assert len(rows) == 3  # no context given: no length check
    with pytest.raises(PromptDataError, match=r"line 2: prompt and answer are 33 tokens, longer than the "
                                              r"model's context of 32"):
        read_prompts(path, lengths=_chars, context=32)
    write_prompts(path, [Prompt("q", "z" * 40)])
    with pytest.raises(PromptDataError, match=r"line 1: the answer is 40 tokens, longer than the model's "
                                              r"context of 32"):
        read_prompts(path, lengths=_chars, context=32)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PromptDataError, match="no such prompt file"):
        read_prompts(tmp_path / "absent.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(PromptDataError, match="not UTF-8"):
        read_prompts(tmp_path / "bin.jsonl")
