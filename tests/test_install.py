"""One import root: the wheel and the editable install both put only ``zoo`` on the
import path, with ``zoo.merge``, ``zoo.protect`` and ``zoo.cli`` from the design card's
top-level folders (pyproject's package-dir)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"zoo": "zoo", "merge": "zoo/merge", "protect": "zoo/protect", "cli": "zoo/cli"}
PROBE = ("import importlib.util, json, zoo, zoo.merge, zoo.protect, zoo.cli.main, zoo.registry.catalogue, "
         "zoo.hub.server, zoo.demo; print(json.dumps({'zoo': zoo.__file__, 'merge': zoo.merge.__file__, "
         "'top': [m for m in ('merge', 'protect', 'cli') if importlib.util.find_spec(m)]}))")


def source_files() -> set[str]:
    """Every file the package must carry, at its path inside the wheel."""
    out = set()
    for folder, target in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or path.suffix == ".mako") and "__pycache__" not in path.parts:
                out.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("zoo-*.whl")
    return whl


def test_the_wheel_holds_only_zoo_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"zoo"}
    missing = source_files() - set(names)
    assert not missing, f"modules the wheel lacks (add their packages to pyproject): {sorted(missing)[:5]}"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "zoo = zoo.cli.main:entry" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_wheel_imports_from_site_packages(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                        "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    packages = {p.name for p in site.iterdir() if p.name not in ("bin",) and not p.name.endswith(".dist-info")}
    assert packages == {"zoo"}
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["zoo"].startswith(str(site)) and got["merge"] == str(site / "zoo" / "merge" / "__init__.py")
    assert got["top"] == []
    r = subprocess.run([sys.executable, "-m", "zoo.cli.main", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "merge" in r.stdout, r.stderr[-2000:]


def test_the_editable_install_maps_the_folders(tmp_path):
    """Run outside the checkout, so the checkout's folders are not on the path by accident."""
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    if not got["zoo"].startswith(str(ROOT)):
        pytest.skip("zoo is not installed in editable mode here")
    assert got["merge"] == str(ROOT / "merge" / "__init__.py")
    assert got["top"] == [], "top-level merge/protect/cli modules are importable: only zoo may be installed"
