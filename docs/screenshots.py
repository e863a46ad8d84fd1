"""Regenerate the README's explorer screenshot from the demo graph (``make demo`` first).

    .venv/bin/python docs/screenshots.py [out/demo/graph]

Writes ``<graph>.html`` (the default export) and ``docs/explorer.png`` (a tighter
pruning, so the picture stays readable and small).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import circuitlab

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(folder: str = "out/demo/graph") -> None:
    from playwright.sync_api import sync_playwright

    graph = circuitlab.Graph.load(folder)
    start = time.perf_counter()
    html = graph.to_html(Path(folder).resolve().with_suffix(".html"))
    print(f"{html}: {html.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.0f} s")
    shown = graph.prune(0.6, 0.95)
    feats = shown.nodes[(shown.nodes["kind"] == "feature") & (shown.nodes["layer"] > 8)]
    top = feats.loc[feats["influence"].idxmax(), "node_id"]
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        small = shown.to_html(Path(tmp) / "graph.html")
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, timeout=60_000)
        page = browser.new_page(viewport={"width": 1024, "height": 600})
        page.goto(small.as_uri())
        page.wait_for_selector('#cl-plot[data-ready="1"]', timeout=120_000)
        page.evaluate("id => window.circuitlab.select(window.circuitlab.data.nodes.findIndex(n => n.id === id))", top)
        page.wait_for_selector("#cl-connections .cl-row")
        page.screenshot(path=str(HERE / "explorer.png"))
        browser.close()
    print(HERE / "explorer.png", f"{(HERE / 'explorer.png').stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(*sys.argv[1:])
