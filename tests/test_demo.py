"""`zoo demo` on the reduced (--quick) size: the same pipeline, small enough for CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import Registry
from zoo.demo.build import QUICK, TASKS, task_labels

ZOO = str(Path(sys.executable).with_name("zoo"))


def test_task_label_maps():
    import torch

    d = torch.arange(10)
    assert task_labels("parity", d).tolist() == [0, 1] * 5
    assert task_labels("ge5", d).tolist() == [0] * 5 + [1] * 5
    assert task_labels("prime", d).tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 0, 0]
    assert task_labels("mod3", d).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for t in ("digit", "rot90", "invert", "hflip"):
        assert task_labels(t, d).tolist() == list(range(10))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    env = {**__import__("os").environ, "ZOO_CACHE": str(work / "cache")}
    env.pop("ZOO_REGISTRY", None)
    first = subprocess.run([ZOO, "demo", "--quick"], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([ZOO, "demo", "--quick", "--json"], cwd=work, capture_output=True, text=True, env=env,
                            timeout=600)
    assert second.returncode == 0, second.stderr
    return work, env, first, second


def test_demo_builds_registers_and_reports(quick_demo):
    work, env, first, _ = quick_demo
    out = first.stdout
    assert "building the demo zoo" in out and "pre-trained base" in out
    for task in TASKS:
        assert f"{QUICK.prefix}-{task}@1" in out
    for row in ("individual experts", "base + expert heads", "task arithmetic", "TIES"):
        assert row in out
    assert "AVG" in out and "registry:" in out
    reg = Registry(work / "registry.db")
    models = reg.list(tag="demo")
    assert sorted(m["name"] for m in models) == sorted([f"{QUICK.prefix}-base"] + [f"{QUICK.prefix}-{t}" for t in TASKS])
    tasks = {t["name"]: t for t in reg.tasks()}
    assert set(tasks) == set(TASKS)
    for name, (_, labels) in TASKS.items():
        assert tasks[name]["labels"] == labels
        sizes = tasks[name]["splits"]
        assert sum(sizes.values()) == 1797
        assert abs(sizes["test"] / 1797 - 0.30) < 0.01 and abs(sizes["val"] / 1797 - 0.105) < 0.01
    for task in TASKS:
        (m,) = [x for x in reg.metrics(f"{QUICK.prefix}-{task}") if x["metric"] == "accuracy"]
        assert m["task"] == task and m["split"] == "test" and 0.0 <= m["value"] <= 1.0
    # even the tiny build learns every task well above chance
    accs = {t: reg.metrics(f"{QUICK.prefix}-{t}")[0]["value"] for t in TASKS}
    assert all(accs[t] > 1.5 / len(TASKS[t][1]) for t in TASKS), accs


def test_second_run_reuses_the_cache(quick_demo):
    work, env, first, second = quick_demo
    res = json.loads(second.stdout)
    assert res["built"] is False
    assert "reusing the cached demo zoo" in second.stderr and "already registered" in second.stderr
    reg = Registry(work / "registry.db")
    assert len(reg.list(tag="demo")) == 1 + len(TASKS)
    accs = {t: reg.metrics(f"{QUICK.prefix}-{t}")[0]["value"] for t in TASKS}
    assert res["accuracy"] == accs
    # the merges were reused too, with their recorded metrics
    p = QUICK.prefix
    assert sorted(m["name"] for m in reg.list(kind="merged")) == sorted(
        [f"{p}-ta", f"{p}-ties"] + [f"{p}-{m}-{tag}-digit" for m in ("ta", "ties") for tag in ("protected", "realigned")])
    # the protection step: the locked expert and the attack's result, reused, and the summary
    best = json.loads(second.stdout)["published"]["merge"]  # and the publishing step's protected merge
    assert sorted(m["name"] for m in reg.list(kind="protected")) == sorted(
        [f"{p}-digit-locked", f"{best}-locked", f"{best}-pulled"])
    assert reg.key(f"{p}-digit-locked") is not None
    prot = res["protection"]["summary"]
    assert prot["victim"] == "digit" and prot["verify"]["passed"]
    recorded = {m["task"]: m["value"] for m in reg.metrics(f"{p}-ta-protected-digit") if m["split"] == "test"}
    assert prot["ta"]["protected"] == recorded["digit"]
    assert len(reg.metrics(f"{QUICK.prefix}-ta")) == len(TASKS)
    rows = {r["method"]: r for r in res["table"]}
    assert rows["individual experts"]["avg"] == pytest.approx(sum(accs.values()) / len(accs))


def test_eval_measures_the_registered_model(quick_demo):
    """`zoo eval` loads the stored expert and reproduces the accuracy the demo recorded."""
    work, env, _, _ = quick_demo
    r = subprocess.run([ZOO, "eval", f"{QUICK.prefix}-parity", "--json"], cwd=work, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    reg = Registry(work / "registry.db")
    recorded = [m for m in reg.metrics(f"{QUICK.prefix}-parity") if m["metric"] == "accuracy"]
    assert len(recorded) == 2 and recorded[0]["value"] == recorded[1]["value"] == res["value"]
    # and against an independent count on the raw test split
    import torch
    from transformers import ViTForImageClassification
    from zoo.checkpoints.taskdata import load_split

    model = ViTForImageClassification.from_pretrained(reg.export(f"{QUICK.prefix}-parity", work / "exported")).eval()
    x, y = load_split(reg.task_data("parity"), "test")
    with torch.no_grad():
        acc = (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    assert abs(acc - res["value"]) < 1e-6


def test_eval_rejects_a_task_with_other_labels(quick_demo):
    work, env, _, _ = quick_demo
    r = subprocess.run([ZOO, "eval", f"{QUICK.prefix}-parity", "--task", "digit"], cwd=work, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {QUICK.prefix}-parity@1 predicts 2 labels but task 'digit' has 10"


def test_learned_rows_of_the_demo(quick_demo):
    """The demo's learned merges, on a few steps each: registered with their lineage,
    measured per task, the ce rows marked supervised. Runs after the tests above (the
    module's registry gains merged models here)."""
    from zoo.demo.merges import LEARNED, merge_demo
    from zoo.demo.build import run_demo

    work, env, _, _ = quick_demo
    reg = Registry(work / "registry.db")
    res = run_demo(reg, QUICK, log=lambda m: None, cache=Path(env["ZOO_CACHE"]) / "demo")
    rows = merge_demo(reg, res, log=lambda m: None, learned=True, steps_scale=0.02)
    by_model = {r.get("model"): r for r in rows}
    for key, spec in LEARNED.items():
        row = by_model[f"{QUICK.prefix}-{key}"]
        assert all(0.0 <= row[t] <= 1.0 for t in TASKS)
        info = reg.show(f"{QUICK.prefix}-{key}")
        learned = info["recipe"]["learned"]
        assert info["kind"] == "merged"
        assert learned["objective"] == spec["parameters"].get("objective", spec["merge_method"])
        assert ("supervised" in row["method"]) == (learned["supervised"] is True)
        assert ("mask" in (info["recipe"].get("artifacts") or {})) == ("concrete" in key)  # parity keeps its start's
    assert reg.show(f"{QUICK.prefix}-parity-ta-heldout")["recipe"]["learned"]["split"] == "val"
    # each Concrete merge rebuilt from its lineage scores what the saved model scores
    from zoo.demo.merges import concrete_masks

    masks = concrete_masks(reg, res, rows, draws=2, log=lambda m: None)
    assert len(masks) == 4
    for m in masks:
        assert m["saved_avg"] == pytest.approx(m["avg"]) and len(m["draw_avgs"]) == 2
        assert 0 <= m["keep"] <= 1 and 0 <= m["binariness"] <= 1 and m["final_mask"] == "relaxed"


def test_demo_publishes_the_best_merge_through_zoo_serve(quick_demo):
    """The demo's last step: the best merge goes up protected and comes back with the same accuracy."""
    work, env, first, second = quick_demo
    pub = json.loads(second.stdout)["published"]
    rows = {r["model"]: r for r in json.loads(second.stdout)["table"] if r.get("model")}
    best = max(rows.values(), key=lambda r: r["avg"])
    assert pub["merge"] == best["model"] and pub["pushed"] == f"{best['model']}-locked@1"
    assert pub["after"] == pub["before"] and pub["max_change"] == 0
    assert "published" in first.stdout and "(MergeLock-protected)" in first.stdout
    for where in ("registry:", "store:", "keys:"):
        assert where in first.stdout
    reg = Registry(work / "registry.db")
    pulled = reg.show(pub["pulled"])
    assert pulled["kind"] == "protected" and pulled["source"]["hub_repo"] == pub["repo"]
    locked = {f["path"]: f["sha256"] for f in reg.show(pub["pushed"])["files"] if f["path"] != "README.md"}
    assert {f["path"]: f["sha256"] for f in pulled["files"] if f["path"] != "README.md"} == locked
    assert "task_heads.safetensors" in locked  # the merge's own heads travel with it


def test_the_demo_registry_in_a_real_browser(quick_demo):
    """The web view over the quick demo's own registry: the zoo page filtered to merges,
    a merge's page, its lineage graph against `zoo lineage --json` and its chart against
    the metrics the demo recorded."""
    import re

    from tests.test_web import _browser, _edges, _refs
    from zoo.hub.server import ServeSettings, running

    work, env, first, _ = quick_demo
    reg = Registry(work / "registry.db")
    merges = sorted(m["ref"] for m in reg.list() if m["kind"] == "merged")
    assert merges
    pw, browser = _browser()
    try:
        with running(reg, ServeSettings()) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/ui?kind=merged")
            rows = page.locator("table.models tbody tr[data-ref]")
            assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.ref)")) == merges
            ref = merges[0]
            page.click(f"a[href='/ui/models/{ref}']")
            page.wait_for_url(re.compile(f"/ui/models/{re.escape(ref)}$"))
            lineage = subprocess.run([ZOO, "lineage", ref, "--json"], cwd=work, capture_output=True, text=True,
                                     env=env, timeout=120)
            tree = json.loads(lineage.stdout)
            nodes = set(page.locator("svg.lineage g.node").evaluate_all("ns => ns.map(n => n.dataset.ref)"))
            edges = set(map(tuple, page.locator("svg.lineage g.edge").evaluate_all(
                "es => es.map(e => [e.dataset.child, e.dataset.parent, e.dataset.role])")))
            assert nodes == _refs(tree) and edges == _edges(tree)
            bars = page.locator("svg.chart rect.bar").evaluate_all(
                "bs => bs.map(b => [b.dataset.model, b.dataset.task, parseFloat(b.dataset.value)])")
            recorded: dict[tuple[str, str], set[float]] = {}
            for m in reg.metrics(ref):
                if m["metric"] == "accuracy":
                    recorded.setdefault((ref, m["task"]), set()).add(m["value"])
            mine = [(t, v) for m, t, v in bars if m == ref]
            assert mine and all(v in recorded[ref, t] for t, v in mine), (mine, recorded)
            page.screenshot(path=str(work / "demo-merge.png"), full_page=True)
            page.goto(url + "/ui/compare?" + "&".join(f"m={m}" for m in merges))
            assert page.locator("table.heatmap, svg.heatmap").count() >= 1
            page.close()
    finally:
        browser.close()
        pw.stop()
        reg.close()


def test_the_build_is_deterministic_whatever_the_callers_threads(tmp_path):
    """The build runs on BUILD_THREADS threads with deterministic algorithms, so the
    caller's thread count does not change a byte; the caller's settings come back after."""
    from dataclasses import replace

    import torch

    from zoo.demo.build import build

    cfg = replace(QUICK, tasks=("digit", "rot90"), base_epochs=2, expert_epochs=1, prefix="det")
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    digests = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = build(cfg, tmp_path / f"t{threads}", log=lambda _: None)
        assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
        digests.append({str(p.relative_to(out)): content(p) for p in sorted(out.rglob("*.safetensors"))})
    torch.set_num_threads(before[0])
    assert digests[0] == digests[1] and len(digests[0]) == 2 + 1 + 2  # 2 task files, base, 2 experts


def content(path) -> str:
    """A checkpoint's bytes; a task file's tensors and metadata (safetensors writes a
    header's metadata keys in no fixed order)."""
    import hashlib

    from zoo.checkpoints.reader import open_safetensors

    if "tasks" not in path.parts:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    ck = open_safetensors(path)
    h = hashlib.sha256(json.dumps(ck.metadata, sort_keys=True).encode())
    for n in sorted(ck.tensors):
        h.update(n.encode() + ck.read_tensor(n).numpy().tobytes())
    return h.hexdigest()


def test_the_cache_key_holds_the_thread_setting_and_the_library_versions(monkeypatch):
    import zoo.demo.build as b

    key = QUICK.key()
    env = b.build_environment()
    assert env["threads"] == b.BUILD_THREADS and env["deterministic"] is True
    assert set(env["versions"]) >= {"torch", "transformers", "numpy", "scikit-learn"}
    assert all(env["versions"][n] for n in ("torch", "transformers", "numpy", "scikit-learn"))
    monkeypatch.setattr(b, "BUILD_THREADS", b.BUILD_THREADS + 1)
    assert QUICK.key() != key
    monkeypatch.undo()
    real = b.build_environment
    monkeypatch.setattr(b, "build_environment", lambda: {**real(), "versions": {**real()["versions"], "torch": "0"}})
    assert QUICK.key() != key
