"""``zoo serve --workers N`` on a real PostgreSQL registry, driven by stock
``huggingface_hub`` clients: concurrent commits on one parent (exactly one wins, the
others get the Hub's 412), concurrent pushes to different repositories (all land), LFS
uploads and their commits handled by different workers, then ``zoo verify`` and every
commit's files read back byte for byte; SIGTERM and Ctrl-C stop every worker."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

WORKERS = 3
LFS_THRESHOLD = 1024  # files of 1 KiB and more go through the LFS batch API and a PUT


@pytest.fixture
def pg_url(pg_server):
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (its workers), from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def gone(pids: list[int]) -> bool:
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return False
    return True


class Served:
    """``zoo serve --workers N`` as a subprocess, in its own session (so Ctrl-C can be sent
    to it as a terminal would, to the whole group)."""

    def __init__(self, pg_url: str, store: Path, env: dict[str, str], workers: int = WORKERS):
        self.store = store
        self.env = {**env, "ZOO_REGISTRY": pg_url, "ZOO_STORE": str(store)}
        cmd = [sys.executable, "-m", "zoo.cli.main", "serve", "--port", "0", "--quiet", "--workers", str(workers),
               "--lfs-threshold", str(LFS_THRESHOLD)]
        # The default SIGINT disposition, as from a terminal (a suite started in the background ignores it).
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        line = self.proc.stdout.readline()
        assert self.proc.poll() is None and " at " in line, self.proc.stderr.read()
        assert f"{workers} workers" in line
        self.url = line.split(" at ")[1].split()[0]
        self.user, self.token = re.search(r"added user '([^']+)' with write token (zoo_\S+)",
                                          self.proc.stdout.readline()).groups()
        deadline = time.monotonic() + 30
        while len(children(self.proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        self.workers = children(self.proc.pid)
        assert len(self.workers) == workers

    def api(self) -> HfApi:
        return HfApi(endpoint=self.url, token=self.token)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            if sig == signal.SIGINT:
                os.killpg(self.proc.pid, sig)  # what Ctrl-C in a terminal does
            else:
                self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return self.proc.returncode, err


@pytest.fixture
def served(pg_url, tmp_path, subprocess_env, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what a zoo serve client sets
    s = Served(pg_url, tmp_path / "srv.store", subprocess_env)
    yield s
    if s.proc.poll() is None:
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait(30)


def content(tag: str, i: int, lfs: bool) -> bytes:
    """A file's bytes, unique to ``tag`` and ``i``; LFS ones above the server's threshold."""
    body = f"{tag}:{i}\n".encode()
    return body * (LFS_THRESHOLD // len(body) + 1 + i) if lfs else body


def test_one_commit_wins_per_parent_and_every_push_lands(served, tmp_path, zoo_cli):
    api = served.api()
    user = served.user
    sent: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, commit) -> the files it added
    barrier = threading.Barrier(8)

    # Eight clients commit on the same parent at once, round after round: one wins each.
    api.create_repo(f"{user}/race")
    parent = api.model_info(f"{user}/race").sha
    for rnd in range(3):
        def attempt(i: int, parent: str = parent, rnd: int = rnd):
            files = {f"r{rnd}/c{i}.bin": content(f"race{rnd}", i, lfs=i % 2 == 0)}
            barrier.wait()
            try:
                info = api.create_commit(f"{user}/race", [CommitOperationAdd(p, b) for p, b in files.items()],
                                         commit_message=f"round {rnd} client {i}", parent_commit=parent)
            except HfHubHTTPError as e:
                return e.response.status_code, None, files
            return 200, info.oid, files

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(8)))
        won = [r for r in results if r[0] == 200]
        assert len(won) == 1, results
        assert sorted(r[0] for r in results if r[0] != 200) == [412] * 7
        parent = won[0][1]
        sent[f"{user}/race", parent] = won[0][2]
        assert [c.commit_id for c in api.list_repo_commits(f"{user}/race")][0] == parent
    # the winners' files and nothing of the losers'
    assert sorted(f for f in api.list_repo_files(f"{user}/race") if f.endswith(".bin")) == \
        sorted(p for (repo, _), files in sent.items() if repo == f"{user}/race" for p in files)

    # Eight clients each push a chain of commits to their own repository: every one lands.
    def push(i: int) -> list[tuple[str, dict[str, bytes]]]:
        repo = f"{user}/own{i}"
        api.create_repo(repo)
        done, head = [], api.model_info(repo).sha
        for k in range(3):
            files = {f"k{k}.bin": content(f"own{i}.{k}", i, lfs=(i + k) % 2 == 0),
                     "shared.bin": content("shared", k, lfs=True)}  # one blob, uploaded by many at once
            head = api.create_commit(repo, [CommitOperationAdd(p, b) for p, b in files.items()],
                                     commit_message=f"push {k}", parent_commit=head).oid
            done.append((head, files))
        return [(repo, d) for d in done]

    with ThreadPoolExecutor(8) as pool:
        for pushed in pool.map(push, range(8)):
            for repo, (sha, files) in pushed:
                sent[repo, sha] = files
    assert len(sent) == 3 + 8 * 3

    # Every commit's files read back byte for byte, at that commit.
    for (repo, sha), files in sent.items():
        for path, data in files.items():
            got = hf_hub_download(repo, path, revision=sha, endpoint=served.url, token=served.token,
                                  cache_dir=tmp_path / "cache")
            assert Path(got).read_bytes() == data, (repo, sha, path)
    for i in range(8):
        assert len(api.list_repo_commits(f"{user}/own{i}")) == 4  # the initial commit and three pushes

    code, err = served.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM) and "Traceback" not in err, err
    assert gone(served.workers)
    code, out, err = zoo_cli("--registry", served.env["ZOO_REGISTRY"], "--store", served.store, "verify")
    assert code == 0, out + err
    assert not [p for p in (served.store / "tmp").iterdir()] if (served.store / "tmp").exists() else True


def test_an_upload_through_one_worker_commits_through_another(served, pg_url):
    """The LFS batch answer, the PUT and the commit are separate requests, each on a new
    connection here, so they land on whichever worker accepts: the upload's record and
    the URL's key are shared by all."""
    import psycopg

    api = served.api()
    repo = f"{served.user}/lfs"
    api.create_repo(repo)
    for i in range(12):  # each commit: preupload, batch, PUT and commit, on fresh connections
        api.upload_file(path_or_fileobj=content("lfs", i, lfs=True), path_in_repo=f"w{i}.bin", repo_id=repo)
    with psycopg.connect(pg_url) as con:
        assert con.execute("SELECT COUNT(*) FROM hub_uploads").fetchone()[0] == 0  # each taken by its commit
        backends = con.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'zoo'").fetchone()[0]
    assert backends >= 2  # more than one worker holds connections
    assert len([f for f in api.list_repo_files(repo) if f.endswith(".bin")]) == 12


def test_sigterm_mid_push_leaves_nothing_half_written(served, pg_url, zoo_cli):
    """SIGTERM while a large LFS upload streams in: the workers finish what they serve and
    stop. The push either committed whole or left no commit; no temp file stays behind."""
    import psycopg

    api = served.api()
    repo = f"{served.user}/big"
    api.create_repo(repo)
    data = os.urandom(48 << 20)
    result: dict = {}

    def push() -> None:
        try:
            result["sha"] = api.upload_file(path_or_fileobj=data, path_in_repo="big.bin", repo_id=repo).oid
        except Exception as e:  # noqa: BLE001 - the server going away is one outcome
            result["error"] = e

    t = threading.Thread(target=push)
    t.start()
    tmp = served.store / "tmp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (tmp.is_dir() and any(tmp.glob("*.part"))) and t.is_alive():
        time.sleep(0.005)
    mid_upload = tmp.is_dir() and any(tmp.glob("*.part"))
    code, err = served.stop(signal.SIGTERM)
    t.join(120)
    assert not t.is_alive()
    assert code in (0, -signal.SIGTERM) and "Traceback" not in err, err
    assert gone(served.workers)
    with psycopg.connect(pg_url) as con:
        commits = con.execute("SELECT c.sha FROM hub_commits c JOIN hub_repos r ON r.id = c.repo_pk "
                              "WHERE r.repo_id = %s", (repo,)).fetchall()
        big = con.execute("SELECT sha256, size FROM hub_entries WHERE path = 'big.bin'").fetchall()
    if "sha" in result:  # committed: whole
        assert result["sha"] in {c[0] for c in commits} and big == [(hashlib.sha256(data).hexdigest(), len(data))]
    else:
        assert len(commits) == 1 and big == []  # the initial commit only
    assert not [p for p in tmp.iterdir()] if tmp.is_dir() else True
    if mid_upload:  # the upload being received was finished, whole, before its worker stopped
        blobs = list((served.store / "blobs").rglob(hashlib.sha256(data).hexdigest()))
        assert len(blobs) == 1 and blobs[0].read_bytes() == data
    code, out, err = zoo_cli("--registry", pg_url, "--store", served.store, "verify")
    assert code == 0, out + err


def test_ctrl_c_stops_every_worker(served):
    api = served.api()
    api.create_repo(f"{served.user}/last")
    code, err = served.stop(signal.SIGINT)
    assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert gone(served.workers)


def test_many_workers_need_postgresql(tmp_path, zoo_cli):
    reg = tmp_path / "r.db"
    code, out, err = zoo_cli("--registry", reg, "serve", "--workers", "2", "--port", "0")
    assert code == 1 and err.count("\n") == 1 and "needs a registry on PostgreSQL" in err, err
    assert not reg.exists()
    code, out, err = zoo_cli("--registry", reg, "serve", "--workers", "0", "--port", "0")
    assert code == 1 and "--workers 0" in err and not reg.exists()
