"""The registry on a real SQLite file and on a real PostgreSQL server: add, query,
lineage, verify, export, remove."""

from __future__ import annotations

import filecmp
import hashlib
import os
import sqlite3
import stat

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from conftest import llama, lora_adapter
from zoo import Registry
from zoo.registry.migrations import SCHEMA_HEAD
from zoo.errors import AlreadyExists, InUse, NotFound, ZooError


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def registry(target):
    """Every test here runs on SQLite and on PostgreSQL."""
    reg = target.open(create=True)
    yield reg
    reg.close()


def test_schema_is_at_alembic_head(registry, target):
    cfg = Config()
    cfg.set_main_option("script_location", "zoo.registry:migrations")
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD
    if target.kind == "postgresql":
        import psycopg

        with psycopg.connect(target.arg) as con:
            assert con.execute("select version_num from alembic_version").fetchone() == (SCHEMA_HEAD,)
            tables = {r[0] for r in con.execute("select tablename from pg_tables where schemaname = 'public'")}
            big = dict(con.execute("select table_name || '.' || column_name, data_type from information_schema.columns "
                                   "where column_name in ('size', 'total_bytes', 'param_count')").fetchall())
        assert {"models", "files", "hub_accounts", "hub_tokens", "hub_refs"} <= tables
        assert set(big.values()) == {"bigint"}, big  # a 7B model's byte count does not fit an int4
        return
    con = sqlite3.connect(registry.path)
    assert con.execute("select version_num from alembic_version").fetchone() == (SCHEMA_HEAD,)
    assert con.execute("pragma journal_mode").fetchone() == ("wal",)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"models", "files", "lineage", "recipes", "metrics", "tasks", "model_tags", "model_tasks", "protection_keys", "hub_repos", "hub_commits", "hub_entries", "hub_refs"} <= tables


def test_add_records_everything(registry, models):
    info = registry.add(models["base"], "base", "base", tags=["demo"])
    e = registry.add(models["parity"], "parity", "expert", base="base", tasks=["parity"], metadata={"lr": 2e-4})
    assert info["ref"] == "base@1" and e["base"] == "base@1"
    d = registry.show("parity")
    assert d["architecture"]["model_type"] == "vit" and d["architecture"]["hidden_size"] == 32
    assert d["tensors"]["dtypes"] == {"F32": d["tensors"]["count"]}
    assert d["tasks"] == ["parity"] and d["metadata"] == {"lr": 2e-4}
    assert d["source"]["path"] == str(models["parity"].resolve())
    files = {f["path"]: f for f in d["files"]}
    assert set(files) == {"config.json", "model.safetensors"}
    for rel, f in files.items():
        assert f["sha256"] == sha(models["parity"] / rel)
        assert f["size"] == (models["parity"] / rel).stat().st_size
    assert registry.show("base")["dependents"] == ["parity@1"]


def test_store_is_copy_readonly_and_deduplicated(registry, models, tmp_path):
    registry.add(models["base"], "base", "base")
    registry.add(models["base"], "base-again", "base")
    blobs = [p for p in registry.store.blobs.rglob("*") if p.is_file()]
    assert len(blobs) == 2  # config.json + model.safetensors, stored once for both models
    for b in blobs:
        assert not (b.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        assert b.stat().st_nlink == 1  # never a hard link to the user's file
    # Editing the original does not touch the store.
    src = models["base"] / "model.safetensors"
    os.chmod(src, 0o644)
    with open(src, "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 16)
    assert registry.verify() == []


def test_in_place_registration_and_verify(registry, models):
    registry.add(models["base"], "base", "base", in_place=True)
    d = registry.show("base")
    assert all(f["location"].startswith(str(models["base"])) for f in d["files"])
    assert not registry.store.blobs.exists() or not any(registry.store.blobs.rglob("*.*"))
    assert registry.model_dir("base") == models["base"]
    with open(models["base"] / "model.safetensors", "r+b") as f:
        f.seek(300)
        f.write(b"\x01\x02\x03")
    (models["base"] / "config.json").unlink()
    problems = {(p["file"], p["problem"]) for p in registry.verify("base")}
    assert problems == {("model.safetensors", "changed"), ("config.json", "missing")}


def test_verify_detects_store_corruption(registry, models):
    registry.add(models["base"], "base", "base")
    registry.add(models["parity"], "parity", "expert", base="base")
    blob = registry.store.path(registry.show("parity")["files"][1]["sha256"])
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")
    problems = registry.verify()
    assert [(p["model"], p["file"], p["problem"]) for p in problems] == [("parity@1", "model.safetensors", "changed")]


def test_export_round_trip_is_byte_identical(registry, tmp_path):
    src = llama(tmp_path / "m", shard="40KB")
    registry.add(src, "m", "base")
    out = registry.export("m", tmp_path / "out")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in src.iterdir() if p.suffix in (".json", ".safetensors"))
    match, mismatch, errors = filecmp.cmpfiles(src, out, names, shallow=False)
    assert mismatch == [] and errors == [] and sorted(match) == names
    with pytest.raises(ZooError, match="not empty"):
        registry.export("m", tmp_path / "out")


def test_export_of_bare_file_gives_standard_name(registry, tmp_path):
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.ones(3)}, str(tmp_path / "weights.safetensors"))
    registry.add(tmp_path / "weights.safetensors", "w", "base")
    out = registry.export("w", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "weights.safetensors").read_bytes()


def test_list_filters(registry, models):
    registry.add(models["base"], "base", "base", tags=["demo"])
    registry.add(models["parity"], "parity", "expert", base="base", tasks=["parity"], tags=["demo", "x"])
    registry.add(models["mod3"], "mod3", "expert", base="base", tasks=["mod3"])
    names = lambda **kw: [m["name"] for m in registry.list(**kw)]  # noqa: E731
    assert names() == ["base", "mod3", "parity"]
    assert names(kind="expert") == ["mod3", "parity"]
    assert names(base="base") == ["mod3", "parity"]
    assert names(task="mod3") == ["mod3"]
    assert names(tag="demo") == ["base", "parity"]
    assert names(tag="x", kind="base") == []
    with pytest.raises(ZooError, match="unknown kind"):
        registry.list(kind="nope")


def test_versions(registry, models):
    registry.add(models["base"], "base", "base")
    with pytest.raises(AlreadyExists):
        registry.add(models["base"], "base", "base")
    v2 = registry.add(models["parity"], "base", "base", new_version=True)
    assert v2["ref"] == "base@2"
    assert registry.show("base")["ref"] == "base@2"
    assert registry.show("base@1")["parameters"] != v2["parameters"]
    with pytest.raises(NotFound, match="no version 7"):
        registry.show("base@7")


def test_lineage_of_a_merged_model(registry, models):
    registry.add(models["base"], "base", "base")
    registry.add(models["parity"], "parity", "expert", base="base")
    registry.add(models["mod3"], "mod3", "expert", base="base")
    recipe = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}}
    registry.add(models["base"], "merged", "merged", base="base",
                 parents=[("base", "base"), ("expert", "parity"), ("expert", "mod3")], recipe=recipe)
    tree = registry.lineage("merged")
    assert tree["method"] == "task_arithmetic"
    assert [(p["role"], p["ref"]) for p in tree["parents"]] == [
        ("base", "base@1"), ("expert", "parity@1"), ("expert", "mod3@1")]
    assert tree["parents"][1]["parents"] == [{"ref": "base@1", "kind": "base", "role": "base", "parents": []}]
    assert registry.show("merged")["recipe"] == recipe

    with pytest.raises(InUse, match="parity@1 is used by 1 model"):
        registry.remove("parity")
    registry.remove("parity", force=True)
    tree = registry.lineage("merged")
    assert tree["parents"][1] == {"ref": "parity@1", "kind": None, "role": "expert", "parents": [], "removed": True}


def test_remove_frees_only_unshared_blobs(registry, models):
    registry.add(models["base"], "base", "base")
    registry.add(models["base"], "copy", "base")
    registry.add(models["parity"], "parity", "expert", base="base")
    before = registry.store.all_digests()
    assert registry.remove("copy")["blobs_freed"] == 0
    res = registry.remove("parity")
    assert res["blobs_freed"] == 2
    assert registry.store.all_digests() == before - {f for f in before if not registry_uses(registry, f)}
    assert len(registry.store.all_digests()) == 2


def registry_uses(registry, digest):
    return any(f["sha256"] == digest for m in registry.list() for f in registry.show(m["ref"])["files"])


def test_tags(registry, models):
    registry.add(models["base"], "base", "base", tags=["a"])
    assert registry.tag("base", add=["b", "c"]) == ["a", "b", "c"]
    assert registry.tag("base", remove=["a"]) == ["b", "c"]


def test_adapter_registration(registry, tmp_path):
    base = llama(tmp_path / "b")
    registry.add(base, "llama", "base")
    info = registry.add(lora_adapter(tmp_path / "ad", base), "ad", "adapter", base="llama")
    assert info["form"] == "adapter"
    assert registry.show("ad")["metadata"]["adapter"]["r"] == 4
    with pytest.raises(ZooError, match="--kind adapter"):
        registry.add(tmp_path / "ad", "ad2", "expert", base="llama")
    with pytest.raises(ZooError, match="does not match base"):
        registry.add(lora_adapter(tmp_path / "bad", base, bad_shape=True), "bad", "adapter", base="llama")


def test_tasks_and_metrics(registry, models, tmp_path):
    import torch
    from zoo.checkpoints.taskdata import save_task_data

    save_task_data(tmp_path / "t.safetensors", {"test": (torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))},
                   ["even", "odd"])
    t = registry.add_task("parity", ["even", "odd"], tmp_path / "t.safetensors", splits={"test": 4})
    assert t["labels"] == ["even", "odd"] and registry.task_data("parity").is_file()
    registry.add(models["base"], "base", "base")
    registry.record_metric("base", "parity", "accuracy", 0.5, split="test")
    (m,) = registry.metrics("base")
    assert (m["model"], m["task"], m["metric"], m["value"], m["split"]) == ("base@1", "parity", "accuracy", 0.5, "test")
    assert m["measured_at"]


def test_missing_registry_is_not_created(tmp_path):
    with pytest.raises(NotFound, match="zoo init"):
        Registry(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()
