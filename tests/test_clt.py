"""Cross-layer transcoders: exact attribution, interventions and graphs, against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import CLT_KINDS, tiny_clt, tiny_model
from test_attribution import check_edges_brute_force

import circuitlab
from circuitlab import attribution, clt as clt_module, memory
from circuitlab import interventions as iv
from circuitlab.errors import CircuitlabError
from circuitlab.graph import Graph
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat on the mat."
KIND_IDS = [f"{a}{'-skip' if s else ''}" for a, s in CLT_KINDS]


def clt_rm(kind=("jumprelu", True), model="gemma3", seed=0, **kw):
    m = tiny_model(model, seed=seed)
    return ReplacementModel(m, tiny_clt(m, *kind, seed=seed, **kw), name="tiny")


def exact(graph, atol=1e-5):
    """Every target's edges plus its constant equal its input."""
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[targets], graph.inputs[targets], atol=atol)
    assert graph.adjacency[targets].abs().sum(1).min() > 0


@pytest.fixture(scope="module")
def rm():
    return clt_rm()


# ------------------------------------------------------------------ the replacement model


@pytest.mark.parametrize("kind", CLT_KINDS, ids=KIND_IDS)
def test_replacement_with_errors_reproduces_logits(kind):
    rm = clt_rm(kind)
    tokens = rm.tokenize(PROMPT)
    trace = rm.run(tokens)
    assert (rm.forward(tokens, errors=trace.errors) - trace.logits).abs().max() < 1e-4
    assert (rm.forward(tokens) - trace.logits).abs().max() > 1e-2


def test_errors_are_what_all_writes_miss(rm):
    """error[t] = mlp_out[t] - b_dec[t] - skip - sum over s <= t of a[s] W_dec[s][:, t - s]."""
    tokens = rm.tokenize(PROMPT)
    trace = rm.run(tokens)
    clt = rm.clt
    acts = [rm.encode(s, trace.mlp_in[s], tokens) for s in range(rm.n_layers)]
    for t in range(rm.n_layers):
        recon = clt.b_dec[t] + trace.mlp_in[t] @ clt.W_skip[t].T
        for s in range(t + 1):
            recon = recon + acts[s] @ clt.W_dec[s][:, t - s]
        assert torch.allclose(trace.errors[t], trace.mlp_out[t] - recon, atol=1e-5)
    # A layer-0 feature writes different vectors into each layer: nothing is summed.
    assert not torch.allclose(clt.W_dec[0][:, 0], clt.W_dec[0][:, 1])


def test_topk_keeps_k_per_token():
    rm = clt_rm(("topk", False))
    trace = rm.run(rm.tokenize(PROMPT))
    for pos, _, _ in trace.features:
        assert torch.bincount(pos).max() <= rm.clt.k


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("max_nodes", [None, 60])
@pytest.mark.parametrize("kind", CLT_KINDS, ids=KIND_IDS)
def test_edges_match_brute_force(kind, max_nodes):
    """Each sampled edge is the effect of ablating its source in the frozen model (an error
    node holds the features of its (layer, pos) that are not nodes, with all their writes)."""
    rm = clt_rm(kind, seed=1)
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=max_nodes, progress=False,
                                 dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(rm, graph)
    assert graph.metadata["cross_layer"]


def test_edges_match_brute_force_layernorm_model():
    rm = clt_rm(("relu", True), model="gpt2")
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(rm, graph)


def test_windowed_clt_edges_match_brute_force_and_round_trip(tmp_path):
    """Features that write into two layers only: exact edges, and the window survives a save
    (``W_dec_<s>`` stores only the written layers)."""
    rm = clt_rm(("jumprelu", True), window=2)
    assert [tuple(W.shape[1:2]) for W in rm.clt.W_dec] == [(2,), (2,), (1,)]
    assert (rm.clt.decoders(0)[:, 2] == 0).all() and rm.clt.decoders(0).shape[1] == 3
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(rm, graph)
    loaded = clt_module.load(rm.clt.save(tmp_path / "clt"))
    assert loaded.window == 2 and "window=2" in repr(loaded)
    for s in range(3):
        assert torch.equal(loaded.decoders(s), rm.clt.decoders(s))
    lazy = clt_module.load(tmp_path / "clt", lazy=True)
    assert torch.equal(lazy.decoders(1), rm.clt.decoders(1))
    again = circuitlab.attribute(ReplacementModel(rm.model, loaded, name="tiny"), PROMPT,
                                 max_feature_nodes=None, progress=False, dtype=torch.float32)
    assert torch.allclose(again.adjacency, graph.adjacency, atol=1e-6)


def test_edge_sums_the_writes_of_every_layer(rm):
    """A layer-0 feature's edge to a layer-2 target is the sum of its contributions through
    its writes into layers 0 and 1: with the layer-1 write removed the edge changes by the
    contribution that write makes."""
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    only_first = ReplacementModel(rm.model, _without_later_writes(rm.clt), name="tiny")
    other = circuitlab.attribute(only_first, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    nodes = graph.nodes
    src = nodes.index[(nodes["kind"] == "feature") & (nodes["layer"] == 0)]
    tgt = nodes.index[(nodes["kind"] == "feature") & (nodes["layer"] == 2)]
    same = lambda g: g.adjacency[torch.tensor(tgt)][:, torch.tensor(src)]  # noqa: E731
    # The graphs share their nodes (encoders are the same; only decoders differ)...
    assert list(other.nodes["node_id"][src]) == list(nodes["node_id"][src])
    # ...but the edges from layer 0 to layer 2 differ: the later writes carry weight.
    assert (same(graph) - same(other)).abs().max() > 1e-3


def _without_later_writes(clt):
    copy = clt_module.CrossLayerTranscoder(clt.n_layers, clt.d_model, clt.d_sae,
                                           activation=clt.activation, k=clt.k,
                                           skip=clt.W_skip is not None)
    copy.load_state_dict(clt.state_dict())
    with torch.no_grad():
        for s in range(clt.n_layers):
            copy.W_dec[s][:, 1:] = 0
    return copy


def test_bounded_rows_stay_exact(monkeypatch):
    rm = clt_rm(("relu", True), seed=3, d_sae=64)
    monkeypatch.setattr(memory, "CANDIDATES_PER_NODE", 1)
    monkeypatch.setattr(memory, "EXTRAS_PER_ROW", 8)
    monkeypatch.setattr(attribution, "spare_memory", lambda *a: 0)
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=80, progress=False,
                                 dtype=torch.float32, batch_size=16)
    assert graph.metadata["recomputed_rows"] > 0
    exact(graph)
    check_edges_brute_force(rm, graph, n_sources=15)


def test_lazy_clt_gives_the_same_graph(rm, tmp_path):
    rm.clt.save(tmp_path / "clt")
    lazy = clt_module.load(tmp_path / "clt", lazy=True)
    assert len(lazy.W_dec) == 0 and lazy.lazy_folder is not None
    a = circuitlab.attribute(rm, PROMPT, progress=False, dtype=torch.float32)
    b = circuitlab.attribute(ReplacementModel(rm.model, lazy, name="tiny"), PROMPT,
                             progress=False, dtype=torch.float32)
    assert torch.equal(a.adjacency, b.adjacency)


def test_bfloat16_close_to_float32(rm):
    g32 = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                               dtype=torch.float32)
    g16 = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                               dtype=torch.bfloat16)
    assert (g16.adjacency - g32.adjacency).abs().max() < 0.05 * g32.adjacency.abs().max()


# ------------------------------------------------------------------ interventions


@pytest.fixture(scope="module")
def clean(rm):
    ids = rm.tokenize(PROMPT)
    trace = rm.run(ids)
    return ids, trace, iv.dense_activations(rm, trace)


@pytest.mark.parametrize("mode", iv.MODES)
def test_empty_intervention_reproduces_clean_logits(rm, clean, mode):
    ids, trace, acts = clean
    out = iv.run_edited(rm, ids, {}, mode, trace, acts)
    with torch.no_grad():
        assert torch.allclose(out.logits, rm.model(ids[None])[0], atol=1e-5)
    res = rm.intervene(PROMPT, [], mode=mode)
    assert torch.allclose(res.logits, res.clean_logits, atol=1e-5)


def test_free_edit_writes_into_every_later_layer(rm, clean):
    """Setting a layer-0 feature moves the MLP output of layers 0, 1 and 2 by its decoded
    change: the model with those deltas added by hand gives the same logits."""
    ids, trace, acts = clean
    pos = 3
    f = int(acts[0][pos].argmax())
    a = float(acts[0][pos, f])
    res = rm.intervene(PROMPT, [(0, pos, f, a + 4.0)], mode="frozen-attention")
    writes = rm.clt.W_dec[0][f]                                      # [L, d]

    def add(layer):
        def hook(act, hook):
            act = act.clone()
            act[0, pos] += 4.0 * writes[layer]
            return act
        return hook

    hooks = [(f"blocks.{l}.hook_mlp_out", add(l)) for l in range(rm.n_layers)]
    hooks.append((lambda n: n.endswith("hook_pattern"),
                  lambda act, hook: trace.patterns[int(hook.name.split(".")[1])][None]))
    with torch.no_grad():
        expected = rm.model.run_with_hooks(ids[None], fwd_hooks=hooks)[0, -1]
    assert torch.allclose(res.logits, expected, atol=1e-4)
    assert not torch.allclose(res.logits, res.clean_logits, atol=1e-3)


def test_constrained_mode_is_the_graph(rm):
    graph = circuitlab.attribute(rm, PROMPT, dtype=torch.float32)
    val = graph.validate(rm, n=25, seed=1)
    assert val.summary["constrained_agreement"] > 0.9999
    assert val.summary["constrained_max_error"] < 1e-4


# ------------------------------------------------------------------ graphs and views


def test_graph_round_trips_and_exports(rm, tmp_path):
    graph = circuitlab.attribute(rm, PROMPT, dtype=torch.float32, progress=False)
    graph.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    assert torch.equal(back.adjacency, graph.adjacency) and back.metadata["cross_layer"]
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    doc = pruned.to_neuronpedia(tmp_path / "np.json")
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    layer, feature = int(feats[0]["layer"]), int(feats[0]["node_id"].split("_")[1])
    assert feats[0]["feature"] == (layer + feature) * (layer + feature + 1) // 2 + feature
    again = Graph.from_neuronpedia(tmp_path / "np.json")
    assert set(again.nodes["node_id"]) == set(pruned.nodes["node_id"])
    mine = again.nodes.set_index("node_id")["feature"]
    assert (pruned.nodes.set_index("node_id")["feature"] == mine[pruned.nodes["node_id"]]).all()
    assert pruned.to_html(tmp_path / "g.html").stat().st_size > 1000


def test_clt_for_another_model_is_refused():
    m = tiny_model("gemma3")
    other = clt_module.CrossLayerTranscoder(m.cfg.n_layers + 1, m.cfg.d_model, 8)
    with pytest.raises(CircuitlabError, match="another model"):
        ReplacementModel(m, other)
    bad = tiny_clt(m, "relu", False)
    bad.hook_in = "hook_resid_pre"
    with pytest.raises(CircuitlabError, match="MLP input"):
        ReplacementModel(m, bad)


# ------------------------------------------------------------------ reading the residual


@pytest.mark.parametrize("model", ["gemma3", "gpt2"])
@pytest.mark.parametrize("kind", [("relu", True), ("jumprelu", False)], ids=["relu-skip", "jumprelu"])
def test_clt_reading_the_residual_is_exact(kind, model):
    """A CLT that reads ``hook_resid_mid`` (the residual before the pre-MLP norm, as
    circuit-tracer's CLTs do) splices and attributes exactly: its encoders and skips see the
    residual unnormalized."""
    m = tiny_model(model, seed=2)
    clt = tiny_clt(m, *kind, seed=2)
    clt.hook_in = "hook_resid_mid"
    rm = ReplacementModel(m, clt, name="tiny")
    assert rm.reads == "resid_mid"
    tokens = rm.tokenize(PROMPT)
    trace = rm.run(tokens)
    cache = m.run_with_cache(tokens[None])[1]
    assert torch.allclose(trace.mlp_in[1], cache["blocks.1.hook_resid_mid"][0])
    assert (rm.forward(tokens, errors=trace.errors) - trace.logits).abs().max() < 1e-4
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(rm, graph)
    for mode in iv.MODES:
        res = rm.intervene(PROMPT, [], mode=mode)
        assert torch.allclose(res.logits, res.clean_logits, atol=1e-5)


def test_per_layer_transcoders_reading_the_residual_are_exact():
    from conftest import tiny_transcoders

    m = tiny_model("gemma3", seed=4)
    tcs = tiny_transcoders(m, "jumprelu_skip_transcoder", seed=4)
    for layer, tc in enumerate(tcs):
        tc.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_mid"
    rm = ReplacementModel(m, tcs, name="tiny")
    assert rm.reads == "resid_mid"
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False,
                                 dtype=torch.float32)
    exact(graph)
    check_edges_brute_force(rm, graph)
    tcs[0].cfg.metadata.hook_name = "blocks.0.hook_mlp_in"
    with pytest.raises(CircuitlabError, match="one kind"):
        ReplacementModel(m, tcs)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_silent_tokens_and_skip_weights_survive_a_round_trip(tmp_path, eight_bit):
    """Two regressions other CLT tools have had: on a token where no feature fires the
    replacement is the skip path plus ``b_dec`` exactly, and an affine (skip) CLT keeps its
    skip weights through save and load (8-bit: to float8's rounding)."""
    rm = clt_rm(("jumprelu", True))
    loaded = clt_module.load(rm.clt.save(tmp_path / "clt", eight_bit=eight_bit))
    assert loaded.W_skip is not None
    for s in range(rm.clt.n_layers):
        want = rm.clt.W_skip[s]
        if eight_bit:
            assert torch.allclose(loaded.W_skip[s], want, atol=float(want.abs().max()) / 16)
            assert not torch.equal(loaded.W_skip[s], want)
        else:
            assert torch.equal(loaded.W_skip[s], want)
    with torch.no_grad():
        loaded.b_enc.fill_(-1e4)  # nothing fires anywhere
    silent = ReplacementModel(rm.model, loaded, name="tiny")
    trace = silent.run(silent.tokenize(PROMPT))
    assert all(float(silent.encode(t, trace.mlp_in[t]).abs().max()) == 0 for t in range(3))
    recon = trace.mlp_out - trace.errors
    for t in range(3):
        want = loaded.b_dec[t] + trace.mlp_in[t] @ loaded.W_skip[t].T
        assert torch.allclose(recon[t], want, atol=1e-5)
        assert float(recon[t].abs().max()) > 0
