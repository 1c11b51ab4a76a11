"""Names and input bounds of ``zoo serve``: which repository ids and file paths it refuses,
and requests it answers with a 400 instead of a 500, a stall or no reply at all.

The real huggingface_hub client against the server on a loopback port (the ``hub``
fixture of test_hub.py), and raw HTTP for what that client never sends. After each
refusal the store's temp folder is empty, nothing was committed, and the server still
answers; no request leaves a traceback in the server's log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import threading
import unicodedata
from pathlib import Path

import httpx2
import pytest

from test_hub import Hub, _commit, hub, hub_client_env  # noqa: F401  (fixtures, reused)
from zoo import Registry
from zoo.errors import HubError, ZooError
from zoo.hub import names
from zoo.hub.client import pull, push_folder
from zoo.hub.names import (API_PREFIXES, API_VERBS, RESERVED, casefold_key, check_case_unique, check_new_repo_id,
                           check_path, check_repo_id)

ROOT = Path(__file__).resolve().parent.parent

# The names issue 17 found accepted, then the rest of what a Windows or macOS client cannot hold.
ISSUE_PATHS = ["C:x", "a" * 300 + ".json", "w\x85.json", "w\x9b.json", "model\u202etxt.json"]
CLIENT_PATHS = ISSUE_PATHS + [
    "sub/C:/x.json", "a:b", "CON", "con.json", "Nul.tar.gz", "aux", "PRN.txt", "COM1", "com9.bin", "LPT1",
    "lpt5.json", "COM\u00b9", "a/CON/b.json", "x<y", "x>y", 'x"y', "x|y", "x?y", "x*y", "dot.", "space ",
    "folder./x", "x\x7f", "x\x1b", "x\u200e", "x\u200f", "x\u061c", "x\u202a", "x\u202b", "x\u202c", "x\u202d",
    "x\u2066", "x\u2067", "x\u2068", "x\u2069", "d/" + "é" * 128, "/".join(["d" * 200] * 6), ".GIT/config",
    "x/.Git/y",
]
# What the client itself rewrites or refuses, so only raw HTTP sends it.
RAW_PATHS = ["", ".", "..", "a/..", "./x", "/x", "a//b", "a/", ".git/config", ".cache/x", ".cache/huggingface/x",
             "a\\b", "x\0y", "x\ny", "\ud800x"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records
                if r.exc_info or "Traceback" in r.getMessage() or "Exception in ASGI" in r.getMessage()]


@pytest.fixture
def server_log(hub):
    """What the server logs at WARNING and above (uvicorn's loggers do not propagate)."""
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "zoo.serve", "starlette")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)
    assert handler.tracebacks() == []


@pytest.fixture
def repo(hub) -> str:
    hub.api().create_repo("team/t")
    return "team/t"


def temp_files(hub: Hub) -> list[Path]:
    tmp = hub.registry.store.tmp
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def settled(hub: Hub, repo: str = "team/t", head: str | None = None) -> None:
    """The store keeps no temp file, the server answers, and the branch did not move."""
    assert temp_files(hub) == []
    sha = hub.api().model_info(repo).sha
    assert head is None or sha == head


def raw_request(hub: Hub, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (no client would), and read the status line and the reply."""
    host, port = hub.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "the server sent no reply at all"
    return int(data.split(b" ", 2)[1]), data


def _file_line(path: str, data: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "s"}}


# -- the validator ------------------------------------------------------------------------------
def test_the_validator_itself():
    for good in ("gpt2", "team/model-1.0", "Team_1/x.y_z", "_a/b_", "a" * 96, "a/" + "b" * 96, "team/models",
                 "team/resolve", "team/info"):
        assert check_repo_id(good) == good == check_new_repo_id(good)
    for bad, why in [("", "empty"), ("a/b/c", "one '/'"), ("team/", "empty"), ("/x", "empty"),
                     ("-x", "start or end"), ("x-", "start or end"), (".x", "start or end"), ("x.", "start or end"),
                     ("team/x.git", ".git"), ("x.GIT/y", ".git"), ("a--b", "'--'"), ("a..b", "'..'"),
                     ("a" * 97, "97 characters"), ("a b", "letters"), ("café/x", "letters"), ("x\0", "letters")]:
        with pytest.raises(HubError, match=f"invalid repository id .*{re.escape(why)}"):
            check_repo_id(bad)
    for word in sorted(RESERVED):
        for rid in (f"team/{word}", f"{word}/x", word, f"team/{word.upper()}"):
            with pytest.raises(HubError, match="reserved word"):
                check_new_repo_id(rid)
        check_repo_id(f"team/{word}")  # a lookup only checks the form: such a repo may exist elsewhere

    for good in ("README.md", "a/b.json", "sub/dir/model.safetensors", ".gitattributes", "é/ü.txt", "a" * 255,
                 "CONSOLE.txt", "com10", "x.CON", "a b/c d.txt", "日本語.json", "d/" + "é" * 127):
        assert check_path(good) == good
    for bad in CLIENT_PATHS + RAW_PATHS:
        with pytest.raises(HubError, match="invalid file path") as err:
            check_path(bad)
        assert err.value.code == "InvalidPath" and err.value.status == 400
        message = str(err.value)
        assert "\n" not in message and "rename it" in message and len(message) < 300, message
    for bad, why in [("C:x", "drive"), ("a" * 300, "300 bytes"), ("w\x85", "U+0085"), ("x\u202e", "U+202E"),
                     ("NUL.txt", "device name"), ("dot.", "dot or a space"), ("a/../b", "'..'"), ("a\\b", "'\\'"),
                     ("/".join(["d" * 200] * 6), "1205 bytes")]:
        with pytest.raises(HubError, match=re.escape(why)):
            check_path(bad)

    nfd = unicodedata.normalize("NFD", "Résumé.md")
    assert nfd != "Résumé.md" and casefold_key(nfd) == casefold_key("RÉSUMÉ.MD") == casefold_key("résumé.md")
    assert casefold_key("Straße") == casefold_key("STRASSE")
    check_case_unique(["a/x", "b"], ["a/y", "c"])
    for tree, new in ((["README.md"], ["readme.md"]), (["A/x"], ["a/y"]), ([], ["a", "A/x"]), ([nfd], ["résumé.md"])):
        with pytest.raises(HubError, match="differ only in case"):
            check_case_unique(tree, new)
    check_case_unique(["x", "X"], ["y"])  # an older commit's clash is not this commit's fault


# -- repository ids ----------------------------------------------------------------------------
def test_repository_ids_are_unique_regardless_of_case(hub, server_log):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = hub.api()
    api.create_repo("alice/t1")
    for other in ("ALICE/T1", "Alice/t1", "alice/T1"):
        with pytest.raises(HfHubHTTPError) as e:
            api.create_repo(other)
        assert e.value.response.status_code == 409 and "alice/t1" in e.value.server_message
        assert api.create_repo(other, exist_ok=True).endswith("/alice/t1")  # the one that exists
        with pytest.raises(RepositoryNotFoundError):  # lookups stay exact
            api.model_info(other)
    assert [m.id for m in api.list_models()] == ["alice/t1"]

    # two creations racing: the check is in the transaction that inserts, so one wins
    results: list[int] = []

    def create(rid: str) -> None:
        r = httpx2.post(f"{hub.url}/api/repos/create", json={"organization": rid.split("/")[0],
                                                             "name": rid.split("/")[1]},
                        headers={"Authorization": f"Bearer {hub.write}"}, timeout=20)
        results.append(r.status_code)

    threads = [threading.Thread(target=create, args=(rid,)) for rid in ("alice/Model", "ALICE/model", "alice/MODEL")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 409, 409]
    assert len([m for m in api.list_models() if m.id.lower() == "alice/model"]) == 1
    assert temp_files(hub) == []


def test_reserved_words_are_refused_at_creation(hub, server_log):
    from huggingface_hub.errors import HfHubHTTPError

    api = hub.api()
    for word in sorted(RESERVED):
        for rid in (f"team/{word}", f"{word}/x", f"team/{word.upper()}"):
            with pytest.raises(HfHubHTTPError) as e:
                api.create_repo(rid)
            assert e.value.response.status_code == 400, rid
            assert "reserved word" in e.value.server_message and word in e.value.server_message.lower()
    assert list(api.list_models()) == []
    assert temp_files(hub) == []


def test_every_reserved_word_really_collides(hub, monkeypatch, tmp_path):
    """Without the reserved list, each word makes a repository the routes misread."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from zoo.hub.server.app import KEYWORDS, UNSUPPORTED

    assert KEYWORDS | UNSUPPORTED <= API_VERBS  # every verb the routes know is reserved
    monkeypatch.setattr(names, "RESERVED", frozenset())
    for ns in ("api", "datasets", "spaces"):  # namespaces of alice's, as far as ownership goes
        hub.accounts.add_org(ns, ["alice"])

    def create(rid: str) -> None:  # raw: the client cannot even parse the URL of some of them
        ns, name = rid.split("/")
        r = httpx2.post(f"{hub.url}/api/repos/create", json={"organization": ns, "name": name},
                        headers={"Authorization": f"Bearer {hub.write}"})
        assert r.status_code == 200 and rid in r.text, r.text

    api = hub.api()
    create("team/plain")
    assert api.model_info("team/plain").id == "team/plain"  # the control: an ordinary name reads back
    for word in sorted(API_VERBS):  # /api/models/team/WORD is repository "team" and verb WORD
        create(f"team/{word}")
        with pytest.raises(HfHubHTTPError):
            api.model_info(f"team/{word}")
    # /api/models/resolve/main/F: the repository api/models resolves into the API
    create("api/models")
    with pytest.raises(Exception):
        hf_hub_download("api/models", ".gitattributes", endpoint=hub.url, cache_dir=tmp_path / "c1")
    for prefix, repo_type in (("datasets", "dataset"), ("spaces", "space")):
        # /datasets/x/... is where clients look for dataset x: a model there answers for it
        create(f"{prefix}/x")
        try:
            got = hf_hub_download("x", ".gitattributes", repo_type=repo_type, endpoint=hub.url,
                                  cache_dir=tmp_path / f"c-{prefix}")
        except Exception:  # once /datasets/ answers for datasets, the model is the one misread
            with pytest.raises(Exception):
                hf_hub_download(f"{prefix}/x", ".gitattributes", endpoint=hub.url, cache_dir=tmp_path / "c2")
        else:
            model = hf_hub_download(f"{prefix}/x", ".gitattributes", endpoint=hub.url, cache_dir=tmp_path / "c2")
            assert Path(got).read_bytes() == Path(model).read_bytes()  # a model served as a dataset or Space
    assert API_PREFIXES | API_VERBS == RESERVED


# -- file paths -----------------------------------------------------------------------------------
def test_refused_paths_through_the_real_client(hub, repo, server_log):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = hub.api()
    head = api.model_info(repo).sha
    blobs = set(hub.registry.store.all_digests())
    for bad in CLIENT_PATHS:
        with pytest.raises(HfHubHTTPError) as e:  # refused at preupload, before any upload
            api.upload_file(path_or_fileobj=b"x", path_in_repo=bad, repo_id=repo)
        assert e.value.response.status_code == 400 and "invalid file path" in e.value.server_message, bad
        assert e.value.response.headers["x-error-code"] == "InvalidPath"
        with pytest.raises(HfHubHTTPError):
            api.create_commit(repo, [CommitOperationAdd(path_in_repo="ok.json", path_or_fileobj=b"{}"),
                                     CommitOperationAdd(path_in_repo=bad, path_or_fileobj=b"x" * 5000)],
                              commit_message="m")
        settled(hub, repo, head)
    assert set(hub.registry.store.all_digests()) == blobs


def test_refused_paths_in_raw_commits(hub, repo, server_log):
    head = hub.api().model_info(repo).sha
    blobs = set(hub.registry.store.all_digests())
    for bad in CLIENT_PATHS + RAW_PATHS:
        for line in (_file_line(bad), {"key": "lfsFile", "value": {"path": bad, "algo": "sha256",
                                                                   "oid": hashlib.sha256(b"x").hexdigest(),
                                                                   "size": 1}}):
            r = _commit(hub, repo, [HEADER, _file_line("fine.txt"), line])
            assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidPath", repr(bad)
            assert "invalid file path" in r.json()["error"]
        settled(hub, repo, head)
    assert set(hub.registry.store.all_digests()) == blobs


def test_case_insensitive_duplicates_in_a_tree(hub, repo, server_log):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    api = hub.api()
    api.upload_file(path_or_fileobj=b"card", path_in_repo="README.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="A/x.json", repo_id=repo)
    api.upload_file(path_or_fileobj=b"r", path_in_repo="Résumé.md", repo_id=repo)
    head = api.model_info(repo).sha
    blobs = set(hub.registry.store.all_digests())
    clashes = [["readme.md"], ["README.MD"], ["a/y.json"], ["a"], ["A/X.JSON"], ["a/x.json/z"],
               [unicodedata.normalize("NFD", "Résumé.md")], ["RÉSUMÉ.md"], ["new.txt", "NEW.txt"],
               ["n/a.txt", "N/b.txt"]]
    for paths in clashes:
        with pytest.raises(HfHubHTTPError) as e:
            api.create_commit(repo, [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b"y") for p in paths],
                              commit_message="clash")
        assert e.value.response.status_code == 400, paths
        assert "differ only in case" in e.value.server_message or "is a file" in e.value.server_message
        settled(hub, repo, head)
    assert set(hub.registry.store.all_digests()) == blobs
    # renaming by case is one commit that deletes the old name and adds the new one
    api.create_commit(repo, [CommitOperationDelete(path_in_repo="README.md"),
                             CommitOperationAdd(path_in_repo="readme.md", path_or_fileobj=b"card")],
                      commit_message="rename")
    assert "readme.md" in api.list_repo_files(repo) and "README.md" not in api.list_repo_files(repo)


def test_pull_refuses_a_served_name_before_writing_anything(hub, repo, tmp_path, monkeypatch):
    """A server that accepted a bad name (an older zoo serve, or another Hub): zoo pull
    refuses it before opening the registry; a commit that deletes it is accepted."""
    from zoo.hub import repos as repos_module
    from zoo.hub.server import app as app_module

    api = hub.api()
    for planted in ("CON.json", "w\u202e.json", "A.json", "a.json"):
        with monkeypatch.context() as m:  # an older server's rules
            for mod in (app_module, repos_module):
                m.setattr(mod, "check_path", lambda p: p)
            m.setattr(repos_module, "check_case_unique", lambda *a: None)
            api.upload_file(path_or_fileobj=b"{}", path_in_repo=planted, repo_id=repo)
    db = tmp_path / "client" / "registry.db"
    with pytest.raises(ZooError, match="CON.json.*device name|nothing was transferred") as e:
        pull(lambda: Registry(db, create=True), repo, endpoint=hub.url)
    assert "\n" not in str(e.value) and not db.parent.exists()
    for planted in ("CON.json", "w\u202e.json"):
        api.delete_file(planted, repo_id=repo)  # a name refused today can still be deleted
    with pytest.raises(ZooError, match="differ only in case"):
        pull(lambda: Registry(db, create=True), repo, endpoint=hub.url)
    api.delete_file("A.json", repo_id=repo)
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a.json"]
    assert not db.parent.exists()


def test_push_refuses_a_bad_local_name_before_sending(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "a:b.json").write_text("{}")
    # a dead endpoint: had anything been sent, the error would say it cannot reach it
    with pytest.raises(ZooError, match="a:b.json.*Windows.*nothing was transferred"):
        push_folder(folder, "team/x", endpoint="http://127.0.0.1:9", token="zoo_x")


# -- input bounds ---------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400(hub, repo, server_log):
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_obj = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    just_over = json.dumps({"files": [{"path": "x", "size": 1, "n": json.loads("[" * 63 + "]" * 63)}]}).encode()
    auth = {"Authorization": f"Bearer {hub.write}"}
    head = hub.api().model_info(repo).sha
    for url in (f"{hub.url}/api/repos/create", f"{hub.url}/api/validate-yaml",
                f"{hub.url}/api/models/{repo}/preupload/main", f"{hub.url}/{repo}.git/info/lfs/objects/batch"):
        for body in (deep, deep_obj, just_over):
            r = httpx2.post(url, content=body, headers=auth, timeout=30)
            assert r.status_code == 400 and "nested deeper than 64 levels" in r.json()["error"], (url, r.text)
        settled(hub, repo, head)
    for lines in ([deep], [deep_obj], [json.dumps(HEADER).encode(), json.dumps(_file_line("a.txt")).encode(), deep],
                  [json.dumps(HEADER).encode(), json.dumps(_file_line("a.txt")).encode(), just_over]):
        r = httpx2.post(f"{hub.url}/api/models/{repo}/commit/main", content=b"\n".join(lines) + b"\n",
                        headers={**auth, "Content-Type": "application/x-ndjson"}, timeout=30)
        assert r.status_code == 400 and "a commit line is nested deeper" in r.json()["error"], r.text
        settled(hub, repo, head)
    # within the bound, the same requests work
    r = httpx2.post(f"{hub.url}/api/models/{repo}/preupload/main", json={"files": [{"path": "x", "size": 1}]},
                    headers=auth)
    assert r.status_code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_control_bytes_in_a_url_path_are_a_400(hub, repo, server_log, method):
    head = hub.api().model_info(repo).sha
    for target in ("/team/t/resolve/main/a%00b", "/team/t/resolve/main/%00", "/team/t/resolve/main/a%01b",
                   "/team/t/resolve/main/a%0Ab", "/team/t/resolve/main/a%0d%0aX-Injected:%201",
                   "/team/t/resolve/main/a%7Fb", "/team/t/resolve/main/a%1Bb", "/team/t/resolve/main/a%C2%85b",
                   "/team/t/resolve/main/a%c2%9fb", "/team/t/resolve/ma%00in/.gitattributes",
                   "/team%00/t/resolve/main/x", "/api/models/team/t%00", "/api/models/team/t/tree/main/%00",
                   "/api/models/team%01/t", "/%00"):
        status, reply = raw_request(hub, f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                    .encode())
        assert status == 400 and b"x-error-code: invalidpath" in reply.lower(), target
        assert b"x-injected" not in reply.lower()
        settled(hub, repo, head)
    for target in (b"/team/t/resolve/main/a\x00b", b"/team/t/resolve/main/a\x01b", b"/team/t/resolve/\x7fx"):
        status, _ = raw_request(hub, method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400, target
        settled(hub, repo, head)
    assert any("Invalid HTTP request" in r.getMessage() for r in server_log.records)  # the log is watched
    ok = httpx2.request(method, f"{hub.url}/team/t/resolve/main/.gitattributes")
    assert ok.status_code == 200  # and percent-encoding without control bytes still resolves
    assert httpx2.get(f"{hub.url}/team/t/resolve/main/%2Egitattributes").status_code == 200


def test_the_same_path_twice_in_one_commit_is_a_400(hub, repo, server_log):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    head = hub.api().model_info(repo).sha
    blobs = set(hub.registry.store.all_digests())
    oid = hashlib.sha256(b"x").hexdigest()
    lfs = {"key": "lfsFile", "value": {"path": "a.txt", "algo": "sha256", "oid": oid, "size": 1}}
    for lines in ([_file_line("a.txt", b"one"), _file_line("a.txt", b"two")], [_file_line("a.txt"), lfs],
                  [lfs, _file_line("a.txt")], [lfs, lfs]):
        r = _commit(hub, repo, [HEADER, _file_line("b.txt"), *lines])
        assert r.status_code == 400 and "appears twice" in r.json()["error"], r.text
        settled(hub, repo, head)
    with pytest.raises(HfHubHTTPError) as e, pytest.warns(UserWarning):  # the client warns, then sends both
        hub.api().create_commit(repo, [CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"one"),
                                       CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"two")],
                                commit_message="twice")
    assert e.value.response.status_code == 400 and "appears twice" in e.value.server_message
    settled(hub, repo, head)
    assert set(hub.registry.store.all_digests()) == blobs


def test_an_oversized_commit_line_removes_what_was_staged(hub, repo, server_log, monkeypatch):
    from zoo.hub.server import wire

    monkeypatch.setattr(wire, "MAX_INLINE_LINE", 256 * 1024)  # the real limit is 64 MiB; same code path
    head = hub.api().model_info(repo).sha
    blobs = set(hub.registry.store.all_digests())
    big = json.dumps(_file_line("big.bin", b"\1" * 300 * 1024)).encode()
    for tail in (big + b"\n", big):  # a long line, and one the body ends in without a newline
        body = b"".join(json.dumps(x).encode() + b"\n" for x in (HEADER, _file_line("a.txt"), _file_line("b.txt")))
        r = httpx2.post(f"{hub.url}/api/models/{repo}/commit/main", content=body + tail,
                        headers={"Authorization": f"Bearer {hub.write}", "Content-Type": "application/x-ndjson"},
                        timeout=30)
        assert r.status_code == 413 and "send large files through LFS" in r.json()["error"]
        settled(hub, repo, head)
    assert set(hub.registry.store.all_digests()) == blobs


# -- the documentation ------------------------------------------------------------------------------
def test_the_hub_page_lists_what_is_refused():
    page = (ROOT / "docs" / "hub.md").read_text()
    section = page[page.index("### Names"):]
    section = section[: section.index("\n### ", 4)]
    for word in sorted(RESERVED):
        assert f"`{word}`" in section, word
    for needle in ("CON", "PRN", "AUX", "NUL", "COM0", "LPT9", "U+202A", "U+2066", "U+061C", "U+200E", "255 bytes",
                   "1024 bytes", "96", "`.git`", "`.cache`", "case", "NFC", "nested deeper than 64", "413", "twice"):
        assert needle in section, needle
