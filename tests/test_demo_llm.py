"""`zoo demo --llm` on the tiny LLM_QUICK zoo: the whole pipeline (build, register,
merge, learned and parity recipes, MergeLock, exact match), its table, and its
determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo.demo.llm_tour import LEARNED, PARITY, STATIC, run_llm
from zoo.demo.llm_zoo import LLM_QUICK
from zoo.registry import Registry

TIMINGS = ("seconds", "cpu_seconds", "peak_rss_mib", "steps_per_second")
ROWS = 2 + len(STATIC) + len(LEARNED) + len(PARITY)  # experts, base, then one row per recipe


def _numbers(table: list[dict]) -> list[dict]:
    """The table without its timings, which vary from run to run (and a not-run row's
    reason, which may name the registry's folder)."""
    return [{k: (v if k != "not_run" else True) for k, v in r.items() if k not in TIMINGS}
            for r in table]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cli_run(zoo_cli, cache: Path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(cache))
    code, out, err = zoo_cli("demo", "--llm", "--quick", "--json")
    assert code == 0, err
    return json.loads(out)


def test_llm_demo(cli_run: dict, zoo_cli, cache: Path, tmp_path: Path) -> None:
    got = cli_run
    tasks = list(LLM_QUICK.tasks)
    assert list(got["experts"]) == tasks and got["base"] == "llm-quick-base@1"
    table = got["table"]
    assert len(table) == ROWS
    assert [r["method"] for r in table[:2]] == ["individual experts", "base"]
    for row in table:
        if "not_run" in row:  # a recipe that cannot run yet says why, and shows no number
            assert row["not_run"] and not any(t in row for t in [*tasks, "avg"]), row
        else:
            assert all(0.0 <= row[t] <= 1.0 for t in tasks) and row["avg"] == pytest.approx(
                sum(row[t] for t in tasks) / len(tasks))
    for key in STATIC:  # the data-free merges always run, at a λ chosen on val
        row = next(r for r in table if r.get("model") == f"llm-quick-{key}")
        assert "not_run" not in row and f"λ {got['selected_on_val'][key]['weight']} (val)" in row["method"]
    objectives = [r.get("objective") for r in table[2 + len(STATIC):]]
    assert objectives == ["entropy", "entropy", "ce", "ce", "parity"]

    # MergeLock: the protected expert alone scores exactly as the original
    prot = got["protection"]
    victim = prot["victim"]
    assert prot["rows"][0]["model"] == "llm-quick-ta" and prot["rows"][1]["model"] == "llm-quick-ta-protected-rev"
    alone, alone_locked = prot["rows"][2], prot["rows"][3]
    assert alone[victim] == alone_locked[victim] and prot["verify"]["top1_agreement"] == 1.0

    # the registry holds the generative tasks and every model the table names
    r = Registry(tmp_path / "registry.db")
    kinds = {t["name"]: t["data_format"] for t in r.tasks()}
    assert all(kinds[t] == "zoo-prompts-jsonl-v1" for t in tasks)
    for row in table:
        if row.get("model") and "not_run" not in row:
            assert r.has(row["model"].split("@")[0])
    r.close()

    # again on the same registry: everything reused, the same table, printed as text
    code, out, err = zoo_cli("demo", "--llm", "--quick")
    assert code == 0, err
    assert "already registered" in out and out.count("llm-quick-base@") >= 1
    assert "TEST EXACT MATCH %" in out and "MERGELOCK (rev protected) %" in out
    printed = [line for line in out.splitlines() if line.startswith("not run: ")]
    assert len(printed) == sum("not_run" in row for row in table)

    # deterministic: a fresh registry, the same cached zoo, the same table number for number
    (tmp_path / "other").mkdir()
    other = Registry(tmp_path / "other" / "registry.db", create=True)
    try:
        tour = run_llm(other, quick=True, cache=cache / "llm-demo", log=lambda _: None)
    finally:
        other.close()
    again = json.loads(json.dumps(tour.to_dict()))
    assert not again["built"]
    assert _numbers(again["table"]) == _numbers(table)
    assert again["selected_on_val"] == got["selected_on_val"]
    assert _numbers(again["protection"]["rows"]) == _numbers(prot["rows"])
