"""What each page shows, read from the registry for one viewer: plain records that the
templates lay out. Every model another viewer's page might name goes through
``Visibility.sees`` first."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from markdown_it import MarkdownIt
from markupsafe import Markup

from zoo.errors import NotFound
from zoo.hub.server.web.access import ServedRepo, Visibility
from zoo.hub.server.web.svg import Series, bar_chart, lineage_graph, lineage_svg
from zoo.hub.server.web.reader import Reader
from zoo.registry.card import public_recipe
from zoo.registry.names import KINDS

METRIC = "accuracy"
SPLIT = "test"
CARD_LIMIT = 256 * 1024  # a README beyond this is shown cut: a page stays fast whatever the card
_FRONT = re.compile(r"\A\ufeff?---\r?\n.*?\r?\n---[ \t]*\r?\n", re.S)
# CommonMark with tables, and no raw HTML: a card's <script> or <img onerror> is shown as text.
_MD = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")


@dataclass(frozen=True)
class Filters:
    """The zoo page's filters and search, as the query string gives them."""

    kind: str = ""
    base: str = ""
    task: str = ""
    tag: str = ""
    q: str = ""


@dataclass
class ZooRow:
    ref: str
    kind: str
    base: str | None
    tasks: list[str]
    tags: list[str]
    bytes: int
    parameters: int
    added: str
    best: tuple[str, float, str | None] | None  # metric, value, task


@dataclass
class ZooPage:
    rows: list[ZooRow]
    filters: Filters
    kinds: Sequence[str]
    bases: list[str]
    tasks: list[str]
    tags: list[str]
    total: int


def not_found(ref: str) -> NotFound:
    """The one answer for a model that is missing or hidden, so private names cannot be probed."""
    return NotFound(f"no model {ref!r} here")


def _accuracy(metrics: list[dict[str, Any]], split: str = SPLIT) -> dict[str, dict[str, float]]:
    """The latest ``accuracy`` per model and task on ``split`` (metrics come oldest first)."""
    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        if m["metric"] == METRIC and m["task"] and (m["split"] or SPLIT) == split:
            out.setdefault(m["model"], {})[m["task"]] = m["value"]
    return out


def zoo_page(reader: Reader, vis: Visibility, f: Filters) -> ZooPage:
    """Every model this viewer may see, filtered and searched."""
    listed = [m for m in reader.list() if vis.sees(m["ref"])]
    acc = _accuracy(reader.metrics())
    q = f.q.strip().lower()
    rows = []
    for m in listed:
        base = m["base"] if m["base"] and vis.sees(m["base"]) else None
        if f.kind and m["kind"] != f.kind or f.task and f.task not in m["tasks"] or f.tag and f.tag not in m["tags"]:
            continue
        if f.base and not (base and (base == f.base or base.split("@")[0] == f.base)):
            continue
        if q and not any(q in s.lower() for s in [m["ref"], base or "", *m["tasks"], *m["tags"]]):
            continue
        scores = acc.get(m["ref"], {})
        best_task = max(scores, key=lambda t: scores[t]) if scores else None
        rows.append(ZooRow(m["ref"], m["kind"], base, m["tasks"], m["tags"], m["bytes"] or 0, m["parameters"] or 0,
                           (m["created_at"] or "")[:16].replace("T", " "),
                           (METRIC, scores[best_task], best_task) if best_task else None))
    return ZooPage(rows, f, KINDS, sorted({m["base"] for m in listed if m["base"] and vis.sees(m["base"])}),
                   sorted({t for m in listed for t in m["tasks"]}), sorted({t for m in listed for t in m["tags"]}),
                   len(listed))


@dataclass
class ParityRound:
    round: int
    kept: bool
    disagreement: float
    accuracy: float | None
    tasks: list[dict[str, Any]]


@dataclass
class ModelPage:
    info: dict[str, Any]
    card: Markup
    files: list[dict[str, Any]]
    architecture: list[tuple[str, Any]]
    lineage: Markup
    graph_nodes: int
    recipe: str | None
    chart: Markup
    chart_rows: list[tuple[str, list[float | None]]]
    chart_series: list[Series]
    parity: list[ParityRound]
    protected: bool
    key_held: bool
    repos: list[ServedRepo]
    pulled_from: str | None
    dependents: list[str]
    parents: list[dict[str, Any]] = field(default_factory=list)
    base_visible: bool = False


def model_page(reader: Reader, vis: Visibility, ref: str) -> ModelPage:
    """One model, as far as this viewer may see it and its lineage."""
    try:
        info = reader.show(ref)
    except NotFound:
        raise not_found(ref) from None
    if not vis.sees(info["ref"]):
        raise not_found(ref)
    tree = reader.lineage(info["ref"])
    graph = lineage_graph(tree, vis.sees)
    hidden = sorted({r for r in _refs(tree) if not vis.sees(r)}, key=len, reverse=True)
    parents = [p for p in info["parents"] if vis.sees(p["ref"])]
    series = [Series(info["ref"], info["ref"], "model", {})]
    for p in parents:
        if p["present"] and p["role"] != "base":
            series.append(Series(f"{p['ref']} ({p['role']})", p["ref"], p["role"], {}))
    if info["base"] and vis.sees(info["base"]) and info["base"] not in {s.ref for s in series}:
        series.append(Series(f"{info['base']} (base)", info["base"], "base", {}))
    acc = _accuracy(reader.metrics())
    for s in series:
        s.values = dict(acc.get(s.ref, {}))
    tasks = list(dict.fromkeys([*series[0].values, *info["tasks"]]))
    series = [s for s in series if s is series[0] or any(t in s.values for t in tasks)]
    recipe = info["recipe"]
    return ModelPage(
        info=info,
        card=_card(reader, info, hidden),
        files=info["files"],
        architecture=_architecture(info),
        lineage=lineage_svg(graph, info["ref"]),
        graph_nodes=len(graph.nodes),
        recipe=yaml.safe_dump(public_recipe(recipe), sort_keys=True).rstrip() if recipe else None,
        chart=bar_chart(tasks, series, METRIC) if series[0].values else Markup(""),
        chart_rows=[(t, [s.values.get(t) for s in series]) for t in tasks],
        chart_series=series,
        parity=_parity(recipe),
        protected=info["kind"] == "protected",
        key_held=info["key_id"] is not None,
        repos=vis.repos(info["ref"]),
        pulled_from=_pulled_from(info, vis),
        dependents=[d for d in info["dependents"] if vis.sees(d)],
        parents=parents,
        base_visible=bool(info["base"]) and vis.sees(info["base"]),
    )


def _refs(node: dict[str, Any]) -> list[str]:
    return [node["ref"], *(r for p in node.get("parents", []) for r in _refs(p))]


def _card(reader: Reader, info: dict[str, Any], hidden: list[str]) -> Markup:
    """The model's own README.md when it has one (a pulled model), else the card a push
    would publish, written from the registry. Front matter is data and is not shown;
    models this viewer may not see are not named."""
    readme = next((f for f in info["files"] if f["path"] == "README.md"), None)
    text = None
    if readme is not None:
        try:
            with open(readme["location"], "rb") as fh:
                text = fh.read(CARD_LIMIT).decode("utf-8", "replace")
        except OSError:
            text = None
    if text is None:
        text = reader.card(info["ref"])
    text = _FRONT.sub("", text, count=1)
    for ref in hidden:
        text = text.replace(ref, "a private model")
    return Markup(render_markdown(text))


def render_markdown(text: str) -> str:
    """A card's Markdown as HTML, raw HTML shown as text, headings two levels down
    (under the page's own h1 and h2)."""
    tokens = _MD.parse(text)
    for t in tokens:
        if t.type in ("heading_open", "heading_close"):
            t.tag = f"h{min(6, int(t.tag[1]) + 2)}"
    return _MD.renderer.render(tokens, _MD.options, {})


def _architecture(info: dict[str, Any]) -> list[tuple[str, Any]]:
    arch = info["architecture"] or {}
    t = info["tensors"]
    rows: list[tuple[str, Any]] = [("form", info["form"]), ("model type", info["model_type"])]
    rows += [(k.replace("_", " "), v) for k, v in sorted(arch.items()) if k != "model_type"
             and isinstance(v, (str, int, float, bool))]
    rows += [("tensors", t["count"]), ("parameters", t["parameters"]),
             ("dtypes", ", ".join(f"{k} ({v})" for k, v in sorted((t["dtypes"] or {}).items())))]
    return [(k, v) for k, v in rows if v is not None]


def _parity(recipe: dict[str, Any] | None) -> list[ParityRound]:
    """A parity merge's rounds: mean disagreement with the experts on their pools, and
    accuracy where it was measured, per round; each round's per-task rows."""
    learned = (recipe or {}).get("learned")
    table = learned.get("table") if isinstance(learned, dict) else None
    if not isinstance(table, list) or not table or not all(isinstance(r, dict) and "disagreement" in r
                                                           for r in table):
        return []
    out = []
    for r in sorted({row["round"] for row in table}):
        rows = [row for row in table if row["round"] == r]
        accs = [row["accuracy"] for row in rows if row.get("accuracy") is not None]
        out.append(ParityRound(r, any(row.get("kept") for row in rows),
                               sum(row["disagreement"] for row in rows) / len(rows),
                               sum(accs) / len(accs) if accs else None, rows))
    return out


def _pulled_from(info: dict[str, Any], vis: Visibility) -> str | None:
    src = info["source"]
    if not src.get("hub_repo") or src["hub_repo"].lower() in vis.hidden_repos:
        return None
    return f"{src['hub_repo']}@{(src.get('hub_revision') or '')[:12]}"


@dataclass
class CompareRow:
    ref: str
    kind: str
    cells: list[tuple[float | None, int]]  # value, colour step 0-9
    avg: float | None


@dataclass
class ComparePage:
    tasks: list[str]
    rows: list[CompareRow]
    choices: list[str]
    chosen: list[str]
    low: float | None
    high: float | None


def compare_page(reader: Reader, vis: Visibility, chosen: Sequence[str]) -> ComparePage:
    """A task-by-model table of accuracy, coloured from the table's lowest to its highest
    value. Without a choice: every model with a measured accuracy, best average first."""
    listed = {m["ref"]: m for m in reader.list() if vis.sees(m["ref"])}
    names = {m["name"]: m["ref"] for m in listed.values()}  # a bare name means its latest version
    acc = _accuracy(reader.metrics())
    choices = [r for r in listed if acc.get(r)]
    refs = list(dict.fromkeys(names.get(c, c) for c in chosen if names.get(c, c) in listed)) if chosen else choices
    tasks = sorted({t for r in refs for t in acc.get(r, {})})
    values = [v for r in refs for v in acc.get(r, {}).values()]
    low, high = (min(values), max(values)) if values else (None, None)
    rows = []
    for r in refs:
        scores = acc.get(r, {})
        cells = [(scores.get(t), _step(scores.get(t), low, high)) for t in tasks]
        got = [v for v, _ in cells if v is not None]
        rows.append(CompareRow(r, listed[r]["kind"], cells, sum(got) / len(got) if got else None))
    if not chosen:
        rows.sort(key=lambda x: -1 if x.avg is None else -x.avg)
    return ComparePage(tasks, rows, choices, [r.ref for r in rows] if chosen else [], low, high)


def _step(v: float | None, low: float | None, high: float | None) -> int:
    if v is None or low is None or high is None:
        return 0
    return 9 if high <= low else min(9, int((v - low) / (high - low) * 10))
