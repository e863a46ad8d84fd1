"""The graph explorer: layout, link binning, escaping, sidecar, supernodes, scores,
Neuronpedia import and the static fallback (no browser; see test_browser.py)."""

from __future__ import annotations

import json
import os
import re
import sys
import types

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import circuitlab
from circuitlab import CircuitlabError, Graph
from circuitlab.cards import FeatureCard
from circuitlab.graph import KINDS
from circuitlab.prune import scores
from circuitlab.viz import explore, to_html

from_neuronpedia = Graph.from_neuronpedia
from circuitlab.viz.card import card_data, fetch
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


def test_widget_and_html_export_show_one_payload(graph, tmp_path):
    """The notebook explorer is the offline viewer: the same nodes, links, grid and scores
    as the HTML export of the same graph, with annotations synced both ways."""
    from circuitlab.viz.explorer import Explorer

    view = graph.show(prune=False)  # the short form of explore(graph)
    assert isinstance(view, Explorer) and "circuitlabViewer" in view._esm
    path = to_html(graph, tmp_path / "g.html", prune=False)
    page = path.read_text()
    embedded = page.split('<script id="cl-data" type="application/json">', 1)[1].split("</script>")[0]
    assert json.loads(view._data) == json.loads(embedded)
    data = json.loads(view._data)
    assert data["nodes"]["id"] == graph.nodes["node_id"].tolist()
    assert data["grid"]["scores"][-1][-1][0] == pytest.approx(scores(graph)["replacement"], abs=1e-4)
    assert data["backbone_links"] > 0 and view.grid == list(data["grid"]["default"])


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


def test_card_data_and_fallback():
    card = FeatureCard(1, 2, label="<b>x</b>", contexts=[
        {"quantile": "top", "tokens": ["<i>", "ok"], "acts": [1.0, 0.0], "max": 1.0}],
        top_tokens=[("<s>", 1.0)], histogram=([0.0, 1.0, 2.0], [3, 1]), prompt_activation=0.5)
    vocab = {}
    data = card_data(card, vocab)
    assert data["label"] == "<b>x</b>" and list(vocab) == ["<i>", "ok"], "raw text: shown as text"
    assert data["contexts"] == [["top", [0, 1], [255, 0]]] and data["histogram"] == [2.0, [3, 1]]
    empty = fetch(None, 1, 2, activation=3.0)
    assert "no examples cached" in empty.message and empty.prompt_activation == 3.0


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


def test_scores_update_with_sliders_and_pins(graph):
    view = explore(graph, prune=False)
    view.set_thresholds(1, 1)
    whole = view.scores()
    assert whole["graph"] == pytest.approx(scores(graph)) and whole["pinned"] is None
    view.set_thresholds(0.6, 0.9)
    node, edge = view.thresholds
    assert view.scores()["graph"] == pytest.approx(scores(graph.prune(node, edge)))
    a, b = feature_ids(view, 2)
    view.pin(a)
    one = view.scores()["pinned"]
    view.pin(b)
    two = view.scores()["pinned"]
    assert one is not None and two != one
    view.unpin([a, b])
    assert view.scores()["pinned"] is None


def test_labels_name_nodes_and_sync_from_the_page(graph):
    view = explore(graph, prune=False)
    a, b = feature_ids(view, 2)
    view.label(a, "<cat> feature")
    assert view.labels[a] == "<cat> feature" == graph.labels[a]
    assert view.state.names()[view.state.row[a]] == "<cat> feature"
    view.labels = {**view.labels, b: "set in the page"}  # as the front end does
    assert graph.labels[b] == "set in the page"
    view.labels = {"99_99_99": "unknown node"}  # refused: the page is set back
    assert view.labels == graph.labels and "99_99_99" not in graph.labels
    view.label(a, "")
    view.label(b, "")
    assert a not in view.labels and not graph.labels


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


def test_neuronpedia_roundtrip_of_feature_and_inner_logit_targets(tiny_rm, tmp_path):
    """A feature target and a logit at an inner position: the export writes the logit at its
    position and the feature as an ordinary feature node, records the targets, and reads
    back the same nodes, targets and edges; with feature targets only (no logit node), the
    layer count comes back too."""
    prompt = "the cat sat"
    trace = tiny_rm.run(tiny_rm.tokenize(prompt))
    p, f, _ = trace.features[1]
    feature = circuitlab.Feature(1, int(p[-1]), int(f[-1]))
    fid = f"1_{feature.feature}_{feature.pos}"
    g = circuitlab.attribute(tiny_rm, prompt, targets=[feature, circuitlab.Logit("a", pos=2)],
                             max_feature_nodes=None, progress=False)
    logit = g.nodes[g.nodes.kind == "logit"].node_id.tolist()
    assert set(g.metadata["targets"]) == {fid, *logit} and logit[0].endswith("_2")
    doc = g.to_neuronpedia(tmp_path / "np.json")
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    assert by_id[logit[0]]["ctx_idx"] == 2 and by_id[logit[0]]["is_target_logit"]
    assert by_id[fid]["feature_type"] == "cross layer transcoder" and by_id[fid]["ctx_idx"] == feature.pos
    assert doc["metadata"]["circuitlab"]["targets"] == g.metadata["targets"]
    back = from_neuronpedia(tmp_path / "np.json")
    cols = ["node_id", "kind", "layer", "pos", "feature", "token"]
    pd.testing.assert_frame_equal(back.nodes[cols], g.nodes[cols])
    assert back.metadata["targets"] == g.metadata["targets"]
    assert torch.equal(back.target_mask, g.target_mask)
    assert torch.allclose(back.target_weights, g.target_weights)
    assert torch.allclose(back.adjacency, g.adjacency)
    pruned = back.prune()
    assert set(pruned.nodes.node_id) >= {fid, *logit}

    only = circuitlab.attribute(tiny_rm, prompt, targets=[feature], max_feature_nodes=None,
                                progress=False).prune()
    doc = only.to_neuronpedia()
    doc["metadata"]["circuitlab"]["n_layers"] = 7  # a pruned graph may lack the top layer
    again = from_neuronpedia(doc)
    assert again.metadata["targets"] == [fid] and again.metadata["n_layers"] == 7
    del doc["metadata"]["circuitlab"]  # Neuronpedia's own graphs: their logit nodes
    assert not from_neuronpedia(doc).target_mask.any()


def test_static_fallback(graph, monkeypatch):
    from circuitlab.viz import explore as module

    monkeypatch.setattr(sys.modules["circuitlab.viz.explore"], "widgets_unavailable",
                        lambda: "ipywidgets is not installed")
    with pytest.warns(UserWarning, match="widgets unavailable"):
        fig = module(graph, prune=False)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert "static figure" in fig.layout.title.text
    assert len(fig.data) == N_BINS + len(KINDS) + 1  # links, one trace per node kind, labels
    assert sum(list(t.x).count(None) for t in fig.data[:N_BINS]) > 0, "its strongest links drawn"


def test_colab_widget_manager(monkeypatch, graph):
    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append(1))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    explore(graph, prune=False)
    assert calls == [1]


def test_large_graph_is_pruned_for_display():
    """5k feature nodes: pruned once for display; the explorer selects in the display graph."""
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
    assert len(json.loads(view._data)["nodes"]["id"]) == shown["base_nodes"]
    view.select(graph.nodes.node_id[n - 1])
    assert view.selected == graph.nodes.node_id[n - 1]
    hidden = next(i for i in graph.nodes.node_id if i not in view.state.row)
    with pytest.raises(CircuitlabError, match="not in the displayed graph"):
        view.select(hidden)


def test_feature_card_in_explorer(graph, tiny_rm, monkeypatch):
    """The page asks Python for the card of a feature without cached examples: it comes
    back with the model's output tokens and, without a model, says what is missing."""
    sent = []
    for rm in (tiny_rm, None):
        view = explore(graph, rm, prune=False)
        monkeypatch.setattr(view, "send", sent.append)
        node = feature_ids(view, 1)[0]
        r = view.state.row[node]
        layer, feature, pos = (int(view.state.shown.nodes[c][r]) for c in ("layer", "feature", "pos"))
        view._on_message(view, {"type": "card", "layer": layer, "feature": feature, "pos": pos,
                                "node": node}, [])
        assert sent[-1]["type"] == "card" and sent[-1]["key"] == f"{layer}/{feature}"
    with_model, bare = sent[-2]["card"], sent[-1]["card"]
    assert with_model["raises"] and "no examples cached" in bare["message"]