"""A registry on a real PostgreSQL server: one-line errors (unreachable, wrong
credentials, no such database, a newer schema, no store), ``zoo registry copy`` between
SQLite and PostgreSQL (verified, all or nothing), and ``zoo serve`` on PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from conftest import db_dump
from zoo import Registry
from zoo.errors import ZooError
from zoo.registry.paths import locate, mask_url

SECRET = "s3cr3t-Pa55"


@pytest.fixture
def pg_url(pg_server):
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def one_line_error(code: int, err: str) -> str:
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_urls_are_masked_and_a_store_is_required(monkeypatch):
    monkeypatch.delenv("ZOO_STORE", raising=False)
    assert mask_url(f"postgresql://bob:{SECRET}@db.example:5432/zoo") == "postgresql://bob:***@db.example:5432/zoo"
    assert SECRET not in mask_url(f"postgresql://bob@db/zoo?password={SECRET}&sslmode=require")
    with pytest.raises(ZooError, match=r"--store PATH or set \$ZOO_STORE") as e:
        locate(f"postgresql://bob:{SECRET}@db/zoo")
    assert SECRET not in str(e.value)
    with pytest.raises(ZooError, match="SQLite .* or PostgreSQL"):
        locate("mysql://db/zoo", "/tmp/x")
    loc = locate("sqlite:///rel/registry.db")
    assert loc.file == Path("rel/registry.db").absolute() and loc.store == loc.file.with_suffix(".store")


def test_bad_databases_get_one_line_and_never_the_password(zoo_cli, pg_server, pg_url, tmp_path):
    pg_server.create_role("alice", SECRET)
    base = pg_url.split("?", 1)[0].rsplit("/", 1)[0]  # postgresql://zoo@
    query = pg_url.split("?", 1)[1]
    store = str(tmp_path / "store")
    cases = {
        "check the user and password": f"postgresql://alice:wrong-{SECRET}@/postgres?{query}",
        "does not exist": f"{base}/no_such_db?{query}",
        "is the server running": f"postgresql://zoo:{SECRET}@/postgres?host={tmp_path}&port=1",
    }
    for hint, url in cases.items():
        err = one_line_error(*zoo_cli("--registry", url, "--store", store, "list")[::2])
        assert hint in err and SECRET not in err, err
        err = one_line_error(*zoo_cli("--registry", url, "--store", store, "init")[::2])
        assert hint in err and SECRET not in err, err
    err = one_line_error(*zoo_cli("--registry", pg_url, "list")[::2])
    assert "--store PATH" in err
    err = one_line_error(*zoo_cli("--registry", pg_url, "--store", store, "show", "x")[::2])
    assert "no registry in" in err and "zoo init" in err
    assert zoo_cli("--registry", pg_url, "--store", store, "init")[0] == 0
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999'")
    for cmd in (["list"], ["show", "x"]):
        err = one_line_error(*zoo_cli("--registry", pg_url, "--store", store, *cmd)[::2])
        assert "newer zoo (schema 9999)" in err


def test_every_command_reads_zoo_registry_and_zoo_store(zoo_cli, pg_url, models, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_REGISTRY", pg_url)
    monkeypatch.setenv("ZOO_STORE", str(tmp_path / "store"))
    assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base")[0] == 0
    assert zoo_cli("add", models["parity"], "--name", "parity", "--base", "base", "--tag", "t")[0] == 0
    code, out, _ = zoo_cli("list", "--json", "--tag", "t")
    assert code == 0 and [m["ref"] for m in json.loads(out)] == ["parity@1"]
    assert json.loads(zoo_cli("list", "--json", "--base", "base@1")[1])[0]["name"] == "parity"
    assert (tmp_path / "store" / "blobs").is_dir() and not (tmp_path / "registry.db").exists()
    assert zoo_cli("verify")[0] == 0
    code, out, err = zoo_cli("rm", "base")
    assert code == 1 and "used by" in err
    assert zoo_cli("rm", "parity")[0] == 0 and zoo_cli("gc", "--older-than", "0")[0] == 0


def _fill(reg: Registry, models: dict[str, Path], tmp_path: Path) -> None:
    from conftest import save_task_data
    import torch

    reg.add(models["base"], "base", "base", tags=["b"])
    reg.add(models["parity"], "parity", "expert", base="base", tasks=["parity"], metadata={"lr": 1e-4})
    reg.add(models["mod3"], "merged", "merged", base="base", parents=[("model", "parity")],
            recipe={"merge_method": "task_arithmetic", "models": ["parity@1"]})
    save_task_data(tmp_path / "t.safetensors", {"test": (torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))},
                   ["even", "odd"])
    reg.add_task("parity", ["even", "odd"], data=tmp_path / "t.safetensors")
    reg.record_metric("parity", "parity", "accuracy", 0.75, split="test")


def test_copy_sqlite_to_postgresql_and_back_is_identical(zoo_cli, pg_url, models, tmp_path):
    a = tmp_path / "a.db"
    with Registry(a, create=True) as reg:
        _fill(reg, models, tmp_path)
    store = tmp_path / "pg.store"
    code, out, err = zoo_cli("registry", "copy", a, pg_url, "--to-store", store, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["models"] == 3 and report["blobs"] >= 5 and report["verified"]
    listed = {}
    for name, args in (("a", ["--registry", a]), ("pg", ["--registry", pg_url, "--store", store])):
        code, out, err = zoo_cli(*args, "list", "--json")
        assert code == 0, err
        listed[name] = json.loads(out)
        assert zoo_cli(*args, "verify")[0] == 0
    assert listed["a"] == listed["pg"]
    with Registry(pg_url, store=store) as pg:
        assert pg.show("merged")["parents"] == [{"role": "model", "ref": "parity@1", "present": True}]
        assert pg.metrics("parity")[0]["value"] == 0.75
    # and back: the rows and the blobs are what they were
    code, out, err = zoo_cli("registry", "copy", pg_url, tmp_path / "b.db", "--from-store", store)
    assert code == 0 and "verified" in out, err
    assert db_dump(tmp_path / "b.db") == db_dump(a)
    blobs = lambda root: sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())  # noqa: E731
    assert blobs(tmp_path / "b.store") == blobs(tmp_path / "a.store") == blobs(store)
    # ids continue after the copied ones on PostgreSQL
    with Registry(pg_url, store=store) as pg:
        assert pg.add(models["wide"], "wide", "base")["ref"] == "wide@1"


def test_copy_is_all_or_nothing(zoo_cli, pg_url, models, tmp_path):
    a = tmp_path / "a.db"
    with Registry(a, create=True) as reg:
        _fill(reg, models, tmp_path)
        victim = reg.store.path(reg.show("parity")["files"][-1]["sha256"])
    store = tmp_path / "pg.store"
    # a source blob whose bytes changed: refused, nothing kept on either kind of destination
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    code, out, err = zoo_cli("registry", "copy", a, pg_url, "--to-store", store)
    assert code == 1 and "does not match its hash" in err
    with psycopg.connect(pg_url) as con:
        assert con.execute("SELECT COUNT(*) FROM models").fetchone() == (0,)
    assert not [p for p in store.rglob("*") if p.is_file() and p.name != "lock"]
    code, out, err = zoo_cli("registry", "copy", a, tmp_path / "b.db")
    assert code == 1 and not (tmp_path / "b.db").exists() and not (tmp_path / "b.store").exists()
    # a destination that holds anything is refused, and left as it was
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(bytes(8))
    with Registry(tmp_path / "c.db", create=True) as c:
        c.add(models["wide"], "wide", "base")
    before = db_dump(tmp_path / "c.db")
    code, out, err = zoo_cli("registry", "copy", a, tmp_path / "c.db")
    assert code == 1 and "is not empty (" in err and "1 models" in err
    assert db_dump(tmp_path / "c.db") == before
    code, out, err = zoo_cli("registry", "copy", a, f"sqlite:///{a}")
    assert code == 1 and "both the source and the destination" in err
    code, out, err = zoo_cli("registry", "copy", a, pg_url, "--to-store", tmp_path / "a.store")
    assert code == 1 and "share the store" in err
    code, out, err = zoo_cli("registry", "copy", a, pg_url)
    assert code == 1 and "name its store folder" in err and err.count("\n") == 1


def test_zoo_serve_on_postgresql_push_and_pull(tmp_path, subprocess_env, pg_url, models, zoo_cli):
    env = {**subprocess_env, "ZOO_REGISTRY": pg_url, "ZOO_STORE": str(tmp_path / "srv.store")}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", "serve", "--port", "0", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert proc.poll() is None, proc.stderr.read()
        assert " at " in line and "postgresql://zoo@/" in line
        url = line.split(" at ")[1].split()[0]
        first = proc.stdout.readline()
        user, token = re.search(r"added user '([^']+)' with write token (zoo_\S+)", first).groups()
        os.environ["HF_TOKEN"] = token
        try:
            assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base")[0] == 0
            code, out, err = zoo_cli("push", "base", f"{user}/base", "--endpoint", url)
            assert code == 0 and "pushed base@1" in out, err
            code, out, err = zoo_cli("pull", f"{user}/base", "--endpoint", url, "--name", "back", "--json")
            assert code == 0, err
        finally:
            del os.environ["HF_TOKEN"]
        with Registry(tmp_path / "registry.db") as local:
            assert {f["sha256"] for f in local.show("back")["files"]} >= \
                {f["sha256"] for f in local.show("base")["files"] if f["path"] == "model.safetensors"}
        with psycopg.connect(pg_url) as con:
            assert con.execute("SELECT COUNT(*) FROM hub_commits").fetchone()[0] >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_zoo_list_on_postgresql_stays_on_the_fast_path(pg_url, models, tmp_path, subprocess_env):
    """``zoo list`` reads a registry on PostgreSQL with psycopg alone: no SQLAlchemy, no torch."""
    with Registry(pg_url, create=True, store=tmp_path / "store") as reg:
        reg.add(models["base"], "Zeta", "base")
        reg.add(models["parity"], "alpha", "expert", base="Zeta", tags=["b", "A"])
    code = ("import sys, json\nsys.argv = ['zoo', 'list', '--json']\nfrom zoo.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sqlalchemy')), file=sys.stderr)\n")
    env = {**subprocess_env, "ZOO_REGISTRY": pg_url, "ZOO_STORE": str(tmp_path / "store")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stderr.strip().splitlines()[-1] == "[]", p.stderr
    rows = json.loads(p.stdout)
    assert [m["ref"] for m in rows] == ["Zeta@1", "alpha@1"]  # byte order, as on SQLite
    assert rows[1]["tags"] == ["A", "b"] and rows[1]["base"] == "Zeta@1" and rows[1]["created_at"].endswith("+00:00")


def test_the_server_writes_zoo_list_json_as_python_would(pg_url, models, tmp_path, zoo_cli):
    """``zoo list --json`` on PostgreSQL reads the lines kept with each model: byte for byte
    what json.dumps makes of the same rows, escapes, nulls and timestamps included."""
    from zoo.registry.listing import list_models, model_lines, relist
    from zoo.registry.paths import locate

    where = locate(pg_url, tmp_path / "store")
    args = ["--registry", pg_url, "--store", tmp_path / "store"]
    assert zoo_cli(*args, "init")[0] == 0
    assert zoo_cli(*args, "list", "--json")[1] == "[]\n"
    with Registry(where, create=True) as reg:
        reg.add(models["base"], "base", "base", tags=['q"uote', "back\\slash", "del\x7f"])
        reg.add(models["parity"], "parity", "expert", base="base", tasks=["t2", "T1"])
        with psycopg.connect(pg_url, autocommit=True) as con:  # a whole second, and a missing model_type
            con.execute("UPDATE models SET created_at = '2026-01-02 03:04:05+00', model_type = NULL "
                        "WHERE name = 'parity'")
            con.execute("INSERT INTO model_tags SELECT id, %s FROM models WHERE name = 'base'", ("tab\there\x01",))
            relist(con)  # these edits went around the registry: write the lines as its writes do
    expect = lambda: [json.dumps(r) for r in list_models(where)]  # noqa: E731
    assert model_lines(where) == expect()
    assert '"created_at": "2026-01-02T03:04:05+00:00"' in model_lines(where)[1]
    assert model_lines(where, tag='q"uote') == [json.dumps(r) for r in list_models(where, tag='q"uote')]
    code, out, _ = zoo_cli(*args, "list", "--json")
    assert code == 0 and json.loads(out) == list_models(where)
    with Registry(where) as reg:
        reg.tag("parity", ["café"])  # beyond ASCII: json.dumps escapes it
    assert model_lines(where) == expect() and "caf\\u00e9" in model_lines(where)[1]


def test_the_migrations_make_the_orm_tables_on_postgresql(pg_url, tmp_path):
    """The same Alembic migrations as SQLite's; the ORM classes match what they made."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from zoo.registry.schema import Base

    with Registry(pg_url, create=True, store=tmp_path / "store") as reg:
        with reg.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
