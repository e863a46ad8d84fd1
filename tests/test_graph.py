"""Graph data, pruning, scores, I/O and exports."""

from __future__ import annotations

import json

import networkx as nx
import pandas as pd
import pytest
import torch

import circuitlab
from circuitlab import Graph
from circuitlab.prune import influence, node_influence, normalized, scores

PROMPT = "the cat sat on the mat."


@pytest.fixture(scope="module")
def graph(tiny_rm):
    return circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False)


def test_nodes_table(graph, tiny_rm):
    nodes = graph.nodes
    assert list(nodes.columns) == ["node_id", "kind", "layer", "pos", "feature", "activation",
                                   "token", "prob", "influence"]
    assert nodes["node_id"].is_unique
    P, L = len(graph.tokens), tiny_rm.n_layers
    assert (nodes["kind"] == "error").sum() == L * P
    assert (nodes["kind"] == "embedding").sum() == P
    feats = nodes[nodes["kind"] == "feature"]
    assert (feats["pos"] > 0).all(), "BOS gets no feature nodes"
    assert (feats["activation"] > 0).all()
    assert graph.adjacency.shape == (len(nodes), len(nodes))
    # Sources never read from later positions.
    t, s = graph.adjacency.nonzero(as_tuple=True)
    assert (torch.tensor(nodes["pos"].to_numpy())[s] <= torch.tensor(nodes["pos"].to_numpy())[t]).all()


def test_edges_and_networkx(graph):
    edges = graph.edges()
    assert list(edges.columns) == ["source", "target", "weight"]
    assert len(edges) == graph.n_edges
    g = graph.to_networkx()
    assert g.number_of_nodes() == len(graph.nodes) and g.number_of_edges() == graph.n_edges
    assert nx.is_directed_acyclic_graph(g)
    row = edges.iloc[0]
    assert g.edges[row.source, row.target]["weight"] == pytest.approx(row.weight)


def test_influence_matches_matrix_inverse(graph):
    A = normalized(graph.adjacency).double()
    w = graph.target_weights.double()
    exact = w @ (torch.linalg.inv(torch.eye(len(A), dtype=torch.float64) - A) - torch.eye(len(A)))
    assert torch.allclose(influence(A.float(), w.float()).double(), exact, atol=1e-5)
    assert torch.allclose(node_influence(graph), torch.tensor(graph.nodes["influence"].to_numpy()).float())


def test_scores_bounds_and_meaning(graph):
    s = graph.scores()
    assert 0 < s["replacement"] < 1 and 0 < s["completeness"] < 1
    # Zeroing the error columns makes both scores perfect.
    no_err = Graph(graph.prompt, graph.tokens, graph.token_strs, graph.nodes.to_dict("records"),
                   graph.adjacency * ~graph.mask("error")[None, :], graph.inputs, graph.constants,
                   graph.metadata)
    perfect = no_err.scores()
    assert (perfect["replacement"], perfect["completeness"]) == pytest.approx((1.0, 1.0))
    # A subgraph without features explains nothing but tokens' direct paths.
    only_logits = graph.mask("logit")
    assert scores(graph, nodes=only_logits)["replacement"] <= s["replacement"]


def test_path_length_against_every_path(graph):
    """The mean path length is the influence-weighted mean length over every path from an
    embedding to a logit, enumerated one by one."""
    pruned = graph.prune(node_threshold=0.5, edge_threshold=0.8)
    A = normalized(pruned.adjacency).double()
    w = pruned.target_weights.double()
    g = nx.DiGraph([(int(s), int(t)) for t, s in pruned.adjacency.nonzero().tolist()])
    total = weighted = 0.0
    for e in pruned.nodes.index[pruned.nodes["kind"] == "embedding"]:
        for t in pruned.nodes.index[pruned.nodes["kind"] == "logit"]:
            if e not in g or t not in g:
                continue
            for path in nx.all_simple_paths(g, e, t):
                share = float(w[t]) * float(torch.prod(torch.stack(
                    [A[b, a] for a, b in zip(path, path[1:])])))
                total += share
                weighted += share * (len(path) - 1)
    assert total > 0
    assert pruned.scores()["path_length"] == pytest.approx(weighted / total, rel=1e-4)
    assert pruned.scores()["path_length"] > 1


def test_prune(graph):
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    n_feat = lambda g: int((g.nodes["kind"] == "feature").sum())  # noqa: E731
    assert 0 < n_feat(pruned) < n_feat(graph)
    assert pruned.n_edges < graph.n_edges
    assert (pruned.nodes["kind"] == "logit").sum() == (graph.nodes["kind"] == "logit").sum()
    # Kept features carry at least the requested share of feature influence.
    feats = graph.nodes[graph.nodes["kind"] == "feature"]
    kept = feats["node_id"].isin(set(pruned.nodes["node_id"]))
    assert feats.loc[kept, "influence"].sum() >= 0.8 * feats["influence"].sum() - 1e-6
    # Every kept feature still has a path to a logit.
    g = pruned.to_networkx()
    logits = set(pruned.nodes.loc[pruned.nodes["kind"] == "logit", "node_id"])
    for node in pruned.nodes.loc[pruned.nodes["kind"] == "feature", "node_id"]:
        assert nx.descendants(g, node) & logits
    # Tighter thresholds keep fewer features.
    assert n_feat(graph.prune(0.5, 0.9)) < n_feat(pruned)
    with pytest.raises(ValueError, match="Thresholds"):
        graph.prune(node_threshold=1.5)


def test_save_load_roundtrip(graph, tmp_path):
    graph.save(tmp_path / "g")
    (tmp_path / "g" / "labels.json").write_text('{"x": 1}')
    graph.save(tmp_path / "g")  # overwrite keeps the user's sidecar
    assert (tmp_path / "g" / "labels.json").read_text() == '{"x": 1}'
    loaded = Graph.load(tmp_path / "g")
    assert torch.equal(loaded.adjacency, graph.adjacency)
    assert torch.equal(loaded.constants, graph.constants)
    pd.testing.assert_frame_equal(loaded.nodes, graph.nodes)
    assert loaded.prompt == graph.prompt and loaded.tokens == graph.tokens
    assert not list(tmp_path.glob(".g*")), "no temp folders left behind"
    with pytest.raises(circuitlab.CircuitlabError, match="not a saved graph"):
        Graph.load(tmp_path)


def test_neuronpedia_json(graph, tmp_path):
    pruned = graph.prune()
    doc = pruned.to_neuronpedia(tmp_path / "np.json", labels={pruned.nodes.node_id[0]: "hello"},
                                supernodes=[["group", pruned.nodes.node_id[0]]])
    assert json.loads((tmp_path / "np.json").read_text()) == doc
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert doc["metadata"]["prompt_tokens"] == graph.token_strs
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert kinds <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert doc["nodes"][0]["clerp"] == "hello"
    assert doc["qParams"]["supernodes"] == [["group", pruned.nodes.node_id[0]]]
    L = graph.metadata["n_layers"]
    for n in doc["nodes"]:
        if n["feature_type"] == "logit":
            assert n["node_id"].startswith(f"{L + 1}_") and n["layer"] == str(L + 1)
        if n["feature_type"] == "embedding":
            assert n["node_id"].startswith("E_") and n["layer"] == "E"
    assert {l["source"] for l in doc["links"]} <= set(ids)
    assert len(doc["links"]) == pruned.n_edges


def test_bad_prompts(tiny_rm):
    for bad in ["", "   \n"]:
        with pytest.raises(circuitlab.CircuitlabError, match="empty or whitespace"):
            circuitlab.attribute(tiny_rm, bad, progress=False)
    with pytest.raises(circuitlab.CircuitlabError, match="limit is"):
        circuitlab.attribute(tiny_rm, "a" * 300, progress=False)


def test_bad_logit_targets(tiny_rm):
    with pytest.raises(circuitlab.CircuitlabError, match="not a single token"):
        circuitlab.attribute(tiny_rm, PROMPT, logit_targets=["ab"], progress=False)
    with pytest.raises(circuitlab.CircuitlabError, match="outside the vocabulary"):
        circuitlab.attribute(tiny_rm, PROMPT, logit_targets=[10**6], progress=False)
    with pytest.raises(circuitlab.CircuitlabError, match="twice"):
        circuitlab.attribute(tiny_rm, PROMPT, logit_targets=["a", "a"], progress=False)
    with pytest.raises(circuitlab.CircuitlabError, match="Unknown logit target"):
        circuitlab.attribute(tiny_rm, PROMPT, logit_targets=[1.5], progress=False)


def test_memory_estimate_refuses(tiny_rm):
    with pytest.raises(circuitlab.CircuitlabError, match="needs about .* GiB"):
        circuitlab.attribute(tiny_rm, PROMPT, memory_limit=1000, progress=False)


def test_nan_activations_rejected(tiny):
    from conftest import tiny_transcoders

    tcs = tiny_transcoders(tiny, "jumprelu_skip_transcoder")
    with torch.no_grad():
        tcs[1].W_enc[0, 0] = float("nan")
    rm = circuitlab.ReplacementModel(tiny, tcs)
    with pytest.raises(circuitlab.CircuitlabError, match="NaN/inf activations"):
        circuitlab.attribute(rm, PROMPT, progress=False)
