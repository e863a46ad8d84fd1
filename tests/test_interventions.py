"""Interventions on tiny random models: every mode against brute force, helpers, bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import circuitlab
from circuitlab import interventions as iv
from circuitlab import validation
from circuitlab.interventions import ablate, add, scale, set_to

PROMPT = "the cat sat on the mat."
MODES = iv.MODES


@pytest.fixture(scope="module")
def clean(tiny_rm):
    ids = tiny_rm.tokenize(PROMPT)
    trace = tiny_rm.run(ids)
    return ids, trace, iv.dense_activations(tiny_rm, trace)


def active_site(acts, layer, pos=-1):
    """(layer, pos, feature, activation) of the strongest feature at ``pos``."""
    P = acts[layer].shape[0]
    pos = pos % P
    f = int(acts[layer][pos].argmax())
    assert acts[layer][pos, f] > 0
    return layer, pos, f, float(acts[layer][pos, f])


def hooked_logits(rm, ids, layer, pos, delta):
    """Brute force: the model with ``delta [d]`` added to ``blocks.layer.hook_mlp_out`` at pos."""
    def hook(act, hook):
        act = act.clone()
        act[0, pos] += delta
        return act

    with torch.no_grad():
        return rm.model.run_with_hooks(ids[None], fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook)])[0]


@pytest.mark.parametrize("mode", MODES)
def test_empty_intervention_reproduces_clean_logits(tiny_rm, clean, mode):
    ids, trace, acts = clean
    out = iv.run_edited(tiny_rm, ids, {}, mode, trace, acts)
    with torch.no_grad():
        model_logits = tiny_rm.model(ids[None])[0]
    assert torch.allclose(out.logits, model_logits, atol=1e-5)
    assert torch.allclose(out.mlp_in, trace.mlp_in, atol=1e-5)
    res = tiny_rm.intervene(PROMPT, [], mode=mode, tokens=["a", "t"])
    assert torch.allclose(res.logits, res.clean_logits, atol=1e-5)
    assert res.tokens["delta_prob"].abs().max() < 1e-6


def test_free_mode_matches_brute_force_and_downstream_responds(tiny_rm, clean):
    ids, trace, acts = clean
    layer, pos, f, a = active_site(acts, 0, pos=3)
    res = tiny_rm.intervene(PROMPT, [(layer, pos, f, 5.0)], mode="free")
    delta = (5.0 - a) * tiny_rm.transcoders[layer].W_dec[f]
    expected = hooked_logits(tiny_rm, ids, layer, pos, delta)
    assert torch.allclose(res.logits, expected[-1], atol=1e-5)
    assert not torch.allclose(res.logits, res.clean_logits, atol=1e-3)
    # A later layer's features respond to the edit in free mode, not in constrained mode.
    edits = iv.resolve(tiny_rm, [(layer, pos, f, 5.0)], acts)
    free = iv.run_edited(tiny_rm, ids, edits, "free", trace, acts)
    later = tiny_rm.encode(2, free.mlp_in[2], ids)
    assert not torch.allclose(later, acts[2], atol=1e-4)


def test_frozen_attention_matches_brute_force(tiny_rm, clean):
    ids, trace, acts = clean
    layer, pos, f, a = active_site(acts, 0, pos=2)
    edits = iv.resolve(tiny_rm, ablate((layer, pos, f)), acts)
    delta = -a * tiny_rm.transcoders[layer].W_dec[f]

    def add_delta(act, hook):
        act = act.clone()
        act[0, pos] += delta
        return act

    hooks = [(f"blocks.{layer}.hook_mlp_out", add_delta),
             (lambda n: n.endswith("hook_pattern"),
              lambda act, hook: trace.patterns[int(hook.name.split(".")[1])][None])]
    with torch.no_grad():
        expected = tiny_rm.model.run_with_hooks(ids[None], fwd_hooks=hooks)[0]
    frozen = iv.run_edited(tiny_rm, ids, edits, "frozen-attention", trace, acts).logits
    free = iv.run_edited(tiny_rm, ids, edits, "free", trace, acts).logits
    assert torch.allclose(frozen, expected, atol=1e-5)
    assert not torch.allclose(frozen, free, atol=1e-4)


def test_constrained_mode_is_the_graph(tiny_rm):
    """In constrained mode, ablating a source moves each target's input by exactly its edge."""
    graph = circuitlab.attribute(tiny_rm, PROMPT, dtype=torch.float32)
    val = graph.validate(tiny_rm, n=25, seed=1)
    assert len(val.edges) == 25
    assert val.summary["constrained_agreement"] > 0.9999
    assert val.summary["constrained_max_error"] < 1e-4
    assert (val.edges["weight"] != 0).all()
    for k in ("free_correlation", "free_sign_agreement", "free_relative_error"):
        assert math.isfinite(val.summary[k])


def test_total_effect_is_the_path_sum(tiny_rm):
    """With feature-to-feature edges removed, a source's total effect is its direct edge;
    with one two-step path it adds the product along it."""
    graph = circuitlab.attribute(tiny_rm, PROMPT, dtype=torch.float32)
    feat = graph.mask("feature")
    A = graph.adjacency.clone()
    A[feat[:, None] & feat[None, :]] = 0
    g = graph.subgraph(torch.ones(len(graph.nodes), dtype=torch.bool), adjacency=A)
    src = int(feat.nonzero()[0])
    assert torch.allclose(validation._total_effects(g, [src])[:, 0], A[:, src].double())
    mid = int(feat.nonzero()[-1])
    A[mid, src] = 0.5
    g = graph.subgraph(torch.ones(len(graph.nodes), dtype=torch.bool), adjacency=A)
    act_mid = graph.nodes.activation.iloc[mid]
    expected = A[:, src].double() + A[:, mid].double() / act_mid * 0.5
    assert torch.allclose(validation._total_effects(g, [src])[:, 0], expected)


def test_helpers_agree(tiny_rm, clean):
    ids, trace, acts = clean
    layer, pos, f, a = active_site(acts, 1, pos=-1)
    run = lambda ivs, mode="free": tiny_rm.intervene(PROMPT, ivs, mode=mode).logits  # noqa: E731
    zero = run(ablate((layer, pos, f)))
    assert torch.allclose(zero, run([(layer, pos, f, 0.0)]), atol=1e-6)
    assert torch.allclose(zero, run(scale((layer, pos, f), 0.0)), atol=1e-6)
    assert torch.allclose(zero, run(add((layer, pos, f), -1.0, relative="prompt")), atol=1e-5)
    assert torch.allclose(run(scale((layer, pos, f), 1.0)), run([]), atol=1e-6)
    doubled = run(set_to((layer, pos, f), 2.0, relative="prompt"))
    assert torch.allclose(doubled, run(scale((layer, pos, f), 2.0)), atol=1e-5)
    assert torch.allclose(doubled, run([(layer, pos, f, 2 * a)]), atol=1e-5)
    # The same feature named as a node id, a (layer, feature) pair at pos, or a DataFrame.
    by_id = run(ablate(f"{layer}_{f}_{pos}"))
    by_pair = run(ablate((layer, f), pos=pos))
    df = pd.DataFrame({"layer": [layer], "feature": [f], "pos": [pos]})
    assert torch.allclose(by_id, zero) and torch.allclose(by_pair, zero)
    assert torch.allclose(run(ablate(df)), zero)
    assert torch.allclose(run(ablate({"group": [f"{layer}_{f}_{pos}"]})), zero)


def test_positions(tiny_rm, clean):
    ids, trace, acts = clean
    P = len(ids)
    assert iv.positions("all", P) == list(range(P))
    assert iv.positions(-1, P) == [P - 1]
    assert iv.positions(slice(2, 4), P) == [2, 3]
    assert iv.positions([1, -1, 1], P) == [1, P - 1]
    layer, _, f, _ = active_site(acts, 0, pos=2)
    everywhere = tiny_rm.intervene(PROMPT, ablate((layer, f))).logits
    manual = tiny_rm.intervene(PROMPT, [(layer, p, f, 0.0) for p in range(P)]).logits
    assert torch.allclose(everywhere, manual, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ([(0, 1, 10_000, 1.0)], "Feature 10000 is out of range"),
    ([(7, 1, 0, 1.0)], "Layer 7 is out of range"),
    ([(0, 99, 0, 1.0)], "Position 99 is out of range"),
    ([(0, 1, 0, float("nan"))], "finite number"),
    ([(0, 1, 0)], "Cannot read intervention"),
])
def test_bad_interventions(tiny_rm, bad, match):
    with pytest.raises(circuitlab.CircuitlabError, match=match):
        tiny_rm.intervene(PROMPT, bad)


def test_bad_feature_names_and_relative(tiny_rm, clean):
    ids, trace, acts = clean
    inactive = int((acts[0][1] == 0).nonzero()[0])
    with pytest.raises(circuitlab.CircuitlabError, match="not active at positions"):
        tiny_rm.intervene(PROMPT, set_to((0, 1, inactive), 2.0, relative="prompt"))
    with pytest.raises(circuitlab.CircuitlabError, match="No features given"):
        ablate([])
    with pytest.raises(circuitlab.CircuitlabError, match="not a feature node id"):
        ablate("0_-1_3")
    with pytest.raises(circuitlab.CircuitlabError, match="lacks columns"):
        ablate(pd.DataFrame({"layer": [0]}))
    with pytest.raises(circuitlab.CircuitlabError, match="Unknown mode"):
        tiny_rm.intervene(PROMPT, [], mode="linear")
    with pytest.raises(circuitlab.CircuitlabError, match="both lists"):
        circuitlab.swap(tiny_rm, PROMPT, remove=[], add=[(0, 1)])


def test_generate_greedy_and_seeded(tiny_rm, clean):
    ids, trace, acts = clean
    out = tiny_rm.generate(PROMPT, max_new_tokens=5)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, tiny_rm.model(seq[None])[0, -1].argmax()[None]])
    assert out == tiny_rm.tokenizer.decode(seq[len(ids):].tolist())
    a = tiny_rm.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == tiny_rm.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=3)
    # An edit at prompt positions only versus also at each new position.
    layer, pos, f, a0 = active_site(acts, 2, pos=-1)
    edits = iv.resolve(tiny_rm, add((layer, f), 50.0, pos=-1), acts)
    ext = iv._extend(edits, len(ids), len(ids) + 3)
    assert ext[layer][-1].pos.tolist() == [len(ids), len(ids) + 1, len(ids) + 2]
    assert torch.allclose(ext[layer][-1].value, torch.full((3,), 50.0))
    with pytest.raises(circuitlab.CircuitlabError, match="temperature"):
        tiny_rm.generate(PROMPT, temperature=-1)


def test_sweep_and_plot(tiny_rm, clean):
    ids, trace, acts = clean
    layer, pos, f, a = active_site(acts, 1, pos=-1)
    df = tiny_rm.sweep(PROMPT, (layer, pos, f), values=[0.0, 1.0, 4.0], tokens=["a", " "])
    assert list(df.columns) == ["value", "token", "id", "prob", "logit", "clean_prob"]
    at_one = df[df.value == 1.0]
    assert (at_one["prob"] - at_one["clean_prob"]).abs().max() < 1e-6
    at_zero = df[df.value == 0.0].set_index("token")["prob"]
    ablated = tiny_rm.intervene(PROMPT, ablate((layer, pos, f)), tokens=["a", " "]).tokens
    assert torch.allclose(torch.tensor(at_zero.loc[["a", " "]].to_numpy()),
                          torch.tensor(ablated["prob"].to_numpy()), atol=1e-6)
    fig = iv.plot_sweep(df)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [0.0, 1.0, 4.0]


def test_swap_is_scale_plus_set(tiny_rm, clean):
    ids, trace, acts = clean
    layer, pos, f, a = active_site(acts, 1, pos=-1)
    g = int((acts[1][pos] == 0).nonzero()[0])
    donor = pd.DataFrame({"layer": [1], "feature": [g], "pos": [0], "activation": [3.0]})
    res = circuitlab.swap(tiny_rm, PROMPT, remove=[(layer, f)], add=donor, strength=2.0,
                          tokens=["a"])
    active = (acts[layer][:, f] != 0).nonzero()[:, 0].tolist()
    # strength 2: the removed feature is scaled by 1 - 2 wherever it is; the added one set to 2 x 3.
    manual = scale((layer, f), -1.0) + [(1, p, g, 6.0) for p in active]
    assert torch.allclose(res.logits, tiny_rm.intervene(PROMPT, manual).logits, atol=1e-5)
    assert list(res.before.columns)[:3] == ["token", "id", "prob"]
    assert res.prob("a") == pytest.approx(float(res.tokens["prob"].iloc[0]))
