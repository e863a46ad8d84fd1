"""The real embedded model (gemma-3-270m from the GGUF package) with the bundled transcoders."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clt
from test_attribution import check_edges_brute_force

import circuitlab
from circuitlab.loading import embedded_hf_model
from circuitlab.cards import find_examples
from circuitlab.replacement import ReplacementModel

pytestmark = pytest.mark.slow

PROMPT = 'The opposite of "small" is "'


@pytest.fixture(scope="module")
def rm():
    return circuitlab.load("gemma-3-270m")


@pytest.fixture(scope="module")
def hf():
    return embedded_hf_model()


def test_tl_logits_and_hook_points_match_hf(rm, hf):
    """TL reproduces HF's logits, and the hooks we splice at carry HF's tensors: the MLP input
    is pre_feedforward_layernorm's output and hook_mlp_out post_feedforward_layernorm's."""
    hf_model, tokenizer = hf
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == [rm.tokenize(PROMPT).tolist()]
    grabbed = {}
    layer = hf_model.model.layers[7]
    handles = [layer.pre_feedforward_layernorm.register_forward_hook(
                   lambda m, i, o: grabbed.__setitem__("pre", o)),
               layer.post_feedforward_layernorm.register_forward_hook(
                   lambda m, i, o: grabbed.__setitem__("post", o))]
    with torch.no_grad():
        hf_logits = hf_model(ids).logits[0]
    for h in handles:
        h.remove()
    trace = rm.run(ids[0])
    assert (trace.logits - hf_logits).abs().max() < 1e-4
    for ours, theirs in ((trace.mlp_in[7], grabbed["pre"][0]), (trace.mlp_out[7], grabbed["post"][0])):
        assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_model_knows_the_antonym(rm):
    trace = rm.run(rm.tokenize(PROMPT))
    top = rm.tokenizer.decode([int(trace.logits[-1].argmax())])
    assert top.strip() in {"large", "big"}


def test_replacement_reproduces_logits(rm):
    tokens = rm.tokenize(PROMPT)
    trace = rm.run(tokens)
    assert (rm.forward(tokens, errors=trace.errors) - trace.logits).abs().max() < 1e-4


def test_attribution_exact_on_real_model(rm):
    graph = circuitlab.attribute(rm, "Dallas is a city in", max_feature_nodes=None,
                                 progress=False, dtype=torch.float32)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    scale = graph.inputs[targets].abs().max()
    assert ((total - graph.inputs)[targets].abs().max()) < 1e-4 * scale
    check_edges_brute_force(rm, graph, n_sources=4)


def test_attribution_exact_with_a_cross_layer_transcoder(rm):
    """A random CLT spliced into the real model: the replacement with errors reproduces the
    logits, edges + constant equal every input, sampled edges equal brute-force ablations,
    and an empty intervention is exact in every mode."""
    clt_rm = ReplacementModel(rm.model, tiny_clt(rm.model, "jumprelu", True, d_sae=64))
    tokens = clt_rm.tokenize("Dallas is a city in")
    trace = clt_rm.run(tokens)
    assert (clt_rm.forward(tokens, errors=trace.errors) - trace.logits).abs().max() < 1e-4
    graph = circuitlab.attribute(clt_rm, "Dallas is a city in", max_feature_nodes=None,
                                 progress=False, dtype=torch.float32)
    assert graph.metadata["cross_layer"] and graph.metadata["n_active_features"] > 50
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    scale = graph.inputs[targets].abs().max()
    assert ((total - graph.inputs)[targets].abs().max()) < 1e-4 * scale
    check_edges_brute_force(clt_rm, graph, n_sources=4)
    for mode in ("free", "frozen-attention", "constrained"):
        res = clt_rm.intervene("Dallas is a city in", [], mode=mode)
        assert (res.logits - res.clean_logits).abs().max() < 1e-3


def test_default_graph_and_pruning(rm):
    graph = circuitlab.attribute(rm, PROMPT, progress=False)
    logits = graph.nodes[graph.nodes["kind"] == "logit"]
    assert logits["token"].str.strip().isin(["large", "big"]).any()
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    # bf16 backward by default on this CPU: sums hold to about a percent.
    assert ((total - graph.inputs)[targets].abs().max()) < 0.03 * graph.inputs[targets].abs().max()
    pruned = graph.prune()
    s = pruned.scores()
    assert 0 < s["replacement"] <= 1 and 0 < s["completeness"] <= 1


def test_trace_command_writes_graphs(tmp_path, capsys):
    from circuitlab.cli import main

    assert main(["trace", PROMPT, "--out", str(tmp_path), "--max-feature-nodes", "2048"]) == 0
    printed = capsys.readouterr().out
    for expected in ("Logit targets:", "replacement", "completeness", "Most influential features"):
        assert expected in printed
    graph = circuitlab.Graph.load(tmp_path / "graph")
    pruned = circuitlab.Graph.load(tmp_path / "pruned")
    examples, _ = find_examples(None)
    top = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(10, "influence")
    listed = printed.split("Most influential features")[1]
    for r in top.itertuples():  # each with its automatic label (or its id when it has none)
        name = examples.label(r.layer, r.feature) or f"L{r.layer}/F{r.feature}"
        assert name[:40] in listed and f"L{r.layer}/F{r.feature} @ {r.pos}" in listed
    assert (graph.nodes["kind"] == "feature").sum() == 2048
    assert len(pruned.nodes) < len(graph.nodes)
    assert (tmp_path / "neuronpedia.json").exists()
    html = (tmp_path / "graph.html").read_text()
    assert 'src="http' not in html and len(html) > 1_000_000  # plotly.js inlined, nothing fetched


def test_trace_command_reports_bad_input(capsys):
    from circuitlab.cli import main

    assert main(["trace", "   "]) == 2
    assert "empty or whitespace" in capsys.readouterr().err


# ---------------------------------------------------------------------- interventions


def concept_swap(rm, prompt_a, word_a, prompt_b, word_b):
    """Features found by code: those active on ``word_a`` in ``prompt_a`` but not on
    ``word_b`` in ``prompt_b`` (to remove), and the reverse with their activations (to add)."""
    a = rm.features_for(prompt_a, word_a, top=100_000)
    b = rm.features_for(prompt_b, word_b, top=100_000)
    key = lambda df: list(zip(df.layer, df.feature))  # noqa: E731
    remove = a[[k not in set(key(b)) for k in key(a)]][["layer", "feature"]]
    add = b[[k not in set(key(a)) for k in key(b)]][["layer", "feature", "activation"]]
    assert len(remove) > 10 and len(add) > 10
    return remove, add


def test_empty_intervention_is_exact_on_the_real_model(rm):
    for mode in ("free", "frozen-attention", "constrained"):
        res = rm.intervene(PROMPT, [], mode=mode, tokens=[" large", "big"])
        assert torch.allclose(res.logits, res.clean_logits, atol=1e-3 if mode == "constrained" else 1e-5)


def test_swap_france_for_italy_moves_paris_to_rome(rm):
    """A swap on a fact the model knows: the capital of France is Paris. Swapping the
    France features (found by code) for Italy's, with attention patterns kept, raises Rome
    several times over and moves the Rome-Paris margin by more than a nat; random features
    added in their place do much less. (In free mode, where attention also responds, random
    features at twice their activations move the model about as much on this prompt.)"""
    prompt = "The capital of France is the city of"
    remove, add = concept_swap(rm, prompt, " France", "The capital of Italy is the city of", " Italy")
    res = circuitlab.swap(rm, prompt, remove=remove, add=add, strength=2.0, mode="frozen-attention",
                          tokens=[" Paris", " Rome"])
    t = res.tokens.set_index("token")
    margin = t.delta_logit[" Rome"] - t.delta_logit[" Paris"]
    assert res.before.token.iloc[0] == " Paris"
    assert t.prob[" Rome"] > 4 * t.clean_prob[" Rome"]
    assert margin > 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the control: random features at the same activations
        rnd = add.assign(feature=torch.randint(0, rm.d_sae(0), (len(add),), generator=gen).numpy())
        ctrl = circuitlab.swap(rm, prompt, remove=remove, add=rnd, strength=2.0, mode="frozen-attention",
                               tokens=[" Paris", " Rome"]).tokens.set_index("token")
        assert ctrl.prob[" Rome"] < 0.3 * t.prob[" Rome"]
        assert ctrl.delta_logit[" Rome"] - ctrl.delta_logit[" Paris"] < margin - 1


def test_validate_on_the_real_model(rm):
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=512, dtype=torch.float32)
    val = graph.validate(rm, n=10)
    assert val.summary["constrained_agreement"] > 0.999
