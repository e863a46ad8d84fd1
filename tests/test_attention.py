"""Head loadings against brute force: the frozen model run with chosen heads' outputs
removed, on tiny models (Gemma-3-like: RoPE, qk-norms, GQA, sandwich norms; GPT-2-like:
LayerNorm) with per-layer skip transcoders and cross-layer transcoders."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from conftest import tiny_clt, tiny_model, tiny_transcoders

import circuitlab
from circuitlab.attention import head_loadings
from circuitlab.qk import attention_row, qk
from circuitlab.errors import CircuitlabError
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat."
KINDS = [("gemma3", "per-layer"), ("gpt2", "per-layer"), ("gemma3", "clt"), ("gpt2", "clt")]


def make_rm(model: str, transcoders: str, seed: int = 0) -> ReplacementModel:
    m = tiny_model(model, seed=seed)
    arch = "transcoder" if transcoders == "no skip" else "jumprelu_skip_transcoder"
    tcs = (tiny_clt(m, "jumprelu", True, seed=seed) if transcoders == "clt"
           else tiny_transcoders(m, arch, seed=seed))
    return ReplacementModel(m, tcs, name="tiny")


def graph_of(rm, **kw):
    return circuitlab.attribute(rm, PROMPT, max_feature_nodes=kw.pop("max_feature_nodes", None),
                                progress=False, dtype=torch.float32, **kw)


def target_values(rm, graph, trace, sources, heads_on):
    """Inputs of every graph target in the frozen model with ``sources`` (feature
    activations, embedding, errors) and only the attention heads in ``heads_on`` (a set of
    ``(layer, head)``) writing their outputs."""
    acts, embed, errors = sources
    hooks, xs = rm.frozen_hooks(trace, lambda l, x: rm.decode(l, acts, x) + errors[l], embed)
    final = {}
    for j in range(rm.n_layers):
        off = [h for h in range(rm.cfg.n_heads) if (j, h) not in heads_on]

        def mask(act, hook, off=off):
            act[:, :, off] = 0
            return act
        hooks.append((f"blocks.{j}.attn.hook_z", mask))
    hooks.append((f"blocks.{rm.n_layers - 1}.hook_resid_post",
                  lambda act, hook: final.setdefault("r", act[0])))
    with torch.no_grad():
        rm.model.run_with_hooks(trace.tokens[None], fwd_hooks=hooks, stop_at_layer=rm.n_layers)
    normed = rm.final_normed(trace, final["r"])[-1]
    out = torch.zeros(len(graph.nodes))
    directions = graph.metadata["logit_directions"]
    for i, r in enumerate(graph.nodes.to_dict("records")):
        if r["kind"] == "feature":
            out[i] = rm.pre_activations(r["layer"], xs[r["layer"]][r["pos"]])[r["feature"]]
        elif r["kind"] == "logit":
            k = i - (len(graph.nodes) - len(directions))
            out[i] = normed @ torch.tensor(directions[k])
    return out


def contribution(rm, graph, trace, source_row, heads_on):
    """What source ``source_row`` adds to every target with only ``heads_on`` writing: the
    frozen model with all sources minus with that source zeroed (an error node holds the
    active features that are not nodes at its place)."""
    acts = [rm.encode(l, trace.mlp_in[l], trace.tokens) for l in range(rm.n_layers)]
    full = (acts, trace.embed.clone(), trace.errors.clone())
    a, e, err = [t.clone() for t in acts], trace.embed.clone(), trace.errors.clone()
    r = graph.nodes.iloc[source_row]
    if r.kind == "feature":
        a[r.layer][r.pos, r.feature] = 0
    elif r.kind == "error":
        nodes = graph.nodes
        here = nodes[(nodes.kind == "feature") & (nodes.layer == r.layer) & (nodes.pos == r.pos)]
        kept = a[r.layer][r.pos, here.feature.tolist()].clone()
        err[r.layer, r.pos] = 0
        a[r.layer][r.pos] = 0
        a[r.layer][r.pos, here.feature.tolist()] = kept
    else:
        e[r.pos] = 0
    return (target_values(rm, graph, trace, full, heads_on)
            - target_values(rm, graph, trace, (a, e, err), heads_on))


def parts(table):
    """Per (source, target): [direct, {(layer, head): weight}, remainder and other heads, edge]."""
    out = {}
    columns = ["source", "target", "kind", "layer", "head", "weight", "edge"]
    for s, t, kind, layer, head, w, e in zip(*(table[c].to_numpy() for c in columns)):
        entry = out.setdefault((s, t), [0.0, {}, 0.0, float(e)])
        if kind == "direct":
            entry[0] += float(w)
        elif kind == "head":
            entry[1][int(layer), int(head)] = float(w)
        else:
            entry[2] += float(w)
    return out


def read_index(node, L):
    return L - 1 if node.kind == "logit" else node.layer


@pytest.mark.parametrize("model, transcoders", KINDS)
def test_loadings_sum_to_the_edge_and_one_layer_edges_have_no_remainder(model, transcoders):
    rm = make_rm(model, transcoders)
    graph = graph_of(rm)
    table = head_loadings(rm, graph)
    assert list(table.columns) == ["source", "target", "edge", "kind", "layer", "head", "weight", "share"]
    sums = table.groupby(["source", "target"]).agg(w=("weight", "sum"), e=("edge", "first"))
    assert torch.allclose(torch.tensor(sums.w.to_numpy()), torch.tensor(sums.e.to_numpy()), atol=1e-5)
    assert len(sums) == int((graph.adjacency != 0).sum())
    nodes = graph.nodes.set_index("node_id")
    L, checked = rm.n_layers, 0
    for (s, t), (direct, heads, remainder, edge) in parts(table).items():
        src, tgt = nodes.loc[s], nodes.loc[t]
        between = read_index(tgt, L) - src.layer  # attention layers from source to target
        if src.pos != tgt.pos:
            assert direct == 0
        if between == 1:
            assert abs(remainder) <= 1e-5 * max(1.0, abs(edge)), (s, t)
            assert all(j == src.layer + 1 for j, _ in heads)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("model, transcoders", KINDS)
def test_each_head_loading_is_the_frozen_model_with_only_that_head(model, transcoders):
    rm = make_rm(model, transcoders, seed=1)
    graph = graph_of(rm)
    trace = rm.run(rm.tokenize(PROMPT))
    table = parts(head_loadings(rm, graph))
    nodes = graph.nodes
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor(nodes.kind.isin(["feature", "logit"]).to_numpy())
    heads = list(itertools.product(range(rm.n_layers), range(rm.cfg.n_heads)))
    for kind in ("embedding", "feature", "error"):
        rows = torch.tensor(nodes.index[nodes.kind == kind].to_numpy())
        rows = rows[(graph.adjacency[:, rows] != 0).any(0)]
        for r in rows[torch.randperm(len(rows), generator=g)[:2]].tolist():
            none = contribution(rm, graph, trace, r, set())
            for j, h in [heads[i] for i in torch.randperm(len(heads), generator=g)[:3].tolist()]:
                only = contribution(rm, graph, trace, r, {(j, h)}) - none
                for t in targets.nonzero()[:, 0].tolist():
                    key = (nodes.node_id[r], nodes.node_id[t])
                    if key in table:
                        want = float(only[t])
                        got = table[key][1].get((j, h), 0.0)
                        assert got == pytest.approx(want, abs=2e-5), (kind, key, j, h)
                        direct = table[key][0]
                        assert direct == pytest.approx(float(none[t]), abs=2e-5)


@pytest.mark.parametrize("transcoders", ["per-layer", "clt"])
def test_remainder_is_the_paths_through_several_heads(transcoders):
    """On the 3-layer model: the remainder equals the brute-force sum of the paths through
    two or three heads, all heads on minus no head minus each head alone."""
    rm = make_rm("gemma3", transcoders, seed=2)
    graph = graph_of(rm)
    trace = rm.run(rm.tokenize(PROMPT))
    table = parts(head_loadings(rm, graph))
    nodes = graph.nodes
    heads = set(itertools.product(range(rm.n_layers), range(rm.cfg.n_heads)))
    embeds = nodes.index[nodes.kind == "embedding"].tolist()[1:4]
    checked = 0
    for r in embeds:  # embeddings reach the logits through all three attention layers
        none = contribution(rm, graph, trace, r, set())
        every = contribution(rm, graph, trace, r, heads)
        singles = sum(contribution(rm, graph, trace, r, {h}) - none for h in heads)
        several = every - none - singles
        for t in nodes.index[nodes.kind == "logit"].tolist():
            key = (nodes.node_id[r], nodes.node_id[t])
            if key in table:
                assert table[key][2] == pytest.approx(float(several[t]), abs=2e-5)
                checked += abs(table[key][2]) > 1e-4
    assert checked > 0, "some multi-head paths are nonzero: the check is not vacuous"


def test_folded_error_nodes_and_a_pruned_graph():
    """With a node budget, error nodes hold the features that are not nodes: their loadings
    still match brute force, on a pruned graph too; top keeps the strongest heads."""
    rm = make_rm("gemma3", "per-layer", seed=3)
    graph = graph_of(rm, max_feature_nodes=6)
    assert len(graph.metadata["kept_features"]) == 6
    pruned = graph.prune(0.9, 0.99)
    trace = rm.run(rm.tokenize(PROMPT))
    table = parts(head_loadings(rm, pruned))
    nodes = pruned.nodes
    errors = [r for r in nodes.index[nodes.kind == "error"].tolist()
              if (pruned.adjacency[:, r] != 0).any()][:2]
    assert errors
    for r in errors:
        for j, h in [(1, 0), (2, 3)]:
            only = contribution(rm, pruned, trace, r, {(j, h)}) - contribution(rm, pruned, trace, r, set())
            for t in (pruned.adjacency[:, r] != 0).nonzero()[:, 0].tolist():
                key = (nodes.node_id[r], nodes.node_id[t])
                assert table[key][1].get((j, h), 0.0) == pytest.approx(float(only[t]), abs=2e-5)
    top = head_loadings(rm, pruned, top=2)
    counts = top[top.kind == "head"].groupby(["source", "target"]).size()
    assert counts.max() <= 2 and "other heads" in set(top.kind)
    sums = top.groupby(["source", "target"]).agg(w=("weight", "sum"), e=("edge", "first"))
    assert (sums.w - sums.e).abs().max() < 1e-5


def test_stored_loadings_survive_prune_save_and_load(tmp_path):
    """``store=True`` keeps the loadings with the graph: pruning keeps those of the edges
    left, a saved graph reloads them (float32 weights), and without the model they are read
    back, the same as computed; edges never stored are refused by name."""
    rm = make_rm("gemma3", "clt", seed=7)
    graph = graph_of(rm)
    every = head_loadings(rm, graph, top=3, store=True)
    pruned = graph.prune(0.8, 0.9)
    kept = set(zip(pruned.edges().source, pruned.edges().target))
    assert set(zip(pruned.loadings.source, pruned.loadings.target)) == kept
    pruned.save(tmp_path / "g")
    back = circuitlab.Graph.load(tmp_path / "g")
    stored = back.head_loadings()  # no model: the stored rows
    want = every[pd.Series(list(zip(every.source, every.target)), dtype=object).isin(kept).to_numpy()]
    key = ["source", "target", "kind", "layer", "head"]
    merged = stored.merge(want, on=key, suffixes=("", "_want"))
    assert len(merged) == len(stored) == len(want)
    assert (merged.weight - merged.weight_want).abs().max() < 1e-6 * every.edge.abs().max()
    sums = stored.groupby(["source", "target"]).agg(w=("weight", "sum"), e=("edge", "first"))
    assert (sums.w - sums.e).abs().max() < 1e-5
    s, t = next(iter(kept))
    assert len(back.head_loadings(edges=[(s, t)])) >= 3
    one = head_loadings(rm, graph, [(s, t)])  # a single edge computed
    assert one.weight.sum() == pytest.approx(float(one.edge.iloc[0]), abs=1e-5)
    ids = graph.nodes.node_id
    with pytest.raises(CircuitlabError, match="stores no head loadings"):
        pruned.head_loadings(None, [(ids.iloc[0], ids.iloc[0])])
    assert list(back.heads(None, t, edges=1).columns) == ["layer", "head", "weight", "share"]


def test_bad_input():
    rm = make_rm("gemma3", "per-layer")
    graph = graph_of(rm)
    with pytest.raises(CircuitlabError, match="need the model"):
        head_loadings(None, graph)
    with pytest.raises(CircuitlabError, match="Unknown node"):
        head_loadings(rm, graph, edges=[("nope", graph.nodes.node_id.iloc[-1])])
    other = make_rm("gemma3", "per-layer")
    other.name = "another"
    with pytest.raises(CircuitlabError, match="was traced with"):
        head_loadings(other, graph)


# ---------------------------------------------------------------------- QK attributions


def model_scores(rm, prompt, layer):
    _, cache = rm.model.run_with_cache(rm.tokenize(prompt)[None], names_filter=lambda n: n in (
        f"blocks.{layer}.attn.hook_attn_scores", f"blocks.{layer}.attn.hook_pattern"))
    return (cache[f"blocks.{layer}.attn.hook_attn_scores"][0],
            cache[f"blocks.{layer}.attn.hook_pattern"][0])


@pytest.mark.parametrize("model, transcoders", KINDS + [("gemma3", "no skip")])
def test_qk_table_sums_to_the_score(model, transcoders):
    """Query components x key components, summed over every pair, give the model's own
    pre-softmax score (RoPE, q/k norms, GQA, LayerNorm), for heads of every layer."""
    rm = make_rm(model, transcoders, seed=4)
    g = torch.Generator().manual_seed(0)
    for layer in range(rm.n_layers):
        scores, pattern = model_scores(rm, PROMPT, layer)
        for _ in range(3):
            head = int(torch.randint(rm.cfg.n_heads, (1,), generator=g))
            q = int(torch.randint(1, len(scores[0]), (1,), generator=g))
            finite = torch.isfinite(scores[head, q, :q + 1]).nonzero()[:, 0]
            k = int(finite[torch.randint(len(finite), (1,), generator=g)])
            table = qk(rm, PROMPT, layer, head, q, k, top=10)
            want = float(scores[head, q, k])
            assert table.attrs["total"] == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert table.attrs["score"] == pytest.approx(want, rel=1e-6)
            assert table.attrs["probability"] == pytest.approx(float(pattern[head, q, k]), rel=1e-5)
            assert len(table) == min(10, table.attrs["n_pairs"])
            assert table.contribution.abs().is_monotonic_decreasing
            assert table.attrs["top_share"] == pytest.approx(table.contribution.sum() / want)
            kinds = set(table.query_kind) | set(table.key_kind)
            assert kinds <= {"embedding", "feature", "error", "skip", "head", "bias"}


def test_qk_with_a_soft_cap_and_the_attention_row():
    rm = make_rm("gemma3", "per-layer", seed=5)
    rm.model.cfg.attn_scores_soft_cap = 0.5  # strong: tanh far from linear
    scores, pattern = model_scores(rm, PROMPT, 2)
    table = qk(rm, PROMPT, 2, 1, 9, 4)
    assert table.attrs["total"] == pytest.approx(float(scores[1, 9, 4]), rel=1e-5)
    row = attention_row(rm, PROMPT, 2, 1, 9)
    assert list(row.columns) == ["key_pos", "token", "score", "probability"]
    assert len(row) == 10 and row.probability.is_monotonic_decreasing
    assert row.probability.sum() == pytest.approx(1.0, abs=1e-5)
    top = row.iloc[0]
    assert top.probability == pytest.approx(float(pattern[1, 9, int(top.key_pos)]))


def test_qk_bad_input():
    rm = make_rm("gemma3", "per-layer")
    for args, match in [((0, 1, 3, 5), "comes after"), ((0, 9, 3, 1), "heads 0 to 3"),
                        ((7, 0, 3, 1), "layers 0 to 2"), ((0, 0, 40, 1), "positions 0 to"),
                        ((0, 0, 11, 1), "outside its attention window")]:
        with pytest.raises(CircuitlabError, match=match):
            qk(rm, PROMPT, *args)


def test_facades_on_the_graph_and_the_model():
    rm = make_rm("gemma3", "clt", seed=6)
    graph = graph_of(rm)
    node = graph.nodes.node_id[graph.mask("logit").nonzero()[0, 0].item()]
    heads = graph.heads(rm, node, edges=5)
    assert list(heads.columns) == ["layer", "head", "weight", "share"] and len(heads) > 0
    assert heads.weight.abs().is_monotonic_decreasing
    direct = graph.head_loadings(rm)
    assert len(direct) and rm.qk(PROMPT, 1, 0, 5, 3).attrs["n_pairs"] > 0


# ---------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_on_the_embedded_model(gemma):
    """Gemma 3 at full size (RoPE, q/k norms, GQA, sandwich norms, skip transcoders): every
    edge's parts add up to it, edges with one attention layer between their ends have no
    remainder, two single-head loadings equal the frozen model with only that head, and QK
    tables of heads in three layers sum to the model's own pre-softmax score."""
    prompt = "Dallas is a city in the state of"
    graph = circuitlab.attribute(gemma, prompt, max_feature_nodes=60, dtype=torch.float32,
                                 progress=False).prune(0.7, 0.9)
    table = head_loadings(gemma, graph)
    by_edge = parts(table)
    scale = float(graph.adjacency.abs().max())
    nodes = graph.nodes.set_index("node_id")
    for (s, t), (direct, heads, rest, edge) in by_edge.items():
        assert direct + sum(heads.values()) + rest == pytest.approx(edge, abs=1e-4 * scale)
        src_layer = -1 if nodes.kind[s] == "embedding" else nodes.layer[s]
        if nodes.kind[t] == "feature" and nodes.kind[s] != "error" and nodes.layer[t] == src_layer + 1:
            assert rest == pytest.approx(0.0, abs=1e-4 * scale)  # one attention layer between
    trace = gemma.run(gemma.tokenize(prompt))
    ids = graph.nodes.node_id
    cross = [(s, t) for (s, t), v in by_edge.items() if v[1] and nodes.pos[s] != nodes.pos[t]
             and nodes.kind[s] != "error"]
    s, t = max(cross, key=lambda e: abs(by_edge[e][3]))
    (j, h), _ = max(by_edge[(s, t)][1].items(), key=lambda kv: abs(kv[1]))
    row, target = int(ids[ids == s].index[0]), int(ids[ids == t].index[0])
    for heads_on in ({(j, h)}, {(j, (h + 1) % gemma.cfg.n_heads)}):
        only = (contribution(gemma, graph, trace, row, heads_on)
                - contribution(gemma, graph, trace, row, set()))[target]
        (one,) = heads_on
        assert by_edge[(s, t)][1].get(one, 0.0) == pytest.approx(float(only), abs=1e-4 * scale)
    last = len(trace.tokens) - 1
    for layer, head in [(0, 1), (j, h), (gemma.n_layers - 1, 3)]:
        scores, pattern = model_scores(gemma, prompt, layer)
        table = qk(gemma, prompt, layer, head, last, 1, top=5)
        assert table.attrs["total"] == pytest.approx(float(scores[head, last, 1]), rel=1e-4, abs=1e-4)
        assert table.attrs["probability"] == pytest.approx(float(pattern[head, last, 1]), rel=1e-4)
