"""Pruning on a grid of thresholds, precomputed for the offline viewer's sliders.

``graph.prune(t_node, t_edge)`` keeps features by cumulative influence, then edges by
cumulative edge influence, then drops nodes without a path to the targets. The viewer
cannot run it, so every ``(node[i], edge[j])`` pruning of the display graph is
run here once: per edge and node threshold ``i``, the first edge threshold ``j`` that
keeps it (``len(edge)`` if none); the kept nodes are the targets and the sources of kept
edges. The counts and replacement/completeness scores of every grid point come along.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..graph import Graph
from ..prune import scores

NODE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EDGE_GRID = (0.6, 0.7, 0.8, 0.9, 0.95)
#: Graphs with at most this many edges also get edge threshold 1 (all their edges).
MAX_EDGES = 150_000
#: The default display keeps at most this many features (by node threshold).
MAX_DEFAULT_FEATURES = 300
DEFAULT_EDGE = 0.9


def default_thresholds(graph: Graph) -> tuple[float, float]:
    """Thresholds that keep the display legible: ``(1, 1)`` for a graph of at most
    ``MAX_DEFAULT_FEATURES`` features, else the largest ``NODE_GRID`` value whose node
    pruning keeps at most that many, with edge threshold ``DEFAULT_EDGE``."""
    inf = torch.tensor(graph.nodes.loc[graph.nodes["kind"] == "feature", "influence"]
                       .fillna(0).to_numpy(), dtype=torch.float32)
    inf = inf[inf > 0].sort(descending=True).values
    if len(inf) <= MAX_DEFAULT_FEATURES:
        return 1.0, 1.0
    cum = torch.cumsum(inf, 0)
    fits = [t for t in NODE_GRID if int((cum < t * cum[-1]).sum()) + 1 <= MAX_DEFAULT_FEATURES]
    return (fits[-1] if fits else NODE_GRID[0]), DEFAULT_EDGE


@dataclass
class PruneGrid:
    """Every grid pruning of a display graph.

    Attributes:
        node, edge: the grid's node and edge thresholds.
        targets, sources: ``[E]`` rows of the edges kept at some grid point, sorted by
            target, then source.
        codes: ``[E, len(node)]`` the first ``edge`` index keeping each edge
            at each node threshold (``len(edge)``: none).
        counts: ``[len(node), len(edge), 3]`` nodes, features and edges kept.
        scores: ``[len(node), len(edge), 2]`` replacement and completeness.
        default: the grid indices ``(i, j)`` shown first.
    """

    node: tuple
    edge: tuple
    targets: np.ndarray
    sources: np.ndarray
    codes: np.ndarray
    counts: np.ndarray
    scores: np.ndarray
    default: tuple[int, int]

    def kept(self, i: int, j: int) -> np.ndarray:
        """Boolean mask of the edges kept at grid point ``(i, j)``."""
        return self.codes[:, i] <= j


def prune_grid(base: Graph) -> PruneGrid:
    """Prune ``base`` at every grid point (see the module docstring); the edge grid
    ends at 1 (all edges) for graphs of at most ``MAX_EDGES`` edges."""
    edge = EDGE_GRID + ((1.0,) if base.n_edges <= MAX_EDGES else ())
    never = len(edge)
    row = {n: r for r, n in enumerate(base.nodes["node_id"])}
    n, shape = len(base.nodes), (len(NODE_GRID), len(edge))
    code = np.full((len(NODE_GRID), n, n), never, dtype=np.uint8)
    counts, found = np.zeros(shape + (3,), dtype=np.int64), np.zeros(shape + (2,))
    for i, tn in enumerate(NODE_GRID):
        for j in reversed(range(len(edge))):
            p = base.prune(tn, edge[j])
            rows = np.array([row[x] for x in p.nodes["node_id"]])
            t, s = (p.adjacency != 0).nonzero(as_tuple=True)
            code[i, rows[t.numpy()], rows[s.numpy()]] = j
            counts[i, j] = len(p.nodes), int((p.nodes["kind"] == "feature").sum()), p.n_edges
            s_ = scores(p)
            found[i, j] = s_["replacement"], s_["completeness"]
    t, s = np.nonzero((code < never).any(0))  # row-major: sorted by target, then source
    tn, te = default_thresholds(base)
    default = (NODE_GRID.index(tn) if tn in NODE_GRID else len(NODE_GRID) - 1,
               edge.index(te) if te in edge else len(edge) - 1)
    return PruneGrid(node=NODE_GRID, edge=edge, targets=t, sources=s, codes=code[:, t, s].T.copy(), counts=counts,
                     scores=found, default=default)
