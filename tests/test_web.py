"""The web view of `zoo serve`, in a real browser: headless Chromium (the distribution's
package) driven by Playwright, against a server on loopback over a small zoo like the
quick demo's: a base, two experts with task data, a task-arithmetic merge, a parity
merge (its rounds), a protected expert, and a model pushed only to alice's private
repository. Screenshots go to $ARTIFACTS (else pytest's tmp folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx2
import pytest
import torch

from tests.conftest import perturbed_expert, vit
from zoo.checkpoints.taskdata import save_task_data
from zoo.hub.accounts import Accounts
from zoo.hub.server import ServeSettings, running
from zoo.registry import Registry

CHROMIUM = os.environ.get("ZOO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# What a machine without network (and a container running as root) needs.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-default-apps", "--disable-extensions", "--disable-sync", "--metrics-recording-only",
         "--disable-features=Translate,OptimizationHints,MediaRouter"]
PARITY_TABLE = [
    {"round": 0, "task": "t0", "pool": 48, "reliable": 40, "parity": 9, "disagreement": 0.25, "accuracy": 0.5},
    {"round": 0, "task": "t1", "pool": 48, "reliable": 38, "parity": 12, "disagreement": 0.35, "accuracy": 0.4},
    {"round": 1, "task": "t0", "pool": 48, "reliable": 41, "parity": 5, "disagreement": 0.125, "accuracy": 0.5625,
     "kept": True},
    {"round": 1, "task": "t1", "pool": 48, "reliable": 40, "parity": 7, "disagreement": 0.1875, "accuracy": 0.46875,
     "kept": True},
]


def _browser():
    """Playwright's Chromium on the system browser, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make test installs the test extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium on this machine (make test installs Debian's chromium as root)")
    pw = sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    except Exception as e:  # a browser that cannot start here: say why
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")


class Zoo:
    def __init__(self, url: str, registry: Registry, tokens: dict[str, str], key: dict, shots: Path):
        self.url, self.registry, self.tokens, self.key, self.shots = url, registry, tokens, key, shots


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import zoo.merge as merge
    from zoo.evaluate import evaluate
    from zoo.protect.run import protect
    from zoo.publish import publish

    tmp = tmp_path_factory.mktemp("web")
    reg = Registry(tmp / "registry.db", create=True)
    base = vit(tmp / "base", num_labels=10, seed=0)
    reg.add(base, "vit-base", "base", tags=["demo"])
    g = torch.Generator().manual_seed(1)
    for i, k in enumerate((2, 3)):
        e = perturbed_expert(base, tmp / f"e{i}", k, seed=100 + i)
        splits = {s: (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g))
                  for s, n in (("train", 16), ("val", 16), ("test", 32))}
        save_task_data(tmp / f"t{i}.safetensors", splits, [str(j) for j in range(k)])
        reg.add_task(f"t{i}", [str(j) for j in range(k)], data=tmp / f"t{i}.safetensors")
        reg.add(e, f"expert-t{i}", "expert", base="vit-base", tasks=[f"t{i}"], tags=["demo"])
        evaluate(reg, f"expert-t{i}", [f"t{i}"])
        # random tiny models all score alike: a later, distinct value tells models apart on the page
        reg.record_metric(f"expert-t{i}", f"t{i}", "accuracy", 0.875 - 0.125 * i, split="test")
    recipe = {"merge_method": "task_arithmetic", "base_model": "vit-base", "parameters": {"lambda": 0.5},
              "models": [{"model": "expert-t0", "parameters": {"weight": 1.0}},
                         {"model": "expert-t1", "parameters": {"weight": 1.0}}]}
    merge.run(merge.from_dict(recipe), out="demo-ta", registry=reg)
    evaluate(reg, "demo-ta", ["t0", "t1"])
    # a parity merge's lineage and rounds, as the registry keeps them (a real parity run
    # is tests/test_parity.py's; its weights here are another task-arithmetic merge)
    merge.run(merge.from_dict({**recipe, "parameters": {"lambda": 0.4}}), out_dir=tmp / "parity",
              registry=reg)
    reg.add(tmp / "parity", "demo-parity-ta", "merged", base="vit-base", tasks=["t0", "t1"],
            parents=[("base", "vit-base"), ("expert", "expert-t0"), ("expert", "expert-t1")],
            recipe={"merge_method": "parity", "base_model": "vit-base@1",
                    "learned": {"table": PARITY_TABLE, "start": {"method": "task_arithmetic"}}})
    evaluate(reg, "demo-parity-ta", ["t0", "t1"])
    protect("expert-t0", "expert-t0-locked", registry=reg)  # a random key: its seed is the secret
    secret = perturbed_expert(base, tmp / "secret", 2, seed=999)
    reg.add(secret, "alice-secret", "expert", base="vit-base", tasks=["t0"])
    evaluate(reg, "alice-secret", ["t0"])
    acc = Accounts(reg)
    tokens = {"alice": acc.create_token("alice")["token"], "bob": acc.create_token("bob", "read")["token"]}
    shots = Path(os.environ.get("ARTIFACTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with running(reg, ServeSettings()) as url:
        publish(reg, "alice-secret", "alice/secret", endpoint=url, token=tokens["alice"], protect_weights=False,
                private=True)
        yield Zoo(url, reg, tokens, reg.key("expert-t0-locked"), shots)
    reg.close()


@pytest.fixture(scope="module")
def browser(zoo):
    pw, b = _browser()
    yield b
    b.close()
    pw.stop()


def _cli(zoo_cli, zoo: Zoo, *args: str) -> object:
    """The real CLI, in-process: `zoo ... --json` on the served registry."""
    code, out, err = zoo_cli(*args, "--json", "--registry", str(zoo.registry.path))
    assert code == 0, err
    return json.loads(out)


def _edges(node: dict, out: set | None = None) -> set:
    out = set() if out is None else out
    for p in node["parents"]:
        out.add((node["ref"], p["ref"], p["role"]))
        _edges(p, out)
    return out


def _refs(node: dict) -> set:
    return {node["ref"], *(r for p in node["parents"] for r in _refs(p))}


def test_zoo_filter_open_parity_merge_lineage_and_chart(zoo, browser, zoo_cli):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(zoo.url + "/ui")
    rows = page.locator("table.models tbody tr[data-ref]")
    listed = set(rows.evaluate_all("rs => rs.map(r => r.dataset.ref)"))
    assert {"vit-base@1", "expert-t0@1", "demo-ta@1", "demo-parity-ta@1", "expert-t0-locked@1"} <= listed
    page.screenshot(path=str(zoo.shots / "zoo.png"), full_page=True)
    # filter to merges, through the form as a person would
    page.select_option("select[name=kind]", "merged")
    page.click("form.filters button[type=submit]")
    page.wait_for_url(re.compile(r"kind=merged"))
    kinds = set(rows.evaluate_all("rs => rs.map(r => r.dataset.kind)"))
    assert kinds == {"merged"}
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.ref)")) == {"demo-ta@1", "demo-parity-ta@1"}
    page.screenshot(path=str(zoo.shots / "zoo-merges.png"), full_page=True)
    page.click("a[href='/ui/models/demo-parity-ta@1']")
    page.wait_for_url(re.compile(r"/ui/models/demo-parity-ta@1$"))
    assert page.locator("main > h1").inner_text().startswith("demo-parity-ta@1")

    # the lineage graph: exactly the nodes and edges of `zoo lineage --json`
    tree = _cli(zoo_cli, zoo, "lineage", "demo-parity-ta")
    nodes = set(page.locator("svg.lineage g.node").evaluate_all("ns => ns.map(n => n.dataset.ref)"))
    edges = set(map(tuple, page.locator("svg.lineage g.edge").evaluate_all(
        "es => es.map(e => [e.dataset.child, e.dataset.parent, e.dataset.role])")))
    assert nodes == _refs(tree)
    assert edges == _edges(tree)
    # nodes are links: the expert's node opens its page
    links = page.locator("svg.lineage a.node-link")
    assert links.count() == len(nodes) - 1

    # the parity rounds
    rounds = page.locator("table.parity tbody tr")
    assert rounds.count() == 2
    assert page.locator("table.parity tr.kept").get_attribute("data-round") == "1"
    assert "15.6%" in page.locator("table.parity tr.kept").inner_text()  # (0.125 + 0.1875) / 2
    page.screenshot(path=str(zoo.shots / "model-parity.png"), full_page=True)

    # the chart, against a fresh `zoo eval --json` (which records what it measures)
    measured = {r["task"]: r["value"] for r in _cli(zoo_cli, zoo, "eval", "demo-parity-ta", "--task", "t0", "--task", "t1")}
    page.reload()
    bars = page.locator("svg.chart rect.bar").evaluate_all(
        "bs => bs.map(b => [b.dataset.model, b.dataset.task, parseFloat(b.dataset.value)])")
    mine = {t: v for m, t, v in bars if m == "demo-parity-ta@1"}
    assert mine == pytest.approx(measured, abs=0)
    # against each expert parent on its own task, as recorded
    experts = {(m["model"], m["task"]): m["value"] for m in zoo.registry.metrics() if m["metric"] == "accuracy"}
    for m, t, v in bars:
        if m.startswith("expert-"):
            assert v == experts[m, t] == {"t0": 0.875, "t1": 0.75}[t]
    assert {m for m, _, _ in bars} == {"demo-parity-ta@1", "expert-t0@1", "expert-t1@1"}
    page.click("svg.lineage a.node-link[href='/ui/models/expert-t0@1']")
    page.wait_for_url(re.compile(r"/ui/models/expert-t0@1$"))
    page.close()


def test_compare_heatmap(zoo, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(zoo.url + "/ui/compare?m=demo-ta&m=demo-parity-ta&m=expert-t0")
    cells = page.locator("#heatmap td[data-task]").evaluate_all(
        "cs => cs.map(c => [c.closest('tr').dataset.model, c.dataset.task, c.dataset.value])")
    got = {(m, t): float(v) for m, t, v in cells if v}
    want = {}
    for m in zoo.registry.metrics():
        if m["metric"] == "accuracy" and m["model"] in ("demo-ta@1", "demo-parity-ta@1", "expert-t0@1"):
            want[m["model"], m["task"]] = m["value"]  # the latest, as the page shows
    assert got == want
    assert [r for r in page.locator("#heatmap tbody tr").evaluate_all("rs => rs.map(r => r.dataset.model)")] == \
        ["demo-ta@1", "demo-parity-ta@1", "expert-t0@1"]
    page.screenshot(path=str(zoo.shots / "compare.png"), full_page=True)
    page.close()


def test_private_model_needs_its_owner(zoo, browser):
    """alice-secret is served only by alice's private repository: absent for anonymous
    viewers and for bob, present for alice, as through the API."""
    anon = browser.new_page()
    anon.goto(zoo.url + "/ui")
    assert anon.locator("tr[data-ref='alice-secret@1']").count() == 0
    assert "alice-secret" not in anon.content()
    resp = anon.goto(zoo.url + "/ui/models/alice-secret")
    assert resp.status == 404
    missing = anon.goto(zoo.url + "/ui/models/no-such-model")
    assert missing.status == 404
    anon.goto(zoo.url + "/ui/compare")
    assert "alice-secret" not in anon.content()
    anon.close()

    for who, sees in (("bob", False), ("alice", True)):
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(zoo.url + "/ui/login?next=/ui")
        page.fill("#token", zoo.tokens[who])
        page.click("form.login button[type=submit]")
        page.wait_for_url(re.compile(r"/ui$"))
        assert f"Signed in as {who}" in page.locator("header .who").inner_text()
        assert (page.locator("tr[data-ref='alice-secret@1']").count() == 1) is sees
        resp = page.goto(zoo.url + "/ui/models/alice-secret")
        assert resp.status == (200 if sees else 404)
        if sees:
            assert "alice/secret" in page.locator("#hub").inner_text()
            page.screenshot(path=str(zoo.shots / "private-alice.png"), full_page=True)
        cookie = next(c for c in ctx.cookies() if c["name"] == "zoo_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != zoo.tokens[who]
        ctx.close()
    # the API agrees: the repository is hidden from bob, shown to alice
    assert httpx2.get(f"{zoo.url}/api/models/alice/secret", headers={"authorization": f"Bearer {zoo.tokens['bob']}"}
                      ).status_code == 404
    assert httpx2.get(f"{zoo.url}/api/models/alice/secret",
                      headers={"authorization": f"Bearer {zoo.tokens['alice']}"}).status_code == 200


def test_bad_token_and_revoked_session(zoo, browser):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(zoo.url + "/ui/login")
    page.fill("#token", "zoo_not-a-token")
    page.click("form.login button[type=submit]")
    assert "not a live token" in page.content() and "zoo_not-a-token" not in page.content()
    acc = Accounts(zoo.registry)
    made = acc.create_token("alice", "read")
    page.fill("#token", made["token"])
    page.click("form.login button[type=submit]")
    page.wait_for_url(re.compile(r"/ui$"))
    assert page.locator("tr[data-ref='alice-secret@1']").count() == 1
    acc.revoke(made["id"])  # a revoked token ends its sessions at once
    page.reload()
    assert page.locator("tr[data-ref='alice-secret@1']").count() == 0
    assert "Sign in" in page.locator("header .who").inner_text()
    ctx.close()


def test_no_page_holds_a_token_or_key(zoo):
    """Every page, for every viewer, fetched raw: no token, no byte of the key."""
    seed = zoo.key["seed"]
    assert len(seed) >= 12, "a random key has a seed worth looking for"
    key_values = [seed, seed.upper(), str(int(seed, 16))]
    refs = [m["ref"] for m in zoo.registry.list()]
    paths = ["/ui", "/ui/compare", "/ui/login", "/ui/static/zoo.css", *(f"/ui/models/{r}" for r in refs)]
    for who in (None, "alice", "bob"):
        headers = {"authorization": f"Bearer {zoo.tokens[who]}"} if who else {}
        for path in paths:
            r = httpx2.get(zoo.url + path, headers=headers)
            assert r.status_code in (200, 404), (path, r.status_code)
            assert "<script" not in r.text
            for token in zoo.tokens.values():
                assert token not in r.text, path
            for v in key_values:
                assert v not in r.text, (path, v[:20])
            assert "default-src 'none'" in r.headers["content-security-policy"]


def test_card_is_sanitised_and_pages_are_fast(zoo):
    from zoo.hub.server.web.data import render_markdown

    html = render_markdown("# t\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n[x](javascript:alert(1))")
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    assert html.startswith("<h3>")
    for _ in range(3):
        r = httpx2.get(zoo.url + "/ui/models/demo-parity-ta")
    took = float(r.headers["server-timing"].split("dur=")[1])
    assert r.status_code == 200 and took < 1000  # bench/web_pages.py measures the 100 ms target


def test_private_reads_need_a_login(tmp_path):
    reg = Registry(tmp_path / "registry.db", create=True)
    token = Accounts(reg).create_token("alice", "read")["token"]
    with running(reg, ServeSettings(open_reads=False)) as url:
        r = httpx2.get(url + "/ui/compare", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
        assert httpx2.get(url + "/ui", headers={"authorization": f"Bearer {token}"}).status_code == 200
        # the Hub API beside the pages is untouched
        assert httpx2.get(url + "/api/models").status_code == 401
        assert httpx2.get(url + "/ui/x/resolve/main/a.txt").headers.get("x-error-code") == "RepoNotFound"
    reg.close()



def test_the_demo_ends_with_the_compare_page():
    from zoo.demo.tour import Tour

    tour = Tour(zoo=None, table=[{"method": "individual experts"}, {"method": "ta", "model": "demo-ta"},
                                 {"method": "ties", "model": "demo-ties"}],
                parity=[], protection={"rows": [{"method": "p", "model": "demo-ta-protected-digit"}]},
                published=None, keys=Path("k"))
    assert tour.compare_path == "/ui/compare?m=demo-ta&m=demo-ties&m=demo-ta-protected-digit"


def test_cached_reads_answer_as_the_registry(zoo):
    from zoo.hub.server.web.reader import Reader

    reader = Reader(zoo.registry)
    reader.begin()
    assert reader.metrics() == zoo.registry.metrics()
    for m in zoo.registry.list():
        assert reader.lineage(m["ref"]) == zoo.registry.lineage(m["ref"])
