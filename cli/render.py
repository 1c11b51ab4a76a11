"""Terminal output for the CLI: progress bars, JSON, tables and one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from zoo.progress import Advance, ProgressFactory, no_progress


def emit_json(data: Any) -> None:
    """Objects indented; lists of objects one per line, which stays fast for big listings."""
    if isinstance(data, list) and len(data) > 0 and all(isinstance(x, dict) for x in data):
        emit_json_lines([json.dumps(x, default=str) for x in data])
    else:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit_json_lines(lines: list[str]) -> None:
    """A list of objects already written as JSON, one per line, as ``emit_json`` prints it."""
    sys.stdout.write("[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n")


def error(message: str) -> None:
    """One line on stderr; the message already says what to do next."""
    first = " ".join(str(message).split())
    sys.stderr.write(f"error: {first}\n")


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFactory]:
    """A progress factory for the Python API: a bar per long operation on a terminal,
    in bytes and, where the operation counts them, items (tensors); nothing when stderr
    is not a terminal (pipes, CI)."""
    if not enabled or not sys.stderr.isatty():
        yield no_progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[items]}"),
                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as bars:
        def factory(desc: str, total: int, total_items: int = 0, /) -> Advance:
            task = bars.add_task(desc, total=total, items="")
            done = [0]

            def advance(n: int, items: int = 0, /) -> None:
                if items and total_items:
                    done[0] += items
                    bars.update(task, advance=n, items=f"{done[0]}/{total_items} tensors")
                else:
                    bars.advance(task, n)

            return advance

        yield factory


@contextmanager
def training_bar(desc: str, enabled: bool = True) -> Iterator[Callable[[int, int, float, float], None]]:
    """A report(step, steps, loss, steps/s) for learned merges: one bar with the step,
    the loss and the throughput, on a terminal only."""
    if not enabled or not sys.stderr.isatty():
        yield lambda *_: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bars:
        task = None

        def report(step: int, steps: int, loss: float, rate: float) -> None:
            nonlocal task
            if task is None:
                task = bars.add_task(desc, total=steps, loss="-", rate="-")
            bars.update(task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}")

        yield report


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """A plain aligned table: (key, header) columns."""
    if not rows:
        return
    cells = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))
    sys.stdout.write(line.rstrip() + "\n")
    for c in cells:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() + "\n")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def tree(node: dict[str, Any], prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """Render a lineage node as box-drawing lines."""
    label = f"{node['role']}: " if node.get("role") else ""
    label += node["ref"]
    extra = [x for x in (node.get("kind"), node.get("method")) if x]
    if node.get("removed"):
        extra.append("removed")
    if extra:
        label += f" ({', '.join(extra)})"
    lines = [label if root else f"{prefix}{'└── ' if last else '├── '}{label}"]
    kids = node.get("parents", [])
    child_prefix = "" if root else prefix + ("    " if last else "│   ")
    for i, kid in enumerate(kids):
        lines += tree(kid, child_prefix, i == len(kids) - 1, root=False)
    return lines
