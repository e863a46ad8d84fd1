"""Targets anywhere: feature targets and logits at inner positions (and a completion's
tokens), exact against brute force on tiny models of every transcoder kind."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_clt, tiny_model, tiny_transcoders
from test_attribution import check_edges_brute_force, clean_sources

import circuitlab
from circuitlab import Direction, Feature, Logit
from circuitlab.errors import CircuitlabError
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat on the mat."
KINDS = [("gemma3", a) for a in ARCHS] + [("gpt2", "skip_transcoder"), ("gemma3", "clt"),
                                          ("gpt2", "clt")]


def make_rm(model: str, transcoders: str, seed: int = 0) -> ReplacementModel:
    m = tiny_model(model, seed=seed)
    tcs = (tiny_clt(m, "jumprelu", True, seed=seed) if transcoders == "clt"
           else tiny_transcoders(m, transcoders, seed=seed))
    return ReplacementModel(m, tcs, name="tiny")


def active(rm, pos: int, n: int = 2) -> list[Feature]:
    """``n`` active features at ``pos``, from the highest layers that have one."""
    trace = rm.run(rm.tokenize(PROMPT))
    out = []
    for layer in range(rm.n_layers - 1, -1, -1):
        p, f, _ = trace.features[layer]
        here = f[p == pos % len(trace.tokens)]
        if len(here):
            out.append(Feature(layer, pos, int(here[0])))
        if len(out) == n:
            break
    return out


def exact(graph):
    """Every target's edges plus its constant equal its input."""
    targets = graph.target_mask
    total = graph.adjacency.sum(1) + graph.constants
    scale = graph.inputs[targets].abs().max()
    assert torch.allclose(total[targets], graph.inputs[targets], atol=1e-5 * scale)


@pytest.mark.parametrize("model, transcoders", KINDS)
def test_feature_and_inner_logit_targets_match_brute_force(model, transcoders):
    """A graph of two feature targets (one at an inner position) and a logit at an inner
    position, with and without a node budget: every sampled edge is the brute-force effect of
    zeroing its source in the frozen model, and each target's edges + constant = its input."""
    rm = make_rm(model, transcoders, seed=2)
    features = [active(rm, -1, 1)[0], active(rm, 4, 1)[0]]
    targets = features + [Logit("c", pos=3)]
    for budget in (None, 12):
        graph = circuitlab.attribute(rm, PROMPT, targets=targets, max_feature_nodes=budget,
                                     progress=False, dtype=torch.float32)
        ids = {f"{f.layer}_{f.feature}_{f.pos % len(graph.tokens)}" for f in features}
        logit = graph.nodes[graph.nodes.kind == "logit"]
        assert list(logit.pos) == [3] and ids <= set(graph.nodes.node_id)
        assert set(graph.metadata["targets"]) == ids | set(logit.node_id)
        exact(graph)
        check_edges_brute_force(rm, graph, n_sources=6)
        if budget is not None:
            assert (graph.nodes.kind == "feature").sum() == budget


@pytest.mark.parametrize("model, transcoders", [("gemma3", "jumprelu_skip_transcoder"),
                                                 ("gpt2", "skip_transcoder"), ("gemma3", "clt")])
def test_direction_targets_match_brute_force(model, transcoders, tmp_path):
    """A direction in a layer's MLP input (a probe's, say) as a target, beside a logit: its
    edges are the brute-force effects of zeroing each source, its edges + constant equal its
    projection, its head loadings add up, and it survives prune, save, load, the HTML export
    and a Neuronpedia export (which leaves it out)."""
    rm = make_rm(model, transcoders, seed=5)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(rm.d_model, generator=g)
    graph = circuitlab.attribute(rm, PROMPT, targets=[Direction(2, -2, probe, "my probe"), "c"],
                                 max_feature_nodes=None, progress=False, dtype=torch.float32)
    node = graph.nodes[graph.nodes.kind == "direction"].iloc[0]
    assert (node.layer, node.pos, node.token) == (2, len(graph.tokens) - 2, "my probe")
    trace = rm.run(rm.tokenize(PROMPT))
    assert graph.inputs[graph.index(node.node_id)] == pytest.approx(
        float(trace.mlp_in[2][node.pos] @ probe), rel=1e-5)
    exact(graph)
    acts, embed, errors = clean_sources(rm, trace)
    x, _ = rm.frozen_run(trace, lambda l, x: rm.decode(l, acts, x) + errors[l], embed=embed)
    for r in (graph.adjacency[graph.index(node.node_id)] != 0).nonzero()[:6, 0].tolist():
        source = graph.nodes.iloc[r]
        a, e, err = [t.clone() for t in acts], embed.clone(), errors.clone()
        if source.kind == "feature":
            a[source.layer][source.pos, source.feature] = 0
        elif source.kind == "error":
            err[source.layer, source.pos] = 0
        else:
            e[source.pos] = 0
        x2, _ = rm.frozen_run(trace, lambda l, x: rm.decode(l, a, x) + err[l], embed=e)
        delta = float((x[2][node.pos] - x2[2][node.pos]) @ probe)
        assert delta == pytest.approx(float(graph.adjacency[graph.index(node.node_id), r]), abs=1e-4)
    loads = graph.head_loadings(rm, [(s, node.node_id) for s in graph.nodes.node_id[
        (graph.adjacency[graph.index(node.node_id)] != 0).numpy()][:5]])
    sums = loads.groupby(["source", "target"]).agg(w=("weight", "sum"), e=("edge", "first"))
    assert (sums.w - sums.e).abs().max() < 1e-4
    pruned = graph.prune(0.5, 0.9)
    assert node.node_id in set(pruned.nodes.node_id)
    back = circuitlab.Graph.load(pruned.save(tmp_path / "g"))
    assert (back.nodes.kind == "direction").sum() == 1 and back.target_mask.sum() == 2
    back.to_html(tmp_path / "g.html", prune=False)
    doc = back.to_neuronpedia()
    assert node.node_id not in {n["node_id"] for n in doc["nodes"]}
    assert all(link["target"] != node.node_id for link in doc["links"])


@pytest.mark.parametrize("transcoders", ["jumprelu_skip_transcoder", "clt"])
def test_an_inactive_feature_asked_for_explicitly(transcoders):
    """``Feature(..., inactive=True)``: why a feature stays off. Its pre-activation (below
    threshold) is its edges plus constant, each edge the brute-force effect of its source,
    and the node feeds nothing."""
    rm = make_rm("gemma3", transcoders, seed=6)
    trace = rm.run(rm.tokenize(PROMPT))
    p, f, _ = trace.features[2]
    off = next(i for i in range(rm.d_sae(2)) if i not in set(f[p == 5].tolist()))
    graph = circuitlab.attribute(rm, PROMPT, targets=[Feature(2, 5, off, inactive=True)],
                                 max_feature_nodes=None, progress=False, dtype=torch.float32)
    row = graph.index(f"2_{off}_5")
    node = graph.nodes.iloc[row]
    assert (node.kind, node.activation) == ("feature", 0.0) and not graph.adjacency[:, row].any()
    pre = float(rm.pre_activations(2, trace.mlp_in[2][5])[off])
    assert graph.inputs[row] == pytest.approx(pre, rel=1e-5, abs=1e-6)
    exact(graph)
    check_edges_brute_force(rm, graph, n_sources=5)


@pytest.mark.parametrize("transcoders", ["jumprelu_skip_transcoder", "clt"])
def test_a_feature_target_is_its_row_of_the_full_graph(transcoders):
    """Targeting a feature at the last position gives, edge for edge, that feature's row in
    a graph of the logits that visited every feature."""
    rm = make_rm("gemma3", transcoders, seed=3)
    full = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                dtype=torch.float32)
    (target,) = active(rm, -1, 1)
    graph = circuitlab.attribute(rm, PROMPT, targets=[target], max_feature_nodes=None,
                                 progress=False, dtype=torch.float32)
    node = f"{target.layer}_{target.feature}_{len(graph.tokens) - 1}"
    mine = dict(zip(graph.nodes.node_id, graph.adjacency[graph.index(node)].tolist()))
    theirs = dict(zip(full.nodes.node_id, full.adjacency[full.index(node)].tolist()))
    sources = [n for n in theirs if not n.startswith(f"{rm.n_layers + 1}_")]
    assert max(abs(mine[n] - theirs[n]) for n in sources) < 1e-6 * max(map(abs, theirs.values()))
    assert graph.inputs[graph.index(node)] == pytest.approx(float(full.inputs[full.index(node)]))
    assert not (graph.nodes.kind == "logit").any()
    pruned = graph.prune(0.5, 0.9)  # the target survives pruning and carries all the weight
    assert node in set(pruned.nodes.node_id)
    assert pruned.target_weights[pruned.index(node)] == 1


def test_completion_targets_and_their_save(tmp_path):
    """``completion`` traces the continuation's tokens teacher-forced, each at the position
    that predicts it; a saved graph keeps its targets."""
    rm = make_rm("gemma3", "jumprelu_skip_transcoder", seed=4)
    graph = circuitlab.attribute(rm, "the cat", completion=" sat on", explain=[0, "n"],
                                 progress=False, dtype=torch.float32, max_feature_nodes=None)
    assert graph.prompt == "the cat sat on"
    logits = graph.nodes[graph.nodes.kind == "logit"]
    tokens = graph.tokens
    assert [tokens[p + 1] for p in logits.pos] == list(logits.feature)
    assert logits.pos.iloc[0] == len(rm.tokenize("the cat")) - 1 and len(logits) == 2
    exact(graph)
    check_edges_brute_force(rm, graph, n_sources=5)
    back = circuitlab.Graph.load(graph.save(tmp_path / "g"))
    assert back.metadata["targets"] == graph.metadata["targets"]
    assert torch.equal(back.target_mask, graph.target_mask)
    generated = circuitlab.attribute(rm, "the cat", completion=2, progress=False,
                                     max_feature_nodes=20)
    # every generated token is traced (two greedy tokens, as many as their text tokenizes to)
    assert (generated.nodes.kind == "logit").sum() == len(generated.tokens) - len(rm.tokenize("the cat")) >= 2


def test_bad_targets():
    rm = make_rm("gemma3", "jumprelu_skip_transcoder")
    trace = rm.run(rm.tokenize(PROMPT))
    p, f, _ = trace.features[1]
    inactive = next(i for i in range(rm.d_sae(1)) if i not in set(f[p == 2].tolist()))
    cases = [
        (dict(targets=[Feature(1, 40, 0)]), "not a position of this prompt"),
        (dict(targets=[Logit("c", pos=-40)]), "not a position of this prompt"),
        (dict(targets=[Feature(1, 2, inactive)]), "is not active at position 2.*inactive=True"),
        (dict(targets=[Feature(9, 2, 0)]), "layer"),
        (dict(targets=[Feature(1, 2, 10**6)]), "feature"),
        (dict(targets=["c"], logit_targets=["c"]), "not both"),
        (dict(targets=Feature(1, 2, 0)), "must be a list"),
        (dict(targets=[Direction(9, 0, torch.zeros(rm.d_model))]), "is not a layer"),
        (dict(targets=[Direction(1, 0, torch.zeros(3))]), "finite tensor of shape"),
        (dict(completion=" sat", explain=["dog"]), "not a token of the completion"),
        (dict(completion=" sat", logit_targets=["c"]), "explain picks"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CircuitlabError, match=match):
            circuitlab.attribute(rm, PROMPT if "completion" not in kwargs else "the cat",
                                 progress=False, **kwargs)


@pytest.mark.slow
def test_targets_on_the_embedded_model(gemma):
    """The embedded model: a Texas feature's graph and the answer inside a completion are
    exact (edges + constant = input, sampled edges = brute-force ablations); a completion that glues onto the prompt's last token is
    refused, naming the token that moved."""
    prompt = "Dallas is a city in the state of"
    (texas,) = [f for f in [Feature(*k) for k in _top_active(gemma, prompt)]]
    graph = circuitlab.attribute(gemma, prompt, targets=[texas], max_feature_nodes=200,
                                 progress=False, dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(gemma, graph, n_sources=4)
    answer = circuitlab.attribute(gemma, "The capital of Texas is", completion=" the city of Austin",
                                  explain=[" Austin"], max_feature_nodes=200, progress=False,
                                  dtype=torch.float32)
    (logit,) = answer.nodes[answer.nodes.kind == "logit"].itertuples()
    assert answer.token_strs[logit.pos + 1] == " Austin" and logit.pos < len(answer.tokens) - 1
    exact(answer)
    check_edges_brute_force(gemma, answer, n_sources=4)
    with pytest.raises(CircuitlabError, match="changes how the prompt tokenizes: token"):
        circuitlab.attribute(gemma, "The capital of Texas is Aus", completion="tin", progress=False)


def _top_active(rm, prompt):
    """The most active feature at the last position of a high layer, as (layer, pos, feature)."""
    table = rm.features_for(prompt, pos=-1, top=50)
    row = table[table.layer == table.layer.max()].iloc[0]
    return [(int(row.layer), -1, int(row.feature))]
