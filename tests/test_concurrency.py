"""Real processes against one real registry, on SQLite and on PostgreSQL: concurrent
adds, and adds killed mid-copy."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import vit

ZOO = str(Path(sys.executable).with_name("zoo"))


def zoo(reg, *args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([ZOO, *reg.cli, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_concurrent_adds_both_succeed(tmp_path, subprocess_env, target):
    reg = target
    base = vit(tmp_path / "base")
    experts = [vit(tmp_path / f"e{i}", 2, seed=10 + i) for i in range(4)]
    assert zoo(reg, "add", base, "--name", "base", "--kind", "base", env=subprocess_env).wait() == 0
    # Four processes at once; two of them add identical bytes (the same blobs).
    procs = [zoo(reg, "add", e, "--name", f"e{i}", "--base", "base", env=subprocess_env) for i, e in enumerate(experts)]
    procs.append(zoo(reg, "add", experts[0], "--name", "e0-copy", "--base", "base", env=subprocess_env))
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    listed = json.loads(subprocess.run([ZOO, *reg.cli, "list", "--json"], capture_output=True,
                                       text=True, env=subprocess_env).stdout)
    assert sorted(m["name"] for m in listed) == ["base", "e0", "e0-copy", "e1", "e2", "e3"]
    verify = subprocess.run([ZOO, *reg.cli, "verify"], capture_output=True, text=True, env=subprocess_env)
    assert verify.returncode == 0, verify.stdout


def test_concurrent_adds_of_the_same_name_one_wins(tmp_path, subprocess_env, target):
    reg = target
    a, b = vit(tmp_path / "a"), vit(tmp_path / "b", seed=1)
    assert zoo(reg, "init", env=subprocess_env).wait() == 0
    procs = [zoo(reg, "add", p, "--name", "same", "--kind", "base", env=subprocess_env) for p in (a, b)]
    codes = sorted(p.wait() for p in procs)
    assert codes == [0, 1]
    errs = [p.stderr.read() for p in procs]
    assert any("already" in e for e in errs)
    assert len(json.loads(subprocess.run([ZOO, *reg.cli, "list", "--json"], capture_output=True,
                                         text=True).stdout)) == 1


def _sparse_checkpoint(path: Path, nbytes: int) -> Path:
    """A large safetensors file that costs no disk until copied (a sparse file of zeros)."""
    path.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes // 4 * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    f = path / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + nbytes // 4 * 4)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_add_killed_mid_copy_leaves_nothing(tmp_path, subprocess_env, sig, target):
    reg = target
    assert zoo(reg, "add", vit(tmp_path / "base"), "--name", "base", "--kind", "base", env=subprocess_env).wait() == 0
    big = _sparse_checkpoint(tmp_path / "big", 1 << 30)
    before, blobs = reg.dump(), reg.blobs()
    tmpdir = reg.store / "tmp"
    p = zoo(reg, "add", big, "--name", "big", "--kind", "base", env=subprocess_env)
    deadline = time.time() + 60
    while time.time() < deadline:
        parts = [x for x in tmpdir.glob("*.part") if x.stat().st_size > 0] if tmpdir.exists() else []
        if parts:
            break
        time.sleep(0.002)
    assert parts, "the copy never started"
    p.send_signal(sig)
    code = p.wait()
    assert code != 0
    if sig == signal.SIGINT:
        assert p.stderr.read().strip().splitlines() == ["error: interrupted; no half-finished change was saved"]
        assert list(tmpdir.iterdir()) == []  # cleaned up on the way out
    assert reg.dump() == before and reg.blobs() == blobs
    # The next add cleans what a killed process left, and succeeds.
    assert zoo(reg, "add", vit(tmp_path / "next", seed=5), "--name", "next", "--kind", "base",
               env=subprocess_env).wait() == 0
    assert list(tmpdir.iterdir()) == []
