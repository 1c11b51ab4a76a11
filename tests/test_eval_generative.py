"""Generative tasks from the command line: `zoo task add`, `zoo tasks`, and `zoo eval`'s
exact match and answer log-likelihood, checked against transformers' own generate and loss."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import db_dump, store_listing
from zoo.checkpoints.prompts import Prompt, write_task_prompts
from zoo.demo.llm_tasks import sample
from zoo.demo.llm_zoo import BOS, EOS, PAD, LLM_QUICK, encode, llama_config, save_tokenizer


def _train_tiny(folder: Path, steps: int = 120) -> None:
    """A character-level Llama taught `upper` for a few steps: right on some prompts,
    wrong on others, so exact match is neither 0 nor 1."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(LLM_QUICK))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(steps):
        rows = [sample("upper", rng) for _ in range(32)]
        seqs = [[BOS] + encode(r.prompt) + encode(r.answer) + [EOS] for r in rows]
        labs = [[-100] * (1 + len(r.prompt)) + encode(r.answer) + [EOS] for r in rows]
        n = max(map(len, seqs))
        ids = torch.tensor([s + [PAD] * (n - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (n - len(s)) for s in labs])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    save_tokenizer(folder, LLM_QUICK.context)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm") / "upper"
    _train_tiny(folder)
    return folder


def _task_file(path: Path, n: int = 24) -> list[Prompt]:
    rng = random.Random(1)
    test = [sample("upper", rng) for _ in range(n)]
    write_task_prompts(path, {"pool": [Prompt(p.prompt) for p in test[:4]], "test": test})
    return test


@pytest.fixture
def registered(zoo_cli, tiny_lm: Path, tmp_path: Path):
    assert zoo_cli("add", tiny_lm, "--name", "lm", "--kind", "base")[0] == 0
    rows = _task_file(tmp_path / "upper.jsonl")
    code, out, err = zoo_cli("task", "add", "upper", tmp_path / "upper.jsonl", "--description", "copy in upper case",
                             "--model", "lm", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "generative" and info["splits"] == {"pool": 4, "test": 24}
    assert info["metadata"] == {"checked_against": "lm@1", "context": LLM_QUICK.context}
    return rows


def _independent(folder: Path, rows: list[Prompt]) -> tuple[float, float, float]:
    """Exact match from transformers' generate (one prompt at a time: no padding), and
    the answers' log-likelihood from transformers' own loss."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    budget = max(len(tok(r.answer, add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    hits, total, count = 0, 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r.prompt, return_tensors="pt")["input_ids"]
            out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=budget, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            hits += tok.decode(out[0, p.shape[1]:], skip_special_tokens=True).strip() == r.answer
            a = tok(r.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.cat([p, torch.tensor([a])], 1)
            labels = torch.cat([torch.full_like(p, -100), torch.tensor([a])], 1)
            loss = model(input_ids=ids, labels=labels).loss.item()  # mean over the answer's tokens
            total -= loss * len(a)
            count += len(a)
    return hits / len(rows), total / count, total / len(rows)


def test_eval_matches_transformers(zoo_cli, registered, tiny_lm: Path) -> None:
    code, out, err = zoo_cli("eval", "lm", "--task", "upper", "--json")
    assert code == 0, err
    [res] = json.loads(out)
    em, per_token, per_answer = _independent(tiny_lm, registered)
    assert 0 < em < 1, em  # the tiny model is right on some prompts only: the comparison means something
    assert res["metric"] == "exact_match" and res["value"] == pytest.approx(em, abs=1e-12)
    assert res["answer_loglik_token"] == pytest.approx(per_token, rel=1e-5)
    assert res["answer_loglik"] == pytest.approx(per_answer, rel=1e-5)
    assert res["n"] == len(registered) and res["split"] == "test"
    code, out, _ = zoo_cli("show", "lm", "--json")
    metrics = {m["metric"]: m["value"] for m in json.loads(out)["metrics"]}
    assert metrics == {"exact_match": res["value"], "answer_loglik_token": res["answer_loglik_token"],
                       "answer_loglik": res["answer_loglik"]}
    code, out, _ = zoo_cli("eval", "lm", "--task", "upper")
    assert code == 0 and out.splitlines()[0].split() == ["MODEL", "TASK", "SPLIT", "METRIC", "VALUE", "LOGLIK/TOK",
                                                         "LOGLIK/ANSWER", "N"]


def test_max_new_tokens_cuts_answers(zoo_cli, registered) -> None:
    code, out, err = zoo_cli("eval", "lm", "--task", "upper", "--max-new-tokens", "1", "--json")
    assert code == 0, err
    [res] = json.loads(out)
    assert res["value"] == 0.0 and res["max_new_tokens"] == 1  # every answer has 3+ letters
    assert zoo_cli("eval", "lm", "--task", "upper", "--max-new-tokens", "0")[0] == 2


def test_tasks_lists_kind_and_splits(zoo_cli, registered) -> None:
    code, out, _ = zoo_cli("tasks")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["TASK", "KIND", "LABELS", "SPLITS", "DATA"]
    assert row.split()[:4] == ["upper", "generative", "-", "pool=4,test=24"]
    code, out, _ = zoo_cli("tasks", "--json")
    assert json.loads(out)[0]["kind"] == "generative"


def _refused(zoo_cli, reg: Path, args, pattern: str) -> None:
    import re

    before, blobs = db_dump(reg), store_listing(reg)
    code, _, err = zoo_cli(*args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert db_dump(reg) == before and store_listing(reg) == blobs


@pytest.mark.parametrize("text, pattern", [
    ('{"prompt": "a"}\n{"answer": "b"}\n', r"line 2: missing \"prompt\""),
    ("\n\n", r"no prompts in it \(an empty pool\)"),
    ('{"prompt": "a"}\n{"prompt": "b", \n', r"line 2: invalid JSON"),
    ('{"prompt": "a", "answer": 3}\n', r"\"answer\" must be a string"),
    ('{"prompt": "up:abc=", "answer": "' + "A" * 40 + '"}\n', r"longer than the model's context of 32"),
])
def test_bad_task_files(zoo_cli, tiny_lm: Path, tmp_path: Path, text: str, pattern: str) -> None:
    assert zoo_cli("add", tiny_lm, "--name", "lm", "--kind", "base")[0] == 0
    (tmp_path / "bad.jsonl").write_text(text)
    _refused(zoo_cli, tmp_path / "registry.db", ["task", "add", "t", tmp_path / "bad.jsonl", "--model", "lm"], pattern)
    assert zoo_cli("tasks", "--json")[1].strip() in ("", "[]")


def test_refusals(zoo_cli, registered, tmp_path: Path) -> None:
    reg = tmp_path / "registry.db"
    _refused(zoo_cli, reg, ["task", "add", "t", tmp_path / "missing.jsonl"], "no such prompt file")
    _refused(zoo_cli, reg, ["task", "add", "t", tmp_path], "is a folder")
    other = tmp_path / "other.jsonl"
    write_task_prompts(other, {"test": [Prompt("up:abc=", "ABC")]})
    _refused(zoo_cli, reg, ["task", "add", "upper", other], "already exists with other data; pass --replace")
    # prompts without answers cannot be scored by exact match
    _refused(zoo_cli, reg, ["eval", "lm", "--task", "upper", "--split", "pool"], "4 of 4 prompts have no reference")
    _refused(zoo_cli, reg, ["eval", "lm", "--task", "upper", "--split", "val"], "no 'val' split")
    code, out, err = zoo_cli("task", "add", "upper", other, "--replace", "--json")
    assert code == 0 and json.loads(out)["splits"] == {"test": 1}, err
