"""The pages' pictures, drawn on the server as inline SVG: the lineage graph and the
per-task bar chart. No script runs in the browser, nothing is fetched, and every mark
carries its data (``data-ref``, ``data-value``) so tests and screen readers read the
same numbers that are drawn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 210, 46, 70, 16, 10
PALETTE = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626")
BASE_COLOUR = "#6b7280"


def model_url(ref: str) -> str:
    return "/ui/models/" + quote(ref, safe="@")


@dataclass
class Node:
    """A model in a lineage graph; ``ref`` is None for one this viewer may not see."""

    key: str
    ref: str | None
    kind: str | None
    method: str | None
    layer: int
    removed: bool = False


@dataclass
class Edge:
    child: str
    parent: str
    role: str


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)


def lineage_graph(tree: dict[str, Any], sees: Callable[[str], bool]) -> Graph:
    """The lineage tree of ``Registry.lineage`` as a graph: one node per model (a base
    shared by every expert is drawn once), one edge per parent with its role. A model
    the viewer may not see is a nameless node, and its own parents are not followed."""
    g = Graph()
    hidden: dict[str, str] = {}

    def key_of(node: dict[str, Any]) -> str:
        ref = node["ref"]
        if node.get("removed") or sees(ref):
            return ref
        return hidden.setdefault(ref, f"private model {len(hidden) + 1}")

    def visit(node: dict[str, Any], layer: int) -> str:
        key = key_of(node)
        shown = key == node["ref"]
        have = g.nodes.get(key)
        if have is None:
            g.nodes[key] = Node(key, node["ref"] if shown else None, node.get("kind") if shown else None,
                                node.get("method") if shown else None, layer, bool(node.get("removed")))
        else:
            have.layer = max(have.layer, layer)
        if shown:
            for p in node.get("parents", []):
                pk = visit(p, layer + 1)
                edge = Edge(key, pk, p.get("role") or "parent")
                if not any(e.child == edge.child and e.parent == edge.parent and e.role == edge.role for e in g.edges):
                    g.edges.append(edge)
        return key

    visit(tree, 0)
    _relayer(g)
    return g


def _relayer(g: Graph) -> None:
    """Every parent stands left of each of its children (a base shared at two depths)."""
    for _ in range(len(g.nodes)):
        moved = False
        for e in g.edges:
            if g.nodes[e.parent].layer <= g.nodes[e.child].layer:
                g.nodes[e.parent].layer = g.nodes[e.child].layer + 1
                moved = True
        if not moved:
            return


def lineage_svg(g: Graph, current: str) -> Markup:
    """The graph, the model on the right and its ancestors leftwards; nodes are links."""
    layers = max(n.layer for n in g.nodes.values()) + 1
    columns: dict[int, list[Node]] = {}
    for n in g.nodes.values():
        columns.setdefault(n.layer, []).append(n)
    rows = max(len(c) for c in columns.values())
    width = PAD * 2 + layers * NODE_W + (layers - 1) * COL_GAP
    height = PAD * 2 + rows * NODE_H + (rows - 1) * ROW_GAP
    at: dict[str, tuple[float, float]] = {}
    for layer, col in columns.items():
        x = PAD + (layers - 1 - layer) * (NODE_W + COL_GAP)
        top = PAD + (height - 2 * PAD - (len(col) * NODE_H + (len(col) - 1) * ROW_GAP)) / 2
        for i, n in enumerate(col):
            at[n.key] = (x, top + i * (NODE_H + ROW_GAP))
    out = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-labelledby="lineage-title">',
           f'<title id="lineage-title">Lineage of {escape(current)}: {len(g.nodes)} models, '
           f'{len(g.edges)} parent links</title>',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9ca3af"/></marker></defs>']
    for e in g.edges:
        (px, py), (cx, cy) = at[e.parent], at[e.child]
        x1, y1, x2, y2 = px + NODE_W, py + NODE_H / 2, cx, cy + NODE_H / 2
        mid = (x1 + x2) / 2
        out.append(f'<g class="edge" data-child="{escape(e.child)}" data-parent="{escape(e.parent)}" '
                   f'data-role="{escape(e.role)}"><path d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} '
                   f'{x2:.1f},{y2:.1f}" fill="none" stroke="#9ca3af" stroke-width="1.5" marker-end="url(#arrow)"/>'
                   f'<text x="{x1 + 4:.1f}" y="{y1 - 4:.1f}" class="role">{escape(e.role)}</text></g>')
    for n in g.nodes.values():
        x, y = at[n.key]
        if n.ref is None:
            label, sub, fill = "private model", "not visible to you", "#f3f4f6"
        else:
            label = n.ref
            sub = " · ".join(s for s in (n.kind or ("removed" if n.removed else None), n.method) if s)
            fill = "#dbeafe" if n.key == current else "#ffffff"
        shape = (f'<g class="node" data-ref="{escape(n.ref or "")}" data-kind="{escape(n.kind or "")}">'
                 f'<title>{escape(label)}{(": " + escape(sub)) if sub else ""}</title>'
                 f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
                 f'stroke="{"#2563eb" if n.key == current else "#9ca3af"}"/>'
                 f'<text x="{x + 10:.1f}" y="{y + 19:.1f}" class="ref">{escape(_clip(label, 28))}</text>'
                 f'<text x="{x + 10:.1f}" y="{y + 36:.1f}" class="sub">{escape(_clip(sub, 32))}</text></g>')
        if n.ref is not None and not n.removed and n.key != current:
            shape = f'<a href="{escape(model_url(n.ref))}" class="node-link">{shape}</a>'
        out.append(shape)
    out.append("</svg>")
    return Markup("".join(out))


@dataclass
class Series:
    """One model's values in a chart, per task."""

    label: str
    ref: str
    role: str
    values: dict[str, float]


def bar_chart(tasks: Sequence[str], series: Sequence[Series], metric: str) -> Markup:
    """Grouped horizontal bars: one group per task, one bar per model."""
    if not tasks or not series:
        return Markup("")
    label_w, plot_w, bar_h, gap = 120, 420, 14, 12
    legend_h = 22 * len(series) + 8
    group_h = bar_h * len(series) + gap
    height = legend_h + group_h * len(tasks) + 24
    width = label_w + plot_w + 70
    peak = max([1.0] + [v for s in series for v in s.values.values()])
    colours = _colours(series)
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-labelledby="chart-title">',
           f'<title id="chart-title">{escape(metric)} per task: {", ".join(escape(s.label) for s in series)}</title>']
    for i, s in enumerate(series):
        y = 6 + 22 * i
        out.append(f'<rect x="{label_w}" y="{y}" width="14" height="14" fill="{colours[i]}"/>'
                   f'<text x="{label_w + 20}" y="{y + 12}" class="legend">{escape(s.label)}</text>')
    for t, task in enumerate(tasks):
        top = legend_h + t * group_h
        out.append(f'<text x="{label_w - 8}" y="{top + group_h / 2}" text-anchor="end" class="task">'
                   f'{escape(_clip(task, 16))}</text>')
        for i, s in enumerate(series):
            y = top + i * bar_h
            v = s.values.get(task)
            if v is None:
                out.append(f'<text x="{label_w + 4}" y="{y + bar_h - 3}" class="missing">not measured</text>')
                continue
            w = max(0.0, v) / peak * plot_w
            out.append(f'<rect class="bar" x="{label_w}" y="{y + 1}" width="{w:.1f}" height="{bar_h - 2}" '
                       f'fill="{colours[i]}" data-model="{escape(s.ref)}" data-task="{escape(task)}" '
                       f'data-value="{v!r}"><title>{escape(s.label)}, {escape(task)}: {_fmt(v, metric)}</title>'
                       f'</rect><text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" class="value">'
                       f'{_fmt(v, metric)}</text>')
    axis = legend_h + group_h * len(tasks)
    out.append(f'<line x1="{label_w}" y1="{legend_h - 4}" x2="{label_w}" y2="{axis}" stroke="#9ca3af"/>')
    out.append("</svg>")
    return Markup("".join(out))


def _colours(series: Sequence[Series]) -> list[str]:
    out, i = [], 0
    for s in series:
        if s.role == "base":
            out.append(BASE_COLOUR)
        else:
            out.append(PALETTE[i % len(PALETTE)])
            i += 1
    return out


def _fmt(v: float, metric: str) -> str:
    return f"{100 * v:.1f}%" if metric in ("accuracy", "disagreement") and 0 <= v <= 1 else f"{v:.4g}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
