"""Influence, pruning, and the replacement and completeness scores.

All three work on the normalized absolute adjacency ``A``: each target's row of ``|edges|``
divided by its sum, so ``A[t, s]`` is the share of ``t``'s input that comes from ``s``.
The influence of a node is the weight of all paths from it to the graph's targets,
``w (A + A^2 + ...)``, with ``w`` the targets' weights (``Graph.target_weights``); the series is finite
because the graph is acyclic (sources sit at earlier layers or positions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .graph import Graph


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """``|adjacency|`` with each row divided by its sum (zero rows stay zero)."""
    a = adjacency.abs()
    return a.div_(a.sum(1, keepdim=True).clamp_min(1e-30))


def influence(A: torch.Tensor, weights: torch.Tensor, max_depth: int = 1000,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """``weights (A + A^2 + ...)``: the total path weight from each node to the weighted nodes.

    ``A`` may hold only the rows ``rows`` of the matrix (the others being zero)."""
    total = torch.zeros_like(weights)
    current = weights
    for _ in range(max_depth):
        current = current @ A if rows is None else current[rows] @ A
        if not current.any():
            break
        total = total + current
    return total


def node_influence(graph: Graph) -> torch.Tensor:
    """Each node's influence on the targets (targets get their own weight). Only the rows of
    nodes with inputs are normalized (a copy the size of those rows)."""
    w = graph.target_weights
    rows = graph.adjacency.any(1).nonzero()[:, 0]
    return influence(normalized(graph.adjacency[rows]), w, rows=rows) + w


def annotate_influence(graph: Graph) -> Graph:
    """Fill ``graph.nodes["influence"]`` with ``node_influence`` and return the graph."""
    graph.nodes["influence"] = node_influence(graph).double().numpy()
    return graph


def _cumulative_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest set of entries whose scores reach ``threshold`` of the total (scores
    are nonnegative; only the nonzero ones are sorted)."""
    flat = scores.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    nonzero = flat.nonzero()[:, 0]
    values = flat[nonzero]
    order = torch.argsort(values, descending=True)
    cum = torch.cumsum(values[order], 0)
    if not len(cum) or cum[-1] <= 0:
        return keep.view(scores.shape)
    n = int((cum < threshold * cum[-1]).sum()) + 1
    keep[nonzero[order[:n]]] = True
    return keep.view(scores.shape)


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """Keep the nodes and edges that carry the given cumulative share of influence.

    Feature nodes are kept by cumulative node influence until ``node_threshold`` of the
    total feature influence is covered; targets are always kept; embeddings and error nodes while
    they have edges. Edges are then scored by their share of the target's input times the
    target's influence and kept until ``edge_threshold`` of the total edge score is covered.
    Nodes left without a path to a target are dropped.

    Returns:
        A new ``Graph`` with the kept nodes, their kept edges and influence recomputed.
    """
    if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
        raise ValueError(
            f"Thresholds must lie in (0, 1]; got node_threshold={node_threshold}, "
            f"edge_threshold={edge_threshold}.")
    inf = node_influence(graph)
    feature = graph.mask("feature")
    targets = graph.target_mask
    keep = ~feature
    keep[feature] = _cumulative_mask(inf[feature], node_threshold)
    keep |= targets
    adj = graph.adjacency * keep[:, None] * keep[None, :]
    A = normalized(adj)
    w = graph.target_weights
    target_inf = influence(A, w) + w
    edge_scores = A * target_inf[:, None]
    adj = adj * _cumulative_mask(edge_scores, edge_threshold)
    # Drop nodes that lost their path to the targets (sources with no out-edge).
    while True:
        has_out = (adj != 0).any(0)
        drop = keep & ~targets & ~has_out
        if not drop.any():
            break
        keep &= ~drop
        adj = adj * keep[:, None] * keep[None, :]
    pruned = graph.subgraph(keep, adjacency=adj, node_threshold=node_threshold,
                            edge_threshold=edge_threshold, pruned=True)
    return annotate_influence(pruned)


def scores(graph: Graph, nodes: torch.Tensor | None = None) -> dict:
    """Replacement and completeness scores.

    * replacement: of all influence that reaches the logits from the graph's sources
      (tokens and error nodes), the share that starts at token embeddings, i.e. that passes
      through features rather than error nodes.
    * completeness: the share of each node's input edge weight that does not come from error
      nodes, averaged over nodes weighted by their influence on the logits.
    * path_length: the mean number of edges on the paths from the token embeddings to the
      logits, each path weighted by its influence (the product of its shares in ``A``); 1 is
      a direct edge, and cross-layer transcoders shorten paths.

    Args:
        graph: the graph.
        nodes: optional boolean mask of a subgraph (e.g. the pinned nodes plus logits);
            edges from nodes outside it count as unexplained, like errors.
    """
    adj = graph.adjacency
    error = graph.mask("error")
    token = graph.mask("embedding")
    if nodes is not None:
        outside = ~nodes
        error = error | (outside & ~token)
        adj = adj * (nodes | token | error)[None, :]
    A = normalized(adj)
    w = graph.target_weights
    inf, current, weighted = torch.zeros_like(w), w, 0.0
    for depth in range(1, 1001):  # influence(A, w), one path length at a time
        current = current @ A
        if not current.any():
            break
        inf += current
        weighted += depth * float(current[token].sum())
    token_inf, error_inf = inf[token].sum(), inf[error].sum()
    replacement = token_inf / (token_inf + error_inf).clamp_min(1e-30)
    non_error = 1 - A[:, error].sum(1)
    has_input = adj.abs().sum(1) > 0
    out_inf = (inf + w) * has_input
    completeness = (non_error * out_inf).sum() / out_inf.sum().clamp_min(1e-30)
    return {"replacement": float(replacement), "completeness": float(completeness),
            "path_length": weighted / max(float(token_inf), 1e-30)}
