"""Keys that cannot lie: a wrong key is refused on every route a protected model can
take (registered, an --out-dir folder, `zoo add --kind protected`, pulled from `zoo
serve`, `zoo key import`), and so is a model that was never protected; nothing is
written then. The right key unlocks every route to the same bytes. Models protected
before key check values are checked against the key id their recipe or card records."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import struct
from pathlib import Path

import pytest

import zoo.protect as protect
from tests.conftest import db_dump, llama, vit
from zoo import open_checkpoint
from zoo.checkpoints.reader import read_safetensors_header
from zoo.errors import ZooError
from zoo.protect.keycheck import METADATA_KEY
from zoo.protect.layouts import layout_for
from zoo.protect.transform import Key

NOT_PROTECTED = r"is not protected \(no MergeLock metadata\); nothing to unlock"


def restamp(shard: Path, metadata: dict[str, str] | None) -> None:
    """Rewrite a safetensors file's header metadata, tensors untouched (an older zoo's
    file, or a tampered one)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = metadata if metadata is not None else {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def stamp(shard: Path) -> dict:
    return json.loads(read_safetensors_header(shard)[1][METADATA_KEY])


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def scene(tmp_path, registry):
    """An expert protected twice with one key: registered (``e-locked``) and into a folder."""
    base, expert = vit(tmp_path / "base", seed=0), vit(tmp_path / "expert", seed=1)
    registry.add(base, "base", "base")
    registry.add(expert, "e", "expert", base="base")
    seed = secrets.randbits(128)  # one key for both, so every route unlocks to the same bytes
    locked = protect.protect("e", "e-locked", registry=registry, seed=seed)
    folder = protect.protect("e", out_dir=tmp_path / "folder", registry=registry, seed=seed)
    assert locked["key_id"] == folder["key_id"]
    wrong = Key.new(1e3)
    protect.write_key_file(tmp_path / "wrong.key", wrong, "e-locked@1")
    key, _ = protect.read_key_file(folder["key_file"])
    # the same seed under another bound is another key, and is refused as well
    protect.write_key_file(tmp_path / "near.key", Key(key.seed, key.max_cond * 2), "e-locked@1")
    return {"expert": expert, "folder": tmp_path / "folder", "key_file": Path(folder["key_file"]), "key": key,
            "wrong": tmp_path / "wrong.key", "near": tmp_path / "near.key"}


class Unchanged:
    """Asserts that a refusal left the registry, its store and the folder untouched."""

    def __init__(self, registry, tmp_path: Path):
        self.registry, self.tmp_path = registry, tmp_path
        self.before = self.snapshot()

    def snapshot(self):
        tmp = self.registry.store.root / "tmp"
        return (db_dump(self.registry.path), sorted(p.name for p in self.tmp_path.iterdir()),
                sorted(p.name for p in tmp.iterdir()) if tmp.exists() else [])

    def check(self) -> None:
        assert self.snapshot() == self.before


def refused(reg, where: Path, pattern: str, fn, /, *args, **kwargs) -> str:
    same = Unchanged(reg, where)
    with pytest.raises(ZooError, match=pattern) as e:
        fn(*args, **kwargs)
    same.check()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_protected_shard_carries_a_salted_check_value(scene, registry, tmp_path):
    key = scene["key"]
    mine = stamp(scene["folder"] / "model.safetensors")
    assert set(mine) == {"algorithm", "version", "check", "salt", "key_check"}
    assert (mine["algorithm"], mine["version"], mine["check"]) == ("mergelock", 1, "hmac-sha256")
    assert len(mine["salt"]) == 32 and len(mine["key_check"]) == 64
    assert read_safetensors_header(scene["folder"] / "model.safetensors")[1]["format"] == "pt"  # loaders need it
    # the same key on the same model: the same tensors, but a fresh salt and so another check value
    theirs = stamp(registry.model_dir("e-locked") / "model.safetensors")
    assert theirs["salt"] != mine["salt"] and theirs["key_check"] != mine["key_check"]
    a, b = open_checkpoint(scene["folder"]), registry.checkpoint("e-locked")
    assert all(a.read_bytes(n) == b.read_bytes(n) for n in a.tensors)
    # nothing in it names the seed or the key id
    raw = json.dumps(mine)
    for form in (f"{key.seed:x}", str(key.seed), key.seed.to_bytes(16, "little").hex(), key.key_id,
                 hashlib.sha256(key.material).hexdigest()[:16]):
        assert form not in raw

    # a sharded model: every shard carries the same value
    src = llama(tmp_path / "llama", shard="20KB")
    protect.protect(str(src), out_dir=tmp_path / "sharded", seed=3, shard_bytes=30_000)
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and len({json.dumps(stamp(s)) for s in shards}) == 1


def test_a_wrong_key_is_refused_on_every_route(scene, registry, tmp_path, zoo_cli):
    folder, wrong, near = scene["folder"], scene["wrong"], scene["near"]
    key_id = scene["key"].key_id
    # a registered protected model, with a key file or a wrong key the registry holds
    msg = refused(registry, tmp_path, "does not unlock e-locked@1", protect.unlock, "e-locked", "x",
                  registry=registry, key_file=wrong)
    assert f"locked with key {key_id}" in msg and "key check value does not match" in msg
    refused(registry, tmp_path, "does not unlock", protect.unlock, "e-locked", "x", registry=registry, key_file=near)
    stored = registry.key("e-locked")
    registry.set_key("e-locked", {**Key.new(1e3).to_dict(), "key_id": Key.new(1e3).key_id}, replace=True)
    refused(registry, tmp_path, "does not unlock e-locked@1", protect.unlock, "e-locked", "x", registry=registry)
    registry.set_key("e-locked", stored, replace=True)
    # an --out-dir folder, by path: no registry record at all
    refused(registry, tmp_path, f"does not unlock {folder}: ", protect.unlock, str(folder), out_dir=tmp_path / "x",
            key_file=wrong)
    assert not (tmp_path / "x").exists()
    # the folder added with `zoo add --kind protected`: the registry records no key id
    assert zoo_cli("--registry", registry.path, "add", folder, "--name", "p", "--kind", "protected")[0] == 0
    refused(registry, tmp_path, "does not unlock p@1", protect.unlock, "p", "x", registry=registry, key_file=wrong)
    # `zoo key import` of a wrong key is refused at import, for either model
    refused(registry, tmp_path, "does not belong to p@1", protect.import_key, registry, wrong, "p")
    refused(registry, tmp_path, "does not belong to e-locked@1", protect.import_key, registry, wrong, "e-locked",
            replace=True)
    # the command line: one line, exit status 1, nothing written
    same = Unchanged(registry, tmp_path)
    code, out, err = zoo_cli("--registry", registry.path, "unlock", "p", "--key", wrong, "--out", "x")
    assert code == 1 and err.count("\n") == 1 and "does not unlock p@1" in err and not out
    code, out, err = zoo_cli("--registry", registry.path, "unlock", folder, "--key", near, "--out-dir",
                             tmp_path / "x")
    assert code == 1 and err.count("\n") == 1 and "does not unlock" in err
    code, out, err = zoo_cli("--registry", registry.path, "key", "import", wrong, "--model", "p")
    assert code == 1 and err.count("\n") == 1 and "does not belong to p@1" in err
    same.check()
    # the right key is taken at import, and then unlocks from the registry (as a base: `zoo add` recorded none)
    assert protect.import_key(registry, scene["key_file"], "p") == {"model": "p@1", "key_id": key_id}
    got = protect.unlock("p", "p-back", registry=registry, kind="base")
    assert got["key_check"] == "the key check value in its files"


def test_a_model_that_was_never_protected_is_refused(scene, registry, tmp_path, zoo_cli):
    right = scene["key_file"]
    refused(registry, tmp_path, "e@1 " + NOT_PROTECTED, protect.unlock, "e", "x", registry=registry)
    refused(registry, tmp_path, NOT_PROTECTED, protect.unlock, str(scene["expert"]), out_dir=tmp_path / "x",
            key_file=right)
    # an unlocked model is not protected any more
    protect.unlock(str(scene["folder"]), out_dir=tmp_path / "back", key_file=right)
    assert METADATA_KEY not in read_safetensors_header(tmp_path / "back" / "model.safetensors")[1]
    refused(registry, tmp_path, NOT_PROTECTED, protect.unlock, str(tmp_path / "back"), out_dir=tmp_path / "x",
            key_file=right)
    # registered as protected though it is not, with nothing recording a key
    assert zoo_cli("--registry", registry.path, "add", scene["expert"], "--name", "fake", "--kind", "protected")[0] == 0
    refused(registry, tmp_path, "fake@1 carries no MergeLock metadata and nothing records its key id",
            protect.unlock, "fake", "x", registry=registry, key_file=right)
    refused(registry, tmp_path, "nothing records its key id", protect.import_key, registry, right, "fake")
    code, out, err = zoo_cli("--registry", registry.path, "unlock", "e", "--key", right, "--out", "x")
    assert code == 1 and err.count("\n") == 1 and "e@1 is not protected (no MergeLock metadata)" in err
    # protecting a protected folder again would lose its check value: refused
    refused(registry, tmp_path, "already protected", protect.protect, str(scene["folder"]), out_dir=tmp_path / "x")


def test_shards_that_disagree_or_a_mangled_stamp_are_refused(tmp_path):
    src = llama(tmp_path / "llama", shard="20KB")
    info = protect.protect(str(src), out_dir=tmp_path / "sharded", seed=3, shard_bytes=30_000)
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    restamp(shards[0], None)
    with pytest.raises(ZooError, match="shards carry different MergeLock metadata"):
        protect.unlock(str(tmp_path / "sharded"), out_dir=tmp_path / "x", key_file=info["key_file"])
    for s in shards:
        restamp(s, {"format": "pt", METADATA_KEY: "{not json"})
    with pytest.raises(ZooError, match="malformed MergeLock metadata"):
        protect.unlock(str(tmp_path / "sharded"), out_dir=tmp_path / "x", key_file=info["key_file"])
    for s in shards:
        restamp(s, {"format": "pt", METADATA_KEY: json.dumps({"algorithm": "mergelock", "version": 2})})
    with pytest.raises(ZooError, match="this zoo unlocks mergelock version 1"):
        protect.unlock(str(tmp_path / "sharded"), out_dir=tmp_path / "x", key_file=info["key_file"])
    assert not (tmp_path / "x").exists()


def test_models_protected_before_check_values(scene, registry, tmp_path, monkeypatch):
    """No metadata: the key id the registry recipe records decides, else the card's, else nothing unlocks."""
    import zoo.protect.lock as lock_mod

    right, wrong, key = scene["key_file"], scene["wrong"], scene["key"]
    monkeypatch.setattr(lock_mod.KeyCheck, "metadata", lambda self: None)  # an older zoo's plain headers
    protect.protect("e", "old-locked", registry=registry, seed=key.seed)
    monkeypatch.undo()
    assert METADATA_KEY not in read_safetensors_header(registry.model_dir("old-locked") / "model.safetensors")[1]
    msg = refused(registry, tmp_path, "does not unlock old-locked@1", protect.unlock, "old-locked", "x",
                  registry=registry, key_file=wrong)
    assert f"locked with key {key.key_id}" in msg and "the key id its registry recipe records" in msg
    refused(registry, tmp_path, "does not belong to old-locked@1", protect.import_key, registry, wrong, "old-locked",
            replace=True)
    got = protect.unlock("old-locked", "old-back", registry=registry)
    assert got["key_check"].startswith("the key id its registry recipe records")

    # a folder from an older zoo: its card names the key id
    old = tmp_path / "old-folder"
    shutil.copytree(scene["folder"], old)
    restamp(old / "model.safetensors", None)
    msg = refused(registry, tmp_path, f"does not unlock {old}", protect.unlock, str(old), out_dir=tmp_path / "x",
                  key_file=wrong)
    assert "the key id its model card records" in msg
    got = protect.unlock(str(old), out_dir=tmp_path / "old-folder-back", key_file=right)
    assert got["key_check"].startswith("the key id its model card records")
    # ... and without its card, nothing says it is protected
    (old / "README.md").unlink()
    refused(registry, tmp_path, NOT_PROTECTED, protect.unlock, str(old), out_dir=tmp_path / "x", key_file=right)
    a, b = open_checkpoint(registry.model_dir("old-back")), open_checkpoint(tmp_path / "old-folder-back")
    assert all(a.read_bytes(n) == b.read_bytes(n) for n in a.tensors)


@pytest.fixture
def hub_url(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from zoo import Registry
    from zoo.hub.server import ServeSettings, running
    from zoo.hub.accounts import Accounts

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what a zoo serve client sets
    monkeypatch.setenv("ZOO_HUB_TIMEOUT", "20")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "server").mkdir()
    reg = Registry(tmp_path / "server" / "registry.db", create=True)
    accounts = Accounts(reg)
    write = accounts.create_token("alice")["token"]
    accounts.add_org("team", ["alice"])
    with running(reg, ServeSettings()) as url:
        yield url, write
    reg.close()


def test_pulled_and_every_other_route_unlock_to_the_same_bytes(scene, registry, tmp_path, hub_url, zoo_cli):
    from zoo.hub.client import pull
    from zoo.publish import publish

    url, token = hub_url
    right, wrong = scene["key_file"], scene["wrong"]
    assert zoo_cli("--registry", registry.path, "add", scene["folder"], "--name", "p", "--kind", "protected")[0] == 0
    pushed = publish(registry, "p", "team/p", endpoint=url, token=token)  # already protected: pushed as it is
    assert pushed["pushed"] == "p@1" and not pushed["protected_now"]
    pull(registry, "team/p", endpoint=url, name="p-pulled")
    pulled = registry.show("p-pulled")
    assert pulled["kind"] == "protected" and registry.key("p-pulled") is None and not pulled.get("recipe")
    # a wrong key, given or imported, is refused for the pulled model too
    refused(registry, tmp_path, "does not unlock p-pulled@1", protect.unlock, "p-pulled", "x", registry=registry,
            key_file=wrong)
    refused(registry, tmp_path, "does not belong to p-pulled@1", protect.import_key, registry, wrong, "p-pulled")
    protect.import_key(registry, right, "p-pulled")

    # the right key: every route gives the same file
    outs = {
        "registered": protect.unlock("e-locked", "r1", registry=registry),
        "registered, key file": protect.unlock("e-locked", "r2", registry=registry, key_file=right),
        "folder": protect.unlock(str(scene["folder"]), out_dir=tmp_path / "r3", key_file=right),
        "zoo add": protect.unlock("p", "r4", registry=registry, key_file=right, kind="base"),
        "pulled, imported key": protect.unlock("p-pulled", "r5", registry=registry, kind="base"),
        "pulled, key file": protect.unlock("p-pulled", "r6", registry=registry, key_file=right, kind="base"),
    }
    assert outs["registered"]["unlock"]["compared_with"] == "e@1"
    assert outs["registered"]["unlock"]["max_rel_error"] < 1e-4
    files = {route: Path(o.get("path") or registry.model_dir(o["ref"])) / "model.safetensors"
             for route, o in outs.items()}
    assert len({sha(f) for f in files.values()}) == 1, {r: sha(f) for r, f in files.items()}
    # against the original: untouched tensors byte for byte, the transformed ones within rounding × cond
    orig, back = open_checkpoint(scene["expert"]), open_checkpoint(files["folder"].parent)
    roles = layout_for(orig).roles
    assert read_safetensors_header(files["folder"])[1] == {"format": "pt"}
    for n in orig.tensors:
        if n in roles:
            a, b = orig.read_tensor(n).double(), back.read_tensor(n).double()
            assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item(), n  # zero biases stay zero
        else:
            assert orig.read_bytes(n) == back.read_bytes(n), n
