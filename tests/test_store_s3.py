"""Blobs on S3-compatible object storage (``--store s3://BUCKET/PREFIX``), against a real
S3-compatible server on loopback that the tests start (moto's server mode, tests/s3.py):
add, show, verify and gc on the bucket; atomic, de-duplicated multipart writes; a merge
reading its inputs through the local cache; ``zoo serve`` redirecting large downloads
to presigned URLs that the stock ``huggingface_hub`` client follows; and one line for
each kind of bad input, with nothing half-written."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import vit
from s3 import PrivateS3, available
from zoo import Registry
from zoo.errors import StorageError, ZooError
from zoo.registry import objectstore
from zoo.registry.blobcache import BlobCache, parse_size
from zoo.registry.paths import locate

ok, why = available()
pytestmark = pytest.mark.skipif(not ok, reason=why)


@pytest.fixture(scope="session")
def s3_server():
    server = PrivateS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_server():
    server = PrivateS3(auth=True).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the open server, with the AWS variables pointing at it; the store URL."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ZOO_S3_CACHE", raising=False)
    monkeypatch.delenv("ZOO_STORE", raising=False)
    name = s3_server.create_bucket(f"zoo-{uuid.uuid4().hex[:12]}")
    return f"s3://{name}/team/zoo"


def keys(server: PrivateS3, store: str, under: str = "") -> list[str]:
    bucket, _, prefix = store[len("s3://"):].partition("/")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{under}")
    return sorted(o["Key"][len(prefix) + 1:] for p in pages for o in p.get("Contents") or ())


def uploads(server: PrivateS3, store: str) -> list[str]:
    bucket = store[len("s3://"):].split("/", 1)[0]
    return [u["Key"] for u in server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or ()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(code: int, err: str) -> str:
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_locating_a_store_on_s3(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOO_S3_CACHE", raising=False)
    loc = locate(tmp_path / "registry.db", "s3://my-bucket/team//zoo/")
    assert loc.remote == "s3://my-bucket/team/zoo" and loc.store == tmp_path / "registry.store"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    pg = locate("postgresql://bob:pw@db/zoo", "s3://my-bucket")
    assert pg.remote == "s3://my-bucket" and pg.store.is_relative_to(tmp_path / "data" / "zoo" / "s3")
    assert pg.keys == pg.store / "keys" and "pw" not in str(pg.store)
    monkeypatch.setenv("ZOO_S3_CACHE", str(tmp_path / "cache"))
    assert locate(tmp_path / "registry.db", "s3://my-bucket").store == tmp_path / "cache"
    for bad, msg in [("s3://B/x", "not a bucket name"), ("s3://ab/x", "not a bucket name"),
                     ("s3://my-bucket/a/../b", "plain folder names"), ("gs://my-bucket/x", "S3-compatible")]:
        with pytest.raises(ZooError, match=msg):
            locate(tmp_path / "registry.db", bad)
    assert parse_size("20G") == 20 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000


def test_add_show_verify_and_gc_on_the_bucket(bucket, s3_server, models, tmp_path):
    reg = Registry(tmp_path / "registry.db", create=True, store=bucket)
    reg.add(models["base"], "base", "base")
    reg.add(models["parity"], "parity", "expert", base="base")
    files = reg.show("parity")["files"]
    assert all(f["location"] == f"{bucket}/blobs/sha256/{f['sha256'][:2]}/{f['sha256']}" for f in files)
    stored = keys(s3_server, bucket)
    assert {f"blobs/sha256/{f['sha256'][:2]}/{f['sha256']}" for f in files} <= set(stored)
    assert not keys(s3_server, bucket, "tmp/") and not uploads(s3_server, bucket)
    assert reg.verify() == []

    # verify reads the bucket, not the cache: a changed object and a missing one are found
    client, name = s3_server.client(), bucket[len("s3://"):].split("/", 1)[0]
    model = next(f for f in files if f["path"] == "model.safetensors")
    config = next(f for f in files if f["path"] == "config.json")
    key = lambda f: f"team/zoo/blobs/sha256/{f['sha256'][:2]}/{f['sha256']}"  # noqa: E731
    client.put_object(Bucket=name, Key=key(model), Body=b"rotten")
    client.delete_object(Bucket=name, Key=key(config))
    problems = {(p["file"], p["problem"]) for p in reg.verify("parity")}
    assert problems == {("model.safetensors", "changed"), ("config.json", "missing")}
    assert all(p["path"].startswith(bucket) for p in reg.verify("parity"))

    # gc: an unused blob, a temporary key and an unfinished multipart upload are removed;
    # the blobs models use stay
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(os.urandom(1000))
    digest, _ = reg.store.ingest(orphan)
    client.put_object(Bucket=name, Key="team/zoo/tmp/1.deadbeef-0000.part", Body=b"left over")
    assert reg.collect(older_than=3600)["blobs_removed"] == 0  # young: may be on its way into a commit
    client.create_multipart_upload(Bucket=name, Key="team/zoo/tmp/2.deadbeef-0000.part")  # (moto dates it 2010)
    got = reg.collect(older_than=0)
    assert got["blobs_removed"] == 1 and got["temporary_removed"] == 2 and got["bytes_freed"] == 1000 + 9
    assert not reg.store.has(digest) and not keys(s3_server, bucket, "tmp/") and not uploads(s3_server, bucket)
    assert reg.store.has(reg.show("base")["files"][0]["sha256"])
    reg.remove("parity")
    assert not reg.store.has(model["sha256"])
    reg.close()


def test_writes_are_multipart_atomic_and_never_repeated(bucket, s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 << 20)  # S3's smallest part: three parts here
    reg = Registry(tmp_path / "registry.db", create=True, store=bucket)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    calls: list[str] = []
    real = reg.store.client

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    reg.store.client = Counting()
    digest, size = reg.store.ingest(big)
    assert (digest, size) == (sha(big), 12 << 20)
    assert calls.count("upload_part") == 3 and calls.count("copy") == 1
    assert reg.store.path(digest).read_bytes() == big.read_bytes()
    calls.clear()
    reg.store.ingest(big)  # stored already: hashed, looked up, not uploaded again
    assert not {"put_object", "create_multipart_upload", "upload_part", "copy"} & set(calls)

    # a failure mid-upload aborts it: no blob, no temporary key, no unfinished upload
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(12 << 20))

    def broken(key, upload, number, data):
        if number == 2:
            raise OSError(5, "network went away")
        return objectstore.S3BlobStore._part(reg.store, key, upload, number, data)

    monkeypatch.setattr(reg.store, "_part", broken)
    with pytest.raises(StorageError, match="cannot copy .*other.bin into the store"):
        reg.store.ingest(other)
    assert not reg.store.has(sha(other))
    assert not keys(s3_server, bucket, "tmp/") and not uploads(s3_server, bucket)
    reg.close()


def test_the_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    cache = BlobCache(tmp_path / "c", limit=10_000)
    old = time.time() - 3600
    for i, d in enumerate(["aa" + "0" * 62, "bb" + "0" * 62, "cc" + "0" * 62]):
        tmp = tmp_path / f"t{i}"
        tmp.write_bytes(b"x" * 1000)
        p = cache.admit(tmp, d)
        os.utime(p, (old + i, old + i))
    assert cache.lookup("aa" + "0" * 62) is not None  # used now: the newest
    cache.limit = 2000
    cache.trim()
    assert [cache.path(d).exists() for d in ("aa" + "0" * 62, "bb" + "0" * 62, "cc" + "0" * 62)] == \
        [True, False, True]
    assert cache.stats().bytes == 2000


def test_a_merge_reads_its_inputs_through_the_cache(bucket, s3_server, zoo_cli, tmp_path, monkeypatch):
    """The same merge on a local store and on S3 writes the same bytes; on S3 the inputs come
    through the cache (a second merge fetches nothing) and the result goes to the bucket."""
    from conftest import expert_family

    base, experts = expert_family(tmp_path / "family", n=2)
    outputs = {}
    for where, store in (("local", None), ("s3", bucket)):
        args = ["--registry", tmp_path / f"{where}.db"] + (["--store", store] if store else [])
        assert zoo_cli(*args, "add", base, "--name", "base", "--kind", "base")[0] == 0
        for i, e in enumerate(experts):
            assert zoo_cli(*args, "add", e, "--name", f"e{i}", "--base", "base")[0] == 0
        if store:  # start cold: only the bucket holds the inputs
            shutil_rmtree(tmp_path / f"{where}.store" / "blobs")
        code, out, err = zoo_cli(*args, "merge", "--method", "ties", "--base", "base", "e0", "e1",
                                 "-p", "density=0.5", "-p", "weight=0.5", "--out", "merged")
        assert code == 0, err
        with Registry(tmp_path / f"{where}.db", store=store) as reg:
            outputs[where] = {f["path"]: f["sha256"] for f in reg.show("merged")["files"]}
            if store:
                cached = sorted(p.name for p in (tmp_path / "s3.store" / "blobs").rglob("*") if p.is_file())
                inputs = {f["sha256"] for m in ("base", "e0", "e1") for f in reg.show(m)["files"]}
                assert inputs <= set(cached)
                assert set(outputs[where].values()) <= reg.store.all_digests()
                assert reg.verify() == []
    assert outputs["s3"] == outputs["local"]
    # warm: a second merge over the same inputs downloads nothing
    fetched: list[str] = []
    real = objectstore.S3BlobStore._fetch
    monkeypatch.setattr(objectstore.S3BlobStore, "_fetch", lambda self, d: fetched.append(d) or real(self, d))
    code, _, err = zoo_cli("--registry", tmp_path / "s3.db", "--store", bucket, "merge", "--method", "ties",
                           "--base", "base", "e0", "e1", "-p", "density=0.5", "-p", "weight=0.5",
                           "--out-dir", tmp_path / "again")
    assert code == 0 and fetched == [], (err, fetched)
    tensors = {k: v for k, v in outputs["local"].items() if k.endswith(".safetensors")}
    assert tensors and {k: sha(tmp_path / "again" / k) for k in tensors} == tensors


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.main", "serve", "--port", "0", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert proc.poll() is None and " at " in line, proc.stderr.read()
    url = line.split(" at ")[1].split()[0]
    user, token = re.search(r"added user '([^']+)' with write token (zoo_\S+)", proc.stdout.readline()).groups()
    return proc, url, user, token


def test_serve_on_s3_push_pull_and_presigned_redirects(bucket, s3_server, models, tmp_path, subprocess_env,
                                                       zoo_cli, monkeypatch):
    import requests  # moto's own dependency
    from huggingface_hub import HfApi, constants, hf_hub_download

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what a zoo serve client sets
    env = {**subprocess_env, **s3_server.env(), "ZOO_REGISTRY": str(tmp_path / "srv.db"), "ZOO_STORE": bucket}
    proc, url, user, token = _serve(env)
    try:
        monkeypatch.setenv("HF_TOKEN", token)
        assert zoo_cli("add", models["base"], "--name", "base", "--kind", "base")[0] == 0
        code, out, err = zoo_cli("push", "base", f"{user}/base", "--endpoint", url)
        assert code == 0 and "pushed base@1" in out, err
        code, out, err = zoo_cli("pull", f"{user}/base", "--endpoint", url, "--name", "back", "--json")
        assert code == 0, err
        with Registry(tmp_path / "registry.db") as local:
            assert {f["sha256"] for f in local.show("back")["files"]} >= \
                {f["sha256"] for f in local.show("base")["files"] if f["path"] == "model.safetensors"}
        with Registry(tmp_path / "srv.db", store=bucket) as served:  # the server's blobs are in the bucket
            assert served.verify() == [] and len(served.store.all_digests()) >= 2

        # a large file: GET answers 302 to a presigned URL on the object store, which the stock client follows
        big = tmp_path / "weights.bin"
        big.write_bytes(os.urandom(11 << 20))
        api = HfApi(endpoint=url, token=token)
        api.create_repo(f"{user}/big")
        api.upload_file(path_or_fileobj=big, path_in_repo="weights.bin", repo_id=f"{user}/big")
        api.upload_file(path_or_fileobj=b"small", path_in_repo="small.txt", repo_id=f"{user}/big")
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.get(f"{url}/{user}/big/resolve/main/weights.bin", headers=auth, allow_redirects=False)
        assert r.status_code == 302 and r.headers["location"].startswith(s3_server.endpoint), r.text
        assert r.headers["x-linked-size"] == str(11 << 20)
        small = requests.get(f"{url}/{user}/big/resolve/main/small.txt", headers=auth, allow_redirects=False)
        assert small.status_code == 200 and small.content == b"small"
        got = hf_hub_download(f"{user}/big", "weights.bin", endpoint=url, token=token,
                              cache_dir=tmp_path / "hf" / "hub")
        assert sha(Path(got)) == sha(big)
    finally:
        proc.terminate()
        proc.wait(30)


def test_bad_stores_get_one_line_and_leave_nothing(bucket, s3_server, s3_auth_server, zoo_cli, tmp_path,
                                                   monkeypatch):
    db = tmp_path / "registry.db"
    name = bucket[len("s3://"):].split("/", 1)[0]
    code, _, err = zoo_cli("--registry", db, "--store", "s3://no-such-bucket-here/zoo", "init")
    assert "bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:" in one_line(code, err)
    code, _, err = zoo_cli("--registry", db, "--store", "s3://Bad_Bucket/zoo", "init")
    assert "is not a bucket name" in one_line(code, err)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    code, _, err = zoo_cli("--registry", db, "--store", bucket, "init")
    assert "cannot reach the object store at http://127.0.0.1:1" in one_line(code, err)

    for k, v in s3_auth_server.env().items():
        monkeypatch.setenv(k, v)
    s3_auth_server.create_bucket(name)
    code, _, err = zoo_cli("--registry", db, "--store", bucket, "init")
    assert code == 0, err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    code, _, err = zoo_cli("--registry", db, "--store", bucket, "list", "--json")  # the fast path: no store
    assert code == 0
    code, _, err = zoo_cli("--registry", db, "--store", bucket, "verify")
    assert "refused access to" in one_line(code, err) and "AWS_SECRET_ACCESS_KEY" in err and "wrong" not in err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")
    code, _, err = zoo_cli("--registry", tmp_path / "other.db", "--store", bucket, "init")
    assert "refused access to" in one_line(code, err)
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "other.store").exists()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _, err = zoo_cli("--registry", tmp_path / "other.db", "--store", bucket, "init")
    assert "no AWS credentials" in one_line(code, err)
    assert not (tmp_path / "other.db").exists() and keys(s3_auth_server, bucket) == []


def test_registry_copy_onto_s3_and_back(bucket, s3_server, zoo_cli, models, tmp_path):
    from conftest import db_dump

    a = tmp_path / "a.db"
    with Registry(a, create=True) as reg:
        reg.add(models["base"], "base", "base")
        reg.add(models["parity"], "parity", "expert", base="base")
    code, out, err = zoo_cli("registry", "copy", a, tmp_path / "s3.db", "--to-store", bucket, "--json")
    assert code == 0, err
    blobs = sorted(p.name for p in (tmp_path / "a.store" / "blobs").rglob("*") if p.is_file())
    assert sorted(k.rsplit("/", 1)[1] for k in keys(s3_server, bucket, "blobs/")) == blobs
    assert zoo_cli("--registry", tmp_path / "s3.db", "--store", bucket, "verify")[0] == 0
    code, out, err = zoo_cli("registry", "copy", tmp_path / "s3.db", tmp_path / "b.db", "--from-store", bucket)
    assert code == 0 and "verified" in out, err
    assert db_dump(tmp_path / "b.db") == db_dump(a)
    # a bucket that holds blobs already is not an empty destination
    code, _, err = zoo_cli("registry", "copy", a, tmp_path / "c.db", "--to-store", bucket)
    assert "is not empty" in one_line(code, err) and not (tmp_path / "c.db").exists()
