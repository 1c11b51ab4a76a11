"""``zoo serve`` and the stock clients: every call huggingface_hub 2.4 and its ``hf`` CLI
make either works or gets an error whose message the client shows. Also git, which
zoo serve does not speak, and the registry upgrade that brings tags."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import create_engine, text

from test_hub import Hub, _auth, folder, hub, hub_client_env  # noqa: F401  (fixtures, used by name)
from zoo import Registry
from zoo.errors import HubError, RevisionNotFound
from zoo.hub.repos import Change, HubRepos
from zoo.registry.migrations import SCHEMA_HEAD
from zoo.registry.schema import HubCommit


def _upload(hub: Hub, repo: str, path: str, data: bytes, revision: str | None = None) -> str:
    return hub.api().upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo, revision=revision,
                                 commit_message=f"add {path}").oid


def _hf(hub: Hub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``hf`` CLI, as a user runs it against zoo serve."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.write, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    hf = Path(sys.executable).with_name("hf")
    return subprocess.run([str(hf), *args], env=env, capture_output=True, text=True, timeout=120)


# -- short shas ----------------------------------------------------------------------
def test_short_shas_resolve_everywhere(hub, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    api = hub.api()
    api.create_repo("team/t")
    first = _upload(hub, "team/t", "a.txt", b"one")
    head = _upload(hub, "team/t", "a.txt", b"two")
    for n in (7, 12, 39, 40):
        assert api.model_info("team/t", revision=first[:n]).sha == first
        assert api.model_info("team/t", revision=head[:n].upper()).sha == head
    p = hf_hub_download("team/t", "a.txt", revision=first[:12], endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(p).read_bytes() == b"one"
    assert Path(snapshot_download("team/t", revision=first[:12], endpoint=hub.url,
                                  cache_dir=tmp_path / "c2"), "a.txt").read_bytes() == b"one"
    assert [f.path for f in api.list_repo_tree("team/t", revision=first[:7])] == [".gitattributes", "a.txt"]
    from huggingface_hub.errors import RevisionNotFoundError

    for bad in (first[:6], "0" * 7 if not first.startswith("0000000") else "f" * 7, "xyz1234"):
        with pytest.raises(RevisionNotFoundError):
            api.model_info("team/t", revision=bad)


def test_zoo_pull_takes_the_12_digit_sha_zoo_prints(hub, folder, registry):
    from zoo.hub.client import pull, push_folder

    hub.api().create_repo("team/m")
    push_folder(folder, "team/m", endpoint=hub.url, token=hub.write)
    sha = hub.api().model_info("team/m").sha
    out = pull(registry, f"team/m@{sha[:12]}", endpoint=hub.url, name="m12")
    assert registry.find_hub("team/m", sha) == out["ref"] and out["files"]


def test_an_ambiguous_prefix_is_refused_and_names_come_first(hub):
    api = hub.api()
    api.create_repo("team/t")
    sha = _upload(hub, "team/t", "a.txt", b"one")
    # A second commit of the same repository whose sha shares the first 8 digits.
    twin = sha[:8] + ("0" if sha[8] != "0" else "1") + sha[9:]
    with hub.registry.db.write() as s:
        s.add(HubCommit(sha=twin, repo_pk=s.get(HubCommit, sha).repo_pk, parent_sha=None, summary="twin",
                        description="", author="alice"))
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError, match="ambiguous"):
        api.model_info("team/t", revision=sha[:8])
    with pytest.raises(RevisionNotFound, match="ambiguous"):
        HubRepos(hub.registry).revision("team/t", sha[:7])
    assert api.model_info("team/t", revision=sha[:9]).sha == sha
    assert api.model_info("team/t", revision=twin[:9]).sha == twin
    # A branch named like a sha prefix wins, as in git.
    initial = api.list_repo_commits("team/t")[-1].commit_id
    api.create_branch("team/t", branch=sha[:8], revision=initial)
    assert api.model_info("team/t", revision=sha[:8]).sha == initial


# -- commit listings -----------------------------------------------------------------
def test_commit_listing_newest_first_with_author_date_and_pages(hub, monkeypatch):
    import zoo.hub.server.history as history

    api = hub.api()
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    api.create_repo("team/t")
    shas = [_upload(hub, "team/t", f"f{i}.txt", b"%d" % i) for i in range(3)]
    commits = api.list_repo_commits("team/t")
    assert [c.commit_id for c in commits][:3] == shas[::-1] and len(commits) == 4
    assert [c.title for c in commits] == ["add f2.txt", "add f1.txt", "add f0.txt", "initial commit"]
    assert all(c.authors == ["alice"] and before <= c.created_at <= datetime.now(timezone.utc) for c in commits)
    assert [c.created_at for c in commits] == sorted((c.created_at for c in commits), reverse=True)
    assert [c.commit_id for c in api.list_repo_commits("team/t", revision=shas[0][:12])] == \
        [shas[0], commits[-1].commit_id]
    # Pages: the client follows the Link header to the end.
    monkeypatch.setattr(history, "PAGE", 1)
    assert [c.commit_id for c in api.list_repo_commits("team/t")] == [c.commit_id for c in commits]
    r = httpx2.get(f"{hub.url}/api/models/team/t/commits/main", params={"limit": 2, "p": 1})
    assert [c["id"] for c in r.json()] == [c.commit_id for c in commits[2:4]] and "link" not in r.headers
    r = httpx2.get(f"{hub.url}/api/models/team/t/commits/main", params={"limit": 2})
    assert 'rel="next"' in r.headers["link"] and "p=1" in r.headers["link"]
    assert httpx2.get(f"{hub.url}/api/models/team/t/commits/main", params={"limit": "x"}).status_code == 400
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError):
        api.list_repo_commits("team/t", revision="nope")


# -- branches and tags ---------------------------------------------------------------
def test_branches_are_made_committed_to_and_deleted(hub):
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api = hub.api()
    api.create_repo("team/t")
    first = _upload(hub, "team/t", "a.txt", b"one")
    api.create_branch("team/t", branch="dev")
    api.create_branch("team/t", branch="feat/old", revision=api.list_repo_commits("team/t")[-1].commit_id)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("team/t", branch="dev")
    assert err.value.response.status_code == 409 and "already exists" in str(err.value)
    api.create_branch("team/t", branch="dev", exist_ok=True)
    on_dev = _upload(hub, "team/t", "b.txt", b"dev", revision="dev")
    assert api.model_info("team/t").sha == first  # main did not move
    assert api.model_info("team/t", revision="dev").sha == on_dev
    assert [f.path for f in api.list_repo_tree("team/t", revision="feat/old")] == [".gitattributes"]
    refs = api.list_repo_refs("team/t")
    assert {(b.name, b.ref, b.target_commit) for b in refs.branches} >= {
        ("main", "refs/heads/main", first), ("dev", "refs/heads/dev", on_dev)}
    assert refs.tags == [] and refs.converts == []
    assert api.list_repo_refs("team/t", include_pull_requests=True).pull_requests == []
    with pytest.raises(RevisionNotFoundError):  # the branch must exist, as on the Hub
        _upload(hub, "team/t", "c.txt", b"x", revision="nope")
    for bad in ("a..b", "-x", "x y", "x.lock", "a/", "refs/heads/x", "x~1", "a" * 300, "0" * 40):
        with pytest.raises(HfHubHTTPError) as err:
            api.create_branch("team/t", branch=bad)
        assert err.value.response.status_code == 400 and "invalid branch name" in str(err.value), bad
    with pytest.raises(HfHubHTTPError) as err:
        api.delete_branch("team/t", branch="main")
    assert err.value.response.status_code == 400 and "cannot be deleted" in str(err.value)
    api.delete_branch("team/t", branch="dev")
    api.delete_branch("team/t", branch="feat/old")
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch("team/t", branch="dev")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("team/t", revision="dev")
    assert api.model_info("team/t", revision=on_dev).sha == on_dev  # its commit stays, by sha
    assert [b.name for b in api.list_repo_refs("team/t").branches] == ["main"]


def test_tags_resolve_as_revisions_and_never_move(hub, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api = hub.api()
    api.create_repo("team/t")
    first = _upload(hub, "team/t", "a.txt", b"one")
    api.create_tag("team/t", tag="v1", revision=first[:12], tag_message="first")
    api.create_tag("team/t", tag="latest")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("team/t", tag="v1")
    assert err.value.response.status_code == 409
    api.create_tag("team/t", tag="v1", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:  # branches and tags share one set of names
        api.create_branch("team/t", branch="v1")
    assert err.value.response.status_code == 409 and "as a tag" in str(err.value)
    head = _upload(hub, "team/t", "a.txt", b"two")
    assert api.model_info("team/t", revision="v1").sha == first
    assert api.model_info("team/t", revision="latest").sha == first
    assert Path(hf_hub_download("team/t", "a.txt", revision="v1", endpoint=hub.url,
                                cache_dir=tmp_path / "c")).read_bytes() == b"one"
    assert Path(snapshot_download("team/t", revision="v1", endpoint=hub.url, cache_dir=tmp_path / "c2"),
                "a.txt").read_bytes() == b"one"
    assert {(t.name, t.ref, t.target_commit) for t in api.list_repo_refs("team/t").tags} == {
        ("v1", "refs/tags/v1", first), ("latest", "refs/tags/latest", first)}
    with pytest.raises(RevisionNotFoundError, match="tag"):  # a commit never moves a tag
        _upload(hub, "team/t", "b.txt", b"x", revision="v1")
    with pytest.raises(RevisionNotFoundError):
        api.create_tag("team/t", tag="v2", revision="nope")
    with pytest.raises(RevisionNotFoundError):  # a tag is not a branch
        api.delete_branch("team/t", branch="v1")
    api.delete_tag("team/t", tag="v1")
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag("team/t", tag="v1")
    assert [t.name for t in api.list_repo_refs("team/t").tags] == ["latest"]
    assert api.model_info("team/t").sha == head


def test_ref_and_delete_routes_need_a_write_token(hub):
    hub.api().create_repo("team/t")
    routes = [("POST", "/api/models/team/t/branch/dev", {"json": {}}),
              ("DELETE", "/api/models/team/t/branch/dev", {}),
              ("POST", "/api/models/team/t/tag/main", {"json": {"tag": "v1"}}),
              ("DELETE", "/api/models/team/t/tag/v1", {}),
              ("DELETE", "/api/repos/delete", {"json": {"name": "t", "organization": "team"}})]
    for token, status in ((None, 401), ("zoo_wrong", 401), (hub.read, 403)):
        for method, path, kw in routes:
            r = httpx2.request(method, hub.url + path, headers=_auth(token), **kw)
            assert r.status_code == status, (method, path, token, r.text)
    assert [b.name for b in hub.api().list_repo_refs("team/t").branches] == ["main"]


# -- delete_repo ---------------------------------------------------------------------
def test_delete_repo_removes_its_rows_and_gc_then_collects_its_blobs(hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    api = hub.api()
    api.create_repo("team/gone")
    api.create_repo("team/kept")
    only_here, shared = os.urandom(6000), os.urandom(5000)  # over the LFS cut: both paths of blobs
    _upload(hub, "team/gone", "only.bin", only_here)
    _upload(hub, "team/gone", "shared.bin", shared)
    _upload(hub, "team/kept", "shared.bin", shared)
    api.create_tag("team/gone", tag="v1")
    api.create_branch("team/gone", branch="dev")
    store = hub.registry.store
    gone_blob = hashlib.sha256(only_here).hexdigest()
    assert store.has(gone_blob)
    api.delete_repo("team/gone")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/gone")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("team/gone")
    api.delete_repo("team/gone", missing_ok=True)
    con = sqlite3.connect(hub.registry.path)
    assert con.execute("select count(*) from hub_repos where repo_id = 'team/gone'").fetchone() == (0,)
    orphans = con.execute("select count(*) from hub_commits where repo_pk not in (select id from hub_repos)").fetchone()
    dangling = con.execute("select count(*) from hub_refs where repo_pk not in (select id from hub_repos)").fetchone()
    assert orphans == dangling == (0,)
    assert con.execute("select count(*) from hub_entries where commit_sha not in "
                       "(select sha from hub_commits)").fetchone() == (0,)
    assert store.has(gone_blob)  # blobs wait for gc
    out = hub.registry.collect(older_than=0)
    assert out["blobs_removed"] >= 1 and not store.has(gone_blob)
    assert store.has(hashlib.sha256(shared).hexdigest())  # another repository still uses it
    assert hub.api().hf_hub_download("team/kept", "shared.bin") and api.model_info("team/kept").sha
    api.create_repo("team/gone")  # the name is free again, with a fresh history
    assert len(api.list_repo_commits("team/gone")) == 1
    r = httpx2.request("DELETE", f"{hub.url}/api/repos/delete", headers=_auth(hub.write),
                       json={"name": "x", "organization": "team", "type": "dataset"})
    assert r.status_code == 404 and "model repositories only" in r.headers["x-error-message"]


# -- list_models ---------------------------------------------------------------------
def test_list_models_filters_sorts_and_pages(hub, monkeypatch):
    api = hub.api()
    for org in ("other", "zed"):
        hub.accounts.add_org(org, ["alice"])
    for repo in ("team/alpha", "team/beta", "other/Alpha-2", "zed/solo"):
        api.create_repo(repo)
    _upload(hub, "team/alpha", "a.txt", b"late")  # alpha changed last; zed/solo was created last

    def ids(**kw) -> list[str]:
        return [m.id for m in api.list_models(**kw)]

    assert ids() == ["other/Alpha-2", "team/alpha", "team/beta", "zed/solo"]
    assert ids(author="team") == ["team/alpha", "team/beta"] and ids(author="TEAM") == ids(author="team")
    assert ids(search="ALPHA") == ["other/Alpha-2", "team/alpha"]
    assert ids(search="alpha", author="team") == ["team/alpha"] and ids(author="nobody") == []
    assert ids(sort="last_modified")[0] == "team/alpha"
    assert ids(sort="created_at") == ["zed/solo", "other/Alpha-2", "team/beta", "team/alpha"]
    assert [m["id"] for m in httpx2.get(f"{hub.url}/api/models", params={"sort": "createdAt", "direction": "1"})
            .json()] == ["team/alpha", "team/beta", "other/Alpha-2", "zed/solo"]
    assert ids(sort="created_at", limit=2) == ["zed/solo", "other/Alpha-2"]
    r = httpx2.get(f"{hub.url}/api/models", params={"sort": "id", "direction": "1"})
    assert [m["id"] for m in r.json()] == sorted(ids())
    r = httpx2.get(f"{hub.url}/api/models", params={"sort": "id", "direction": "1", "limit": 3})
    assert len(r.json()) == 3 and 'rel="next"' in r.headers["link"]
    assert httpx2.get(f"{hub.url}/api/models", params={"sort": "likes"}).status_code == 400
    m = next(iter(api.list_models(search="beta")))
    assert m.author == "team" and m.created_at is not None and m.last_modified is not None
    info = api.model_info("team/alpha")
    assert info.author == "team" and info.created_at < info.last_modified
    import zoo.hub.server.history as history

    monkeypatch.setattr(history, "MAX_PAGE", 2)  # pages of 2: the client follows them all
    monkeypatch.setattr("zoo.hub.server.app.MAX_PAGE", 2)
    assert ids() == ["other/Alpha-2", "team/alpha", "team/beta", "zed/solo"]


# -- routes zoo serve does not hold --------------------------------------------------
def test_datasets_and_spaces_get_a_message_the_client_shows(hub, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub.api().create_repo("team/d")  # a model named like the dataset: still not served as one
    for kind in ("dataset", "space"):
        with pytest.raises(RepositoryNotFoundError, match="model repositories only"):
            hf_hub_download("team/d", "x.csv", repo_type=kind, endpoint=hub.url, cache_dir=tmp_path / "c")
        with pytest.raises(RepositoryNotFoundError, match="model repositories only"):
            snapshot_download("team/d", repo_type=kind, endpoint=hub.url, cache_dir=tmp_path / "c")
        with pytest.raises(RepositoryNotFoundError, match="model repositories only"):
            hub.api().repo_info("team/d", repo_type=kind)
    assert list(hub.api().list_datasets()) == [] and list(hub.api().list_spaces()) == []
    with pytest.raises(HfHubHTTPError, match="does not serve /discussions") as err:
        list(hub.api().get_repo_discussions("team/d"))
    assert err.value.response.status_code == 501


def test_git_clone_is_told_what_to_use_instead(hub, tmp_path):
    hub.api().create_repo("team/t")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    for url in (f"{hub.url}/team/t", f"{hub.url}/team/t.git"):
        r = subprocess.run(["git", "clone", url, str(tmp_path / "clone")], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and not (tmp_path / "clone").exists()
        assert "remote: zoo serve does not speak git" in r.stderr, r.stderr
        assert f"remote: To download team/t: HF_ENDPOINT={hub.url} hf download team/t" in r.stderr
        assert "not found" not in r.stderr
    for path in ("/team/t/info/refs", "/team/t.git/info/refs?service=git-receive-pack",
                 "/team/t.git/git-upload-pack"):
        r = httpx2.request("POST" if path.endswith("pack") else "GET", hub.url + path)
        assert r.status_code == 501 and r.headers["content-type"].startswith("text/plain"), path


# -- the hf CLI ----------------------------------------------------------------------
def test_the_hf_cli(hub, tmp_path):
    api = hub.api()
    api.create_repo("team/t")
    first = _upload(hub, "team/t", "a.txt", b"one")
    _upload(hub, "team/t", "a.txt", b"two")

    def hf(*args: str) -> str:
        r = _hf(hub, tmp_path, *args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    out = hf("download", "team/t", "a.txt", "--revision", first[:12], "--local-dir", str(tmp_path / "d1"))
    assert (tmp_path / "d1" / "a.txt").read_bytes() == b"one", out
    hf("repos", "tag", "create", "team/t", "v1", "--revision", first[:12])
    assert "v1" in hf("repos", "tag", "list", "team/t")
    hf("download", "team/t", "--revision", "v1", "--local-dir", str(tmp_path / "d2"))
    assert (tmp_path / "d2" / "a.txt").read_bytes() == b"one"
    hf("repos", "branch", "create", "team/t", "dev", "--revision", "v1")
    assert api.model_info("team/t", revision="dev").sha == first
    hf("repos", "tag", "delete", "team/t", "v1", "--yes")
    hf("repos", "branch", "delete", "team/t", "dev")
    assert [r.name for r in api.list_repo_refs("team/t").branches] == ["main"]
    hf("repos", "delete", "team/t", "--yes")
    assert not api.repo_exists("team/t")
    # The CLI words a RepositoryNotFoundError itself (the Python API shows the server's reason):
    # a missing dataset, not a network problem.
    r = _hf(hub, tmp_path, "download", "team/x", "f.csv", "--repo-type", "dataset")
    assert r.returncode != 0 and "Dataset 'team/x' not found" in r.stderr and "connection" not in r.stderr


# -- the registry upgrade ------------------------------------------------------------
def test_a_0003_registry_upgrades_and_its_refs_are_branches(tmp_path):
    from alembic import command
    from alembic.config import Config
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from zoo.registry.schema import Base

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    cfg = Config()
    cfg.set_main_option("script_location", "zoo.registry:migrations")
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        sha = "a" * 40
        conn.execute(text("insert into hub_repos (id, repo_type, repo_id, private, created_at) "
                          "values (1, 'model', 'team/old', 0, '2026-01-01 00:00:00')"))
        conn.execute(text("insert into hub_commits (sha, repo_pk, summary, created_at) "
                          f"values ('{sha}', 1, 'initial commit', '2026-01-01 00:00:00')"))
        conn.execute(text(f"insert into hub_refs (repo_pk, name, commit_sha) values (1, 'main', '{sha}')"))
        conn.commit()
    engine.dispose()
    reg = Registry(path)
    try:
        repos = HubRepos(reg)
        assert [(r.name, r.kind) for r in repos.refs("team/old")] == [("main", "branch")]
        assert repos.revision("team/old", "aaaaaaa").sha == sha
        repos.create_ref("team/old", "v0", "tag")
        with pytest.raises(HubError, match="tag"):
            repos.commit("team/old", "v0", Change(summary="x"))
    finally:
        reg.close()
    con = sqlite3.connect(path)
    assert con.execute("select version_num from alembic_version").fetchone() == (SCHEMA_HEAD,)
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:  # the ORM classes match the migrated tables
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


# -- paths-info ----------------------------------------------------------------------
def test_paths_info_and_the_hf_file_system(hub):
    from huggingface_hub import HfFileSystem
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = hub.api()
    api.create_repo("team/t")
    big = os.urandom(5000)
    _upload(hub, "team/t", "sub/w.bin", big)
    sha = _upload(hub, "team/t", "a.txt", b"one")
    got = api.get_paths_info("team/t", ["a.txt", "sub", "sub/w.bin", "missing", "a.txt"], revision=sha[:12])
    assert [(type(p), p.path) for p in got] == [(RepoFile, "a.txt"), (RepoFolder, "sub"), (RepoFile, "sub/w.bin")]
    assert got[2].lfs.sha256 == hashlib.sha256(big).hexdigest() and got[0].size == 3
    fs = HfFileSystem(endpoint=hub.url, token=hub.write)
    assert fs.read_bytes("team/t/sub/w.bin") == big and fs.info("team/t/a.txt")["size"] == 3
    assert sorted(fs.ls("team/t", detail=False)) == ["team/t/.gitattributes", "team/t/a.txt", "team/t/sub"]
