"""Every bad input: a one-line error, a non-zero exit, and a registry left exactly as it was."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import db_dump, store_listing

ZOO = str(Path(sys.executable).with_name("zoo"))


@pytest.fixture
def seeded(zoo_cli, models, tmp_path):
    """A registry with a base and one expert, through the real CLI."""
    assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base")[0] == 0
    assert zoo_cli("add", models["parity"], "--name", "parity", "--base", "base", "--task", "parity")[0] == 0
    return tmp_path / "registry.db"


def assert_refused(zoo_cli, reg: Path, args, pattern: str) -> str:
    before, blobs = db_dump(reg), store_listing(reg)
    code, out, err = zoo_cli(*args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert db_dump(reg) == before
    assert store_listing(reg) == blobs
    return lines[0]


def test_path_that_does_not_exist(zoo_cli, seeded, tmp_path):
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "nope", "--name", "x", "--base", "base"], "no such file")


def test_directory_without_checkpoint(zoo_cli, seeded, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "empty", "--name", "x", "--base", "base"], "no checkpoint found")


def _broken_copy(src: Path, dst: Path, data: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(data)
    return dst


def test_truncated_safetensors(zoo_cli, seeded, models, tmp_path):
    data = (models["parity"] / "model.safetensors").read_bytes()
    p = _broken_copy(models["parity"], tmp_path / "trunc", data[: len(data) // 2])
    assert_refused(zoo_cli, seeded, ["add", p, "--name", "x", "--base", "base"], "truncated")


def test_corrupt_header(zoo_cli, seeded, models, tmp_path):
    data = bytearray((models["parity"] / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"
    p = _broken_copy(models["parity"], tmp_path / "corrupt", bytes(data))
    assert_refused(zoo_cli, seeded, ["add", p, "--name", "x", "--base", "base"], "corrupt safetensors header")


def test_absurd_header_length(zoo_cli, seeded, models, tmp_path):
    data = (models["parity"] / "model.safetensors").read_bytes()
    p = _broken_copy(models["parity"], tmp_path / "absurd", struct.pack("<Q", 2**62) + data[8:])
    assert_refused(zoo_cli, seeded, ["add", p, "--name", "x", "--base", "base"], "claims")


def test_duplicate_name(zoo_cli, seeded, models):
    assert_refused(zoo_cli, seeded, ["add", models["mod3"], "--name", "parity", "--base", "base"],
                   "already exists.*--new-version")


def test_expert_shapes_do_not_match_base(zoo_cli, seeded, models):
    msg = assert_refused(zoo_cli, seeded, ["add", models["wide"], "--name", "wide", "--base", "base"],
                         "does not match base base@1: .*shape mismatches")
    assert "zoo check" in msg


def test_unknown_base(zoo_cli, seeded, models):
    assert_refused(zoo_cli, seeded, ["add", models["mod3"], "--name", "mod3", "--base", "nobase"],
                   "no model named 'nobase'")


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "a\\b", "bad\x07name", "tab\tname", "-flag", ""])
def test_bad_names(zoo_cli, seeded, models, name):
    assert_refused(zoo_cli, seeded, ["add", models["mod3"], "--name", name, "--base", "base"], "name")


def test_pickle_checkpoint(zoo_cli, seeded, tmp_path):
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04...")
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "pk", "--name", "x", "--base", "base"],
                   "never unpickles.*weights_only=True")


def test_other_commands_fail_cleanly(zoo_cli, seeded, tmp_path):
    assert_refused(zoo_cli, seeded, ["show", "nothing"], "no model named")
    assert_refused(zoo_cli, seeded, ["rm", "base"], "used by 1 model.*--force")
    assert_refused(zoo_cli, seeded, ["list", "--kind", "weird"], "unknown kind")
    assert_refused(zoo_cli, seeded, ["eval", "base"], "has no tasks")
    assert_refused(zoo_cli, seeded, ["eval", "parity"], "task 'parity' has no data")
    assert_refused(zoo_cli, seeded, ["export", "parity", tmp_path], "not empty")
    assert_refused(zoo_cli, seeded, ["--registry", tmp_path / "other.db", "list"], "no registry at")
    assert not (tmp_path / "other.db").exists()


def _disk_full_env(big: Path, limit: int):
    """Run `zoo add` under a file-size limit: the kernel refuses writes past it (EFBIG),
    exactly as a full disk refuses them (ENOSPC)."""
    import resource

    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def _big_checkpoint(path: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"w": torch.zeros(mb * (1 << 20) // 4)}, str(path / "model.safetensors"))
    return path


def test_disk_fills_during_copy(seeded, tmp_path, subprocess_env):
    big = _big_checkpoint(tmp_path / "big", 8)
    before, blobs = db_dump(seeded), store_listing(seeded)
    proc = subprocess.run([ZOO, "--registry", str(seeded), "add", str(big), "--name", "big", "--kind", "base"],
                          capture_output=True, text=True, preexec_fn=_disk_full_env(big, 4 << 20), env=subprocess_env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: disk full while copying") and proc.stderr.count("\n") == 1, proc.stderr
    assert db_dump(seeded) == before and store_listing(seeded) == blobs
    assert list((seeded.with_suffix(".store") / "tmp").iterdir()) == []


def test_disk_fills_on_a_real_small_filesystem(tmp_path, models, subprocess_env):
    """A real ENOSPC: the registry lives on a 2 MB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        reg = mnt / "registry.db"
        ok = subprocess.run([ZOO, "--registry", str(reg), "add", str(models["base"]), "--name", "b", "--kind", "base"],
                            capture_output=True, text=True, env=subprocess_env)
        assert ok.returncode == 0, ok.stderr
        big = _big_checkpoint(tmp_path / "big", 4)
        before, blobs = db_dump(reg), store_listing(reg)
        proc = subprocess.run([ZOO, "--registry", str(reg), "add", str(big), "--name", "big", "--kind", "base"],
                              capture_output=True, text=True, env=subprocess_env)
        assert proc.returncode == 1
        assert proc.stderr.startswith("error: disk full") and proc.stderr.count("\n") == 1, proc.stderr
        assert db_dump(reg) == before and store_listing(reg) == blobs
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_registry_file_that_is_not_a_database(zoo_cli, tmp_path):
    (tmp_path / "registry.db").write_bytes(b"not a database, just bytes\n" * 100)
    for args in (["list"], ["list", "--json"], ["show", "x"], ["gc"]):
        code, out, err = zoo_cli(*args)
        assert code == 1 and "Traceback" not in err, err
        assert err.strip().splitlines() == [f"error: {tmp_path / 'registry.db'} is not a zoo registry (file is not "
                                            "a database); point --registry at a registry.db, or move this file away "
                                            "and run `zoo init`"]
    assert (tmp_path / "registry.db").read_bytes() == b"not a database, just bytes\n" * 100


@pytest.mark.parametrize("args, pattern", [
    (["serve", "--port", "99999"], r"--port 99999 is not a port"),
    (["serve", "--host", "256.1.1.1", "--port", "0"], r"--host '256.1.1.1' is not an address of this machine"),
])
def test_serve_with_a_bad_address_says_which_and_leaves_no_registry(zoo_cli, tmp_path, args, pattern):
    code, _, err = zoo_cli(*args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "registry.db").exists()


def test_gc_with_a_negative_age(zoo_cli, seeded):
    assert_refused(zoo_cli, seeded, ["gc", "--older-than", "-5"], r"--older-than -5 is not an age")


def test_a_recipe_that_is_not_utf8(zoo_cli, seeded, tmp_path):
    (tmp_path / "r.yml").write_bytes(b"merge_method: ties\n\xff\xfe base_model: base\n")
    assert_refused(zoo_cli, seeded, ["merge", tmp_path / "r.yml", "--out", "m"], r"is not UTF-8 text \(byte 19\)")


def test_a_symlink_loop_is_named_as_such(zoo_cli, seeded, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "loop", "--name", "x", "--kind", "base"],
                   r"a symbolic link that cannot be followed")


def test_a_checkpoint_without_tensors(zoo_cli, seeded, tmp_path):
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "empty.safetensors"))
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "empty.safetensors", "--name", "x", "--kind", "base"],
                   r"holds no tensors")


def test_overlapping_tensor_bytes_are_refused_as_safetensors_does(zoo_cli, seeded, tmp_path):
    import json

    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    raw = json.dumps(header).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    assert_refused(zoo_cli, seeded, ["add", tmp_path / "overlap.safetensors", "--name", "x", "--kind", "base"],
                   r"tensors 'a' and 'b' share bytes")


def test_a_new_version_of_another_architecture(zoo_cli, seeded, tmp_path):
    from conftest import llama

    assert_refused(zoo_cli, seeded, ["add", llama(tmp_path / "llama"), "--name", "base", "--kind", "base",
                                     "--new-version"], r"base@1 is a vit model; a new version must be the same "
                                                       r"architecture \(got llama\)")


def test_recipe_models_given_as_a_string(zoo_cli, seeded, tmp_path):
    (tmp_path / "r.yml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels: parity\n")
    assert_refused(zoo_cli, seeded, ["merge", tmp_path / "r.yml", "--out", "m"],
                   r"models must be a list of \{model: NAME\} entries, got 'parity'")


def test_steps_on_a_method_that_does_not_train(zoo_cli, seeded):
    assert_refused(zoo_cli, seeded, ["merge", "--method", "ties", "--base", "base", "parity", "--steps", "5",
                                     "--out", "m"], r"ties does not train, so it takes no steps")


@pytest.fixture
def mount(tmp_path):
    """A small tmpfs of our own (needs root; skipped where mounting is not allowed);
    ``mount("ro")`` remounts it read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def remount(mode: str) -> Path:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)
        return mnt
    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_registry_on_read_only_storage_reads_and_refuses_writes_in_one_line(zoo_cli, seeded, mount):
    mnt = mount("rw")
    import sqlite3

    with sqlite3.connect(seeded) as con:  # as a cleanly closed registry is: everything in the main file
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(seeded, mnt / "registry.db")
    shutil.copytree(seeded.with_name("registry.store"), mnt / "registry.store")
    mount("ro")
    reg = ["--registry", str(mnt / "registry.db")]
    code, out, err = zoo_cli("list", *reg)
    assert code == 0 and "parity@1" in out, err
    code, out, err = zoo_cli("show", "parity", *reg)
    assert code == 0 and "parity@1" in out, err
    assert zoo_cli("verify", *reg)[0] == 0
    code, _, err = zoo_cli("tag", "parity", "x", *reg)
    assert code == 1 and err.strip().splitlines() == [
        f"error: registry {mnt / 'registry.db'} is busy or unwritable: attempt to write a readonly database"]


@pytest.mark.parametrize("args, pattern", [
    (["export", "parity", "{mnt}/out"], r"cannot write to {mnt}: Read-only file system; choose another folder"),
    (["merge", "--method", "task_arithmetic", "--base", "base", "parity", "-p", "weight=0.3", "--out-dir", "{mnt}/m"],
     r"cannot write to {mnt}: Read-only file system; choose a writable --out-dir"),
    (["key", "export", "locked", "--out", "{mnt}/k/locked.key"], r"cannot write the key file {mnt}/k/locked.key"),
])
def test_writing_to_read_only_storage_is_one_line(zoo_cli, seeded, mount, args, pattern, models):
    assert zoo_cli("protect", "parity", "--out", "locked", "--seed", "1")[0] == 0
    mnt = mount("ro")
    assert_refused(zoo_cli, seeded, [a.format(mnt=mnt) for a in args], pattern.format(mnt=mnt))


def test_gc_removes_the_folder_a_killed_out_dir_merge_left(zoo_cli, seeded, tmp_path):
    """kill -9 during `zoo merge --out-dir` leaves its hidden folder; `zoo gc` removes it
    and counts its bytes; a second `--out-dir` write beside it removes such folders too."""
    env = {**os.environ, "ZOO_REGISTRY": str(seeded)}
    script = ("import os, signal, sys\n"
              "from zoo.cli.main import main\n"
              "import zoo.merge.engine as e\n"
              "real = e.execute\n"
              "def die(plan, folder, **kw):\n"
              "    (folder / 'partial.safetensors').write_bytes(b'x' * 123456)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "e.execute = die\n"
              "sys.argv = ['zoo', 'merge', '--method', 'task_arithmetic', '--base', 'base', 'parity', '-p', "
              "'weight=0.3', '--out-dir', "
              f"{str(tmp_path / 'out')!r}]\n"
              "main()\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".writing")]
    code, out, err = zoo_cli("gc", "--json")
    got = __import__("json").loads(out)
    assert code == 0 and got["folders_removed"] == 1 and got["bytes_freed"] >= 123456, err
    assert not left.exists() and not (tmp_path / "out").exists()
    assert list((seeded.with_name("registry.store") / "workspaces").iterdir()) == []


def test_an_adapter_where_a_model_is_needed_says_so(zoo_cli, tmp_path):
    from conftest import llama, lora_adapter

    base = llama(tmp_path / "b")
    lora_adapter(tmp_path / "a", base)
    assert zoo_cli("add", base, "--name", "b", "--kind", "base")[0] == 0
    assert zoo_cli("add", tmp_path / "a", "--name", "a", "--kind", "adapter", "--base", "b")[0] == 0
    reg = tmp_path / "registry.db"
    line = assert_refused(zoo_cli, reg, ["protect", "a", "--out", "x"], r"^error: a@1 is a LoRA adapter: MergeLock "
                                                                        r"protects whole models")
    assert str(tmp_path / "registry.store") not in line  # the user's name, not a store path
    code, out, _ = zoo_cli("check", "b", "--base", "a")
    assert code == 1 and "a is a LoRA adapter, not a base model" in out and "shape" not in out
