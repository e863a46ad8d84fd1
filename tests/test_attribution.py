"""Exactness of attribution graphs on tiny random models, against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model, tiny_transcoders

import circuitlab
from circuitlab import attribution, memory
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat on the mat."


def frozen_target_values(rm, graph, trace, acts, embed, errors):
    """Inputs of all graph targets in the frozen model with the given sources.

    ``acts[l]`` are feature activations ``[P, d_sae]`` (fixed: no re-encoding), ``embed``
    the residual entering layer 0, ``errors [L, P, d]`` the error terms.
    """
    x, resid = rm.frozen_run(trace, lambda l, x: rm.decode(l, acts, x) + errors[l], embed=embed)
    normed = rm.final_normed(trace, resid)
    out = torch.zeros(len(graph.nodes))
    for i, r in enumerate(graph.nodes.to_dict("records")):
        if r["kind"] == "feature":
            out[i] = rm.pre_activations(r["layer"], x[r["layer"], r["pos"]])[r["feature"]]
        elif r["kind"] == "logit":
            W_U, b_U = rm.model.W_U, rm.model.b_U
            t = r["feature"]
            out[i] = normed[r["pos"]] @ (W_U[:, t] - W_U.mean(1)) + (b_U[t] - b_U.mean())
    return out


def clean_sources(rm, trace):
    acts = [rm.encode(l, trace.mlp_in[l], trace.tokens) for l in range(rm.n_layers)]
    return acts, trace.embed.clone(), trace.errors.clone()


def check_edges_brute_force(rm, graph, n_sources=12, seed=0):
    """Zero a source in the frozen model: every target moves by exactly -edge. An error node
    holds the active features that are not nodes at its ``(layer, pos)``: zeroing it zeroes
    them too."""
    trace = rm.run(rm.tokenize(graph.prompt))
    acts, embed, errors = clean_sources(rm, trace)
    base = frozen_target_values(rm, graph, trace, acts, embed, errors)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    assert torch.allclose(base[targets], graph.inputs[targets], atol=1e-4)
    g = torch.Generator().manual_seed(seed)
    nodes = graph.nodes
    checked = 0
    for kind in ("feature", "error", "embedding"):
        idx = torch.tensor(nodes.index[nodes["kind"] == kind].to_numpy())
        # Prefer sources with nonzero out-edges so the check is not vacuous.
        idx = idx[(graph.adjacency[:, idx] != 0).any(0)]
        for i in idx[torch.randperm(len(idx), generator=g)[:n_sources]].tolist():
            r = nodes.iloc[i]
            a, e, err = [t.clone() for t in acts], embed.clone(), errors.clone()
            if kind == "feature":
                a[r.layer][r.pos, r.feature] = 0
            elif kind == "error":
                err[r.layer, r.pos] = 0
                nodes_here = nodes[(nodes["kind"] == "feature") & (nodes["layer"] == r.layer)
                                   & (nodes["pos"] == r.pos)]["feature"].tolist()
                kept = a[r.layer][r.pos, nodes_here].clone()
                a[r.layer][r.pos] = 0
                a[r.layer][r.pos, nodes_here] = kept
            else:
                e[r.pos] = 0
            delta = base - frozen_target_values(rm, graph, trace, a, e, err)
            edge = graph.adjacency[:, i]
            scale = graph.inputs[targets].abs().max()
            assert torch.allclose(delta[targets], edge[targets], atol=2e-5 * scale), (kind, r.node_id)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("arch", ARCHS)
def test_edges_match_brute_force(arch):
    model = tiny_model("gemma3")
    rm = ReplacementModel(model, tiny_transcoders(model, arch))
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    check_edges_brute_force(rm, graph)


def test_edges_match_brute_force_layernorm_model():
    model = tiny_model("gpt2")
    rm = ReplacementModel(model, tiny_transcoders(model, "skip_transcoder"))
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    check_edges_brute_force(rm, graph)


@pytest.mark.parametrize("max_nodes", [None, 150])
@pytest.mark.parametrize("arch", ARCHS)
def test_edges_plus_constant_equal_inputs(arch, max_nodes):
    model = tiny_model("gemma3", seed=1)
    rm = ReplacementModel(model, tiny_transcoders(model, arch, seed=1))
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=max_nodes, progress=False, dtype=torch.float32)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[targets], graph.inputs[targets], atol=1e-5)
    # Constants are not the inputs themselves: the edges carry real weight.
    assert graph.adjacency[targets].abs().sum(1).min() > 0
    if max_nodes is not None:
        assert (graph.nodes["kind"] == "feature").sum() == max_nodes


@pytest.mark.parametrize("arch", ARCHS)
def test_bounded_rows_stay_exact(arch, monkeypatch):
    """With fewer candidate columns than active features, rows are stored folded, missed
    nodes are recomputed, and every edge is still exact; edges between nodes both graphs
    keep equal those of whole rows."""
    model = tiny_model("gemma3", seed=3)
    rm = ReplacementModel(model, tiny_transcoders(model, arch, seed=3))
    monkeypatch.setattr(memory, "CANDIDATES_PER_NODE", 10 ** 6)
    whole = circuitlab.attribute(rm, PROMPT, max_feature_nodes=80, progress=False,
                                 dtype=torch.float32, batch_size=16)
    assert whole.metadata["recomputed_rows"] == 0
    monkeypatch.setattr(memory, "CANDIDATES_PER_NODE", 1)
    monkeypatch.setattr(memory, "EXTRAS_PER_ROW", 8)
    monkeypatch.setattr(attribution, "spare_memory", lambda *a: 0)
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=80, progress=False,
                                 dtype=torch.float32, batch_size=16)
    assert graph.metadata["n_active_features"] > 4 * 80
    assert graph.metadata["recomputed_rows"] > 0
    check_edges_brute_force(rm, graph, n_sources=20)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[targets], graph.inputs[targets], atol=1e-5)
    ids = graph.nodes["node_id"]
    common = ids[ids.isin(set(whole.nodes["node_id"]))
                 & graph.nodes["kind"].isin(["feature", "logit"])]
    assert len(common) > 40
    here = torch.tensor(common.index.to_numpy())
    there = torch.tensor([whole.index(i) for i in common])
    assert torch.allclose(graph.adjacency[here][:, here], whole.adjacency[there][:, there],
                          atol=1e-6)


def test_truncated_graph_keeps_most_influential():
    """With a node budget, kept features carry more influence than the ones left out."""
    model = tiny_model("gemma3", seed=2)
    rm = ReplacementModel(model, tiny_transcoders(model, "jumprelu_skip_transcoder", seed=2))
    full = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    part = circuitlab.attribute(rm, PROMPT, max_feature_nodes=200, progress=False, dtype=torch.float32)
    feats = full.nodes[full.nodes["kind"] == "feature"]
    kept = set(part.nodes.loc[part.nodes["kind"] == "feature", "node_id"])
    inf_kept = feats.loc[feats["node_id"].isin(kept), "influence"].sum()
    top = feats["influence"].nlargest(200).sum()
    assert inf_kept > 0.8 * top


def test_replacement_with_errors_reproduces_logits(tiny_rm):
    tokens = tiny_rm.tokenize(PROMPT)
    trace = tiny_rm.run(tokens)
    logits = tiny_rm.forward(tokens, errors=trace.errors)
    assert (logits - trace.logits).abs().max() < 1e-4
    # Without errors the transcoders alone do change the output (random transcoders).
    assert (tiny_rm.forward(tokens) - trace.logits).abs().max() > 1e-2


def test_logit_target_kinds(tiny_rm):
    direction = torch.randn(tiny_rm.d_model)
    graph = circuitlab.attribute(tiny_rm, PROMPT, logit_targets=["x", 5, ("b", "c"), direction],
                                 max_feature_nodes=50, progress=False, dtype=torch.float32)
    logits = graph.nodes[graph.nodes["kind"] == "logit"]
    assert list(logits["token"])[:3] == ["x", tiny_rm.tokenizer.decode([5]), "b - c"]
    assert logits["node_id"].is_unique
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[targets], graph.inputs[targets], atol=1e-5)
    # Logit difference input equals the difference of the logits.
    trace = tiny_rm.run(tiny_rm.tokenize(PROMPT))
    ids = [tiny_rm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "bc"]
    diff = trace.logits[-1, ids[0]] - trace.logits[-1, ids[1]]
    assert abs(float(graph.inputs[logits.index[2]]) - float(diff)) < 1e-4


def test_default_logit_targets_cover_probability(tiny_rm):
    graph = circuitlab.attribute(tiny_rm, PROMPT, logit_prob=0.5, max_logits=20,
                                 max_feature_nodes=20, progress=False, dtype=torch.float32)
    probs = graph.nodes.loc[graph.nodes["kind"] == "logit", "prob"]
    assert probs.sum() >= 0.5 and probs.sum() - probs.min() < 0.5


def test_bfloat16_backward_close_to_float32(tiny_rm):
    g32 = circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    g16 = circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False,
                               dtype=torch.bfloat16)
    scale = g32.adjacency.abs().max()
    assert (g16.adjacency - g32.adjacency).abs().max() < 0.05 * scale
