"""The CLI end to end, in-process, over a real registry."""

from __future__ import annotations

import json


def test_workflow(zoo_cli, models, tmp_path):
    code, out, _ = zoo_cli("init")
    assert code == 0 and "registry.db" in out
    assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base", "--tag", "demo")[0] == 0
    code, out, _ = zoo_cli("add", models["parity"], "-n", "parity", "-b", "base", "-t", "parity", "--json")
    assert code == 0 and json.loads(out)["base"] == "base@1"
    assert zoo_cli("add", models["mod3"], "-n", "mod3", "-b", "base", "-t", "mod3", "--in-place")[0] == 0

    code, out, _ = zoo_cli("list", "--json")
    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["base@1", "mod3@1", "parity@1"]
    code, out, _ = zoo_cli("list", "--kind", "expert", "--task", "parity")
    assert code == 0 and "parity@1" in out and "mod3@1" not in out and out.startswith("MODEL")

    code, out, _ = zoo_cli("show", "parity", "--json")
    shown = json.loads(out)
    assert shown["architecture"]["num_layers"] == 2 and len(shown["files"]) == 2
    code, out, _ = zoo_cli("show", "parity")
    assert "architecture: vit  hidden 32  layers 2  heads 4" in out

    code, out, _ = zoo_cli("lineage", "parity")
    assert out.splitlines() == ["parity@1 (expert)", "└── base: base@1 (base)"]

    code, out, _ = zoo_cli("check", "parity", "mod3")
    assert code == 0 and "parity vs base@1: ok" in out and "task head" in out
    code, out, _ = zoo_cli("check", models["wide"], "--base", "base")
    assert code == 1 and "error" in out and "shape" in out
    code, out, _ = zoo_cli("check", models["wide"], "--base", "base", "--json")
    assert code == 1 and json.loads(out)[0]["ok"] is False

    code, out, _ = zoo_cli("tag", "parity", "good", "best")
    assert out.strip() == "parity: best, good"
    code, out, _ = zoo_cli("tag", "parity", "--remove", "best")
    assert out.strip() == "parity: good"

    assert zoo_cli("verify")[0] == 0
    (models["mod3"] / "config.json").write_text("{}")
    code, out, _ = zoo_cli("verify", "--json")
    assert code == 1 and [(p["model"], p["file"], p["problem"]) for p in json.loads(out)] == [
        ("mod3@1", "config.json", "changed")]

    code, out, _ = zoo_cli("export", "parity", tmp_path / "exported")
    assert code == 0
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == (models["parity"] / "model.safetensors").read_bytes()

    code, out, err = zoo_cli("rm", "base")
    assert code == 1 and "--force" in err
    assert zoo_cli("rm", "parity")[0] == 0
    code, out, _ = zoo_cli("rm", "base", "--force")
    assert code == 0 and "1 dependent(s)" in out
    code, out, _ = zoo_cli("list", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["mod3@1"] and json.loads(out)[0]["base"] is None
