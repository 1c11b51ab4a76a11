"""The ``zoo`` command as a new user meets it: usage errors, help, global options,
the generated reference, and the fast paths (no SQLAlchemy, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ZOO = str(Path(sys.executable).with_name("zoo"))
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed ``zoo`` (the typer and click that are really installed), stderr a pipe."""
    return subprocess.run([ZOO, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("args, usage, message", [
    ([], "zoo [OPTIONS] COMMAND", None),
    (["frobnicate"], "zoo [OPTIONS] COMMAND", "No such command 'frobnicate'"),
    (["list", "--jsn"], "zoo list [OPTIONS]", "No such option: --jsn"),
    (["add", "somewhere"], "zoo add [OPTIONS] PATH", "Missing option '--name'"),
    (["merge", "--seed", "many"], "zoo merge [OPTIONS] [RECIPE] [MODEL...]", "Invalid value for '--seed'"),
    (["token", "create"], "zoo token create [OPTIONS]", "Missing option '--user'"),
    (["key"], "zoo key [OPTIONS] COMMAND", None),
])
def test_usage_errors_are_a_usage_line_and_exit_2(tmp_path, subprocess_env, args, usage, message):
    p = run(*args, cwd=tmp_path, env=subprocess_env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.startswith(f"Usage: {usage}"), p.stderr
    if message is None:  # bare `zoo`, bare `zoo key`: the help
        assert "Commands:" in p.stderr
    else:
        assert f"Error: {message}" in p.stderr and "--help" in p.stderr


def test_user_errors_stay_one_line(tmp_path, subprocess_env):
    p = run("list", cwd=tmp_path, env=subprocess_env)
    assert p.returncode == 1 and p.stderr.startswith("error: no registry at") and p.stderr.count("\n") == 1
    assert "zoo init" in p.stderr


def test_version(tmp_path, subprocess_env):
    from zoo import __version__

    p = run("--version", cwd=tmp_path, env=subprocess_env)
    assert p.returncode == 0 and p.stdout == f"zoo {__version__}\n"


def test_registry_option_before_or_after_the_subcommand(zoo_cli, models, tmp_path):
    reg = tmp_path / "elsewhere" / "reg.db"
    reg.parent.mkdir()
    assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base", "--registry", reg)[0] == 0
    assert reg.exists() and not (tmp_path / "registry.db").exists()
    code, out, _ = zoo_cli("list", "--registry", reg, "--json")
    assert code == 0 and [r["ref"] for r in json.loads(out)] == ["base@1"]
    code, out, _ = zoo_cli("--registry", reg, "show", "base", "--json")
    assert code == 0 and json.loads(out)["ref"] == "base@1"
    code, _, err = zoo_cli("--registry", reg, "list", "--registry", tmp_path / "none.db")  # the last one wins
    assert code == 1 and "no registry at" in err
    code, _, err = zoo_cli("list")  # and nothing carries over to the next run
    assert code == 1 and str(tmp_path / "registry.db") in err


def test_json_where_it_makes_sense(zoo_cli, models, tmp_path):
    code, out, _ = zoo_cli("init", "--json")
    assert code == 0 and json.loads(out)["registry"] == str(tmp_path / "registry.db")
    assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base")[0] == 0
    code, out, _ = zoo_cli("tag", "base", "x", "--json")
    assert code == 0 and json.loads(out) == {"model": "base", "tags": ["x"]}
    code, out, _ = zoo_cli("export", "base", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["path"] == str(tmp_path / "out")
    code, out, _ = zoo_cli("rm", "base", "--json")
    assert code == 0 and json.loads(out)["removed"] == "base@1"


def test_help_shows_meanings_not_python_types():
    from zoo.cli.reference import render

    text = render()
    for python_type in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list[", "{"):
        assert python_type not in text.replace("{e.g.", ""), python_type
    assert "-t, --task TASK " in text and "--registry PATH " in text and "--json  " in text


def test_merge_help_lists_the_methods_from_their_classes(zoo_cli):
    from zoo.cli.merge import summary
    from zoo.merge.methods import METHODS

    code, out, _ = zoo_cli("merge", "--help")
    assert code == 0
    listed = out[out.index("Methods"):]
    for name, method in METHODS.items():
        assert f"\n  {name} " in listed
        assert summary(type(method).__doc__).split()[0] in listed


@pytest.mark.parametrize("order", ["method first", "help first"])
def test_merge_method_help_lists_its_parameters_and_defaults(zoo_cli, order):
    from zoo.merge.methods import METHODS

    for name, method in METHODS.items():
        args = ["merge", "--method", name, "--help"] if order == "method first" else ["merge", "-h", "-m", name]
        code, out, _ = zoo_cli(*args)
        assert code == 0 and f"Method {name}:" in out
        section = " ".join(out[out.index(f"Method {name}:"):].split())
        for key, p in {**method.parameters, **method.model_parameters}.items():
            assert f" {key} " in section
            if p.default is not None:
                shown = str(p.default).lower() if isinstance(p.default, bool) else str(p.default)
                assert f"[default: {shown}]" in section.split(f" {key} ", 1)[1], (name, key)


def test_reference_is_current():
    from zoo.cli.reference import render

    path = ROOT / "docs" / "cli.md"
    assert path.is_file() and path.read_text() == render(), \
        "docs/cli.md is not current: run `python -m zoo.cli.reference` (or `make docs`)"


def _imported(args: list[str], cwd: Path, env: dict) -> tuple[int, list[str]]:
    code = ("import sys\nsys.argv = ['zoo', *sys.argv[1:]]\nfrom zoo.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\nelse:\n    rc = 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sqlalchemy'))\n"
            "print('IMPORTED', rc, *heavy, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=120)
    words = p.stderr.strip().splitlines()[-1].split()
    assert words[0] == "IMPORTED", p.stderr
    return int(words[1]), words[2:]


def test_help_and_list_import_neither_sqlalchemy_nor_torch(zoo_cli, models, tmp_path, subprocess_env):
    for name in ("base", "parity"):
        assert zoo_cli("add", models[name], "--name", name, "--kind", "base")[0] == 0
    for args in (["--help"], ["list"], ["list", "--json", "--kind", "base"], ["--version"]):
        code, heavy = _imported(args, tmp_path, subprocess_env)
        assert code == 0 and heavy == [], (args, heavy[:5])
    code, heavy = _imported(["show", "base"], tmp_path, subprocess_env)  # the check can see them
    assert code == 0 and "sqlalchemy" in heavy


def test_no_third_party_progress_bars_without_a_terminal(tmp_path, subprocess_env):
    code = ("import sys\nsys.argv = ['zoo', '--version']\nfrom zoo.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "from huggingface_hub.utils import are_progress_bars_disabled\n"
            "from transformers.utils import logging\n"
            "print(are_progress_bars_disabled(), logging.is_progress_bar_enabled(), logging.get_verbosity())\n")
    env = {k: v for k, v in subprocess_env.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    import logging as std_logging

    assert p.stdout.split()[-3:] == ["True", "False", str(std_logging.ERROR)], p.stdout + p.stderr
