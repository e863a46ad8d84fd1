"""The explorer in a real browser: Debian's headless Chromium driven by Playwright.

Exported HTML files are opened offline: a graph of the demo prompt on the embedded model
(hover at each top feature's centre shows it and draws its links, its card shows its
label and contexts, the sliders' counts and scores match ``graph.prune``, pins group into
a supernode, search finds labels and ids) and a tiny graph whose user texts must stay
inert. Then JupyterLab runs a notebook with the widget explorer and a click in the
browser must change ``view.selected`` in the kernel.
"""

from __future__ import annotations

import base64
import json
import os
import re
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

REPO = Path(__file__).resolve().parent.parent
#: Chromium or Chrome, as ``make test`` passes it, else what scripts/find_browser.sh finds.
CHROMIUM = os.environ.get("CIRCUITLAB_BROWSER") or subprocess.run(
    ["sh", str(REPO / "scripts" / "find_browser.sh")], capture_output=True, text=True).stdout.strip()
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "the cat sat"
TESTS = Path(__file__).resolve().parent
# Skipped only where no browser is found, and never on CI.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM and os.environ.get("CI") != "true",
    reason="no Chromium or Chrome found (apt-get install chromium, or set CIRCUITLAB_BROWSER)")]

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
    if not CHROMIUM or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"No Chromium or Chrome ({CHROMIUM!r}); CI must run the browser tests: "
                    "install one (apt-get install chromium) or set CIRCUITLAB_BROWSER.")
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


# Screen position of the marker of node row ``r`` in the offline viewer.
NODE_JS = """r => {
  const gd = document.getElementById('cl-plot'), fl = gd._fullLayout;
  const t = gd._fullData.find(t => t.customdata && t.customdata.includes(r));
  const k = t.customdata.indexOf(r), box = gd.querySelector('.nsewdrag').getBoundingClientRect();
  return [box.left + fl.xaxis.l2p(t.x[k]), box.top + fl.yaxis.l2p(t.y[k])];
}"""
DEMO = 'The opposite of "small" is "'
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def hover(page, row: int, node_id: str) -> str:
    """Move the mouse to the centre of node ``row``'s marker; the hover label's text once it
    names ``node_id``."""
    x, y = page.evaluate(NODE_JS, row)
    page.mouse.move(x, y)
    page.wait_for_function("id => (document.querySelector('.hoverlayer .hovertext') || {}).textContent"
                           "?.includes(id)", arg=f"node {node_id}")
    return page.text_content(".hoverlayer")


def open_viewer(browser, path):
    page = browser.new_page(viewport={"width": 1400, "height": 850})
    page.set_default_timeout(30_000)
    page.goto(path.as_uri())
    page.wait_for_selector('#cl-plot[data-ready="1"]')
    return page


@pytest.fixture(scope="module")
def demo(gemma, tmp_path_factory):
    """The demo prompt traced on the embedded model (400 features), its display graph
    with a user label and the exported viewer."""
    base = circuitlab.attribute(gemma, DEMO, max_feature_nodes=400, progress=False).prune()
    feats = base.nodes[base.nodes["kind"] == "feature"].sort_values("influence", ascending=False)
    base.labels = {feats["node_id"].iloc[2]: "my label for <b>this</b>"}
    path = base.to_html(tmp_path_factory.mktemp("demo") / "graph.html", prune=False)
    return base, path


def shown_rows(page, base):
    """The grid point shown, the pruned graph there and the base rows of its features,
    strongest first (by the display graph's influence, as the viewer orders them)."""
    i, j = page.evaluate("[window.circuitlab.state.i, window.circuitlab.state.j]")
    grid = page.evaluate("window.circuitlab.data.grid")
    pruned = base.prune(grid["node"][i], grid["edge"][j])
    ids = set(pruned.nodes.loc[pruned.nodes["kind"] == "feature", "node_id"])
    feats = base.nodes[base.nodes["node_id"].isin(ids)].sort_values("influence", ascending=False)
    return grid, (i, j), pruned, feats.index.tolist()


def test_viewer_hover_top_features_and_cards(browser, demo):
    base, path = demo
    page = open_viewer(browser, path)
    _, _, pruned, rows = shown_rows(page, base)
    features = int((pruned.nodes["kind"] == "feature").sum())
    assert 0 < features <= 300, "a legible default: a few hundred features at most"
    assert int(page.get_attribute("#cl-counts", "data-features")) == features
    names = page.evaluate("[...Array(window.circuitlab.data.nodes.id.length).keys()].map("
                          "r => window.circuitlab.data.nodes.auto[r])")
    # On open, the strongest links of the shown graph are drawn (not a scatter plot).
    backbone = page.evaluate("window.circuitlab.data.backbone_links")
    opened = page.evaluate("window.circuitlab.drawn()")
    assert opened == min(backbone, pruned.n_edges) and page.locator("#cl-links line").count() == opened
    assert f"the {opened} strongest" in page.inner_text("#cl-drawn")
    for r in rows[:10]:
        node = base.nodes.loc[r]
        fid = f"L{node['layer']}/F{node['feature']}"
        text = hover(page, r, node["node_id"])
        name = base.labels.get(node["node_id"]) or names[r]
        assert fid in text and name in text, (fid, name, text)
        drawn = page.evaluate("window.circuitlab.drawn()")
        assert 0 < drawn <= backbone + page.evaluate("window.circuitlab.data.max_links")
        assert page.locator("#cl-links line").count() == drawn, "hovering draws the node's links"
        assert "of the focused nodes" in page.inner_text("#cl-drawn")
    # Click the strongest feature: its name, id, card (label, contexts) and connections.
    top = base.nodes.loc[rows[0]]
    hover(page, rows[0], top["node_id"])
    x, y = page.evaluate(NODE_JS, rows[0])
    page.mouse.click(x, y)
    page.wait_for_selector("#cl-connections .cl-row")
    assert f"L{top['layer']}/F{top['feature']}" in page.inner_text("#cl-selection")
    assert names[rows[0]] in page.inner_text("#cl-selection")
    assert page.locator("#cl-card .cl-ctx").count() > 0, "top contexts in the card"
    assert "activation on this prompt" in page.inner_text("#cl-card")
    page.mouse.move(5, 5)
    assert page.evaluate("window.circuitlab.drawn()") > 0, "a click keeps the links"
    assert ink(page, page.locator("#cl-plot .nsewdrag").bounding_box()) > 0.01
    page.close()


def test_viewer_sliders_match_prune(browser, demo):
    base, path = demo
    page = open_viewer(browser, path)
    grid = page.evaluate("window.circuitlab.data.grid")
    before = page.inner_text("#cl-scores")
    for i, j in [(0, 0), (2, 3), (len(grid["node"]) - 1, len(grid["edge"]) - 1), (4, 1)]:
        page.locator("#cl-node").fill(str(i))
        page.locator("#cl-edge").fill(str(j))
        pruned = base.prune(grid["node"][i], grid["edge"][j])
        s = pruned.scores()
        assert int(page.get_attribute("#cl-counts", "data-nodes")) == len(pruned.nodes)
        assert int(page.get_attribute("#cl-counts", "data-links")) == pruned.n_edges
        assert page.inner_text("#cl-node-value") == str(grid["node"][i])
        shown = dict(re.findall(r"(replacement|completeness) ([0-9.]+)", page.inner_text("#cl-scores")))
        for key in ("replacement", "completeness"):  # as displayed, to 3 decimals
            assert float(shown[key]) == pytest.approx(s[key], abs=6e-4)
        markers = page.evaluate("document.getElementById('cl-plot')._fullData.slice(0, 4)"
                                ".reduce((a, t) => a + t.x.length, 0)")
        assert markers == len(pruned.nodes)
    assert page.inner_text("#cl-scores") != before
    page.close()


def test_viewer_pins_supernodes_search(browser, demo):
    base, path = demo
    page = open_viewer(browser, path)
    _, _, _, rows = shown_rows(page, base)
    for r in rows[:2]:
        page.evaluate("r => window.circuitlab.select(r)", r)
        page.click("#cl-pin")
    assert page.locator("#cl-pinned .cl-row").count() == 2
    page.fill("#cl-group-name", "")
    page.click("#cl-group")
    assert "non-empty name" in page.inner_text("#cl-status")
    page.fill("#cl-group-name", "Opposites <i>")
    page.click("#cl-group")
    assert "Opposites <i>" in page.inner_text("#cl-supernodes")
    assert "Opposites <i>" in page.inner_text("#cl-subplot"), "the subgraph draws the supernode"
    box = page.locator(".cl-supernode").first
    box.locator("input").fill("Renamed")
    box.locator("button", has_text="rename").click()
    assert "Renamed" in page.inner_text("#cl-supernodes")
    doc = json.loads(page.evaluate("window.circuitlab.sidecar()"))
    assert doc["format"] == "circuitlab-labels/1" and list(doc["supernodes"]) == ["Renamed"]
    assert sorted(doc["supernodes"]["Renamed"]) == sorted(base.nodes.loc[rows[:2], "node_id"])
    # Search by the user's label and by feature id; a result selects its node.
    labelled = next(iter(base.labels))
    page.fill("#cl-search", "MY LABEL")
    hit = page.locator(f'#cl-search-results .cl-row[data-node="{labelled}"]')
    hit.click()
    assert base.labels[labelled] in page.inner_text("#cl-selection")
    top = base.nodes.loc[rows[0]]
    page.fill("#cl-search", f"L{top['layer']}/F{top['feature']}")
    page.press("#cl-search", "Enter")
    assert top["node_id"] in page.inner_text("#cl-selection")
    # A label set in the page names the node everywhere.
    page.fill("#cl-label", "renamed here")
    page.click("#cl-set-label")
    assert "renamed here" in page.inner_text("#cl-selection")
    assert json.loads(page.evaluate("window.circuitlab.sidecar()"))["labels"][top["node_id"]] == "renamed here"
    page.close()


def test_viewer_head_loadings_and_qk(browser, gemma, demo, tmp_path):
    """Exported with the model, the file holds the head loadings of the strongest links and
    the QK tables of their strongest heads: clicking a link's "heads" button lists its
    parts as ``graph.head_loadings`` computes them (summing to the link's weight), and
    clicking a head shows its attention row and QK pairs with the model's own score."""
    base, _ = demo
    page = open_viewer(browser, base.to_html(tmp_path / "heads.html", gemma, prune=False))
    try:
        api = "window.circuitlab"
        heads = page.evaluate(f"{api}.data.heads")
        assert len(heads["loadings"]) == heads["budget"]["links"] and heads["qk"]
        pos = dict(zip(base.nodes.node_id, base.nodes.pos))
        chosen = None
        for key, rows in heads["loadings"].items():  # a cross-position link with a QK table
            s, t = key.split(">")
            tables = [r for r in rows if r[0] == "head"
                      and f"{r[1]}/{r[2]}/{pos[t]}/{pos[s]}" in heads["qk"]]
            if pos[s] == pos[t] or not tables:
                continue
            page.evaluate(f"r => {api}.select(r)", page.evaluate(f"id => {api}.index(id)", t))
            if page.locator(f'#cl-connections button[data-link="{key}"]').count():
                chosen = s, t, tables[0]
                break
        assert chosen, "no link of the top ones has its QK table and a button"
        s, t, (_, layer, head, _) = chosen
        assert page.is_disabled("#cl-trace")  # no model in a file: the button says why
        assert "needs the model" in page.inner_text("#cl-trace-why")
        page.locator(f'#cl-connections button[data-link="{s}>{t}"]').first.click()
        page.wait_for_selector(f'#cl-link .cl-row[data-head="{layer}.{head}"]')
        shown = [line.split() for line in page.inner_text("#cl-link").splitlines()
                 if line.strip() and line.split()[0][0] in "+-"]
        want = base.head_loadings(gemma, [(s, t)], top=6)
        edge = float(want.edge.iloc[0])
        assert sum(float(x[0]) for x in shown) == pytest.approx(edge, abs=1e-3 * abs(edge) + 1e-4)
        for row in want[want.kind == "head"].itertuples():
            match = [x for x in shown if x[-1] == f"L{row.layer}.H{row.head}"]
            assert match and float(match[0][0]) == pytest.approx(row.weight, abs=1e-4)
        page.locator(f'#cl-link .cl-row[data-head="{layer}.{head}"]').click()
        page.wait_for_function("document.querySelector('#cl-qk').innerText.includes('score')")
        text = page.inner_text("#cl-qk")
        table = gemma.qk(base, layer, head, pos[t], pos[s], top=10)
        assert f"score {table.attrs['score']:.3g}" in text
        assert f"Head L{layer}.H{head}: query {pos[t]}" in text
        assert table["query"].iloc[0].split(" ")[0] in text
        page.screenshot(path=str(tmp_path / "heads.png"))
    finally:
        page.close()


def test_exported_html_user_text_stays_inert(browser, tiny_rm, tmp_path):
    prompt = "<script>pwned=3</script>"
    g = circuitlab.attribute(tiny_rm, prompt, max_feature_nodes=None, progress=False).prune(0.9, 0.99)
    feats = g.nodes.loc[g.nodes["kind"] == "feature", "node_id"].tolist()
    g.labels = {feats[0]: EVIL}
    g.supernodes = {EVIL: feats[1:3]}
    g.pinned = feats[1:3]
    page = open_viewer(browser, g.to_html(tmp_path / "graph.html", prune=False))
    assert page.evaluate("window.pwned") is None
    assert page.inner_text("#cl-title") == prompt
    assert page.locator("#cl-pinned .cl-row").count() == 2
    assert EVIL in page.inner_text("#cl-supernodes")
    page.evaluate("r => window.circuitlab.select(r)", g.index(feats[0]))
    assert EVIL in page.inner_text("#cl-selection")
    page.fill("#cl-search", "<script>")
    assert page.locator("#cl-search-results .cl-row").count() >= 1
    x, y = page.evaluate(NODE_JS, g.index(feats[0]))
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext")
    assert "<script>" in page.text_content(".hoverlayer")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert page.locator("img[src=x]").count() == 0 and page.locator("body script").count() == 3
    page.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOTEBOOK = [
    f"import sys, json; sys.path.insert(0, {str(TESTS)!r})\n"
    "from pathlib import Path\n"
    "import circuitlab\n"
    "from conftest import tiny_model, tiny_transcoders\n"
    "from circuitlab.viz import explore\n"
    "m = tiny_model()\n"
    "rm = circuitlab.ReplacementModel(m, tiny_transcoders(m, 'jumprelu_skip_transcoder'), name='tiny')\n"
    f"folder = circuitlab.attribute(rm, {PROMPT!r}, max_feature_nodes=None, progress=False).save('graph')\n"
    "view = explore(circuitlab.Graph.load(folder), rm, prune=False)\n"
    "view",
    "print('SELECTED=' + str(view.selected))",
    "print('STATE=' + json.dumps({'grid': view.grid, 'labels': view.labels, 'supernodes': view.supernodes, "
    "'file': json.loads((Path(folder) / 'labels.json').read_text())}))",
    "print('TRACED=' + json.dumps(view.traced[-1].metadata['targets']))",
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


def cell_output(page, i: int, prefix: str) -> str:
    """Run cell ``i`` and return its printed line after ``prefix``."""
    run_cell(page, i)
    out = page.locator(".jp-Notebook .jp-Cell").nth(i).locator(".jp-OutputArea-output")
    page.wait_for_function("([i, p]) => (document.querySelectorAll('.jp-Notebook .jp-Cell')[i]"
                           ".querySelector('.jp-OutputArea-output') || {}).innerText?.includes(p)",
                           arg=[i, prefix], timeout=60_000)
    return out.inner_text().strip().split(prefix, 1)[1]


def test_jupyterlab_widget(browser, lab, tmp_path):
    """The explorer in JupyterLab: it opens with links drawn; hover draws a node's links, a
    click selects it (in the kernel too) and shows its card; the sliders, search, grouping
    and a label set in the page reach Python and the graph's labels file."""
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(60_000)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(lab)
        page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.click()
        run_cell(page, 0)
        page.wait_for_selector('.cl-root #cl-plot[data-ready="1"]', timeout=180_000)
        api = "document.querySelector('.cl-root').circuitlab"
        opened = page.evaluate(f"{api}.drawn()")
        assert opened > 0 and page.locator(".cl-root #cl-links line").count() == opened
        ids = page.evaluate(f"{api}.data.nodes.id")
        kinds = page.evaluate(f"{api}.data.nodes.kind")
        feature = max((r for r, k in enumerate(kinds) if k == "feature"),
                      key=lambda r: page.evaluate(f"{api}.data.nodes.influence[{r}]"))
        hover(page, feature, ids[feature])
        assert "focused" in page.inner_text(".cl-root #cl-drawn")
        x, y = page.evaluate(NODE_JS, feature)
        page.mouse.click(x, y)
        page.wait_for_function(f"id => {api}.state.selected !== null && document.querySelector("
                               "'.cl-root #cl-selection').innerText.includes(id)", arg=ids[feature])
        page.wait_for_function("document.querySelector('.cl-root #cl-card').innerText.trim().length > 0"
                               " && !document.querySelector('.cl-root #cl-card').innerText.includes('loading')")
        assert cell_output(page, 1, "SELECTED=") == ids[feature]
        page.locator(".cl-root #cl-connections button[data-link]").first.click()
        page.wait_for_selector(".cl-root #cl-link .cl-row[data-head]")  # computed in the kernel
        parts = [float(line.split()[0]) for line in page.inner_text(".cl-root #cl-link").splitlines()
                 if line.strip() and line.split()[0][0] in "+-"]
        weight = float(page.inner_text(".cl-root #cl-link").split("weight ", 1)[1].split()[0])
        assert sum(parts) == pytest.approx(weight, rel=5e-3, abs=1e-3)  # the parts add up
        page.locator(".cl-root #cl-link .cl-row[data-head]").first.click()
        page.wait_for_function("document.querySelector('.cl-root #cl-qk').innerText.includes('score')")
        assert "query component" in page.inner_text(".cl-root #cl-qk") and parts

        page.fill(".cl-root #cl-label", "from the <b>widget</b>")
        page.click(".cl-root #cl-set-label")
        page.click(".cl-root #cl-pin")
        page.fill(".cl-root #cl-group-name", "Group <i>")
        page.click(".cl-root #cl-group")
        page.fill(".cl-root #cl-search", "from the <b>")
        page.wait_for_selector(f'.cl-root #cl-search-results .cl-row[data-node="{ids[feature]}"]')
        before = page.inner_text(".cl-root #cl-counts")
        page.locator(".cl-root #cl-node").fill("0")
        page.wait_for_function("b => document.querySelector('.cl-root #cl-counts').innerText !== b",
                               arg=before)
        page.screenshot(path=str(tmp_path / "lab.png"))
        assert page.locator(".cl-root #cl-selection b, .cl-root #cl-supernodes i").count() == 0
        state = json.loads(cell_output(page, 2, "STATE="))
        assert state["grid"][0] == 0
        assert state["labels"] == {ids[feature]: "from the <b>widget</b>"} == state["file"]["labels"]
        assert state["supernodes"] == {"Group <i>": [ids[feature]]} == state["file"]["supernodes"]
        page.locator(".cl-root #cl-trace").first.click()  # trace from this node: a new graph, shown below
        page.wait_for_selector('.cl-traced #cl-plot[data-ready="1"]', timeout=180_000)
        assert ids[feature] in page.inner_text(".cl-traced-title")
        assert json.loads(cell_output(page, 3, "TRACED=")) == [ids[feature]]
        page.locator(".cl-traced").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "traced.png"))
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(json.dumps({"screenshot": str(tmp_path / "failure.png"), "errors": errors[-10:]}))
        raise
    finally:
        page.close()
