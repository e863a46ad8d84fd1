"""Comparing attribution graphs: ``compare`` two graphs' features, and
``suggest_supernodes`` (groups of a graph's features with a shared role).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from .cards import find_examples
from .prune import influence, node_influence

__all__ = ["Comparison", "compare", "suggest_supernodes"]


def influence_of(graph) -> torch.Tensor:
    """Each node's influence: ``graph.nodes["influence"]``, computed when missing."""
    values = graph.nodes["influence"]
    if values.isna().any():
        return node_influence(graph).double()
    return torch.tensor(values.to_numpy())


def _feature_shares(graph) -> pd.DataFrame:
    """Per ``(layer, feature)`` of a graph: its share of the graph's feature influence
    (summed over positions) and its node ids."""
    nodes = graph.nodes.assign(influence=influence_of(graph).numpy())
    feats = nodes[nodes["kind"] == "feature"]
    grouped = feats.groupby(["layer", "feature"]).agg(influence=("influence", "sum"),
                                                      nodes=("node_id", list))
    total = grouped["influence"].sum()
    grouped["share"] = grouped["influence"] / total if total > 0 else 0.0
    return grouped


@dataclass
class Comparison:
    """Features two graphs share, by ``(layer, feature)`` regardless of position.

    Attributes:
        shared: DataFrame ``layer, feature, share_a, share_b, nodes_a, nodes_b`` (shares of
            each graph's total feature influence), by ``min(share_a, share_b)``.
        only_a / only_b: DataFrames ``layer, feature, share, nodes`` of the others.
        overlap: influence-weighted overlap, ``sum over shared of min(share_a, share_b)``:
            1 for graphs with the same features in the same proportions, 0 for none shared.
        jaccard: unweighted ``|shared| / |union|``.
    """

    shared: pd.DataFrame
    only_a: pd.DataFrame
    only_b: pd.DataFrame
    overlap: float
    jaccard: float

    def __repr__(self) -> str:
        return (f"Comparison(overlap={self.overlap:.3f}, jaccard={self.jaccard:.3f}, "
                f"{len(self.shared)} shared, {len(self.only_a)} only in a, {len(self.only_b)} only in b)")


def compare(graph_a, graph_b) -> Comparison:
    """Shared and unique features of two graphs, and their influence-weighted overlap.

    Features are matched by ``(layer, feature)``, ignoring positions; each feature's weight
    is its share of its graph's total feature influence (``graph.nodes.influence``, computed
    if missing). Use it on graphs of the same transcoders, e.g. one prompt in two languages.
    """
    a, b = _feature_shares(graph_a), _feature_shares(graph_b)
    both = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")
    both["weight"] = np.minimum(both["share_a"], both["share_b"])
    shared = both.sort_values("weight", ascending=False)[
        ["share_a", "share_b", "nodes_a", "nodes_b"]].reset_index()
    only = lambda x, y: x[~x.index.isin(y.index)].sort_values("share", ascending=False)[  # noqa: E731
        ["share", "nodes"]].reset_index()
    union = len(a.index.union(b.index))
    return Comparison(shared, only(a, b), only(b, a), float(both["weight"].sum()),
                      len(both) / union if union else 0.0)


def _effect_profiles(graph, rows: torch.Tensor) -> torch.Tensor:
    """Per node in ``rows``: its signed path effect on each logit target, then its direct
    share of every target's input; each part scaled to unit norm."""
    adj = graph.adjacency.float()
    A = adj / adj.abs().sum(1, keepdim=True).clamp_min(1e-30)
    logits = graph.mask("logit").nonzero()[:, 0]
    paths = influence(A, torch.eye(len(A))[logits]).T[rows]
    direct = A[:, rows].T
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return torch.cat([unit(paths), unit(direct)], 1) / 2 ** 0.5


def suggest_supernodes(graph, rm=None, *, top: int = 40, threshold: float = 0.5,
                       min_size: int = 2) -> dict[str, list[str]]:
    """Suggest supernodes: groups of a graph's most influential features with a shared role.

    Features are compared by their effect on targets (signed path effect on each logit and
    direct share of each node's input; cosine similarity) and, given ``rm``, by their
    decoder directions (cosine similarity, averaged with the first). Average-linkage
    clustering cuts at ``threshold``.

    Args:
        graph: the graph (pruned or not).
        rm: the ``ReplacementModel``, for decoder similarity and names from output tokens.
        top: how many of the most influential features to consider.
        threshold: the similarity a group's members need on average.
        min_size: the smallest group to suggest.

    Returns:
        ``{name: [node_id, ...]}`` as the explorer's ``view.supernodes``; names come from the
        automatic label of the group's most influential member, its top output tokens (with
        ``rm``) or its layers and token.
    """
    feats = graph.mask("feature").nonzero()[:, 0]
    rows = feats[influence_of(graph)[feats].argsort(descending=True)[:top]]  # most influential first
    if len(rows) < max(min_size, 2):
        return {}
    profiles = _effect_profiles(graph, rows)
    sim = profiles @ profiles.T
    nodes = graph.nodes.iloc[rows.numpy()]
    if rm is not None:
        dirs = _decoder_rows(rm, nodes)
        sim = (sim + dirs @ dirs.T) / 2
    dist = (1 - sim).clamp_min(0).double().numpy()
    labels = fcluster(linkage(dist[np.triu_indices(len(dist), 1)], "average"), 1 - threshold, "distance")
    groups = {}
    for label in np.unique(labels):
        members = nodes[labels == label]
        if len(members) >= min_size:
            name = _group_name(rm, graph, members, groups)
            groups[name] = members["node_id"].tolist()
    return groups


def _decoder_rows(rm, nodes: pd.DataFrame) -> torch.Tensor:
    """Unit decoder directions of the feature nodes."""
    rows = torch.stack([rm.decoder(l)[f].detach().float()
                        for l, f in zip(nodes["layer"], nodes["feature"])])
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _group_name(rm, graph, members: pd.DataFrame, taken: dict) -> str:
    """A readable, unused name for a group of feature nodes: the automatic label of its most
    influential labelled member, else its top output tokens (with ``rm``), else its layers
    and token."""
    examples = find_examples(rm)[0] if rm is not None else None
    labels = [examples.label(l, f) for l, f in zip(members["layer"], members["feature"])] if examples else []
    if any(labels):
        name = next(t for t in labels if t)
    elif rm is not None:
        direction = _decoder_rows(rm, members).sum(0)
        effect = direction.to(rm.model.W_U.dtype) @ rm.unembedding()
        name = "/".join(s.strip() or repr(s) for s in rm.token_strs(effect.topk(2).indices))
    else:
        token = graph.token_strs[int(members["pos"].mode()[0])]
        name = f"L{members['layer'].min()}-{members['layer'].max()} {token.strip() or repr(token)}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base} ({n})", n + 1
    return name
