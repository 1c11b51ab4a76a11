"""docs/hub.md says exactly what `zoo serve` serves and refuses: every route in its table
answers (no "no route"), every verb the server routes is in the table, and the lists of
reserved words and refused names are the validator's own."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pytest

from tests.test_hub import _auth, hub  # noqa: F401  (the fixture)
from zoo.hub import names
from zoo.hub.server.app import KEYWORDS, UNSUPPORTED

DOC = (Path(__file__).resolve().parent.parent / "docs" / "hub.md").read_text()
ROW = re.compile(r"^\| (`[^|]+`) \|", re.M)


def documented_routes() -> list[tuple[str, str]]:
    """(method, path) for each route of the table, placeholders kept."""
    out = []
    for cell in ROW.findall(DOC):
        methods: list[str] = []
        for part in cell.split(", "):  # `POST /a`, `DELETE /b`; `GET /a`, `/b` (the same method)
            methods = re.findall(r"`([A-Z]+)`", part) + re.findall(r"`([A-Z]+) /", part) or methods
            path = re.search(r"[ `](/[^`]+)`", part).group(1)
            for m in methods:
                out.append((m, re.sub(r"\[.*?\]", "", path)))
    return out


def test_the_table_lists_every_verb_the_server_routes():
    routes = documented_routes()
    assert len(routes) >= 20
    table = " ".join(ROW.findall(DOC))
    for verb in KEYWORDS - {"xet-write-token", "xet-read-token"}:  # Xet: refused, said in the text
        assert f"/{verb}/" in table or f"/{verb}`" in table, verb
    assert "Xet" in DOC
    for verb in UNSUPPORTED:  # not served: each named in the text
        assert f"`{verb}`" in DOC or f"/{verb}" in DOC, verb


def test_every_documented_route_answers(hub):  # noqa: F811
    api = hub.api()
    api.create_repo("team/doc")
    api.create_branch("team/doc", branch="gone")
    api.create_tag("team/doc", tag="old")
    fill = {"{repo}": "team/doc", "{rev}": "main", "{branch}": "b1", "{tag}": "old", "{path}": ".gitattributes",
            "{oid}": "0" * 64, "{name}": "nothing-registered"}
    bodies = {"/api/repos/create": {"name": "doc2", "organization": "team"},
              "/api/repos/delete": {"name": "nothing-here", "organization": "team"},
              "/api/validate-yaml": {"content": "---\nlicense: mit\n---\n", "repoType": "model"},
              "preupload": {"files": []}, "batch": {"operation": "upload", "objects": []}, "tag": {"tag": "t2"}}
    seen = []
    for method, template in documented_routes():
        path = template.replace("/commit/{branch}", "/commit/main")
        for k, v in fill.items():
            path = path.replace(k, v)
        if method == "DELETE" and "/branch/" in path:
            path = path.replace("/b1", "/gone")
        body = next((b for key, b in bodies.items() if key in path), None)
        kw = {"json": body} if body is not None and method in ("POST", "DELETE") else {}
        if path.endswith("/commit/main"):
            kw = {"content": b'{"key":"header","value":{"summary":"doc"}}\n',
                  "headers": {"Content-Type": "application/x-ndjson"}}
        if "/paths-info/" in path:
            kw = {"data": {"paths": ".gitattributes"}}
        r = httpx2.request(method, hub.url + path, headers={**_auth(hub.write), **kw.pop("headers", {})},
                           timeout=30, **kw)
        said = r.headers.get("x-error-message", "")
        assert "no route" not in said, (method, path, r.status_code, said)
        assert r.status_code < 500, (method, path, r.status_code, said)
        seen.append((method, path, r.status_code))
    # the ones that must succeed outright
    ok = {(m, p) for m, p, s in seen if s < 300}
    assert len(seen) == len(documented_routes())
    for m, p in (("GET", "/api/whoami-v2"), ("GET", "/api/models"), ("GET", "/api/models/team/doc"),
                 ("POST", "/api/models/team/doc/commit/main"), ("POST", "/api/models/team/doc/branch/b1"),
                 ("GET", "/team/doc/resolve/main/.gitattributes"), ("POST", "/api/validate-yaml")):
        assert (m, p) in ok, (m, p, seen)


def test_the_reserved_words_are_the_validators():
    section = DOC[DOC.index("reserved words are refused"):DOC.index("**File paths**")]
    words = set(re.findall(r"`([a-z][a-z-]*)`", section)) - {"api/models"}
    assert words == names.API_VERBS | names.API_PREFIXES


@pytest.mark.parametrize("path", ["C:x", "a/CON.json", "x\u202e", "x\x85", "a" * 256, "a/./b", ".git/x", "a:b",
                                  "x.", "x "])
def test_each_documented_path_refusal_is_refused(path):
    assert names.path_problem(path) is not None
