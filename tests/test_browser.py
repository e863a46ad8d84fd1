"""The explorer in a real browser: Debian's headless Chromium driven by Playwright.

An exported HTML file is opened offline (node and link counts, hover, click, the
connections list, a screenshot), then JupyterLab runs a notebook with the widget explorer
and a click in the browser must change ``view.selected`` in the kernel.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

import circuitlab
from circuitlab.viz.links import N_BINS
from circuitlab.viz.state import ViewState

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "the cat sat"
TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

# Screen position of point ``i`` of trace ``k`` of the Plotly plot ``el``.
POINT_JS = """([el, k, i]) => {
  const gd = el.closest('.js-plotly-plot') || el, fl = gd._fullLayout, t = gd._fullData[k];
  const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
  return [box.left + fl.xaxis.l2p(t.x[i]), box.top + fl.yaxis.l2p(t.y[i])];
}"""
# Share of non-white pixels of a PNG (base64) inside a rectangle.
INK_JS = """async ([png, x, y, w, h]) => {
  const img = new Image(); img.src = 'data:image/png;base64,' + png; await img.decode();
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(x, y, w, h).data; let ink = 0;
  for (let p = 0; p < d.length; p += 4) if (d[p] < 235 || d[p + 1] < 235 || d[p + 2] < 235) ink++;
  return ink / (w * h);
}"""


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is missing at {CHROMIUM}; `make setup` installs it "
                    "(apt-get install -y chromium). Browser tests are never skipped.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def graph(tiny_rm):
    return circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False)


def ink(page, box) -> float:
    png = base64.b64encode(page.screenshot()).decode()
    return page.evaluate(INK_JS, [png, int(box["x"]), int(box["y"]), int(box["width"]), int(box["height"])])


def test_exported_html(browser, graph, tmp_path):
    g = graph.prune(0.9, 0.99)
    feats = g.nodes.loc[g.nodes["kind"] == "feature", "node_id"].tolist()
    g.labels = {feats[0]: "cat <feature>"}
    g.supernodes = {"Pets": feats[1:3]}
    g.pinned = feats[1:3]
    path = g.to_html(tmp_path / "graph.html", prune=False)
    state = ViewState(g, prune=False)
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(path.as_uri())
    page.wait_for_selector('#cl-plot[data-ready="1"]')
    # Nodes and links as exported.
    assert page.locator("#cl-plot .scatterlayer .trace .points path").count() == len(g.nodes)
    assert int(page.get_attribute("#cl-counts", "data-links")) == g.n_edges
    assert page.locator("#cl-pinned .cl-row").count() == 2
    assert "Pets" in page.inner_text("#cl-supernodes")
    # Hover the top logit: its tooltip; click it: the connections list.
    kinds = ["feature", "error", "embedding", "logit"]
    k = N_BINS + kinds.index("logit")
    plot = page.query_selector("#cl-plot")
    x, y = page.evaluate(POINT_JS, [plot, k, 0])
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext")
    assert "Logit" in page.text_content(".hoverlayer")
    page.mouse.click(x, y)
    page.wait_for_selector("#cl-connections .cl-row")
    row = state.row[g.nodes.node_id[g.mask("logit").nonzero()[0, 0].item()]]
    logit_id = state.ids[row]
    assert logit_id in page.inner_text("#cl-connections .cl-heading")
    state.select(logit_id)
    links = len(state.links()[0])  # of the clicked and the pinned nodes
    assert links > int((g.adjacency[row] != 0).sum())
    assert page.evaluate("window.circuitlab.drawn()") == links
    assert f"{links} links drawn" in page.inner_text("#cl-drawn")
    first = page.locator("#cl-connections .cl-row").first
    target = first.get_attribute("data-node")
    first.click()
    assert target in page.inner_text("#cl-connections .cl-heading")
    assert "cat <feature>" in page.inner_text("#cl-connections") or target != feats[0]
    box = page.locator("#cl-plot .nsewdrag").bounding_box()
    assert ink(page, box) > 0.01, "the plot area is not blank"
    page.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOTEBOOK = [
    f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    "import circuitlab\n"
    "from conftest import tiny_model, tiny_transcoders\n"
    "from circuitlab.viz import explore\n"
    "m = tiny_model()\n"
    "rm = circuitlab.ReplacementModel(m, tiny_transcoders(m, 'jumprelu_skip_transcoder'), name='tiny')\n"
    f"graph = circuitlab.attribute(rm, {PROMPT!r}, max_feature_nodes=None, progress=False)\n"
    "view = explore(graph, prune=False)\n"
    "view",
    "print('SELECTED=' + str(view.selected))",
]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 with a token, on a free port; always shut down."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "explore.ipynb")
    port, token = free_port(), "circuitlab-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "HF_HUB_OFFLINE": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={tmp_path}", "--ServerApp.port_retries=0",
         "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
         "--ServerApp.shutdown_no_activity_timeout=600",
         "--MappingKernelManager.cull_idle_timeout=600"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(1)
        # Start the notebook's kernel up front, so Lab attaches to it without asking.
        body = json.dumps({"path": "explore.ipynb", "type": "notebook", "name": "explore.ipynb",
                           "kernel": {"name": "python3"}}).encode()
        request = urllib.request.Request(f"{url}/api/sessions?token={token}", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=60)
        yield f"{url}/lab/tree/explore.ipynb?token={token}"
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """End the process group we started: SIGTERM, then SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_cell(page, i: int) -> None:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(i)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")


def test_jupyterlab_widget(browser, graph, lab, tmp_path):
    state = ViewState(graph, prune=False)
    expected = state.ids[int((graph.nodes["kind"] == "logit").to_numpy().nonzero()[0][0])]
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(60_000)
    try:
        page.goto(lab)
        page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.click()
        run_cell(page, 0)
        plot = page.wait_for_selector(".circuitlab-explorer .js-plotly-plot", timeout=180_000)
        page.wait_for_selector(".circuitlab-explorer .js-plotly-plot .scatterlayer .trace .points path")
        assert page.locator(".circuitlab-explorer .js-plotly-plot").count() >= 2, "graph and subgraph"
        k = N_BINS + 3  # the logit trace
        x, y = page.evaluate(POINT_JS, [plot, k, 0])
        page.mouse.click(x, y)
        page.wait_for_function(
            "id => document.querySelector('.circuitlab-explorer').innerText.includes(id)",
            arg=expected, timeout=60_000)
        page.screenshot(path=str(tmp_path / "lab.png"))
        run_cell(page, 1)
        out = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea-output")
        out.wait_for(timeout=60_000)
        assert out.inner_text().strip() == f"SELECTED={expected}"
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(json.dumps({"screenshot": str(tmp_path / "failure.png")}))
        raise
    finally:
        page.close()
