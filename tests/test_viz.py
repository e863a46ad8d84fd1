"""The graph explorer: layout, link binning, escaping, sidecar, supernodes, scores,
Neuronpedia import and the static fallback (no browser; see test_browser.py)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import circuitlab
from circuitlab import CircuitlabError, Graph
from circuitlab.cards import FeatureCard
from circuitlab.prune import scores
from circuitlab.viz import explore, to_html

from_neuronpedia = Graph.from_neuronpedia
from circuitlab.viz.card import fetch, render
from circuitlab.viz.figure import NODE_TRACES
from circuitlab.viz.legend import MAX_LINKS
from circuitlab.viz.layout import MIN_WIDTH, layout, visible
from circuitlab.viz.links import N_BINS, NEGATIVE, POSITIVE, bin_style, link_bin, segments, shares

PROMPT = "the cat\nsat on"
EVIL = '<script>x</script><!--\u2028'


@pytest.fixture(scope="module")
def graph(tiny_rm):
    return circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False)


def feature_ids(view, n):
    nodes = view.state.shown.nodes
    return nodes.loc[nodes["kind"] == "feature"].sort_values("influence", ascending=False)["node_id"][:n].tolist()


# ---------------------------------------------------------------------- layout


def test_visible_whitespace():
    assert visible(" the") == "␣the"
    assert visible("a\nb\t") == "a↵b⇥"
    assert visible("") == "∅"


def test_layout_rows_columns(graph):
    L = graph.metadata["n_layers"]
    lay = layout(graph.nodes, graph.token_strs, L)
    kind = graph.nodes["kind"]
    assert (lay.y[kind == "embedding"] == 0).all()
    assert (lay.y[kind == "logit"] == L + 1).all()
    inner = kind.isin(["feature", "error"]).to_numpy()
    assert (lay.y[inner] == graph.nodes["layer"].to_numpy()[inner] + 1).all()
    # Positions go across: every node sits inside its column, columns left to right.
    pos = graph.nodes["pos"].to_numpy()
    assert ((lay.x > lay.left[pos]) & (lay.x < lay.left[pos] + lay.width[pos])).all()
    assert (np.diff(lay.left) > 0).all()
    assert lay.tick_text[1 + PROMPT.index("\n")] == "↵" and lay.tick_text[1 + PROMPT.index(" ")] == "␣"


def test_layout_column_widths():
    rows = [dict(node_id=f"{p}", kind="embedding", layer=-1, pos=p, feature=0, prob=np.nan,
                 influence=np.nan) for p in range(3)]
    rows += [dict(node_id=f"0_{f}_1", kind="feature", layer=0, pos=1, feature=f, prob=np.nan,
                  influence=1.0) for f in range(6)]
    rows += [dict(node_id=f"1_{f}_2", kind="feature", layer=1, pos=2, feature=f, prob=np.nan,
                  influence=1.0) for f in range(2)]
    lay = layout(pd.DataFrame(rows), ["<bos>", " a", "b"], 2)
    assert lay.width[0] == MIN_WIDTH, "a column without features is compressed"
    assert lay.width[1] > lay.width[2] > lay.width[0], "wider columns hold more nodes"
    assert lay.tick_text == ["<bos>", "␣a", "b"]


# ---------------------------------------------------------------------- links


def test_link_binning(graph):
    share = shares(graph.adjacency)
    nz = graph.adjacency != 0
    assert torch.allclose(share.abs().sum(1)[nz.any(1)], torch.ones(int(nz.any(1).sum())))
    t, s = nz.nonzero(as_tuple=True)
    bins = link_bin(share[t, s].numpy())
    assert bins.min() >= 0 and bins.max() < N_BINS
    positive = share[t, s].numpy() > 0
    assert all(bin_style(b)[0] in POSITIVE for b in bins[positive])
    assert all(bin_style(b)[0] in NEGATIVE for b in bins[~positive])
    assert bin_style(N_BINS - 1)[1] > bin_style(N_BINS // 2)[1], "width grows with |share|"
    x, y = np.arange(len(graph.nodes), dtype=float), np.zeros(len(graph.nodes))
    segs = segments(x, y, s.numpy(), t.numpy(), bins)
    assert len(segs) == N_BINS
    assert sum(xs.count(None) for xs, _ in segs) == len(s), "one segment per edge"
    assert all(len(xs) == 3 * xs.count(None) for xs, _ in segs)


def test_explorer_draws_binned_traces(graph):
    from circuitlab.viz.explorer import Explorer

    view = graph.show(prune=False)  # the short form of explore(graph)
    assert isinstance(view, Explorer)
    fig = view.figure
    assert isinstance(fig, go.FigureWidget)
    assert len(fig.data) == N_BINS + 5, "link bins, one trace per node kind, the text labels"
    assert sum(len(t.x) for t in fig.data[NODE_TRACES]) == len(graph.nodes)
    assert sum(len(t.x or ()) for t in fig.data[:N_BINS]) == 0, "no links before a click"
    target = graph.nodes.node_id[graph.mask("logit").nonzero()[0, 0].item()]
    view.select(target)
    i = view.state.row[target]
    expected = min(MAX_LINKS, int(((graph.adjacency[i] != 0) | (graph.adjacency[:, i] != 0)).sum()))
    assert sum(list(t.x).count(None) for t in fig.data[:N_BINS]) == expected
    view.link_type.value = "output"  # logits have no outputs
    assert sum(list(t.x).count(None) for t in fig.data[:N_BINS]) == 0
    view.link_type.value = "input"
    assert sum(list(t.x).count(None) for t in fig.data[:N_BINS]) == expected
    # Neighbours are recoloured by their link to the selected node.
    colours = [c for t in fig.data[NODE_TRACES] for c in t.marker.color]
    assert any(c in POSITIVE + NEGATIVE for c in colours)


def test_connections_panel(graph):
    view = explore(graph, prune=False)
    node = feature_ids(view, 1)[0]
    view.select(node)
    conns = view.state.connections(node)
    for side in ("input", "output"):
        pos, neg = conns[side]["positive"], conns[side]["negative"]
        assert all(r["weight"] > 0 for r in pos) and all(r["weight"] < 0 for r in neg)
        assert [abs(r["weight"]) for r in pos] == sorted((abs(r["weight"]) for r in pos), reverse=True)
    first = conns["input"]["positive"][0]
    assert view.connections[0].options[0][1] == first["node_id"]
    assert first["place"] in view.connections[0].options[0][0]
    view.connections[0].value = first["node_id"]  # clicking a row selects that node
    assert view.selected == first["node_id"]
    with pytest.raises(CircuitlabError, match="Unknown node"):
        view.select("99_99_99")


# ---------------------------------------------------------------------- escaping


def test_html_escapes_prompt_and_labels(tiny_rm, tmp_path):
    g = circuitlab.attribute(tiny_rm, EVIL, max_feature_nodes=None, progress=False)
    node = g.nodes.node_id[0]
    g.labels[node] = "</script><script>alert(2)</script><!--"
    path = to_html(g, tmp_path / "g.html", prune=False)
    text = path.read_text(encoding="utf-8")
    assert "<script>x" not in text and "</script><script>" not in text.replace(
        "</script>\n<script", "")
    assert "\u2028" not in text
    tags = re.sub(r"<script[^>]*>.*?</script>", "<script></script>", text, flags=re.S)
    assert "src=" not in tags and "href=" not in tags, "nothing loaded from elsewhere (no CDN)"
    assert "Plotly.newPlot" in text and len(text) > 3_000_000, "plotly.js is inlined"
    assert "&lt;script&gt;" in text.split("<script>")[0], "the title is escaped"
    blob = re.search(r'<script id="cl-data" type="application/json">(.*?)</script>', text, re.S).group(1)
    assert "<" not in blob and ">" not in blob, "no '</script>' or '<!--' inside the data"
    data = json.loads(blob)
    assert data["labels"][node] == g.labels[node] and data["prompt"] == EVIL
    ticks = data["layout"]["xaxis"]["ticktext"]  # Plotly renders tags in texts
    assert "&lt;bos&gt;" in ticks and not any("<" in t for t in ticks)
    hovers = data["nodes"]["hover"]
    assert any("&lt;bos&gt;" in h for h in hovers)
    assert not any("<script" in h or "</script" in h or "<bos>" in h for h in hovers)
    assert data["grid"]["counts"][-1][-1][2] == g.prune(1.0, data["grid"]["edge"][-1]).n_edges
    assert len(data["nodes"]["id"]) == len(g.nodes)


def test_card_render_escapes_and_falls_back():
    card = FeatureCard(1, 2, label="<b>x</b>", contexts=[
        {"quantile": "top", "tokens": ["<i>", "ok"], "acts": [1.0, 0.0], "max": 1.0}],
        top_tokens=[("<s>", 1.0)], histogram=([0.0, 1.0, 2.0], [3, 1]), prompt_activation=0.5)
    text = render(card)
    assert "<i>" not in text and "&lt;i&gt;" in text and "<svg" in text and "0.5" in text
    empty = fetch(None, 1, 2, activation=3.0)
    assert "no examples cached" in empty.message and empty.prompt_activation == 3.0
    assert "no examples cached" in render(empty)


# ---------------------------------------------------------------------- sidecar


def test_sidecar_roundtrip(graph, tmp_path):
    folder = tmp_path / "g"
    graph.subgraph(torch.ones(len(graph.nodes), dtype=torch.bool)).save(folder)
    view = explore(Graph.load(folder), prune=False)
    a, b, c = feature_ids(view, 3)
    view.label(a, "cats")
    view.group([a, b], "Animals")
    view.pin(c)
    doc = json.loads((folder / "labels.json").read_text())
    assert doc["labels"] == {a: "cats"} and doc["supernodes"] == {"Animals": [a, b]}
    assert doc["pinned"] == [a, b, c]
    doc["note"] = "mine"  # keys we do not know survive writes
    (folder / "labels.json").write_text(json.dumps(doc))
    view.rename("Animals", "Pets")
    assert json.loads((folder / "labels.json").read_text())["note"] == "mine"
    loaded = Graph.load(folder)
    assert loaded.labels == {a: "cats"} and loaded.supernodes == {"Pets": [a, b]}
    assert loaded.pinned == [a, b, c]
    # Pruning and subgraphs keep annotations; saving over the folder merges labels.
    pruned = loaded.prune(0.9, 0.99)
    assert pruned.labels == loaded.labels and pruned.supernodes == loaded.supernodes
    other = Graph.load(folder)
    other.labels = {b: "dogs"}
    other.save(folder)
    assert Graph.load(folder).labels == {a: "cats", b: "dogs"}, "nothing written is lost"
    view.label(a, "")
    assert a not in Graph.load(folder).labels
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temp files"


def test_sidecar_atomic_and_bad_json(graph, tmp_path, monkeypatch):
    folder = tmp_path / "g"
    graph.subgraph(torch.ones(len(graph.nodes), dtype=torch.bool)).save(folder)
    view = explore(Graph.load(folder), prune=False)
    a, b = feature_ids(view, 2)
    view.label(a, "kept")
    before = (folder / "labels.json").read_text()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        view.label(b, "lost")
    monkeypatch.undo()
    assert (folder / "labels.json").read_text() == before, "a failed write leaves the old file"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    (folder / "labels.json").write_text("{not json")
    with pytest.raises(CircuitlabError, match="not valid JSON.*will not overwrite"):
        Graph.load(folder)
    with pytest.raises(CircuitlabError, match="not valid JSON"):
        view.label(a, "again")
    assert (folder / "labels.json").read_text() == "{not json"
    (folder / "labels.json").write_text('{"supernodes": {"x": []}}')
    with pytest.raises(CircuitlabError, match="non-empty lists"):
        Graph.load(folder)


# ---------------------------------------------------------------------- supernodes and scores


def test_group_rename_ungroup(graph):
    view = explore(graph, prune=False)
    a, b, c = feature_ids(view, 3)
    view.pin([a, b])
    view.group(view.pinned, "Texas")
    assert view.supernodes == {"Texas": [a, b]}
    with pytest.raises(CircuitlabError, match="at least one node"):
        view.group([], "Empty")
    with pytest.raises(CircuitlabError, match="exists already"):
        view.group([c], "Texas")
    with pytest.raises(CircuitlabError, match="already in a supernode"):
        view.group([a], "Other")
    with pytest.raises(CircuitlabError, match="Unknown node"):
        view.group(["nope"], "Other")
    view.group([c], "Austin")
    with pytest.raises(CircuitlabError, match="exists already"):
        view.rename("Texas", "Austin")
    assert view.supernodes == {"Texas": [a, b], "Austin": [c]}, "a failed rename keeps the group"
    view.rename("Texas", "Lone Star")
    assert view.supernodes == {"Austin": [c], "Lone Star": [a, b]}
    view.ungroup("Austin")
    with pytest.raises(CircuitlabError, match="No supernode"):
        view.ungroup("Austin")
    assert c in view.pinned, "ungrouped nodes stay pinned"
    assert view.supernodes == graph.supernodes  # the graph carries them
    graph.supernodes.clear(), graph.pinned.clear()


def test_supernode_edges_aggregated(graph):
    view = explore(graph, prune=False)
    feats = feature_ids(view, 6)
    logit = graph.nodes.node_id[graph.mask("logit").nonzero()[0, 0].item()]
    view.group(feats[:4], "Group")
    view.pin(logit)
    units, edges = view.state.subgraph()
    names = [u["name"] for u in units]
    assert names[0] == "Group" and len(units) == 2 and units[0]["members"] == feats[:4]
    rows = [view.state.row[i] for i in feats[:4]]
    t = view.state.row[logit]
    want = float(graph.adjacency[t, rows].sum())
    edge = next(e for e in edges if e["source"] == 0 and e["target"] == 1)
    assert edge["weight"] == pytest.approx(want, rel=1e-5)
    assert edge["share"] == pytest.approx(want / float(graph.adjacency[t].abs().sum()), rel=1e-5)
    sub = view.subfigure
    assert list(sub.data[-1].text) == ["Group", "Logit " + visible(graph.nodes.token[t])]
    graph.supernodes.clear(), graph.pinned.clear()


def test_scores_update_with_sliders_and_pins(graph):
    view = explore(graph, prune=False)
    whole = view.state.scores()
    assert whole["graph"] == pytest.approx(scores(graph)) and whole["pinned"] is None
    assert f"{whole['graph']['replacement']:.3f}" in view.status.value
    n0 = view.state.counts()
    view.set_thresholds(0.6, 0.9)
    n1 = view.state.counts()
    assert n1["nodes"] < n0["nodes"] and n1["edges"] < n0["edges"]
    assert f"nodes {n1['nodes']:,} / {n0['nodes']:,}" in view.status.value
    assert view.state.scores()["graph"] == pytest.approx(scores(graph.prune(0.6, 0.9)))
    a, b = feature_ids(view, 2)
    view.pin(a)
    one = view.state.scores()["pinned"]
    view.pin(b)
    two = view.state.scores()["pinned"]
    assert one is not None and two != one
    assert "pinned subgraph" in view.scores_html.value and f"{two['replacement']:.3f}" in view.scores_html.value
    view.unpin([a, b])
    assert view.state.scores()["pinned"] is None
    view.set_thresholds(1, 1)
    assert view.state.counts() == n0


def test_labels_show_in_hover_and_connections(graph):
    view = explore(graph, prune=False)
    a = feature_ids(view, 1)[0]
    view.label(a, "<cat> feature")
    hover = [h for t in view.figure.data[NODE_TRACES] for h in t.hovertext]
    assert any("&lt;cat&gt; feature" in h for h in hover) or view.labels[a] == "<cat> feature"
    assert view.state.names()[view.state.row[a]] == "<cat> feature"
    view.label(a, "")
    assert a not in view.labels


# ---------------------------------------------------------------------- exports and fallbacks


def test_neuronpedia_roundtrip(graph, tmp_path):
    g = graph.prune(0.9, 0.99)
    a, b = g.nodes.node_id[g.mask("feature").nonzero()[:2, 0].numpy()].tolist()
    g.labels = {a: "first"}
    g.supernodes = {"Both": [a, b]}
    doc = g.to_neuronpedia(tmp_path / "np.json")
    assert doc["nodes"][g.index(a)]["clerp"] == "first"
    assert doc["qParams"]["supernodes"] == [["Both", a, b]]
    back = from_neuronpedia(tmp_path / "np.json")
    cols = ["node_id", "kind", "layer", "pos", "feature", "token"]
    pd.testing.assert_frame_equal(back.nodes[cols], g.nodes[cols])
    assert np.allclose(back.nodes["activation"], g.nodes["activation"])
    assert torch.allclose(back.adjacency, g.adjacency)
    assert back.labels == {a: "first"} and back.supernodes == {"Both": [a, b]}
    assert back.token_strs == g.token_strs and back.tokens == g.tokens
    view = explore(str(tmp_path / "np.json"))
    assert view.state.counts()["nodes"] == len(g.nodes)
    with pytest.raises(CircuitlabError, match="Not Neuronpedia"):
        from_neuronpedia({"nodes": []})


def test_static_fallback(graph, monkeypatch):
    from circuitlab.viz import explore as module

    monkeypatch.setattr(sys.modules["circuitlab.viz.explore"], "widgets_unavailable",
                        lambda: "ipywidgets is not installed")
    with pytest.warns(UserWarning, match="widgets unavailable"):
        fig = module(graph, prune=False)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert "static figure" in fig.layout.title.text
    assert len(fig.data) == N_BINS + 5


def test_colab_widget_manager(monkeypatch, graph):
    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append(1))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    explore(graph, prune=False)
    assert calls == [1]


def test_large_graph_stays_responsive():
    """5k feature nodes: pruned once for display, clicks redraw a few traces quickly."""
    g = torch.Generator().manual_seed(0)
    P, L, F = 12, 10, 5000
    rows = [dict(node_id=f"E_{p}_{p}", kind="embedding", layer=-1, pos=p, feature=p,
                 activation=1.0, token=f"t{p}", prob=np.nan) for p in range(P)]
    lay = torch.randint(0, L, (F,), generator=g).tolist()
    pos = torch.randint(1, P, (F,), generator=g).tolist()
    rows += [dict(node_id=f"{l}_{i}_{p}", kind="feature", layer=l, pos=p, feature=i,
                  activation=1.0, token=f"t{p}", prob=np.nan) for i, (l, p) in enumerate(zip(lay, pos))]
    rows += [dict(node_id=f"{L + 1}_{i}_{P - 1}", kind="logit", layer=L, pos=P - 1, feature=i,
                  activation=1.0, token=f"o{i}", prob=0.5) for i in range(2)]
    n = len(rows)
    layer = torch.tensor([r["layer"] for r in rows])
    adj = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.01)
    adj *= layer[None, :] < layer[:, None]  # sources at lower layers: acyclic
    graph = Graph("x", list(range(P)), [f"t{p}" for p in range(P)], rows, adj,
                  torch.zeros(n), torch.zeros(n), {"n_layers": L})
    from circuitlab.prune import annotate_influence

    annotate_influence(graph)
    view = explore(graph)
    shown = view.state.counts()
    assert shown["nodes"] < n, "pruned for display by default"
    assert len(view.figure.data) == N_BINS + 5
    start = time.perf_counter()
    view.select(graph.nodes.node_id[n - 1])
    assert time.perf_counter() - start < 5
    assert sum(list(t.x).count(None) for t in view.figure.data[:N_BINS]) > 0


def test_feature_card_in_explorer(graph, tiny_rm):
    view = explore(graph, tiny_rm, prune=False)
    node = feature_ids(view, 1)[0]
    view.select(node)
    assert "raises:" in view.card.value and "activation on this prompt" in view.card.value
    hover = [h for t in view.figure.data[NODE_TRACES] for h in t.hovertext]
    assert any("top tokens:" in h for h in hover)
    bare = explore(graph, prune=False)  # no model: the card still shows what it can
    bare.select(node)
    assert "no examples cached" in bare.card.value and "activation on this prompt" in bare.card.value
