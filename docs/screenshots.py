"""Regenerate the README's screenshots from the demo trace (``make demo`` first).

    .venv/bin/python docs/screenshots.py [out/demo/graph]

From the trace folder holding that graph (``out/demo``), writes ``docs/explorer.png`` (the
offline HTML viewer ``graph.html``, the strongest feature selected with its card and
links), ``docs/legend.png`` (the viewer with its legend open) and ``docs/widget.png`` (the
notebook explorer on ``pruned/`` in JupyterLab).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOP = """() => {
  const d = window.circuitlab.data, s = window.circuitlab.state, n = d.nodes;
  const gd = document.getElementById('cl-plot');
  const shown = new Set(gd._fullData[0].customdata);
  return [...shown].sort((a, b) => n.influence[b] - n.influence[a])[0];
}"""


def html_shots(page, html: Path) -> None:
    """The viewer with the strongest shown feature selected, then with the legend open."""
    page.goto(html.resolve().as_uri())
    page.wait_for_selector('#cl-plot[data-ready="1"]', timeout=120_000)
    page.evaluate("r => window.circuitlab.select(r)", page.evaluate(TOP))
    page.wait_for_selector("#cl-connections .cl-row")
    page.screenshot(path=str(HERE / "explorer.png"))
    page.click("details.cl-legend-box summary")
    page.screenshot(path=str(HERE / "legend.png"))


def widget_shot(page, graph: Path) -> None:
    """The notebook explorer in JupyterLab (started here on a free port, then stopped)."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        code = (f"from circuitlab.viz import explore\nview = explore({str(graph.resolve())!r})\n"
                "feats = view.state.shown.nodes.query('kind == \"feature\"')\n"
                "view.select(feats.sort_values('influence').node_id.iloc[-1])\nview")
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, Path(tmp) / "explore.ipynb")
        token, url = "circuitlab-docs", f"http://127.0.0.1:{port}"
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": f"{tmp}/runtime", "JUPYTER_CONFIG_DIR": f"{tmp}/config"}
        lab = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp}",
             "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                    break
                except OSError:
                    time.sleep(1)
            body = json.dumps({"path": "explore.ipynb", "type": "notebook", "name": "explore.ipynb",
                               "kernel": {"name": "python3"}}).encode()
            urllib.request.urlopen(urllib.request.Request(
                f"{url}/api/sessions?token={token}", data=body, method="POST",
                headers={"Content-Type": "application/json"}), timeout=60)
            page.goto(f"{url}/lab/tree/explore.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Control+Enter")
            page.wait_for_selector(".cl-root #cl-plot[data-ready=\"1\"]",
                                   timeout=300_000)
            page.wait_for_timeout(2000)
            page.evaluate("document.querySelectorAll('.jp-toast-container, .Toastify').forEach(e => e.remove())")
            page.locator(".cl-root").screenshot(path=str(HERE / "widget.png"))
        finally:
            lab.terminate()
            lab.wait(timeout=30)


def main(graph: str = "out/demo/graph") -> None:
    from playwright.sync_api import sync_playwright

    demo = Path(graph).parent
    with sync_playwright() as p:
        found = subprocess.run(["sh", str(HERE.parent / "scripts" / "find_browser.sh")],
                               capture_output=True, text=True).stdout.strip()
        if not found:
            sys.exit("No Chromium or Chrome found: install one (apt-get install chromium) or "
                     "set CIRCUITLAB_BROWSER to its path.")
        browser = p.chromium.launch(executable_path=found, args=ARGS, timeout=60_000)
        html_shots(browser.new_page(viewport={"width": 1400, "height": 850}), demo / "graph.html")
        widget_shot(browser.new_page(viewport={"width": 1900, "height": 1300}), demo / "pruned")
        browser.close()
    for name in ("explorer.png", "legend.png", "widget.png"):
        print(HERE / name, f"{(HERE / name).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(*sys.argv[1:])
