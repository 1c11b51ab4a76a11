"""The web pages of `zoo serve` on the demo registry: how long each page takes, from the
request leaving the client to the last byte (loopback, one request at a time).

Target: a model page under 100 ms. Every model's page is timed (the parity merges and
protected models are the heaviest: lineage, chart, rounds, card), plus the zoo list
and the compare page with all measured models. ``first_ms`` is each page's first view,
before its registry reads are cached (``zoo.hub.server.web.reader``: kept until the
database changes); ``median_ms`` and ``p95_ms`` are the views after it.

    .venv/bin/python bench/web_pages.py [--registry registry.db] [--runs 20]

Without --registry it runs `zoo demo --quick` (cached after the first run) in a scratch
folder, without publishing, and measures that registry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402

import httpx2  # noqa: E402

from zoo import Registry  # noqa: E402
from zoo.hub.server import ServeSettings, running  # noqa: E402
from zoo.hub.server.web.svg import model_url  # noqa: E402

TARGET_MS = 100.0


def timed(client: httpx2.Client, url: str, runs: int) -> dict[str, float]:
    t0 = time.perf_counter()
    client.get(url)  # the first view: this model's registry reads are not cached yet
    first = (time.perf_counter() - t0) * 1000
    wall, server = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.get(url)
        wall.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code)
        server.append(float(r.headers["server-timing"].split("dur=")[1]))
    wall.sort()
    return {"first_ms": round(first, 1), "median_ms": round(statistics.median(wall), 1), "p95_ms": round(wall[int(0.95 * (len(wall) - 1))], 1),
            "server_median_ms": round(statistics.median(server), 1), "bytes": len(r.content)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="a registry (default: build the quick demo's)")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoo-web-bench-") as tmp:
        path = args.registry
        if path is None:
            from zoo.demo.tour import run

            path = Path(tmp) / "registry.db"
            with Registry(path, create=True) as reg:
                run(reg, quick=True, publishing=False, log=lambda m: None)
        reg = Registry(path)
        models = [m["ref"] for m in reg.list()]
        pages = {"/ui": "zoo list", "/ui/compare": "compare"}
        pages.update({model_url(m): f"model {m}" for m in models})
        results = {}
        with running(reg, ServeSettings()) as url, httpx2.Client(base_url=url, timeout=60) as client:
            for page, label in pages.items():
                results[label] = timed(client, page, args.runs)
        reg.close()
    model_pages = {k: v for k, v in results.items() if k.startswith("model ")}
    slowest = max(model_pages, key=lambda k: model_pages[k]["median_ms"])
    slowest_first = max(model_pages, key=lambda k: model_pages[k]["first_ms"])
    save("web_pages", {
        "registry": "quick demo" if args.registry is None else str(args.registry.name),
        "models": len(models), "runs": args.runs, "target_model_page_ms": TARGET_MS,
        "slowest_model_page": {"page": slowest, **model_pages[slowest]},
        "model_page_median_of_medians_ms": round(statistics.median(v["median_ms"] for v in model_pages.values()), 1),
        "slowest_first_view": {"page": slowest_first, "first_ms": model_pages[slowest_first]["first_ms"]},
        "within_target": model_pages[slowest]["median_ms"] < TARGET_MS,
        "pages": results,
    })


if __name__ == "__main__":
    main()
