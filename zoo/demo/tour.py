"""The whole demo in one call: build and register the demo zoo, merge it, protect one
expert and merge with it, publish the best merge through a local ``zoo serve``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from zoo.demo.build import FULL, QUICK, DemoResult

if TYPE_CHECKING:
    from zoo.registry import Registry

Report = Callable[[int, int, float, float], None]


@dataclass
class Tour:
    """What the demo did: the zoo it built, one accuracy row per merge, the parity
    merges' summaries, and (when they ran) the protection and publishing results."""

    zoo: DemoResult
    table: list[dict[str, Any]]
    parity: list[dict[str, Any]]
    protection: dict[str, Any] | None
    published: dict[str, Any] | None
    keys: Path

    @property
    def tasks(self) -> list[str]:
        return list(self.zoo.experts)

    @property
    def compare_path(self) -> str:
        """The page of ``zoo serve`` that compares the demo's merges, task by task."""
        rows = [*self.table, *((self.protection or {}).get("rows") or [])]
        models = dict.fromkeys(r["model"] for r in rows if r.get("model"))
        return "/ui/compare?" + urlencode([("m", m) for m in models])

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``zoo demo --json``."""
        z = self.zoo
        return {"base": z.base, "experts": z.experts, "accuracy": z.accuracy, "built": z.built,
                "seconds": z.seconds, "registry": str(z.registry), "store": str(z.store), "keys": str(self.keys),
                "table": self.table, "parity": self.parity, "protection": self.protection,
                "published": self.published}


def run(registry: "Registry", *, quick: bool = False, learned: bool | None = None, protection: bool = True,
        publishing: bool = True, log: Callable[[str], None] = print, report: Report | None = None) -> Tour:
    """Run the demo on ``registry``: ``quick`` is a tiny build of the same zoo (for CI);
    ``learned`` adds the learned merges (default: on, off with ``quick``); ``report``
    follows their training steps."""
    from zoo.demo.build import run_demo
    from zoo.demo.merges import merge_demo, parity_summary
    from zoo.demo.protection import protect_demo, publish_demo

    zoo = run_demo(registry, QUICK if quick else FULL, log=log)
    learned = not quick if learned is None else learned
    rows = merge_demo(registry, zoo, log=log, learned=learned, report=report)
    locked = protect_demo(registry, zoo, rows, log=log, learned=learned, report=report) if protection else None
    parity = parity_summary(registry, rows, zoo.config.prefix)
    published = publish_demo(registry, zoo, rows, log=log) if publishing else None
    return Tour(zoo, rows, parity, locked, published, registry.keys_dir)
