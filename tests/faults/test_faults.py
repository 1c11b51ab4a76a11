"""The fault corpus: every row of cases.py through the real CLI, then signals and kills
as real processes, and full or read-only storage on a small tmpfs.

Each outcome is recorded; at the end of the module the figures (cases, clear one-line
errors, tracebacks, leftovers, data loss) are printed, and written as JSON to
$ZOO_FAULTS_SUMMARY when set (`python -m tests.faults.report` does both)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests.conftest import db_dump, store_listing
from tests.faults import world as world_mod
from tests.faults.cases import CASES, Case

ZOO = str(Path(sys.executable).with_name("zoo"))
RESULTS: list[dict] = []
IGNORED = {"registry.db-wal", "registry.db-shm", "registry.db-journal"}  # SQLite's own; hidden
# ".NAME.lock" files are the flock sidecars token files keep for good, not temp files


# ---------------------------------------------------------------- fixtures, shared per module

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return world_mod.build(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def ports():
    """A port nobody listens on, and one that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    yield f"http://127.0.0.1:{dead}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    silent.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """`zoo serve` in-process on loopback, as tests/test_hub.py runs it."""
    from zoo import Registry
    from zoo.hub.server import ServeSettings, running
    from zoo.hub.accounts import Accounts

    root = tmp_path_factory.mktemp("hub")
    reg = Registry(root / "registry.db", create=True)
    accounts = Accounts(reg)
    write, read = accounts.create_token("alice")["token"], accounts.create_token("reader", "read")["token"]
    accounts.add_org("team", ["alice", "reader"])
    with running(reg, ServeSettings(open_reads=True, lfs_threshold=4096)) as url:
        yield {"hub": url, "write": write, "read": read}
    reg.close()


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    figures = summarise(RESULTS)
    out = os.environ.get("ZOO_FAULTS_SUMMARY")
    if out:
        Path(out).write_text(json.dumps({"figures": figures, "cases": RESULTS}, indent=1) + "\n")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.write_line("")
            tr.write_line("fault corpus: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


def summarise(results: list[dict]) -> dict[str, int]:
    return {"cases": len(results),
            "clear one-line errors": sum(r["clear"] for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
            "leftovers": sum(r["leftover"] for r in results),
            "data loss": sum(r["data_loss"] for r in results),
            "known bugs (xfail)": sum(r.get("known_bug", False) for r in results)}


# ---------------------------------------------------------------- helpers

def snapshot(folder: Path) -> set[str]:
    """Every file, and every folder outside the store's own layout, under ``folder``."""
    out = set()
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.name in IGNORED or re.fullmatch(r"\..+\.lock", p.name) or "__pycache__" in rel.parts:
            continue
        if rel.parts[:2] == ("registry.store", "views"):
            continue  # the store's read-only views of registered models: a cache it rebuilds
        if p.is_dir() and not p.is_symlink() and rel.parts[0] in ("registry.store", "registry.keys"):
            continue  # the store's own folders (tmp/, workspaces/...) may be made on open
        out.add(str(rel))
    return out


def hidden_temps(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if re.search(r"(\.writing|\.tmp|\.partial)$", p.name)]


def one_line(code: int, err: str) -> str | None:
    """The message line if stderr is exactly what a refusal prints, else None."""
    lines = err.strip("\n").splitlines()
    if code == 1:
        return lines[0] if len(lines) == 1 and lines[0].startswith("error: ") else None
    if code == 2:  # click: "Usage: ..." and "Try ..." lines, then the one "Error: ..." line
        errs = [x for x in lines if x.startswith("Error:")]
        return errs[-1] if len(errs) == 1 and not any(x.startswith("  File ") for x in lines) else None
    return None


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str, bool]:
    """The real entry point in-process: (exit, stdout, stderr, raised a traceback)."""
    from zoo.cli.main import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["zoo", *argv])
    code, tb = 0, False
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - an escaped exception is exactly what we count
        code, tb = 1, True
        sys.stderr.write(traceback.format_exc())
    out, err = capsys.readouterr()
    return code, out, err, tb or "Traceback (most recent call last)" in err


def record(id: str, command: str, expected: int, code: int, line: str | None, pattern: str, tb: bool,
           leftovers: list[str], changed: bool) -> dict:
    r = {"id": id, "command": command, "exit": code, "message": line, "traceback": tb,
         "clear": line is not None and code == expected and bool(re.search(pattern, line)) and not tb,
         "leftover": bool(leftovers), "data_loss": changed, "left": leftovers}
    RESULTS.append(r)
    return r


def check(r: dict, expected: int, pattern: str, err: str) -> None:
    assert not r["traceback"], err[-3000:]
    assert r["exit"] == expected, (r["exit"], err)
    assert r["message"] is not None, f"not one line: {err!r}"
    assert re.search(pattern, r["message"]), r["message"]
    assert not r["left"], r["left"]
    assert not r["data_loss"], "the registry changed"


# ---------------------------------------------------------------- the table

def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(x) for x in CASES])
def test_case(case: Case, world, ports, request, tmp_path, monkeypatch, capsys):
    fx, reg_dir = world
    if case.setup == "seeded":
        for name in world_mod.REGISTRY_FILES:
            src = reg_dir / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    subst = {"fx": fx, "bad": fx / "bad", "r": fx / "recipes", "k": fx / "keys", "tmp": tmp_path,
             "dead": ports[0], "silent": ports[1]}
    if any("{hub}" in a for a in case.argv) or case.env:
        subst.update(request.getfixturevalue("hub"))
    argv = [a.format(**subst) for a in case.argv]
    monkeypatch.chdir(tmp_path)
    for var in ("ZOO_REGISTRY", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZOO_HUB_TIMEOUT", "3")
    monkeypatch.setenv("HF_HOME", str(tmp_path.parent / f"{tmp_path.name}-hf"))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.format(**subst))
    reg = tmp_path / "registry.db"
    before, blobs, files = db_dump(reg), store_listing(reg), snapshot(tmp_path)
    fx_before = snapshot(fx)

    code, out, err, tb = run_cli(argv, capsys, monkeypatch)
    line = one_line(code, err)
    if case.report:  # `zoo check` reports a finding on stdout and exits 1
        line = out.strip().replace("\n", " ") if code == 1 and not err.strip() and out.strip() else None
    left = sorted(snapshot(tmp_path) - files) + hidden_temps(tmp_path) \
        + [f"fx/{p}" for p in sorted(snapshot(fx) - fx_before)]
    for sub in ("tmp", "workspaces"):
        d = reg.with_suffix(".store") / sub
        left += [str(p) for p in d.rglob("*")] if d.exists() else []
    changed = db_dump(reg) != before or store_listing(reg) != blobs
    r = record(case.id, case.command, case.exit, code, line, case.pattern, tb, left, changed)
    r["known_bug"] = bool(case.xfail)
    if case.setup == "seeded":
        vcode, _, verr, vtb = run_cli(["verify"], capsys, monkeypatch)
        assert vcode == 0 and not vtb, verr
    check(r, case.exit, case.pattern, err)


# ---------------------------------------------------------------- signals and kills, as real processes

def _seeded_copy(world, dest: Path) -> Path:
    for name in world_mod.REGISTRY_FILES:
        src = world[1] / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest / "registry.db"


PATCHES = {  # where each command's streaming step is, and how it finds its output folder
    "merge": ("zoo.merge.engine", "execute", "a[1]"),
    "protect": ("zoo.protect.run", "lock_checkpoint", "a[2]"),
}
SIGNAL_ARGS = {
    ("merge", "out"): ["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3",
                       "--out", "m"],
    ("merge", "out-dir"): ["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3",
                           "--out-dir", "{tmp}/o"],
    ("protect", "out"): ["protect", "parity", "--out", "p", "--seed", "3"],
    ("protect", "out-dir"): ["protect", "parity", "--out-dir", "{tmp}/o", "--seed", "3"],
}


def _midway(command: str, sig: int, argv: list[str]) -> str:
    """A `zoo` process that gets ``sig`` from the kernel once it has written part of its output."""
    module, name, folder = PATCHES[command]
    return ("import os, signal, sys, time\n"
            "from pathlib import Path\n"
            "from zoo.cli.main import main\n"
            f"import {module} as target\n"
            "def midway(*a, **kw):\n"
            f"    (Path({folder}) / 'partial.safetensors').write_bytes(b'x' * 123456)\n"
            f"    os.kill(os.getpid(), {int(sig)})\n"
            "    time.sleep(30)\n"
            f"target.{name} = midway\n"
            f"sys.argv = ['zoo', *{argv!r}]\n"
            "main()\n")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "sigint"])
@pytest.mark.parametrize("command, dest", list(SIGNAL_ARGS), ids=[f"{a}-{b}" for a, b in SIGNAL_ARGS])
def test_signal_midway(world, tmp_path, capsys, monkeypatch, command, dest, sig):
    """kill -9 leaves what the kernel leaves, and `zoo gc` removes it; Ctrl-C (SIGINT)
    exits 130 with one line and leaves nothing at all. The registry never changes."""
    reg = _seeded_copy(world, tmp_path)
    before, blobs, files = db_dump(reg), store_listing(reg), snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in SIGNAL_ARGS[(command, dest)]]
    env = {**os.environ, "ZOO_REGISTRY": str(reg)}
    proc = subprocess.run([sys.executable, "-c", _midway(command, sig, argv)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    tb = "Traceback" in proc.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    if sig == signal.SIGKILL:
        expected, line, pattern = -signal.SIGKILL, "killed", "killed"
        assert proc.returncode == expected, proc.stderr[-2000:]
        gcode, _, gerr, gtb = run_cli(["gc", "--json"], capsys, monkeypatch)
        assert gcode == 0 and not gtb, gerr
    else:
        expected, pattern = 130, r"^error: interrupted; no half-finished change was saved$"
        line = one_line(1, proc.stderr)
    left = sorted(snapshot(tmp_path) - files) + hidden_temps(tmp_path)
    for sub in ("tmp", "workspaces"):
        d = reg.with_suffix(".store") / sub
        left += [str(p) for p in d.rglob("*")] if d.exists() else []
    changed = db_dump(reg) != before or store_listing(reg) != blobs
    r = record(f"{command}-{dest}-{signal.Signals(sig).name}", command, expected, proc.returncode, line, pattern,
               tb, left, changed)
    vcode, _, verr, _ = run_cli(["verify"], capsys, monkeypatch)
    assert vcode == 0, verr
    check(r, expected, pattern, proc.stderr)


# ---------------------------------------------------------------- full and read-only storage on a small tmpfs

@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    """A 16 MB tmpfs of our own (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path_factory.mktemp("small")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or 'mount refused'}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


STORAGE = [  # (mode, argv, pattern): the registry is on the tmpfs, filled to the brim or read-only
    ("full", ["add", "{fx}/lb", "--name", "x", "--kind", "base"], r"disk full"),
    ("full", ["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3", "--out", "m"],
     r"disk full"),
    ("full", ["protect", "parity", "--out", "p", "--seed", "1"], r"disk full"),
    ("full", ["export", "parity", "{mnt}/out"], r"cannot export to .*: No space left on device"),
    ("full", ["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3",
              "--out-dir", "{mnt}/o"],
     r"disk full"),
    ("ro", ["add", "{fx}/mod3", "--name", "x", "--base", "base"], r"(?i)read-only|unwritable|cannot write"),
    ("ro", ["tag", "parity", "x"], r"is busy or unwritable"),
    ("ro", ["rm", "mod3"], r"(?i)read-only|unwritable|cannot write"),
    ("ro", ["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3", "--out", "m"],
     r"(?i)read-only|unwritable|cannot write"),
    ("ro", ["protect", "parity", "--out", "p"], r"(?i)read-only|unwritable|cannot write"),
    ("ro", ["export", "parity", "{mnt}/out"], r"Read-only file system"),
    ("ro", ["gc"], r"(?i)read-only|unwritable|cannot write"),
]


@pytest.mark.parametrize("mode, args, pattern", STORAGE, ids=[f"{m}-{a[0]}-{i}" for i, (m, a, _) in enumerate(STORAGE)])
def test_storage(world, small_fs, tmp_path, capsys, monkeypatch, mode, args, pattern):
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    for p in small_fs.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    import sqlite3

    reg = _seeded_copy(world, small_fs)
    con = sqlite3.connect(reg)  # as a cleanly closed registry is: everything in the main file
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before, blobs, files = db_dump(reg), store_listing(reg), snapshot(small_fs) | {"ballast"}
    if mode == "full":
        with open(small_fs / "ballast", "wb") as f:  # leave about 48 KB free: room for SQLite's -shm, not for a model
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            f.write(b"\0" * max(0, free - (48 << 10)))
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    argv = [a.format(fx=world[0], mnt=small_fs) for a in args]
    # a real process, so that nothing of this one holds the mount open for the remount
    proc = subprocess.run([ZOO, "--registry", str(reg), *argv], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "ZOO_CACHE": str(tmp_path.parent / "cache")}, timeout=120)
    code, err = proc.returncode, proc.stderr
    tb = "Traceback" in err
    line = one_line(code, err)
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    (small_fs / "ballast").unlink(missing_ok=True)  # SQLite needs room for its -shm to read back
    left = sorted(snapshot(small_fs) - files) + hidden_temps(small_fs) + sorted(snapshot(tmp_path))
    for sub in ("tmp", "workspaces"):
        d = reg.with_suffix(".store") / sub
        left += [str(p) for p in d.rglob("*")] if d.exists() else []
    changed = db_dump(reg) != before or store_listing(reg) != blobs
    r = record(f"{mode}-{' '.join(args[:1])}", args[0], 1, code, line, pattern, tb, left, changed)
    check(r, 1, pattern, err)
