"""Cards are data, never code: a corpus of hostile model cards against ``zoo serve``,
with the real huggingface_hub client and the ``hf`` CLI on loopback.

Each hostile card is refused (a 400 the client shows) by validate-yaml and at commit,
inline or through LFS. Cards that are fine (dates, timestamps, a byte-order mark,
CRLF) are accepted and served as plain JSON. Hostile cards that reached a repository
some other way (committed by an older server) still leave model info, snapshot_download
and ``hf download`` working, fast and small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from test_hub import hub, hub_client_env  # noqa: F401  (the server fixture and the client's environment)
from zoo.hub.repos import Change, HubRepos
from zoo.hub.server.cards import CARD_DATA_LIMIT, parse_card
from zoo.registry.card import MAX_DEPTH, CardError, front_matter, read_front_matter, render

REQUEST_S = 20  # every request of these tests is bounded


def _card(front: str, body: str = "# card\n") -> bytes:
    return f"---\n{front}\n---\n{body}".encode()


def _nested_aliases(levels: int) -> bytes:
    """The issue's card: ``levels`` lists of nine aliases of the list before; a few hundred
    bytes that expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return _card("\n".join(lines))


def _block_nesting(depth: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "leaf: 1"


# name -> (card bytes, what the refusal says)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "alias": (_card("a: &x [1, 2]\nb: *x"), "anchors and aliases"),
    "anchor only": (_card("a: &x 1"), "anchors and aliases"),
    "billion laughs": (_card("\n".join(['lol0: &lol0 "lol"'] + [
        f"lol{i}: &lol{i} [" + ",".join([f"*lol{i - 1}"] * 10) + "]" for i in range(1, 10)])), "anchors and aliases"),
    "8-level nested aliases": (_nested_aliases(8), "anchors and aliases"),
    "!!set": (_card("tags: !!set {a, b}"), "tags are refused"),
    "!!binary": (_card("blob: !!binary aGVsbG8="), "tags are refused"),
    "!!python/object": (_card("x: !!python/object/apply:os.system ['echo pwned']"), "tags are refused"),
    "custom tag": (_card("x: !foo bar"), "tags are refused"),
    "explicit !!str": (_card("x: !!str 1"), "tags are refused"),
    "deep flow nesting": (_card("x: " + "[" * 40 + "]" * 40), f"deeper than {MAX_DEPTH}"),
    "one level too deep": (_card("x: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH), f"deeper than {MAX_DEPTH}"),
    "deep block nesting": (_card(_block_nesting(30)), f"deeper than {MAX_DEPTH}"),
    "100000 open brackets": (_card("x: " + "[" * 100_000), "deeper than|not valid YAML"),
    "huge scalar": (_card("x: " + "a" * 300_000), "over the 256 KiB"),
    "huge key": (_card("k" * 300_000 + ": 1"), "over the 256 KiB"),
    "many keys": (_card("\n".join(f"key{i}: {i}" for i in range(12_000))), "over the 64 KiB"),
    "non-UTF-8 bytes": (b"---\nlicense: \xff\xfe mit\n---\n# card\n", "not UTF-8"),
    "non-mapping (list)": (_card("- just\n- a list"), "must be a mapping"),
    "non-mapping (scalar)": (_card("just some words"), "must be a mapping"),
    "unterminated": (b"---\nlicense: mit\n# card, no closing line\n", "no closing"),
    "duplicate keys": (_card("license: mit\nlicense: apache-2.0"), "duplicate key"),
    "NaN": (_card("score: .nan"), "NaN or infinity"),
    "infinity": (_card("score: -.inf"), "NaN or infinity"),
    "complex key": (_card("? [a, b]\n: 1"), "key must be a string"),
    "control character": (_card("x: \x07bell"), "not valid YAML"),
    "tags not a list": (_card("tags: 5"), "'tags' must be"),
    "eval_results": (_card("eval_results: [{task: x}]"), "'eval_results' is huggingface_hub"),
    "two documents": (_card("a: 1\n...\n%YAML 1.1\n--- b\n"), "not valid YAML|more than one"),
    "unbalanced": (_card("x: [1, 2"), "not valid YAML"),
}

# name -> (card bytes, the cardData it is served with)
FINE: dict[str, tuple[bytes, dict | None]] = {
    "date": (_card("date: 2024-05-01\ntags: [a]"), {"date": "2024-05-01", "tags": ["a"]}),
    "timestamps": (_card("t1: 2001-12-14t21:59:43.10-05:00\nt2: 2001-12-14 21:59:43.10 -5\nd: [2002-12-14]"),
                   {"t1": "2001-12-14t21:59:43.10-05:00", "t2": "2001-12-14 21:59:43.10 -5", "d": ["2002-12-14"]}),
    "byte-order mark": (b"\xef\xbb\xbf" + _card("tags: [bom]"), {"tags": ["bom"]}),
    "CRLF": (b"---\r\nlicense: mit\r\ntags:\r\n- crlf\r\n---\r\n# card\r\n", {"license": "mit", "tags": ["crlf"]}),
    "YAML 1.1 booleans stay words": (_card("on: yes\noff: no\ny: n"), {"on": "yes", "off": "no", "y": "n"}),
    "scalar keys become strings": (_card("1: one\ntrue: yes\nnull: none\n1.5: x"),
                                   {"1": "one", "true": "yes", "null": "none", "1.5": "x"}),
    "numbers, booleans, null": (_card("a: 1\nb: -2.5\nc: 1.0e-05\nd: true\ne: ~\nf: '3'\ng: 0o17\nh: 1e5"),
                                {"a": 1, "b": -2.5, "c": 1e-05, "d": True, "e": None, "f": "3", "g": "0o17",
                                 "h": "1e5"}),
    f"{MAX_DEPTH} levels": (_card("x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)),  # and the mapping
                            {"x": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}),
    "empty front matter": (b"---\n---\n# card\n", None),
    "no front matter": (b"# just a title\n", None),
    "zoo's own card": (render(front_matter(["team/a", "team/b"], "merge", ["zoo", "merge"]), "m", ["body"]).encode(),
                       {"base_model": ["team/a", "team/b"], "base_model_relation": "merge",
                        "library_name": "transformers", "tags": ["zoo", "merge"]}),
}


@pytest.fixture(autouse=True)
def bounded_requests():
    """Every request huggingface_hub sends gets a timeout (it sends none by itself)."""
    from huggingface_hub.utils import _http

    def bound(request) -> None:
        request.extensions["timeout"] = {k: REQUEST_S for k in ("connect", "read", "write", "pool")}

    def factory():
        client = _http.default_client_factory()
        client.event_hooks["request"].append(bound)
        return client

    _http.set_client_factory(factory)
    yield
    _http.set_client_factory(_http.default_client_factory)


def test_the_corpus_is_large_enough():
    assert len(HOSTILE) >= 20 and len(FINE) >= 8


@pytest.mark.parametrize("name", list(HOSTILE))
def test_the_reader_refuses_each_hostile_card_with_its_reason(name):
    data, reason = HOSTILE[name]
    start = time.monotonic()
    with pytest.raises(CardError, match=reason) as e:
        parse_card(data)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and len(str(e.value)) < 300
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("name", list(FINE))
def test_the_reader_gives_plain_json_for_each_fine_card(name):
    data, expected = FINE[name]
    assert parse_card(data) == (expected or {})
    assert json.loads(json.dumps(parse_card(data))) == (expected or {})


def test_without_libyaml_the_same_cards_are_refused_and_read(monkeypatch):
    """PyYAML without its C extension parses in Python: the same answers."""
    import yaml

    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    for name, (data, reason) in HOSTILE.items():
        with pytest.raises(CardError, match=reason):
            parse_card(data)
    for name, (data, expected) in FINE.items():
        assert parse_card(data) == (expected or {}), name


def test_text_that_was_never_utf8_is_refused():
    for text in ("---\na: \ud800\n---\n", "---\n\udcff: 1\n---\n"):
        with pytest.raises(CardError, match="not UTF-8"):
            read_front_matter(text)
        with pytest.raises(CardError, match="not UTF-8"):
            parse_card(text)


def test_what_zoo_writes_reads_back_as_written():
    front = front_matter(["a/b", "1e5", "yes", "012", "2024-05-01", "null", "~", "x: y"], "merge",
                         ["zoo", "True", "3.0"])
    front["numbers"] = [1, -2, 2.5, 1e-05, 10**30, None, True, "", " padded"]
    text = render(front, "t", ["body"])
    assert read_front_matter(text) == front == read_front_matter(text.encode())
    assert read_front_matter("---\n- a\n---\n".replace("- a", "a: 1")) == {"a": 1}
    with pytest.raises(ValueError, match="must be a mapping"):
        read_front_matter("---\n- a\n---\n")


def _upload(hub, repo: str, data: bytes):
    return hub.api().upload_file(path_or_fileobj=data, path_in_repo="README.md", repo_id=repo,
                                 commit_message="card")


def test_hostile_cards_are_refused_by_validate_yaml_and_at_commit(hub, monkeypatch):
    """The client's validate-yaml refuses each card with the reason; a client that skips
    it (as an old or hostile one may) is refused at commit, inline or through LFS, and
    nothing is committed or left in the store's temp folder."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub.api().create_repo("team/cards")
    head = hub.api().model_info("team/cards").sha
    for name, (data, reason) in HOSTILE.items():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            with pytest.raises(UnicodeDecodeError):  # the client itself refuses to read it
                _upload(hub, "team/cards", data)
        else:
            with pytest.raises(ValueError, match="Invalid metadata in README.md") as e:
                _upload(hub, "team/cards", data)
            assert "invalid model card metadata" in str(e.value), name
            assert any(r in str(e.value) for r in reason.split("|")), (name, str(e.value))
            # raw: validate-yaml answers JSON with the reason
            r = httpx2.post(f"{hub.url}/api/validate-yaml", json={"content": data.decode()}, timeout=REQUEST_S)
            assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidMetadata", name
            assert r.json()["errors"][0]["message"].startswith("invalid model card metadata")
    # a client that skips validate-yaml: the commit itself is refused (small cards inline, large ones by LFS)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *a, **kw: None)
    for name, (data, reason) in HOSTILE.items():
        if b"\xff" in data:
            continue  # the client cannot read it; sent raw below
        with pytest.raises(HfHubHTTPError) as e:
            _upload(hub, "team/cards", data)
        assert e.value.response.status_code == 400, name
        assert e.value.response.headers["x-error-code"] == "InvalidMetadata", name
        assert "invalid model card metadata" in str(e.value), name
    r = _raw_commit(hub, "team/cards", HOSTILE["non-UTF-8 bytes"][0])
    assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidMetadata" and "not UTF-8" in r.text
    assert hub.api().model_info("team/cards").sha == head
    assert list(hub.registry.store.tmp.iterdir()) == []


def _raw_commit(hub, repo: str, data: bytes) -> httpx2.Response:
    import base64

    lines = [{"key": "header", "value": {"summary": "card"}},
             {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(data).decode(),
                                       "encoding": "base64"}}]
    return httpx2.post(f"{hub.url}/api/models/{repo}/commit/main",
                       content=b"".join(json.dumps(x).encode() + b"\n" for x in lines),
                       headers={"Authorization": f"Bearer {hub.write}", "Content-Type": "application/x-ndjson"},
                       timeout=REQUEST_S)


def test_fine_cards_are_accepted_and_served_as_plain_json(hub):
    hub.api().create_repo("team/fine")
    for name, (data, expected) in FINE.items():
        _upload(hub, "team/fine", data)
        info = hub.api().model_info("team/fine")
        raw = httpx2.get(f"{hub.url}/api/models/team/fine", timeout=REQUEST_S).json()
        assert raw["cardData"] == expected, name
        if expected:
            assert info.card_data.to_dict() == {k: v for k, v in expected.items() if v is not None}, name
        else:
            assert info.card_data is None, name
    date = FINE["date"][0]
    _upload(hub, "team/fine", date)
    assert hub.api().model_info("team/fine").card_data.to_dict()["date"] == "2024-05-01"
    assert hub.api().model_info("team/fine").tags == ["a"]


def _commit_directly(hub, repo: str, data: bytes) -> str:
    """Put a card into a repository past every check, as a server before them would have."""
    repos = HubRepos(hub.registry)
    return repos.commit(repo, "main", Change(summary="an old card", files={"README.md": repos.stage(data)}), "alice")


def test_hostile_cards_already_committed_never_break_reads(hub, tmp_path):
    """model info answers fast and small, without cardData; snapshot_download and
    ``hf download`` fetch the repository whole."""
    from huggingface_hub import snapshot_download

    api = hub.api()
    corpus = {**HOSTILE, "date": FINE["date"]}
    repos = {}
    for i, (name, (data, _)) in enumerate(corpus.items()):
        repo = f"team/old-{i}"
        api.create_repo(repo)
        api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id=repo)
        repos[name] = (repo, _commit_directly(hub, repo, data))
    for name, (repo, sha) in repos.items():
        for _ in range(2):  # the second answer comes from the parsed-card cache
            start = time.monotonic()
            r = httpx2.get(f"{hub.url}/api/models/{repo}", timeout=REQUEST_S)
            took = time.monotonic() - start
            assert r.status_code == 200 and r.json()["sha"] == sha, (name, r.text[:300])
            assert len(r.content) < CARD_DATA_LIMIT + 4096 and took < 2, (name, len(r.content), took)
        info = api.model_info(repo)
        if name == "date":
            assert info.card_data.to_dict()["date"] == "2024-05-01" and info.tags == ["a"]
        else:
            assert info.card_data is None and r.json()["cardData"] is None, name
        got = Path(snapshot_download(repo, endpoint=hub.url, cache_dir=tmp_path / "hf" / "hub"))
        assert (got / "README.md").read_bytes() == corpus[name][0], name
        assert json.loads((got / "config.json").read_text()) == {"a": 1}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_cli"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DOWNLOAD_TIMEOUT=str(REQUEST_S),
               HF_HUB_ETAG_TIMEOUT=str(REQUEST_S))
    hf = Path(sys.executable).with_name("hf")
    for name in ("8-level nested aliases", "!!python/object", "deep block nesting", "non-UTF-8 bytes", "many keys",
                 "date"):
        repo, _ = repos[name]
        out = tmp_path / "cli" / repo.replace("/", "_")
        r = subprocess.run([str(hf), "download", repo, "--local-dir", str(out)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert (out / "README.md").read_bytes() == corpus[name][0] and (out / "config.json").is_file(), name


def test_a_bad_card_costs_one_parse_and_one_log_line(hub, caplog):
    import logging

    hub.api().create_repo("team/laughs")
    _commit_directly(hub, "team/laughs", HOSTILE["many keys"][0] + os.urandom(8).hex().encode())  # not cached yet
    with caplog.at_level(logging.WARNING, logger="zoo.serve"):
        for _ in range(5):
            assert httpx2.get(f"{hub.url}/api/models/team/laughs", timeout=REQUEST_S).json()["cardData"] is None
    said = [r.getMessage() for r in caplog.records if "no cardData served" in r.getMessage()]
    assert len(said) == 1 and "over the 64 KiB" in said[0]
