"""`zoo serve` for a team: users, organisations, tokens and who may do what, through the
stock huggingface_hub client and `hf` CLI, with two users, an organisation, private
repositories and read tokens; and every byte served checked against its hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from tests.conftest import db_dump, store_listing
from tests.test_hub import LFS, SEED as PROTECT_SEED, _auth
from zoo.errors import ZooError
from zoo.hub.accounts import Accounts
from zoo.hub.server import ServeSettings, running
from zoo.registry import Registry


@pytest.fixture(autouse=True)
def hub_client_env(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what a zoo serve client sets
    monkeypatch.setenv("ZOO_HUB_TIMEOUT", "20")
    monkeypatch.delenv("HF_TOKEN", raising=False)


class Team:
    """alice and bob (write tokens), carol (a read token); alice and carol are in `lab`."""

    def __init__(self, url: str, reg: Registry, tokens: dict[str, str]):
        self.url, self.registry, self.tokens = url, reg, tokens

    def api(self, who: str | None):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=self.tokens[who] if who else False)


@pytest.fixture
def team(tmp_path):
    (tmp_path / "server").mkdir()
    reg = Registry(tmp_path / "server" / "registry.db", create=True)
    acc = Accounts(reg)
    tokens = {"alice": acc.create_token("alice")["token"], "bob": acc.create_token("bob")["token"],
              "bob-read": acc.create_token("bob", "read")["token"], "carol": acc.create_token("carol", "read")["token"]}
    acc.add_org("lab", ["alice", "carol"])
    with running(reg, ServeSettings(lfs_threshold=LFS)) as url:
        yield Team(url, reg, tokens)
    reg.close()


def _status(call) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:
        call()
    return e.value.response.status_code


def test_tokens_are_kept_hashed_and_belong_to_users(tmp_path):
    reg = Registry(tmp_path / "r.db", create=True)
    acc = Accounts(reg)
    made = acc.create_token("alice")
    tok = made["token"]
    assert tok.startswith("zoo_") and made["user_created"] and made["id"].startswith("tok_")
    dump = "".join(db_dump(reg.path))
    assert tok not in dump and hashlib.sha256(tok.encode()).hexdigest() in dump
    holder = acc.check(tok)
    assert (holder.user, holder.scope, holder.can_write, holder.orgs) == ("alice", "write", True, ())
    assert acc.check(tok + "x") is None and acc.check(None) is None and acc.check("") is None
    second = acc.create_token("alice", "read")  # a user may hold several tokens
    assert not second["user_created"] and not acc.check(second["token"]).can_write
    assert [t["id"] for t in acc.tokens("alice")] == [second["id"], made["id"]]
    assert all("token" not in t for t in acc.tokens())  # listings never show a token
    acc.revoke(made["id"])
    assert acc.check(tok) is None and [t["id"] for t in acc.tokens()] == [second["id"]]
    assert acc.tokens(revoked=True)[-1]["revoked_at"]
    with pytest.raises(ZooError, match="unknown scope"):
        acc.create_token("alice", "admin")
    with pytest.raises(ZooError, match="invalid user name"):
        acc.create_token("a/b")
    acc.add_org("lab", ["alice"])
    assert acc.check(second["token"]).orgs == ("lab",)
    with pytest.raises(ZooError, match="already an organisation"):
        acc.add_user("LAB")  # namespaces are one or the other, whatever the case
    with pytest.raises(ZooError, match="no user named 'ghost'"):
        acc.add_org("lab2", ["alice", "ghost"])
    assert not any(a["name"] == "lab2" for a in acc.accounts())  # one transaction: nothing of it kept
    acc.remove_member("lab", "alice")
    assert acc.check(second["token"]).orgs == ()


def test_write_tokens_write_only_to_their_namespaces(team, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hi")
    alice, bob = team.api("alice"), team.api("bob")
    assert alice.create_repo("alice/x").repo_id == "alice/x"
    assert alice.create_repo("lab/y").repo_id == "lab/y"  # an organisation of hers
    assert alice.create_repo("plain").repo_id == "alice/plain"  # no namespace: the user's own, as on the Hub
    assert _status(lambda: bob.create_repo("alice/b")) == 403
    assert _status(lambda: bob.create_repo("lab/b")) == 403
    assert _status(lambda: team.api("bob-read").create_repo("bob/r")) == 403
    bob.create_repo("bob/z")
    for repo in ("alice/x", "lab/y"):
        head = alice.model_info(repo).sha
        assert _status(lambda: bob.upload_file(path_or_fileobj=f, path_in_repo="a.txt", repo_id=repo)) == 403
        assert _status(lambda: bob.delete_file(".gitattributes", repo_id=repo)) == 403
        assert _status(lambda: team.api("carol").upload_file(path_or_fileobj=f, path_in_repo="a.txt",
                                                             repo_id=repo)) == 403
        assert alice.model_info(repo).sha == head  # nothing committed
    alice.upload_file(path_or_fileobj=f, path_in_repo="a.txt", repo_id="lab/y")
    # raw LFS batch and preupload of another's repository: refused too
    for path, body in ((f"/bob/z.git/info/lfs/objects/batch", {"operation": "upload", "objects": []}),
                       ("/api/models/bob/z/preupload/main", {"files": []})):
        r = httpx2.post(team.url + path, json=body, headers=_auth(team.tokens["alice"]))
        assert r.status_code == 403 and "may not write to bob/z" in r.headers["x-error-message"]
    # each commit records its author and date, shown through the API
    commits = alice.list_repo_commits("lab/y")
    assert [c.authors for c in commits] == [["alice"], ["alice"]] and all(c.created_at for c in commits)
    assert [c.authors for c in bob.list_repo_commits("bob/z")] == [["bob"]]


def test_private_repositories_are_invisible_to_everyone_else(team):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    alice = team.api("alice")
    alice.create_repo("alice/secret", private=True)
    alice.create_repo("lab/inner", private=True)
    alice.create_repo("alice/open")
    # bob (either token) and anonymous readers: exactly what a missing repository gets
    for who in ("bob", "bob-read", None):
        api = team.api(who)
        for repo in ("alice/secret", "lab/inner", "alice/missing"):
            with pytest.raises(RepositoryNotFoundError):
                api.model_info(repo)
            with pytest.raises(RepositoryNotFoundError):
                hf_hub_download(repo, ".gitattributes", endpoint=team.url, token=team.tokens[who] if who else False,
                                cache_dir=team.registry.path.parent / f"hf-{who}")
        seen = {m.id for m in api.list_models()}
        assert "alice/open" in seen and not seen & {"alice/secret", "lab/inner"}
    answers = []
    for repo in ("alice/secret", "alice/missing"):
        for route in (f"/api/models/{repo}", f"/{repo}/resolve/main/.gitattributes", f"/api/models/{repo}/tree/main"):
            r = httpx2.get(team.url + route, headers=_auth(team.tokens["bob"]))
            answers.append((r.status_code, r.headers["x-error-code"],
                            r.headers["x-error-message"].replace(repo, "REPO")))
    assert answers[:3] == answers[3:] and answers[0][0] == 404  # same status, code and words
    # bob may not even learn by writing that it exists
    r = httpx2.post(team.url + "/api/models/alice/secret/preupload/main", json={"files": []},
                    headers=_auth(team.tokens["bob"]))
    assert r.status_code == 404
    # carol (a read token in lab) reads lab's private repository, not alice's own
    carol = team.api("carol")
    assert carol.model_info("lab/inner").private
    with pytest.raises(RepositoryNotFoundError):
        carol.model_info("alice/secret")
    assert {m.id for m in carol.list_models()} >= {"lab/inner", "alice/open"}
    assert "alice/secret" in {m.id for m in alice.list_models()}


def test_whoami_lists_organisations_for_the_client_and_hf_cli(team, tmp_path, subprocess_env):
    who = team.api("alice").whoami()
    assert who["name"] == "alice" and [o["name"] for o in who["orgs"]] == ["lab"]
    assert who["auth"]["accessToken"]["role"] == "write"
    assert team.api("carol").whoami()["auth"]["accessToken"]["role"] == "read"
    env = {**subprocess_env, "HF_ENDPOINT": team.url, "HF_TOKEN": team.tokens["alice"],
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    hf = Path(sys.executable).parent / "hf"
    r = subprocess.run([str(hf), "auth", "whoami"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "alice" in r.stdout and "lab" in r.stdout, r.stdout + r.stderr


def test_revoking_a_token_or_a_membership_takes_effect_at_once(team, tmp_path, zoo_cli):
    alice = team.api("alice")
    alice.create_repo("lab/r")
    acc = Accounts(team.registry)
    acc.remove_member("lab", "alice")
    assert _status(lambda: alice.create_repo("lab/r2")) == 403
    acc.add_member("lab", "alice")
    alice.create_repo("lab/r2")
    token_id = next(t["id"] for t in acc.tokens("alice"))
    code, out, _ = zoo_cli("--registry", team.registry.path, "token", "revoke", token_id)
    assert code == 0 and f"revoked write token {token_id} of alice" in out
    assert _status(lambda: alice.create_repo("lab/r3")) == 401


def test_admin_commands(tmp_path, zoo_cli):
    reg = tmp_path / "srv.db"
    code, out, err = zoo_cli("--registry", reg, "token", "create", "--user", "dana", "--json")
    made = json.loads(out)
    assert code == 0 and made["user"] == "dana" and made["user_created"] and made["token"].startswith("zoo_")
    assert zoo_cli("--registry", reg, "user", "add", "erin")[0] == 0
    code, out, _ = zoo_cli("--registry", reg, "org", "add", "ops", "--member", "dana", "--member", "erin")
    assert code == 0 and "added organisation ops; members: dana, erin" in out
    code, out, _ = zoo_cli("--registry", reg, "org", "remove-member", "ops", "erin")
    assert code == 0
    code, out, _ = zoo_cli("--registry", reg, "user", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["ops"]["members"] == ["dana"] and rows["dana"]["orgs"] == ["ops"] and rows["dana"]["tokens"] == 1
    code, out, _ = zoo_cli("--registry", reg, "token", "list")
    assert code == 0 and made["id"] in out and made["token"] not in out and "dana" in out
    code, out, err = zoo_cli("--registry", reg, "org", "add-member", "ops", "ghost")
    assert code == 1 and "no user named 'ghost'" in err


def test_an_older_token_file_is_adopted_once(tmp_path):
    from zoo.hub.server.startup import open_accounts

    reg = Registry(tmp_path / "registry.db", create=True)
    token = "zoo_" + "x" * 43
    (tmp_path / "registry.tokens").write_text(f"ci\twrite\t{hashlib.sha256(token.encode()).hexdigest()}\n")
    said = open_accounts(reg, reg.path)
    assert said[0].startswith("adopted 1 token(s)") and len(said) == 1  # accounts exist: no first user
    assert Accounts(reg).check(token).user == "ci"
    assert not (tmp_path / "registry.tokens").exists() and (tmp_path / "registry.tokens.imported").exists()
    assert open_accounts(reg, reg.path) == []
    bad = tmp_path / "b"
    bad.mkdir()
    reg2 = Registry(bad / "registry.db", create=True)
    (bad / "registry.tokens").write_bytes(b"\xff garbage\n")
    before = db_dump(reg2.path)
    with pytest.raises(ZooError, match="is not a token file"):
        open_accounts(reg2, reg2.path)
    assert db_dump(reg2.path) == before and (bad / "registry.tokens").exists()


def test_a_refused_push_protects_nothing_and_leaves_nothing(team, tiny, registry, zoo_cli, monkeypatch):
    team.api("alice").create_repo("lab/e0")
    before = (db_dump(registry.path), store_listing(registry.path))
    for who, said in (("bob", r"bob may not push to lab/e0"), ("carol", r"read-only"),
                      (None, r"needs a token|refused the credentials")):
        if who:
            monkeypatch.setenv("HF_TOKEN", team.tokens[who])
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        code, out, err = zoo_cli("--registry", registry.path, "push", "e0", "lab/e0", "--endpoint", team.url)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        import re

        assert re.search(said, err), err
    assert (db_dump(registry.path), store_listing(registry.path)) == before  # no e0-locked, no key
    monkeypatch.setenv("HF_TOKEN", team.tokens["alice"])
    # a seeded key: the protection's verification gate is then the same on every run
    code, out, err = zoo_cli("--registry", registry.path, "push", "e0", "lab/e0", "--endpoint", team.url,
                             "--seed", str(PROTECT_SEED))
    assert code == 0 and "pushed e0-locked@1" in out, err
    assert Registry(registry.path).key("e0-locked")["seed"] == f"{PROTECT_SEED:x}"  # the key push made


def test_a_damaged_blob_is_never_served_as_whole(team, tmp_path, zoo_cli):
    from huggingface_hub import hf_hub_download

    alice = team.api("alice")
    alice.create_repo("alice/m")
    big = tmp_path / "w.bin"
    big.write_bytes(bytes(range(256)) * 20_000)  # 5 MB: LFS here, and several chunks on the wire
    alice.upload_file(path_or_fileobj=big, path_in_repo="w.safetensors", repo_id="alice/m")
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    code, out, _ = zoo_cli("--registry", team.registry.path, "verify")
    assert code == 0
    blob = team.registry.store.path(sha)
    blob.chmod(0o644)
    with open(blob, "r+b") as f:  # one flipped byte, the size unchanged
        f.seek(3_000_000)
        b = f.read(1)
        f.seek(3_000_000)
        f.write(bytes([b[0] ^ 1]))
    from huggingface_hub.errors import HfHubHTTPError

    # the first GET is hashed on the way and cut short of its length at the end
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(f"{team.url}/alice/m/resolve/main/w.safetensors")
    # from then on it is refused with the reason, before a byte is sent
    with pytest.raises(HfHubHTTPError, match="the server's copy is damaged"):
        hf_hub_download("alice/m", "w.safetensors", endpoint=team.url, token=team.tokens["alice"],
                        cache_dir=tmp_path / "hf")
    got = list((tmp_path / "hf").rglob("w.safetensors"))
    assert not [p for p in got if p.is_file()]  # nothing kept as if it were the file
    # once found bad, it is refused before a byte is sent, ranges included
    for headers in ({}, {"Range": "bytes=10-20"}):
        r = httpx2.get(f"{team.url}/alice/m/resolve/main/w.safetensors", headers=headers)
        assert r.status_code == 500 and r.headers["x-error-code"] == "CorruptBlob"
    code, out, _ = zoo_cli("--registry", team.registry.path, "verify", "--json")
    problems = json.loads(out)
    assert code == 1 and problems == [{"model": "hub:alice/m", "file": "w.safetensors", "path": str(blob),
                                       "problem": "changed", "expected": sha, "actual": problems[0]["actual"]}]
