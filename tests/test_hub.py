"""Hub pull and push, and ``zoo serve``: the real huggingface_hub client (and
transformers) against the server on a loopback port, with real registries on SQLite."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest
import torch

from conftest import db_dump, vit
from zoo import Registry
from zoo.errors import Conflict, HubError, NotFound, PushConflict, RepoNotFound, ZooError
from zoo.hub.client import pull, push_folder
from zoo.hub.git import DEFAULT_BRANCH, GITATTRIBUTES, git_blob_oid, is_lfs_oid, lfs_pointer
from zoo.hub.names import check_path, check_repo_id
from zoo.hub.server import ServeSettings, running
from zoo.hub.accounts import Accounts

LFS = 4096  # the tiny model's weights go through LFS, its config inline: both paths run
# The key seed of protections made at push. A random key can, rarely, push the tiny
# model's relative logit error past verification's 1e-4 gate and refuse the push; a
# 128-bit seed keeps the key unguessable in the bytes the key-material test searches.
SEED = 0x8F3A_61C2_D94E_07B5_2C18_E6A0_537D_B94F


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.parts}


class Hub:
    def __init__(self, url: str, registry: Registry, write: str, read: str, accounts: Accounts):
        self.url, self.registry, self.write, self.read, self.accounts = url, registry, write, read, accounts

    def api(self, token: str | None = "write"):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=self.write if token == "write" else token)


@pytest.fixture(autouse=True)
def hub_client_env(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what a zoo serve client sets
    monkeypatch.setenv("ZOO_HUB_TIMEOUT", "20")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def team(reg: Registry) -> tuple[Accounts, str, str]:
    """Users alice (a write token) and reader (a read token), both in the organisation `team`."""
    accounts = Accounts(reg)
    write = accounts.create_token("alice")["token"]
    read = accounts.create_token("reader", "read")["token"]
    accounts.add_org("team", ["alice", "reader"])
    return accounts, write, read


def _start(tmp_path: Path, open_reads: bool = True):
    (tmp_path / "server").mkdir()
    reg = Registry(tmp_path / "server" / "registry.db", create=True)
    accounts, write, read = team(reg)
    settings = ServeSettings(open_reads=open_reads, lfs_threshold=LFS)
    return reg, accounts, write, read, settings


@pytest.fixture
def hub(tmp_path):
    reg, accounts, write, read, settings = _start(tmp_path)
    with running(reg, settings) as url:
        yield Hub(url, reg, write, read, accounts)
    reg.close()


@pytest.fixture
def folder(tmp_path) -> Path:
    return vit(tmp_path / "src", 3, seed=5)


def test_git_facts_shared_by_client_and_server():
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # what `git hash-object` says
    assert git_blob_oid(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    digest = hashlib.sha256(b"x").hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize 1\n"
    assert lfs_pointer(digest, 1) == pointer.encode()
    assert is_lfs_oid(digest) and not any(map(is_lfs_oid, (digest.upper(), digest[:-1], digest + "\n", "")))
    assert GITATTRIBUTES.startswith(b"*.safetensors filter=lfs") and DEFAULT_BRANCH == "main"
    assert check_repo_id("team/model-1.0") == "team/model-1.0" and check_path("a/b.json") == "a/b.json"
    for bad in ("a/b/c", "team/x.git", "-x", "", "team/"):
        with pytest.raises(HubError, match="invalid repository id"):
            check_repo_id(bad)
    for bad in ("../x", "a//b", "/etc/passwd", ".git/config", "a\\b", "a/./b", "x\ny"):
        with pytest.raises(HubError) as err:
            check_path(bad)
        assert err.value.code == "InvalidPath" and err.value.status == 400


def test_hub_errors_live_with_the_other_errors():
    assert issubclass(HubError, ZooError) and issubclass(PushConflict, ZooError)
    assert (RepoNotFound("x").status, RepoNotFound("x").code) == (404, "RepoNotFound")
    assert (Conflict("x").status, Conflict("x").code) == (412, "Conflict")
    e = RepoNotFound("x", status=401)
    assert (e.status, e.code, str(e)) == (401, "RepoNotFound", "x") and RepoNotFound.status == 404


def test_the_client_loads_no_server_code(subprocess_env):
    """pull and push need the Git facts, not the server: no Starlette, no served repositories."""
    code = ("import sys, zoo.hub.client; "
            "print(sorted(m for m in sys.modules if m.startswith(('zoo.hub.server', 'zoo.hub.repos', 'starlette'))))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_push_then_pull_into_fresh_hf_home_is_byte_identical(hub, folder, tmp_path, registry):
    from huggingface_hub import snapshot_download

    api = hub.api()
    api.create_repo("team/tiny")
    first = api.model_info("team/tiny").sha
    info = api.upload_folder(folder_path=folder, repo_id="team/tiny", parent_commit=first, commit_message="v1")
    assert api.model_info("team/tiny").sha == info.oid != first
    files = {s.rfilename: s for s in api.model_info("team/tiny", files_metadata=True).siblings}
    assert files["model.safetensors"].lfs.sha256 == sha(folder / "model.safetensors")  # went through LFS
    assert files["config.json"].lfs is None
    assert files["config.json"].blob_id == git_blob_oid((folder / "config.json").read_bytes())

    got = snapshot_download("team/tiny", endpoint=hub.url, cache_dir=tmp_path / "fresh_hf_home" / "hub")
    assert tree_hashes(got) == {**tree_hashes(folder), ".gitattributes": tree_hashes(got)[".gitattributes"]}

    # zoo pull: registered with repo id and commit sha; the files are the pushed bytes
    out = pull(registry, "team/tiny", endpoint=hub.url)
    assert out["pulled"] and out["source"]["hub_repo"] == "team/tiny" and out["source"]["hub_revision"] == info.oid
    stored = {f["path"]: f["sha256"] for f in out["files"]}
    assert {k: v for k, v in stored.items() if k != "README.md"} == tree_hashes(folder)
    before = db_dump(registry.path)
    again = pull(registry, "team/tiny", endpoint=hub.url, name="other-name")
    assert not again["pulled"] and again["ref"] == out["ref"] and db_dump(registry.path) == before


def test_second_revision_and_pulling_the_first_sha(hub, folder, tmp_path, registry):
    from huggingface_hub import hf_hub_download, snapshot_download

    api = hub.api()
    api.create_repo("team/tiny")
    v1 = api.upload_folder(folder_path=folder, repo_id="team/tiny", commit_message="v1").oid
    old = tree_hashes(folder)
    vit(folder, 3, seed=6)  # new weights, same layout
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "note": "second"}))
    v2 = api.upload_folder(folder_path=folder, repo_id="team/tiny", commit_message="v2").oid
    assert v2 != v1 and api.model_info("team/tiny").sha == v2
    assert [c for c in (api.model_info("team/tiny", revision=v1).sha,)] == [v1]
    got = snapshot_download("team/tiny", revision=v1, endpoint=hub.url, cache_dir=tmp_path / "hf" / "hub")
    assert {k: v for k, v in tree_hashes(got).items() if k != ".gitattributes"} == old
    assert "second" in Path(hf_hub_download("team/tiny", "config.json", endpoint=hub.url,
                                            cache_dir=tmp_path / "hf" / "hub")).read_text()
    a = pull(registry, f"team/tiny@{v1}", endpoint=hub.url, name="tiny-v1")
    b = pull(registry, "team/tiny", endpoint=hub.url, name="tiny-v2")
    assert a["source"]["hub_revision"] == v1 and b["source"]["hub_revision"] == v2
    assert {f["path"]: f["sha256"] for f in a["files"]}["model.safetensors"] == old["model.safetensors"]
    with pytest.raises(ZooError, match="revision 'f{40}' not found|not found in team/tiny"):
        pull(registry, "team/tiny@" + "f" * 40, endpoint=hub.url, name="nope")


def test_writes_need_a_write_token(hub, folder, registry):
    from huggingface_hub.errors import HfHubHTTPError

    for token, status in ((False, 401), ("zoo_wrong", 401), (hub.read, 403)):
        with pytest.raises(HfHubHTTPError) as e:
            hub.api(token).create_repo("team/x")
        assert e.value.response.status_code == status
    hub.api().create_repo("team/x")
    head = hub.api().model_info("team/x").sha
    for token in (False, "zoo_wrong", hub.read):
        with pytest.raises(HfHubHTTPError):
            hub.api(token).upload_folder(folder_path=folder, repo_id="team/x")
    assert hub.api().model_info("team/x").sha == head  # nothing committed
    registry.add(folder, "m", "base")
    with pytest.raises(ZooError, match="refused the credentials"):
        push_folder(registry.model_dir("m"), "team/x", endpoint=hub.url, token="zoo_wrong")
    # reads are open, but a private repository is not found without a token
    hub.api().create_repo("team/secret", private=True)
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        hub.api(False).model_info("team/secret")
    assert hub.api(hub.read).model_info("team/secret").private


def test_private_reads_need_a_token(tmp_path, folder):
    from huggingface_hub.errors import RepositoryNotFoundError

    reg, _, write, read, settings = _start(tmp_path, open_reads=False)
    with running(reg, settings) as url:
        from huggingface_hub import HfApi

        HfApi(endpoint=url, token=write).create_repo("team/t")
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=url, token=False).model_info("team/t")
        r = httpx2.get(f"{url}/team/t/resolve/main/.gitattributes")
        assert r.status_code == 401 and r.headers["x-error-code"] == "RepoNotFound"
        assert HfApi(endpoint=url, token=read).model_info("team/t").sha


def _commit(hub: Hub, repo: str, lines: list[dict], token: str | None = None) -> httpx2.Response:
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return httpx2.post(f"{hub.url}/api/models/{repo}/commit/main", content=body,
                       headers={"Authorization": f"Bearer {token or hub.write}", "Content-Type": "application/x-ndjson"})


def test_path_traversal_and_forged_uploads_are_refused(hub, tmp_path):
    hub.api().create_repo("team/t")
    head = hub.api().model_info("team/t").sha
    blobs = set(hub.registry.store.all_digests())
    content = base64.b64encode(b"pwned").decode()
    for bad in ("../evil.txt", "a/../../evil.txt", "/etc/evil", ".git/config", "a//b", "./x", "a\\..\\b", "x\0y"):
        r = _commit(hub, "team/t", [{"key": "header", "value": {"summary": "s"}},
                                    {"key": "file", "value": {"path": bad, "content": content, "encoding": "base64"}}])
        assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidPath", bad
        assert "invalid file path" in r.json()["error"]
    assert hub.api().model_info("team/t").sha == head
    assert set(hub.registry.store.all_digests()) == blobs  # nothing staged was kept
    assert not list(tmp_path.rglob("evil.txt")) and not list(hub.registry.store.tmp.iterdir())
    # the client refuses such paths too, before sending anything
    from huggingface_hub import CommitOperationAdd

    with pytest.raises(ValueError):
        CommitOperationAdd(path_in_repo="a/../../evil.txt", path_or_fileobj=b"x")
    # an LFS upload URL must come from the batch API, signed and unexpired
    oid = hashlib.sha256(b"data").hexdigest()
    r = httpx2.put(f"{hub.url}/api/lfs-upload/{oid}?size=4&expires={int(time.time()) + 60}&sig=00", content=b"data")
    assert r.status_code == 403
    # a commit naming LFS content that was never uploaded is refused
    r = _commit(hub, "team/t", [{"key": "header", "value": {"summary": "s"}},
                                {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": oid,
                                                             "size": 4}}])
    assert r.status_code == 400 and "was not uploaded" in r.json()["error"]


def test_resolve_headers_etag_and_range(hub, folder):
    api = hub.api()
    api.create_repo("team/t")
    sha_ = api.upload_folder(folder_path=folder, repo_id="team/t").oid
    url = f"{hub.url}/team/t/resolve/main/model.safetensors"
    h = httpx2.head(url, headers={"Accept-Encoding": "identity"})
    assert h.status_code == 200 and h.headers["x-repo-commit"] == sha_
    assert h.headers["etag"] == f'"{sha(folder / "model.safetensors")}"'  # LFS files: their sha256
    assert int(h.headers["content-length"]) == (folder / "model.safetensors").stat().st_size
    c = httpx2.head(f"{hub.url}/team/t/resolve/{sha_}/config.json")
    assert c.headers["etag"] == f'"{git_blob_oid((folder / "config.json").read_bytes())}"'  # small files: git oid
    r = httpx2.get(url, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == (folder / "model.safetensors").read_bytes()[100:]
    missing = httpx2.head(f"{hub.url}/team/t/resolve/main/nope.bin")
    assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
    assert missing.headers["x-repo-commit"] == sha_
    assert httpx2.get(f"{hub.url}/api/models/team/none").headers["x-error-code"] == "RepoNotFound"
    assert httpx2.get(f"{hub.url}/api/models/team/t/revision/{'0' * 40}").headers["x-error-code"] == \
        "RevisionNotFound"


def test_invalid_card_metadata_is_refused_before_upload(hub, folder):
    hub.api().create_repo("team/t")
    head = hub.api().model_info("team/t").sha
    (folder / "README.md").write_text("---\n- just\n- a list\n---\n# card\n")
    with pytest.raises(ValueError, match="front matter must be a mapping"):
        hub.api().upload_folder(folder_path=folder, repo_id="team/t")
    assert hub.api().model_info("team/t").sha == head


def test_concurrent_pushes_on_one_parent_one_wins(hub, folder, tmp_path, registry, monkeypatch):
    """Both pushes read the same head, then commit at once: one lands, the other is told."""
    from huggingface_hub import HfApi, snapshot_download

    other = vit(tmp_path / "other", 3, seed=9)
    registry.add(folder, "a", "base")
    registry.add(other, "b", "base")
    hub.api().create_repo("team/race")
    start = hub.api().model_info("team/race").sha
    both_read = threading.Barrier(2, timeout=30)
    real = HfApi.model_info

    def model_info(self, *a, **kw):
        out = real(self, *a, **kw)
        if threading.current_thread().name.startswith("push-"):
            both_read.wait()
        return out

    monkeypatch.setattr(HfApi, "model_info", model_info)
    results: dict[str, object] = {}

    def push(name: str) -> None:
        try:
            results[name] = push_folder(registry.model_dir(name), "team/race", endpoint=hub.url, token=hub.write)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[name] = e

    threads = [threading.Thread(target=push, args=(n,), name=f"push-{n}") for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = {n: r for n, r in results.items() if isinstance(r, dict)}
    lost = {n: r for n, r in results.items() if not isinstance(r, dict)}
    assert len(won) == 1 and len(lost) == 1, results
    (winner, w), (loser, err) = next(iter(won.items())), next(iter(lost.items()))
    assert isinstance(err, PushConflict) and "nothing of this push was committed" in str(err)
    assert w["parent"] == start and hub.api().model_info("team/race").sha == w["commit"]
    got = snapshot_download("team/race", endpoint=hub.url, cache_dir=tmp_path / "hf" / "hub")
    src = folder if winner == "a" else other
    assert {k: v for k, v in tree_hashes(got).items() if k != ".gitattributes"} == tree_hashes(src)
    monkeypatch.setattr(HfApi, "model_info", real)
    again = push_folder(registry.model_dir(loser), "team/race", endpoint=hub.url, token=hub.write)
    assert again["parent"] == w["commit"]  # the loser pushes again, on top of the winner: nothing lost


def test_publish_protects_experts_by_default(hub, tiny, registry, tmp_path):
    from zoo.publish import publish

    registry.record_metric("e0", "t0", "accuracy", 0.75, split="test")
    out = publish(registry, "e0", "team/e0", endpoint=hub.url, token=hub.write, protect_seed=SEED)
    assert out["protected_now"] and out["kind"] == "protected" and out["pushed"] == "e0-locked@1"
    locked = registry.show("e0-locked")
    assert locked["kind"] == "protected" and registry.key("e0-locked") is not None
    got = Path(pull(registry, "team/e0", endpoint=hub.url, name="e0-back")["files"][0]["location"]).parent
    back = {f["path"]: f["sha256"] for f in registry.show("e0-back")["files"]}
    mine = {f["path"]: f["sha256"] for f in locked["files"]}
    expert = {f["path"]: f["sha256"] for f in registry.show("e0")["files"]}
    assert back["model.safetensors"] == mine["model.safetensors"] != expert["model.safetensors"]
    assert registry.show("e0-back")["kind"] == "protected"  # from the card's mergelock tag
    card = (registry.model_dir("e0-back") / "README.md").read_text()
    import yaml

    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["zoo", "mergelock"] and front["library_name"] == "transformers"
    assert front["base_model"] == ["base@1"] and front["base_model_relation"] == "finetune"
    assert "These weights are protected" in card and "| `e0@1` | t0 | accuracy | test | 75.0% |" in card
    assert "## Lineage" in card and "`e0-locked@1`: protected" in card and got.exists()
    # a second push reuses the protected copy: no new key, nothing to commit
    again = publish(registry, "e0", "team/e0", endpoint=hub.url, token=hub.write)
    assert not again["protected_now"] and again["unchanged"] and again["pushed"] == "e0-locked@1"
    # --no-protect pushes the expert's own bytes
    raw = publish(registry, "e0", "team/e0-raw", protect_weights=False, endpoint=hub.url, token=hub.write)
    assert raw["kind"] == "expert" and raw["pushed"] == "e0@1"
    files = {s.rfilename: s for s in hub.api().model_info("team/e0-raw", files_metadata=True).siblings}
    assert files["model.safetensors"].lfs.sha256 == expert["model.safetensors"]


def test_merge_card_lists_parents_and_recipe(hub, tiny, registry):
    import zoo.merge as merge
    import yaml

    from zoo.publish import publish

    merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": "base",
               "parameters": {"lambda": 0.5, "weight": 0.3},
               "models": [{"model": "e0"}, {"model": "e1"}]}), out="ta", registry=registry)
    publish(registry, "ta", "team/ta", endpoint=hub.url, token=hub.write, protect_seed=SEED)
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download("team/ta", "README.md", endpoint=hub.url, cache_dir=registry.path.parent / "hf")
                ).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["base@1", "e0@1", "e1@1"] and front["base_model_relation"] == "merge"
    assert front["tags"] == ["zoo", "merge", "mergelock"]
    assert "merge_method: task_arithmetic" in card and "`ta@1`: merged" in card
    # the protected merge keeps the experts' heads, and the pulled copy measures as the merge does
    from zoo.evaluate import evaluate

    pull(registry, "team/ta", endpoint=hub.url, name="ta-back")
    assert "task_heads.safetensors" in {f["path"] for f in registry.show("ta-back")["files"]}
    want = [r["value"] for r in evaluate(registry, "ta", ["t0", "t1"], record=False)]
    assert [r["value"] for r in evaluate(registry, "ta-back", ["t0", "t1"], record=False)] == want


def test_publish_refuses_what_it_cannot_protect(hub, registry, tmp_path, zoo_cli):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPTBigCodeConfig(vocab_size=99, n_embd=32, n_layer=1, n_head=4)  # a type MergeLock has no layout for
    T.GPTBigCodeForCausalLM(cfg).save_pretrained(tmp_path / "nb")
    T.GPTBigCodeForCausalLM(cfg).save_pretrained(tmp_path / "ne")
    registry.add(tmp_path / "nb", "nbase", "base")
    registry.add(tmp_path / "ne", "nexp", "expert", base="nbase")
    os.environ["HF_TOKEN"] = hub.write
    try:
        code, out, err = zoo_cli("--registry", registry.path, "push", "nexp", "team/nexp", "--endpoint", hub.url)
        assert code == 1 and err.count("\n") == 1 and "cannot protect nexp@1" in err and "--no-protect" in err
        from huggingface_hub.errors import RepositoryNotFoundError

        with pytest.raises(RepositoryNotFoundError):
            hub.api().model_info("team/nexp")  # refused before anything was created
        code, out, err = zoo_cli("--registry", registry.path, "push", "nexp", "team/nexp", "--endpoint", hub.url,
                                 "--no-protect", "--seed", "7")  # a key for a protection that is not made
        assert code == 1 and err.count("\n") == 1 and "--no-protect makes none" in err
        code, out, err = zoo_cli("--registry", registry.path, "push", "nexp", "team/nexp", "--endpoint", hub.url,
                                 "--no-protect")
        assert code == 0 and "pushed nexp@1 (unprotected" in out
    finally:
        del os.environ["HF_TOKEN"]


class RecordingProxy:
    """A loopback TCP proxy that keeps every byte the client sends."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_protected_push_uploads_no_key_material(hub, tiny, registry):
    from zoo.publish import publish

    proxy = RecordingProxy(hub.url)
    try:
        out = publish(registry, "e1", "team/e1", endpoint=proxy.url, token=hub.write, protect_seed=SEED)
    finally:
        proxy.close()
    key = registry.key(out["pushed"])
    seed = int(key["seed"], 16)
    sent = bytes(proxy.sent)
    weights = (registry.model_dir(out["pushed"]) / "model.safetensors").read_bytes()
    assert weights in sent  # the proxy saw the upload itself
    needles = [key["seed"], str(seed), seed.to_bytes(16, "big"), seed.to_bytes(16, "little"),
               json.dumps(key), base64.b64encode(seed.to_bytes(16, "big"))[:20]]
    key_files = list(registry.keys_dir.glob("*.key"))
    assert key_files
    needles += [p.read_bytes() for p in key_files]
    for n in needles:
        n = n.encode() if isinstance(n, str) else n
        assert n not in sent, n[:40]
    assert registry.key(out["pushed"])["seed"] == key["seed"]  # and the key is still here


def test_transformers_loads_a_pushed_model_from_the_server(hub, folder, tmp_path, subprocess_env):
    from transformers import ViTForImageClassification

    api = hub.api()
    api.create_repo("team/vit")
    api.upload_folder(folder_path=folder, repo_id="team/vit")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    want = ViTForImageClassification.from_pretrained(folder).eval()(pixel_values=x).logits
    script = (
        "import sys, torch\n"
        "from transformers import ViTForImageClassification\n"
        "m = ViTForImageClassification.from_pretrained('team/vit').eval()\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "torch.save(m(pixel_values=x).logits.detach(), sys.argv[2])\n"
    )
    env = {**subprocess_env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, want.detach())


def test_pull_refuses_pickles_and_checks_hashes(hub, folder, tmp_path, registry, monkeypatch):
    api = hub.api()
    api.create_repo("team/pickle")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "config.json").write_text("{}")
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    api.upload_folder(folder_path=tmp_path / "pk", repo_id="team/pickle")
    before = db_dump(registry.path)
    with pytest.raises(ZooError, match="no safetensors weights.*never loads pickle"):
        pull(registry, "team/pickle", endpoint=hub.url)
    # a repository with both: the pickle is never downloaded
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    api.create_repo("team/both")
    api.upload_folder(folder_path=folder, repo_id="team/both")
    out = pull(registry, "team/both", endpoint=hub.url)
    assert "pytorch_model.bin" not in {f["path"] for f in out["files"]}
    # a blob corrupted on the server: the pull fails and registers nothing
    api.create_repo("team/bad")
    api.upload_folder(folder_path=folder, repo_id="team/bad", allow_patterns=["*.json", "*.safetensors"])
    blob = hub.registry.store.path(sha(folder / "model.safetensors"))
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = db_dump(registry.path)
    with pytest.raises(ZooError, match="the server's copy is damaged"):  # zoo serve hashes what it sends
        pull(registry, "team/bad", endpoint=hub.url, name="bad")
    assert db_dump(registry.path) == before and not list(registry.store.tmp.iterdir())
    # a server that does not (as another Hub might): the client's own check refuses it
    from starlette.responses import FileResponse

    from zoo.hub.server import app

    monkeypatch.setattr(app, "VerifiedBlob", lambda path, sha, size, checks, what, headers, media_type:
                        FileResponse(path, headers=headers, media_type=media_type))
    monkeypatch.setattr(app.BlobChecks, "known", lambda *a: None)
    with pytest.raises(ZooError, match="does not match the hash"):
        pull(registry, "team/bad", endpoint=hub.url, name="bad")
    assert db_dump(registry.path) == before and not list(registry.store.tmp.iterdir())


def test_a_push_replaces_the_previous_model_files(hub, tmp_path, registry):
    """A sharded model, then a single-file one, into one repository: no stale shard remains."""
    from conftest import llama

    registry.add(llama(tmp_path / "sharded", shard="30KB"), "sharded", "base")
    registry.add(llama(tmp_path / "single", seed=1), "single", "base")
    first = push_folder(registry.model_dir("sharded"), "team/m", endpoint=hub.url, token=hub.write)
    files = set(hub.api().list_repo_files("team/m"))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 1
    hub.api().upload_file(path_or_fileobj=b"{}", path_in_repo="eval/results.json", repo_id="team/m")
    between = hub.api().model_info("team/m").sha
    second = push_folder(registry.model_dir("single"), "team/m", endpoint=hub.url, token=hub.write)
    assert second["parent"] == between
    assert set(hub.api().list_repo_files("team/m")) == {".gitattributes", "config.json", "generation_config.json",
                                                        "model.safetensors", "eval/results.json"}
    assert set(hub.api().list_repo_files("team/m", revision=first["commit"])) == files  # history kept
    again = push_folder(registry.model_dir("single"), "team/m", endpoint=hub.url, token=hub.write)
    assert again["unchanged"] and again["commit"] == second["commit"]  # nothing new: no commit


def test_removing_a_model_keeps_the_blobs_a_served_repo_uses(tmp_path, folder):
    reg = Registry(tmp_path / "shared.db", create=True)
    _, write, _ = team(reg)
    reg.add(folder, "m", "base")
    with running(reg, ServeSettings(lfs_threshold=LFS)) as url:
        push_folder(reg.model_dir("m"), "team/m", endpoint=url, token=write)
        reg.remove("m")
        out = pull(reg, "team/m", endpoint=url, name="m2")
    assert {f["path"]: f["sha256"] for f in out["files"] if f["path"] != "README.md"} == tree_hashes(folder)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_every_command_fails_clearly_when_the_endpoint_is_unreachable(registry, folder, tmp_path, subprocess_env):
    registry.add(folder, "m", "base")
    dead = f"http://127.0.0.1:{_closed_port()}"
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    mute = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {**subprocess_env, "ZOO_REGISTRY": str(registry.path), "ZOO_HUB_TIMEOUT": "3", "HF_TOKEN": "zoo_x",
           "HF_HOME": str(tmp_path / "hf")}
    try:
        for endpoint, said in ((dead, "cannot reach"), (mute, "did not answer in time")):
            for cmd in (["pull", "team/m"], ["push", "m", "team/m"]):
                t = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "zoo.cli.main", *cmd, "--endpoint", endpoint], env=env,
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 1 and r.stderr.count("\n") == 1, (cmd, r.stderr[-1500:])
                assert said in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
                assert time.monotonic() - t < 60
        # a pull that cannot reach its Hub leaves no new registry behind (here: none in the working folder)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        r = subprocess.run([sys.executable, "-m", "zoo.cli.main", "pull", "team/m", "--endpoint", dead],
                           env={k: v for k, v in env.items() if k != "ZOO_REGISTRY"}, cwd=fresh,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "cannot reach" in r.stderr and list(fresh.iterdir()) == [], r.stderr
        # serve: a port in use is one line too
        r = subprocess.run([sys.executable, "-m", "zoo.cli.main", "serve", "--port", str(silent.getsockname()[1])],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr and r.stderr.count("\n") == 1
    finally:
        silent.close()


def test_zoo_serve_command_with_cli_push_and_pull(tmp_path, subprocess_env, tiny, registry, zoo_cli):
    server_db = tmp_path / "srv" / "registry.db"
    server_db.parent.mkdir()
    env = {**subprocess_env, "ZOO_REGISTRY": str(server_db)}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # with its access log
    try:
        line = proc.stdout.readline()
        assert proc.poll() is None, proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        first = proc.stdout.readline()  # zero configuration: a first user, and its token shown once
        assert first.startswith("first run: added user ") and re.search(r"write token zoo_\S+", first)
        # a token and an organisation made while the server runs are used at once
        token = subprocess.run([sys.executable, "-m", "zoo.cli.main", "token", "create", "--user", "ci"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run([sys.executable, "-m", "zoo.cli.main", "org", "add", "team", "--member", "ci"], env=env,
                       capture_output=True, text=True, check=True)
        os.environ["HF_TOKEN"] = token
        said = []
        try:
            code, out, err = zoo_cli("--registry", registry.path, "push", "e2", "team/e2", "--endpoint", url,
                                     "--private")
            said += [out, err]
            assert code == 0 and "protected e2@1 as e2-locked@1" in out and "pushed e2-locked@1 (protected" in out
            code, out, err = zoo_cli("--registry", registry.path, "pull", "team/e2", "--endpoint", url,
                                     "--name", "e2-pulled", "--json")
            said += [out, err]
            assert code == 0 and json.loads(out)["kind"] == "protected"
            code, out, err = zoo_cli("--registry", registry.path, "pull", "team/e2", "--endpoint", url)
            said += [out, err]
            assert code == 0 and "nothing to do" in out
        finally:
            del os.environ["HF_TOKEN"]
        assert not any(token in x for x in said)
        # huggingface_hub's stored login is honoured: the repository is private, HF_TOKEN unset
        hf_home = tmp_path / "hf_home"
        hf_home.mkdir()
        (hf_home / "token").write_text(token)
        penv = {k: v for k, v in subprocess_env.items() if k != "HF_TOKEN"}
        penv.update(HF_HOME=str(hf_home), ZOO_REGISTRY=str(tmp_path / "other.db"))
        r = subprocess.run([sys.executable, "-m", "zoo.cli.main", "pull", "team/e2", "--endpoint", url], env=penv,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "pulled team/e2@" in r.stdout, r.stderr
        assert token not in r.stdout + r.stderr
        (hf_home / "token").unlink()
        r = subprocess.run([sys.executable, "-m", "zoo.cli.main", "pull", "team/e2", "--endpoint", url, "--name", "x"],
                           env=penv, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "not found" in r.stderr and "HF_TOKEN" in r.stderr
        assert token not in "".join(db_dump(registry.path)) and token not in "".join(db_dump(server_db))
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stdout.read() + proc.stderr.read()  # uvicorn's access log goes to stdout
    assert "GET /api/models/team/e2" in log and token not in log


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_every_write_route_needs_a_write_token(hub):
    hub.api().create_repo("team/t")
    oid = hashlib.sha256(b"x").hexdigest()
    routes = [
        ("POST", "/api/repos/create", {"json": {"name": "y", "organization": "team"}}),
        ("POST", "/api/models/team/t/preupload/main", {"json": {"files": [{"path": "a", "size": 1, "sample": ""}]}}),
        ("POST", "/team/t.git/info/lfs/objects/batch", {"json": {"operation": "upload",
                                                                  "objects": [{"oid": oid, "size": 1}]}}),
        ("POST", "/api/models/team/t/commit/main", {"content": json.dumps({"key": "header", "value": {"summary": "s"}})}),
    ]
    for token, status in ((None, 401), ("zoo_wrong", 401), (hub.read, 403)):
        for method, path, kw in routes:
            r = httpx2.request(method, hub.url + path, headers=_auth(token), **kw)
            assert r.status_code == status, (path, token, r.text)
    assert httpx2.get(f"{hub.url}/api/models/team/y").status_code == 404  # nothing was created


def test_upload_urls_are_bound_to_their_object_and_repository(hub):
    api = hub.api()
    api.create_repo("team/a")
    api.create_repo("team/b")
    data = os.urandom(5000)
    oid = hashlib.sha256(data).hexdigest()
    r = httpx2.post(f"{hub.url}/team/a.git/info/lfs/objects/batch", headers=_auth(hub.write),
                    json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    other = hashlib.sha256(b"other").hexdigest()
    for forged in (href.replace(oid, other), href.replace("size=5000", "size=5"),
                   href.replace("repo=team%2Fa", "repo=team%2Fb"),
                   href.split("&expires=")[0] + f"&expires={int(time.time()) - 1}&sig=" + href.split("sig=")[1]):
        assert httpx2.put(forged, content=data).status_code == 403, forged
    assert httpx2.put(href, content=data[:-1] + b"!").status_code == 400  # content must match the oid
    assert httpx2.put(href, content=data).status_code == 200
    line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    header = {"key": "header", "value": {"summary": "s"}}
    # repository b never received it: naming its oid is not enough
    r = _commit(hub, "team/b", [header, line])
    assert r.status_code == 400 and "was not uploaded to team/b" in r.json()["error"]
    assert _commit(hub, "team/a", [header, line]).status_code == 200
    # a blob the store holds for something else (a registered model, another repository) is not reachable
    hidden = os.urandom(3000)
    tmp = hub.registry.store.temp_path()
    tmp.write_bytes(hidden)
    h = hub.registry.store.adopt(tmp)[0]
    r = httpx2.post(f"{hub.url}/team/b.git/info/lfs/objects/batch", headers=_auth(hub.write),
                    json={"operation": "upload", "objects": [{"oid": h, "size": len(hidden)}]})
    assert "actions" in r.json()["objects"][0]  # asked to upload: the store's contents are not revealed
    r = _commit(hub, "team/b", [header, {"key": "lfsFile", "value": {"path": "h.bin", "oid": h}}])
    assert r.status_code == 400
    assert httpx2.get(f"{hub.url}/team/b/resolve/main/h.bin").status_code == 404


def test_malformed_requests_get_a_400_not_a_500(hub):
    hub.api().create_repo("team/t")
    head = hub.api().model_info("team/t").sha
    w = _auth(hub.write)
    bad = [
        ("/api/models/team/t/preupload/main", {"files": [{"path": "a", "size": "abc"}]}),
        ("/api/models/team/t/preupload/main", {"files": ["a"]}),
        ("/api/models/team/t/preupload/main", ["not", "an", "object"]),
        ("/team/t.git/info/lfs/objects/batch", {"operation": "upload", "objects": "x"}),
        ("/api/validate-yaml", {"content": "---\n: [\n---\n"}),
    ]
    for path, body in bad:
        r = httpx2.post(hub.url + path, headers=w, json=body)
        assert r.status_code == 400 and "x-error-code" in r.headers, (path, r.status_code, r.text)
    r = httpx2.post(f"{hub.url}/team/t.git/info/lfs/objects/batch", headers=w,
                    json={"operation": "upload", "objects": ["x"]})
    assert r.status_code == 200 and r.json()["objects"][0]["error"]["code"] == 422
    for lines in ([{"key": "header", "value": {"summary": "s", "parentCommit": 5}}],
                  [{"key": "header", "value": {"summary": "s"}}, {"key": "lfsFile", "value": {"path": "a", "oid": "0",
                                                                                               "size": "x"}}],
                  [{"key": "header", "value": {"summary": "s"}}, {"key": "nope", "value": {}}],
                  [{"key": "header", "value": "s"}]):
        r = _commit(hub, "team/t", lines)
        assert r.status_code == 400, (lines, r.text)
    r = httpx2.post(f"{hub.url}/api/models/team/t/commit/main", headers=w, content=b"{not json\n")
    assert r.status_code == 400
    r = httpx2.post(f"{hub.url}/api/validate-yaml", json={"content": "---\na: b\n---\n" + "x" * (2 << 20)})
    assert r.status_code == 413
    assert httpx2.get(f"{hub.url}/api/models/team/t/discussions").status_code == 501
    assert hub.api().model_info("team/t").sha == head


def test_an_upload_that_cannot_be_written_fails_cleanly(hub, monkeypatch):
    import errno

    import zoo.hub.server.uploads as hs

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hs, "datasync", full)
    hub.api().create_repo("team/t")
    data = os.urandom(1 << 20)
    oid = hashlib.sha256(data).hexdigest()
    r = httpx2.post(f"{hub.url}/team/t.git/info/lfs/objects/batch", headers=_auth(hub.write),
                    json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    t = time.monotonic()
    r = httpx2.put(r.json()["objects"][0]["actions"]["upload"]["href"], content=data, timeout=30)
    assert r.status_code == 507 and r.headers["x-error-code"] == "InsufficientStorage"
    assert time.monotonic() - t < 20
    assert not [t for t in threading.enumerate() if t.name.endswith("(writer)")]  # the writer thread ended
    assert not hub.registry.store.has(oid) and not list(hub.registry.store.tmp.iterdir())


def test_a_hugging_face_token_is_not_sent_over_plain_http(hub, folder, registry, monkeypatch):
    hub.api().create_repo("team/t")
    hub.api().upload_folder(folder_path=folder, repo_id="team/t")
    proxy = RecordingProxy(hub.url)
    try:
        monkeypatch.setenv("HF_TOKEN", "hf_not_for_this_server_0123456789")
        pull(registry, "team/t", endpoint=proxy.url, name="a")
        assert b"hf_not_for_this_server" not in bytes(proxy.sent) and bytes(proxy.sent)
        monkeypatch.setenv("HF_TOKEN", hub.read)  # this server's own token is sent
        assert not pull(registry, "team/t", endpoint=proxy.url, name="b")["pulled"]  # (same commit: no-op)
        assert hub.read.encode() in bytes(proxy.sent)
        from zoo.hub.client import token_for

        assert token_for(proxy.url, None) is None and token_for("https://hub.example", None) is None
        monkeypatch.setenv("HF_TOKEN", "hf_x")
        assert token_for(proxy.url, None) is False and token_for("https://hub.example", None) is None
        assert token_for(proxy.url, "hf_explicit") == "hf_explicit"
    finally:
        proxy.close()


def test_gc_removes_only_blobs_nothing_uses(hub, folder, tiny, registry, zoo_cli):
    """An upload never committed is collected; everything a model, task, repository or
    recipe uses stays, and so does a blob younger than the cut-off."""
    import zoo.merge as merge

    merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 0.3},
                               "models": [{"model": "e0"}, {"model": "e1"}]}), out="ta", registry=registry)
    hub.api().create_repo("team/t")
    hub.api().upload_folder(folder_path=folder, repo_id="team/t")
    orphan = os.urandom(5000)
    oid = hashlib.sha256(orphan).hexdigest()
    r = httpx2.post(f"{hub.url}/team/t.git/info/lfs/objects/batch", headers=_auth(hub.write),
                    json={"operation": "upload", "objects": [{"oid": oid, "size": len(orphan)}]})
    assert httpx2.put(r.json()["objects"][0]["actions"]["upload"]["href"], content=orphan).status_code == 200
    server = hub.registry
    kept = server.store.all_digests() - {oid}
    assert server.collect()["blobs_removed"] == 0 and server.store.has(oid)  # too young
    assert server.collect(older_than=0) == {"blobs_removed": 1, "folders_removed": 0, "bytes_freed": len(orphan)}
    assert server.store.all_digests() == kept
    from huggingface_hub import snapshot_download

    snapshot_download("team/t", endpoint=hub.url, cache_dir=registry.path.parent / "hf")  # still whole
    # the client registry: models, task data and learned/merge artifacts all in use
    before = registry.store.all_digests()
    code, out, _ = zoo_cli("--registry", registry.path, "gc", "--older-than", "0", "--json")
    assert code == 0 and json.loads(out)["blobs_removed"] == 0 and registry.store.all_digests() == before
