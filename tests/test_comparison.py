"""Graph comparison and supernode suggestions (``circuitlab.comparison``)."""

from __future__ import annotations

import pytest
import torch

import circuitlab
from circuitlab.comparison import _feature_shares, compare, suggest_supernodes


@pytest.fixture(scope="module")
def graphs(tiny_rm):
    kw = dict(max_feature_nodes=None, progress=False, dtype=torch.float32)
    return [circuitlab.attribute(tiny_rm, p, **kw) for p in ("the cat sat", "a cat sat")]


def test_compare(graphs):
    a, b = graphs
    same = compare(a, a)
    assert same.overlap == pytest.approx(1.0) and same.jaccard == 1 and same.only_a.empty
    result = compare(a, b)
    shares = [_feature_shares(g)["share"] for g in (a, b)]
    common = shares[0].index.intersection(shares[1].index)
    expected = sum(min(shares[0][k], shares[1][k]) for k in common)
    assert result.overlap == pytest.approx(expected) and 0 < result.overlap < 1
    assert len(result.shared) == len(common)
    assert len(result.only_a) + len(common) == len(shares[0])
    assert set(result.only_b.layer.astype(str) + "_" + result.only_b.feature.astype(str)).isdisjoint(
        set(result.shared.layer.astype(str) + "_" + result.shared.feature.astype(str)))
    assert "overlap=" in repr(result)


def test_suggest_supernodes(tiny_rm, graphs):
    graph = graphs[0]
    groups = suggest_supernodes(graph, tiny_rm, top=12, threshold=0.3)
    members = [n for ids in groups.values() for n in ids]
    assert len(members) == len(set(members)) and set(members) <= set(graph.nodes.node_id)
    assert all(len(ids) >= 2 for ids in groups.values())
    everything = suggest_supernodes(graph, top=12, threshold=-1.0)
    assert len(everything) == 1 and len(next(iter(everything.values()))) == 12
    assert suggest_supernodes(graph, tiny_rm, top=12, threshold=1.01) == {}


def test_supernode_names_are_feature_labels(tiny_rm, graphs, cached):
    """With feature cards cached, a group is named by its most influential member's label."""
    graph = graphs[0]
    groups = suggest_supernodes(graph, tiny_rm, top=12, threshold=0.3)
    influence = graph.nodes.set_index("node_id")["influence"]
    assert groups
    for name, ids in groups.items():
        labels = [cached.label(*map(int, i.split("_")[:2])) for i in sorted(ids, key=lambda i: -influence[i])]
        assert name.split(" (")[0] == next(t for t in labels if t)
